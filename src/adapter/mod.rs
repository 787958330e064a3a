//! Query adapters: a linear map on a text query's embedding, learnt per knowledge index from its
//! own synthetic question → document pairs (`mkflow train queries`), so that queries land nearer
//! their documents while the stored document vectors stay valid: nothing is re-embedded.
//!
//! - [`QueryAdapter`]: the matrix and what its training measured, stored in the index's
//!   directory ([`ADAPTER_FILE`], written atomically) and applied to every text query that
//!   searches the index's documents (`vector_search`, `hybrid_search`, the documents' own
//!   rankings in `mk_search`) — not to `qa_search`, whose questions are queries themselves.
//! - [`Adapters`]: the adapters of the indexes searched, reloaded when their file changes, so a
//!   running server picks up a training without a restart.
//! - [`train`]: the training (InfoNCE over in-batch and mined hard negatives, early stopping on
//!   held-out questions); [`data`]: reading the pairs out of an index.

pub mod data;
pub mod train;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use mkflow_index::KnowledgeIndex;

/// The adapter's file in an index directory.
pub const ADAPTER_FILE: &str = "query_adapter.bin";

/// The first bytes of an adapter file (and its format version).
const MAGIC: &[u8; 8] = b"MKQADPT1";

/// How well the index's held-out synthetic questions find their documents (exact search over
/// every document).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScores {
    /// Mean reciprocal rank of the question's document, 0 below rank 10.
    pub mrr_at_10: f64,
    /// Share of questions whose document is in the top 10.
    pub recall_at_10: f64,
}

/// What an adapter was trained on and what it measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// The embedding model whose query vectors it maps (the index's).
    pub model: String,
    /// The vectors' dimension.
    pub dimensions: usize,
    /// Questions it was trained on.
    pub trained_questions: usize,
    /// Questions held out to stop the training.
    pub held_out_questions: usize,
    /// The held-out questions' scores without the adapter.
    pub before: HeldOutScores,
    /// The held-out questions' scores with it.
    pub after: HeldOutScores,
    /// Passes over the training questions, and the one whose matrix was kept.
    pub epochs: usize,
    /// The pass kept (the best held-out MRR@10).
    pub best_epoch: usize,
    /// When it was trained (milliseconds since the Unix epoch).
    pub trained_at_ms: i64,
}

/// Why an adapter file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not an adapter of this format.
    #[error("{path} is not a query adapter file ({message}; hint: train it again with `mkflow train queries`)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A learnt linear map `q ↦ W q / |W q|` on query vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryAdapter {
    /// What it was trained on and measured.
    pub info: AdapterInfo,
    /// `W`, row-major, `dimensions × dimensions`.
    matrix: Vec<f32>,
}

impl QueryAdapter {
    /// An adapter with `matrix` (row-major, `info.dimensions` squared values).
    pub fn new(info: AdapterInfo, matrix: Vec<f32>) -> Self {
        assert_eq!(matrix.len(), info.dimensions * info.dimensions, "a square matrix");
        QueryAdapter { info, matrix }
    }

    /// The matrix, row-major.
    pub fn matrix(&self) -> &[f32] {
        &self.matrix
    }

    /// `query` mapped and scaled to unit length. A vector of another dimension is returned as
    /// it is (the caller's dimension check refuses it).
    pub fn apply(&self, query: &[f32]) -> Vec<f32> {
        let d = self.info.dimensions;
        if query.len() != d {
            return query.to_vec();
        }
        let mut out: Vec<f32> = self
            .matrix
            .chunks_exact(d)
            .map(|row| row.iter().zip(query).map(|(w, q)| w * q).sum())
            .collect();
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|x| *x /= norm);
        }
        out
    }

    /// Writes the adapter into index directory `dir`, atomically (a temporary file, fsynced,
    /// renamed over the old one).
    pub fn save(&self, dir: &Path) -> Result<(), AdapterError> {
        let path = dir.join(ADAPTER_FILE);
        let io = |source| AdapterError::Io {
            path: path.clone(),
            source,
        };
        let info = serde_json::to_vec(&self.info).expect("the adapter's description serialises");
        let mut bytes = Vec::with_capacity(16 + info.len() + self.matrix.len() * 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(info.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&info);
        self.matrix
            .iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
        let temporary = dir.join(format!("{ADAPTER_FILE}.tmp"));
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Reads the adapter of index directory `dir`; `None` when it has none.
    pub fn load(dir: &Path) -> Result<Option<QueryAdapter>, AdapterError> {
        let path = dir.join(ADAPTER_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AdapterError::Io { path, source }),
        };
        let invalid = |message: &str| AdapterError::Invalid {
            path: path.clone(),
            message: message.to_string(),
        };
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(invalid("no adapter header"));
        }
        let info_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let info_end = 16usize.checked_add(info_len).filter(|&e| e <= bytes.len());
        let info_end = info_end.ok_or_else(|| invalid("truncated description"))?;
        let info: AdapterInfo =
            serde_json::from_slice(&bytes[16..info_end]).map_err(|e| invalid(&format!("bad description: {e}")))?;
        let values = &bytes[info_end..];
        let expected = info
            .dimensions
            .checked_mul(info.dimensions)
            .and_then(|n| n.checked_mul(4));
        if expected != Some(values.len()) {
            return Err(invalid(&format!(
                "{} bytes of matrix for {} dimensions",
                values.len(),
                info.dimensions
            )));
        }
        let matrix = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Ok(Some(QueryAdapter { info, matrix }))
    }

    /// Removes the adapter of index directory `dir`; whether there was one.
    pub fn remove(dir: &Path) -> Result<bool, AdapterError> {
        let path = dir.join(ADAPTER_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(AdapterError::Io { path, source }),
        }
    }
}

