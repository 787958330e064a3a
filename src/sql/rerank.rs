//! `rerank => N` on `hybrid_search` (and `qa_hybrid_search`, `chunk_hybrid_search`): the top
//! `N` rows of the fused list are scored by a cross-encoder against the query and put in that
//! order (a `rerank_score` column says the score; rows below `N` keep their fused order after
//! them, with a NULL score).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float32Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, Result};
use mkflow_udfs::rerank::LazyReranker;

/// The column holding the cross-encoder's score.
pub const RERANK_SCORE_COLUMN: &str = "rerank_score";

/// Reordering the top of a list with a cross-encoder.
#[derive(Debug, Clone)]
pub struct RerankStep {
    /// Rows reranked, from the top.
    pub depth: usize,
    /// The query the rows are scored against.
    pub query: String,
    /// The columns read as each row's text, joined by ". " (NULLs skipped).
    pub columns: Vec<String>,
    /// The cross-encoder.
    pub model: Arc<LazyReranker>,
}

impl RerankStep {
    /// `schema` with the `rerank_score` column appended.
    pub fn schema(schema: &Schema) -> SchemaRef {
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(RERANK_SCORE_COLUMN, DataType::Float32, true));
        Arc::new(Schema::new(fields))
    }

    /// The text of each of the first `rows` rows of `batch`.
    fn texts(&self, batch: &RecordBatch, rows: usize) -> Result<Vec<String>> {
        let mut texts = vec![String::new(); rows];
        for name in &self.columns {
            let Some(column) = batch.column_by_name(name) else {
                continue;
            };
            let column = cast(column, &DataType::Utf8)?;
            let column = column.as_string::<i32>();
            for (row, text) in texts.iter_mut().enumerate() {
                if column.is_valid(row) && !column.value(row).trim().is_empty() {
                    if !text.is_empty() {
                        text.push_str(". ");
                    }
                    text.push_str(column.value(row).trim());
                }
            }
        }
        Ok(texts)
    }

    /// `batch` (rows best first) with its top rows reordered by the cross-encoder, at most
    /// `limit` rows kept, and `rerank_score` appended.
    pub async fn apply(&self, batch: RecordBatch, limit: Option<usize>) -> Result<RecordBatch> {
        let reranked = self.depth.min(batch.num_rows());
        let texts = self.texts(&batch, reranked)?;
        let scores = self
            .model
            .score_blocking(self.query.clone(), texts)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut order: Vec<usize> = (0..reranked).collect();
        // Stable: equal scores keep their fused order.
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.extend(reranked..batch.num_rows());
        order.truncate(limit.unwrap_or(usize::MAX));
        let indices = UInt32Array::from_iter_values(order.iter().map(|&i| i as u32));
        let mut columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<std::result::Result<_, _>>()?;
        columns.push(Arc::new(Float32Array::from_iter(
            order.iter().map(|&i| scores.get(i).copied()),
        )));
        Ok(RecordBatch::try_new(Self::schema(&batch.schema()), columns)?)
    }
}
