//! Clusters of a Meta-Knowledge index: sizes and centroids (of the metadata clusters,
//! recomputed from the questions after every commit, which is cheap; topics keep theirs, see
//! [`super::topics`]) and summaries (expensive, so persisted and rewritten
//! only when a cluster has changed enough or its summary grew old).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};

use mkflow_index::{IndexError, vector_values};
use mkflow_udfs::mk::ClusterKind;

/// When a summary is rewritten.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SummaryPolicy {
    /// Rewrite once the cluster's question count changed by this fraction since the summary.
    pub growth: f64,
    /// ... or once the summary is older than this (milliseconds) and the questions changed.
    pub max_age_ms: i64,
}

/// A cluster's persisted summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The Meta-Knowledge summary.
    pub text: String,
    /// 1 for the first summary, +1 for each rewrite.
    pub version: u64,
    /// When it was written (milliseconds since the Unix epoch).
    pub written_at_ms: i64,
    /// The cluster's question count when it was written.
    pub questions: usize,
    /// The generator that wrote it.
    pub generator: String,
}

/// A cluster's current state.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The cluster key.
    pub name: String,
    /// A metadata cluster or a topic.
    pub kind: ClusterKind,
    /// Documents in it.
    pub documents: usize,
    /// Synthetic questions in it.
    pub questions: usize,
    /// Normalised mean of its question vectors (empty when it has none).
    pub centroid: Vec<f32>,
    /// Its summary, once written.
    pub summary: Option<Summary>,
}

impl Cluster {
    /// Whether `policy` asks for a new summary at `now_ms`.
    pub fn needs_summary(&self, policy: &SummaryPolicy, now_ms: i64) -> bool {
        if self.questions == 0 {
            return false;
        }
        let Some(summary) = &self.summary else {
            return true;
        };
        let changed = self.questions.abs_diff(summary.questions);
        let grew_enough = changed as f64 >= policy.growth * summary.questions.max(1) as f64 && changed > 0;
        let too_old = now_ms - summary.written_at_ms > policy.max_age_ms && changed > 0;
        grew_enough || too_old
    }
}

/// The persisted summaries of an index's clusters (`clusters.json`, replaced atomically).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SummaryFile {
    /// Summary per cluster key.
    pub summaries: BTreeMap<String, Summary>,
}

impl SummaryFile {
    /// Reads the file (empty when absent).
    pub fn read(path: &Path) -> Result<Self, IndexError> {
        read_json(path)
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), IndexError> {
        write_json(path, self)
    }
}

/// Reads a JSON file of the index (the default value when absent; an error naming the file
/// when it is damaged).
pub fn read_json<T: Default + serde::de::DeserializeOwned>(path: &Path) -> Result<T, IndexError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| IndexError::Invalid(format!("{} is damaged: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(IndexError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Writes a JSON file of the index atomically (temporary file, then rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), IndexError> {
    let temporary: PathBuf = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).expect("index files serialise");
    std::fs::write(&temporary, text)
        .and_then(|_| std::fs::rename(&temporary, path))
        .map_err(|e| IndexError::Io {
            path: path.to_path_buf(),
            source: e,
        })
}

/// A cluster's size and centroid, as computed from the rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterShape {
    /// Documents in the cluster.
    pub documents: usize,
    /// Questions in the cluster.
    pub questions: usize,
    /// Normalised mean of the question vectors (empty when there are none).
    pub centroid: Vec<f32>,
}

/// Sizes and centroids of clusters from the question rows (their cluster and vector columns
/// at the given positions) and the document rows (their cluster column).
pub fn cluster_shapes(
    questions: &[RecordBatch],
    (cluster_column, vector_column): (usize, usize),
    documents: &[RecordBatch],
    document_cluster_column: usize,
    dimensions: usize,
) -> HashMap<String, ClusterShape> {
    let mut shapes: HashMap<String, ClusterShape> = HashMap::new();
    fn shape<'a>(shapes: &'a mut HashMap<String, ClusterShape>, name: &str, dimensions: usize) -> &'a mut ClusterShape {
        shapes.entry(name.to_string()).or_insert_with(|| ClusterShape {
            centroid: vec![0.0; dimensions],
            ..Default::default()
        })
    }
    for batch in questions {
        let clusters = batch.column(cluster_column).as_string::<i32>();
        let vectors = batch.column(vector_column);
        let values = vector_values(vectors);
        for row in 0..batch.num_rows() {
            let name = if clusters.is_valid(row) {
                clusters.value(row)
            } else {
                ""
            };
            let entry = shape(&mut shapes, name, dimensions);
            entry.questions += 1;
            if vectors.is_valid(row) {
                let vector = &values[row * dimensions..(row + 1) * dimensions];
                entry.centroid.iter_mut().zip(vector).for_each(|(s, v)| *s += v);
            }
        }
    }
    for batch in documents {
        let Ok(clusters) = datafusion::arrow::compute::cast(batch.column(document_cluster_column), &DataType::Utf8)
        else {
            continue;
        };
        let clusters = clusters.as_string::<i32>();
        for row in (0..batch.num_rows()).filter(|&r| clusters.is_valid(r)) {
            shape(&mut shapes, clusters.value(row), dimensions).documents += 1;
        }
    }
    for entry in shapes.values_mut() {
        let norm = entry.centroid.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            entry.centroid.iter_mut().for_each(|x| *x /= norm);
        } else {
            entry.centroid.clear();
        }
    }
    shapes
}
