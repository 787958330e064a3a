//! The approximate-nearest-neighbour part of a knowledge index: a usearch HNSW graph over
//! cosine distance, keyed by the row store's `u64` keys.
//!
//! usearch trusts its caller: a vector of the wrong length is undefined behaviour, adding past
//! the reserved capacity fails, growing the capacity must not overlap any other call, and each
//! concurrent call needs one of the thread contexts reserved ahead. This wrapper checks lengths,
//! grows capacity itself (exclusively, while searches and inserts share the graph), and hands
//! out the reserved contexts, so any number of threads may search while a commit inserts.

use std::path::Path;
use std::sync::{Condvar, Mutex, RwLock};

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

/// A usearch HNSW index with checked dimensions and automatic capacity growth, safe to search,
/// insert into and remove from concurrently.
pub struct AnnIndex {
    index: usearch::Index,
    dimensions: usize,
    /// Growing the capacity holds it for writing; every other call for reading.
    growth: RwLock<()>,
    /// The thread contexts usearch reserved: each call holds one while it runs.
    contexts: Contexts,
}

/// A counting semaphore over usearch's reserved thread contexts (a call beyond them would fail
/// with "Reserve capacity ahead of searches").
struct Contexts {
    free: Mutex<usize>,
    released: Condvar,
}

/// One thread context, held for the duration of a usearch call.
struct ContextGuard<'a>(&'a Contexts);

impl Contexts {
    fn new(count: usize) -> Self {
        Contexts {
            free: Mutex::new(count),
            released: Condvar::new(),
        }
    }

    fn acquire(&self) -> ContextGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.released.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        ContextGuard(self)
    }
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.released.notify_one();
    }
}

impl std::fmt::Debug for AnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnnIndex")
            .field("dimensions", &self.dimensions)
            .field("size", &self.index.size())
            .finish()
    }
}

/// Concurrent calls usearch keeps scratch space for (more wait for a free one).
fn search_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()).max(8) * 2
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
        let ann = AnnIndex {
            index,
            dimensions,
            growth: RwLock::new(()),
            contexts: Contexts::new(search_threads()),
        };
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

    /// Writes the index to `path` (searches go on meanwhile).
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let path_str = path
            .to_str()
            .ok_or_else(|| IndexError::Invalid(format!("non-UTF-8 path {}", path.display())))?;
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        self.index.save(path_str).map_err(ann_error)
    }

    /// The index as [`AnnIndex::save`] writes it, in memory (a copy taken in one step, so the
    /// caller can write it out while inserts go on).
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>, IndexError> {
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        let mut buffer = vec![0u8; self.index.serialized_length()];
        self.index.save_to_buffer(&mut buffer).map_err(ann_error)?;
        Ok(buffer)
    }

    /// Grows the capacity to `capacity`, waiting for running calls and holding new ones back
    /// meanwhile (usearch reallocates its tables).
    fn reserve(&self, capacity: usize) -> Result<(), IndexError> {
        let _exclusive = self.growth.write().unwrap_or_else(|e| e.into_inner());
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
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        let add_all = |part: &[(u64, &[f32])]| {
            let _context = self.contexts.acquire();
            part.iter()
                .try_for_each(|(key, vector)| self.index.add(*key, vector).map_err(ann_error))
        };
        if threads <= 1 || items.len() < 256 {
            return add_all(items);
        }
        let chunk = items.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = items
                .chunks(chunk)
                .map(|part| scope.spawn(move || add_all(part)))
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(IndexError::Ann("insert thread panicked".into())))
            })
        })
    }

    /// Removes `key` (no-op when absent).
    pub fn remove(&self, key: u64) -> Result<(), IndexError> {
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        let _context = self.contexts.acquire();
        self.index.remove(key).map(|_| ()).map_err(ann_error)
    }

    /// The `k` nearest vectors to `query` whose keys pass `filter` (all keys when `None`).
    /// `k` is capped at the vectors held, so a huge `k` reserves nothing.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<Hit>, IndexError> {
        self.check_vector(query)?;
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        let k = k.min(self.index.size());
        if k == 0 {
            return Ok(Vec::new());
        }
        let _context = self.contexts.acquire();
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

    /// Whether the index holds a vector for `key`.
    pub fn contains(&self, key: u64) -> bool {
        let _shared = self.growth.read().unwrap_or_else(|e| e.into_inner());
        self.index.contains(key)
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
