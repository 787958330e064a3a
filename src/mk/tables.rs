//! `<kb>_clusters`: the clusters of a Meta-Knowledge index (`kind`: `metadata` or `topic`),
//! with their summaries, versions and ages.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::Result;
use mkflow_index::vectors_to_array;

use super::{CLUSTER_COLUMN, MkIndex};
use crate::support::batch_table::Snapshot;
use crate::support::now_ms;

/// Schema of the clusters table.
fn clusters_schema(dimensions: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(CLUSTER_COLUMN, DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("documents", DataType::UInt64, false),
        Field::new("questions", DataType::UInt64, false),
        Field::new("summary", DataType::Utf8, true),
        Field::new("summary_version", DataType::UInt64, false),
        Field::new("summarized_at", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        Field::new("summary_age_seconds", DataType::Float64, true),
        Field::new("questions_since_summary", DataType::Int64, false),
        Field::new("summary_generator", DataType::Utf8, true),
        Field::new("centroid", mkflow_index::vector_type(dimensions), true),
    ]))
}

/// The clusters table of one index.
#[derive(Debug)]
pub struct ClustersTable {
    mk: Arc<MkIndex>,
    schema: SchemaRef,
}

impl ClustersTable {
    /// The table over `mk`'s clusters.
    pub fn new(mk: Arc<MkIndex>) -> Self {
        let schema = clusters_schema(mk.questions().manifest().dimensions);
        ClustersTable { mk, schema }
    }

    fn batch(&self) -> Result<RecordBatch> {
        let clusters = self.mk.clusters();
        let now = now_ms();
        let dims = self.mk.questions().manifest().dimensions;
        let summary = |f: &dyn Fn(&super::Summary) -> i64| -> Vec<Option<i64>> {
            clusters.iter().map(|c| c.summary.as_ref().map(f)).collect()
        };
        let mut vectors = Vec::with_capacity(clusters.len() * dims);
        for c in &clusters {
            if c.centroid.len() == dims {
                vectors.extend_from_slice(&c.centroid);
            } else {
                vectors.extend(std::iter::repeat_n(0.0, dims));
            }
        }
        let present: Vec<bool> = clusters.iter().map(|c| c.centroid.len() == dims).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(clusters.iter().map(|c| c.name.as_str()))),
            Arc::new(StringArray::from_iter_values(
                clusters.iter().map(|c| c.kind.to_string()),
            )),
            Arc::new(UInt64Array::from_iter_values(
                clusters.iter().map(|c| c.documents as u64),
            )),
            Arc::new(UInt64Array::from_iter_values(
                clusters.iter().map(|c| c.questions as u64),
            )),
            Arc::new(StringArray::from(
                clusters
                    .iter()
                    .map(|c| c.summary.as_ref().map(|s| s.text.as_str()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from_iter_values(
                clusters.iter().map(|c| c.summary.as_ref().map_or(0, |s| s.version)),
            )),
            Arc::new(TimestampMillisecondArray::from(summary(&|s| s.written_at_ms))),
            Arc::new(Float64Array::from(
                summary(&|s| now - s.written_at_ms)
                    .into_iter()
                    .map(|ms| ms.map(|ms| ms as f64 / 1000.0))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from_iter_values(clusters.iter().map(|c| {
                c.questions as i64 - c.summary.as_ref().map_or(0, |s| s.questions as i64)
            }))),
            Arc::new(StringArray::from(
                clusters
                    .iter()
                    .map(|c| c.summary.as_ref().map(|s| s.generator.as_str()))
                    .collect::<Vec<_>>(),
            )),
            vectors_to_array(vectors, present, dims)?,
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// The clusters as they are when the scan starts.
impl Snapshot for ClustersTable {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn snapshot(&self) -> Result<RecordBatch> {
        self.batch()
    }
}