/// The adapters of the indexes searched, by index directory: read when first needed and again
/// when the file's modification time changes (one `stat` per search).
#[derive(Debug, Default)]
pub struct Adapters {
    loaded: Mutex<HashMap<PathBuf, Loaded>>,
}

/// An adapter file as last read.
#[derive(Debug, Clone)]
struct Loaded {
    modified: Option<SystemTime>,
    adapter: Option<Arc<QueryAdapter>>,
}

impl Adapters {
    /// The adapter to apply to text queries searching `index`'s rows, if it has a usable one.
    /// One trained for another model or dimension (the index was rebuilt since) is left out
    /// with a warning, and so is an unreadable file.
    pub fn of(&self, index: &KnowledgeIndex) -> Option<Arc<QueryAdapter>> {
        let dir = index.dir();
        let modified = std::fs::metadata(dir.join(ADAPTER_FILE))
            .and_then(|m| m.modified())
            .ok();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = loaded.get(dir)
            && known.modified == modified
        {
            return known.adapter.clone();
        }
        let adapter = match modified.map(|_| QueryAdapter::load(dir)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(adapter))) => {
                let manifest = index.manifest();
                if adapter.info.model == manifest.model && adapter.info.dimensions == manifest.dimensions {
                    Some(Arc::new(adapter))
                } else {
                    log::warn!(
                        "{}: query adapter trained for model '{}' ({} dimensions), the index now uses '{}' ({}); not applied (hint: `mkflow train queries` again)",
                        dir.display(),
                        adapter.info.model,
                        adapter.info.dimensions,
                        manifest.model,
                        manifest.dimensions
                    );
                    None
                }
            }
            Some(Err(e)) => {
                log::warn!("{e}; searches run without it");
                None
            }
        };
        loaded.insert(
            dir.to_path_buf(),
            Loaded {
                modified,
                adapter: adapter.clone(),
            },
        );
        adapter
    }

    /// `query` as it searches `index`'s rows: through the index's adapter when it has one.
    pub fn adapt(&self, index: &KnowledgeIndex, query: Vec<f32>) -> Vec<f32> {
        match self.of(index) {
            Some(adapter) => adapter.apply(&query),
            None => query,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dimensions: usize) -> AdapterInfo {
        let scores = HeldOutScores {
            mrr_at_10: 0.5,
            recall_at_10: 0.7,
        };
        AdapterInfo {
            model: "m".into(),
            dimensions,
            trained_questions: 9,
            held_out_questions: 1,
            before: scores,
            after: scores,
            epochs: 2,
            best_epoch: 1,
            trained_at_ms: 7,
        }
    }

    #[test]
    fn an_adapter_maps_normalises_and_round_trips_through_its_file() {
        let adapter = QueryAdapter::new(info(2), vec![0.0, 2.0, 1.0, 0.0]);
        assert_eq!(adapter.apply(&[3.0, 0.0]), vec![0.0, 1.0]);
        assert_eq!(adapter.apply(&[1.0, 2.0, 3.0]), vec![1.0, 2.0, 3.0]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(QueryAdapter::load(dir.path()).unwrap(), None);
        adapter.save(dir.path()).unwrap();
        assert_eq!(QueryAdapter::load(dir.path()).unwrap(), Some(adapter));
        assert!(QueryAdapter::remove(dir.path()).unwrap());
        assert!(!QueryAdapter::remove(dir.path()).unwrap());
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        QueryAdapter::new(info(2), vec![1.0, 0.0, 0.0, 1.0])
            .save(dir.path())
            .unwrap();
        let path = dir.path().join(ADAPTER_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = QueryAdapter::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(ADAPTER_FILE) && err.contains("bytes of matrix"), "{err}");
        std::fs::write(&path, b"not an adapter").unwrap();
        let err = QueryAdapter::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no adapter header"), "{err}");
    }
}
