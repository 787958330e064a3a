//! The approximate-nearest-neighbour part of a knowledge index: a usearch HNSW graph over
//! cosine distance, keyed by the row store's `u64` keys.
//!
//! usearch trusts its caller: a vector of the wrong length is undefined behaviour and adding
//! past the reserved capacity fails. This wrapper checks lengths and grows capacity itself.

use std::path::Path;

use serde::{Deserialize, Serialize};
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

use crate::IndexError;

/// How vectors are stored inside the ANN graph (the row store always keeps full `f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 32-bit floats: exact distances, 4 bytes a dimension.
    #[default]
    F32,
    /// 16-bit floats: half the memory, near-identical recall.
    F16,
    /// 8-bit integers: a quarter of the memory, for unit-length (cosine) vectors.
    I8,
}

impl Quantization {
    /// Parses `f32`, `f16` or `i8`.
    pub fn parse(s: &str) -> Result<Self, IndexError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Quantization::F32),
            "f16" => Ok(Quantization::F16),
            "i8" => Ok(Quantization::I8),
            other => Err(IndexError::Invalid(format!(
                "unknown quantization '{other}': use f32, f16 or i8"
            ))),
        }
    }

    fn scalar_kind(self) -> ScalarKind {
        match self {
            Quantization::F32 => ScalarKind::F32,
            Quantization::F16 => ScalarKind::F16,
            Quantization::I8 => ScalarKind::I8,
        }
    }
}

/// One match of a search: the row key and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Row key.
    pub key: u64,
    /// Cosine similarity (1 − cosine distance); higher is closer.
    pub score: f32,
}

/// A usearch HNSW index with checked dimensions and automatic capacity growth.
pub struct AnnIndex {
    index: usearch::Index,
    dimensions: usize,
}

impl std::fmt::Debug for AnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnnIndex")
            .field("dimensions", &self.dimensions)
            .field("size", &self.index.size())
            .finish()
    }
}

/// Concurrent searches usearch keeps scratch space for.
fn search_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()).max(4) * 2
}

impl AnnIndex {
    /// An empty index for `dimensions`-long vectors.
    pub fn new(dimensions: usize, quantization: Quantization) -> Result<Self, IndexError> {
        let options = IndexOptions {
            dimensions,
            metric: MetricKind::Cos,
            quantization: quantization.scalar_kind(),
            connectivity: 0,
            expansion_add: 0,
            expansion_search: 0,
            multi: false,
        };
        let index = usearch::Index::new(&options).map_err(ann_error)?;
        let ann = AnnIndex { index, dimensions };
        ann.reserve(1024)?;
        Ok(ann)
    }

    /// Loads an index saved by [`AnnIndex::save`], checking its dimensions.
    pub fn load(path: &Path, dimensions: usize, quantization: Quantization) -> Result<Self, IndexError> {
        let ann = AnnIndex::new(dimensions, quantization)?;
        let path_str = path
            .to_str()
            .ok_or_else(|| IndexError::Invalid(format!("non-UTF-8 path {}", path.display())))?;
        let meta = usearch::Index::metadata(path_str).map_err(ann_error)?;
        if meta.dimensions as usize != dimensions {
            return Err(IndexError::Invalid(format!(
                "{} holds {}-dimensional vectors, the manifest says {dimensions}",
                path.display(),
                meta.dimensions
            )));
        }
        ann.index.load(path_str).map_err(ann_error)?;
        ann.reserve(ann.index.size() + 1024)?;
        Ok(ann)
    }

    /// Writes the index to `path`.
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let path_str = path
            .to_str()
            .ok_or_else(|| IndexError::Invalid(format!("non-UTF-8 path {}", path.display())))?;
        self.index.save(path_str).map_err(ann_error)
    }

    fn reserve(&self, capacity: usize) -> Result<(), IndexError> {
        self.index
            .reserve_capacity_and_threads(capacity, search_threads())
            .map_err(ann_error)
    }

    /// Checks a vector before it reaches usearch.
    pub fn check_vector(&self, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dimensions {
            return Err(IndexError::DimensionMismatch {
                expected: self.dimensions,
                found: vector.len(),
            });
        }
        if vector.iter().any(|x| !x.is_finite()) {
            return Err(IndexError::Invalid("vector holds NaN or infinite values".into()));
        }
        Ok(())
    }

    /// Adds many vectors at once, on all cores (usearch inserts concurrently once capacity and
    /// thread slots are reserved). Every vector is checked before any is added.
    pub fn add_many(&self, items: &[(u64, &[f32])]) -> Result<(), IndexError> {
        for (_, vector) in items {
            self.check_vector(vector)?;
        }
        let needed = self.index.size() + items.len();
        if needed > self.index.capacity() {
            self.reserve(needed.max(self.index.capacity() * 2))?;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(search_threads());
        if threads <= 1 || items.len() < 256 {
            return items
                .iter()
                .try_for_each(|(key, vector)| self.index.add(*key, vector).map_err(ann_error));
        }
        let chunk = items.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = items
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .try_for_each(|(key, vector)| self.index.add(*key, vector).map_err(ann_error))
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(IndexError::Ann("insert thread panicked".into())))
            })
        })
    }

    /// Removes `key` (no-op when absent).
    pub fn remove(&self, key: u64) -> Result<(), IndexError> {
        self.index.remove(key).map(|_| ()).map_err(ann_error)
    }

    /// The `k` nearest vectors to `query` whose keys pass `filter` (all keys when `None`).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<Hit>, IndexError> {
        self.check_vector(query)?;
        if k == 0 || self.index.size() == 0 {
            return Ok(Vec::new());
        }
        let matches = match filter {
            None => self.index.search(query, k),
            Some(f) => self.index.filtered_search(query, k, f),
        }
        .map_err(ann_error)?;
        Ok(matches
            .keys
            .into_iter()
            .zip(matches.distances)
            .map(|(key, distance)| Hit {
                key,
                score: 1.0 - distance,
            })
            .collect())
    }

    /// Vectors in the index.
    pub fn len(&self) -> usize {
        self.index.size()
    }

    /// Whether the index holds no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vectors the index can hold before it grows.
    pub fn capacity(&self) -> usize {
        self.index.capacity()
    }

    /// Bytes usearch holds for the graph and vectors.
    pub fn memory_usage(&self) -> usize {
        self.index.memory_usage()
    }
}

fn ann_error(e: impl std::fmt::Display) -> IndexError {
    IndexError::Ann(e.to_string())
}
