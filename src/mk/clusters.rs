//! Clusters of a Meta-Knowledge index: sizes and centroids (the metadata clusters' kept by
//! running totals, see [`super::tally`]; topics keep theirs, see [`super::topics`]) and summaries (expensive, so persisted and rewritten
//! only when a cluster has changed enough or its summary grew old).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use mkflow_index::IndexError;
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

/// A metadata cluster's size and centroid.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterShape {
    /// Documents in the cluster.
    pub documents: usize,
    /// Questions in the cluster.
    pub questions: usize,
    /// Normalised mean of the question vectors (empty when there are none).
    pub centroid: Vec<f32>,
}
