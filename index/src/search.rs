//! Vector search over a knowledge index, with row filters evaluated inside the search.
//!
//! A search reads the state published when it starts (see [`crate::state`]): a commit running
//! meanwhile changes nothing it sees. `k` is capped at the rows that can answer, so a huge `k`
//! costs no more than the index.
//!
//! A filter is evaluated once over the row store into a set of allowed keys. When few rows
//! pass, the search is exact over those rows (cheaper and exact); otherwise usearch's filtered
//! HNSW search consults the set at every step. Should the graph walk still come back short of
//! `k` while at least `k` rows pass, the exact search over the passing rows fills the answer,
//! so a query asking for `k` rows gets `k` whenever `k` rows match.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Float32Array, RecordBatch};
use arrow::compute::interleave;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::state::State;
use crate::{Hit, IndexError, KnowledgeIndex, vector_values};

/// A row filter: evaluated on a batch of the index's rows, true where a row passes.
pub type RowPredicate<'a> = dyn Fn(&RecordBatch) -> Result<BooleanArray, IndexError> + 'a;

/// Below this many passing rows, filtered searches are exact by default.
pub const DEFAULT_EXACT_SEARCH_MAX_ROWS: usize = 2048;

/// Name of the similarity column search results carry.
pub const SCORE_COLUMN: &str = "score";

/// A dense set of row keys.
pub(crate) struct KeySet {
    bits: Vec<u64>,
    len: usize,
}

impl KeySet {
    fn with_capacity(max_key: u64) -> Self {
        KeySet {
            bits: vec![0; (max_key as usize / 64) + 1],
            len: 0,
        }
    }

    fn insert(&mut self, key: u64) {
        let (word, bit) = ((key / 64) as usize, key % 64);
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.len += 1;
        }
    }

    pub(crate) fn contains(&self, key: u64) -> bool {
        let word = (key / 64) as usize;
        word < self.bits.len() && self.bits[word] & (1 << (key % 64)) != 0
    }
}

/// The hits whose rows are live in `state`, each once. A commit running meanwhile changes the
/// shared graph: it may add keys this state does not hold, and usearch may hand a removed
/// node's slot to a new key while a search walks it, so even a filtered walk can answer a key
/// its filter never saw.
fn live_hits(state: &State, mut hits: Vec<Hit>) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::with_capacity(hits.len());
    hits.retain(|hit| state.is_live(hit.key) && seen.insert(hit.key));
    hits
}

/// Best first; ties by key.
fn by_score(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.key.cmp(&b.key))
}

/// The best `k` of `hits` and `more`, each key once.
fn merged(mut hits: Vec<Hit>, more: &[Hit], k: usize) -> Vec<Hit> {
    if more.is_empty() {
        return hits;
    }
    hits.extend_from_slice(more);
    hits.sort_by(by_score);
    let mut seen = std::collections::HashSet::with_capacity(hits.len());
    hits.retain(|hit| seen.insert(hit.key));
    hits.truncate(k);
    hits
}

/// A vector's length (never zero, so it can divide).
fn norm(vector: &[f32]) -> f32 {
    vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE)
}

/// Cosine similarity of `query` (of length `query_norm`) and `vector`.
fn cosine(query: &[f32], query_norm: f32, vector: &[f32]) -> f32 {
    let (dot, norm) = vector
        .iter()
        .zip(query)
        .fold((0.0f32, 0.0f32), |(d, n), (a, b)| (d + a * b, n + a * a));
    dot / (query_norm * norm.sqrt().max(f32::MIN_POSITIVE))
}

impl KnowledgeIndex {
    /// The schema of search results: the index's columns plus `score` (cosine similarity).
    pub fn search_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(SCORE_COLUMN, DataType::Float32, false));
        Arc::new(Schema::new(fields))
    }

    /// The `k` rows nearest to `query` among those passing `filter`, best first, as one batch
    /// of [`KnowledgeIndex::search_schema`].
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RowPredicate<'_>>,
    ) -> Result<RecordBatch, IndexError> {
        let state = self.current();
        state.ann.check_vector(query)?;
        let k = k.min(state.vectors);
        let hits = match filter {
            None => {
                // The graph is shared with a commit that may be running: keep the hits live in
                // this state; should too few be, walk again skipping the others, then exactly.
                // Rows whose vectors wait in the backlog are scored exactly and merged in.
                let waiting = self.backlog_hits(&state, query, None);
                let mut hits = merged(live_hits(&state, state.ann.search(query, k, None)?), &waiting, k);
                if hits.len() < k {
                    let walked = state.ann.search(query, k, Some(&|key| state.is_live(key)))?;
                    hits = merged(live_hits(&state, walked), &waiting, k);
                }
                if hits.len() < k {
                    hits = self.exact_hits(&state, query, k, None)?;
                }
                hits
            }
            Some(filter) => {
                let allowed = self.allowed_keys(&state, filter, true)?;
                if allowed.len <= self.exact_search_max_rows() || allowed.len <= k {
                    self.exact_hits(&state, query, k, Some(&allowed))?
                } else {
                    let mut hits = live_hits(&state, state.ann.search(query, k, Some(&|key| allowed.contains(key)))?);
                    hits.retain(|hit| allowed.contains(hit.key));
                    hits = merged(hits, &self.backlog_hits(&state, query, Some(&allowed)), k);
                    if hits.len() < k.min(allowed.len) {
                        self.exact_hits(&state, query, k, Some(&allowed))?
                    } else {
                        hits
                    }
                }
            }
        };
        self.gather(&state, &hits)
    }

    /// The exact (brute-force) `k` nearest rows to `query`, best first; the reference that ANN
    /// recall is measured against.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Result<RecordBatch, IndexError> {
        let state = self.current();
        state.ann.check_vector(query)?;
        let hits = self.exact_hits(&state, query, k.min(state.vectors), None)?;
        self.gather(&state, &hits)
    }

    /// Keys of live rows that pass `filter` (and have a vector, when `with_vector`).
    pub(crate) fn allowed_keys(
        &self,
        state: &State,
        filter: &RowPredicate<'_>,
        with_vector: bool,
    ) -> Result<KeySet, IndexError> {
        let mut allowed = KeySet::with_capacity(state.manifest.next_key);
        for segment in &state.segments {
            let mask = filter(&segment.batch)?;
            let vectors = segment.batch.column(self.vector_column);
            for (row, &key) in segment.keys.iter().enumerate() {
                let has_vector = !with_vector || vectors.is_valid(row);
                if mask.is_valid(row) && mask.value(row) && has_vector && state.is_live(key) {
                    allowed.insert(key);
                }
            }
        }
        Ok(allowed)
    }

    /// Brute-force cosine similarity over live rows (restricted to `allowed` when given).
    pub(crate) fn exact_hits(
        &self,
        state: &State,
        query: &[f32],
        k: usize,
        allowed: Option<&KeySet>,
    ) -> Result<Vec<Hit>, IndexError> {
        let dims = query.len();
        let query_norm = norm(query);
        let mut hits: Vec<Hit> = Vec::new();
        for segment in &state.segments {
            let column = segment.batch.column(self.vector_column);
            let values = vector_values(column);
            for (row, &key) in segment.keys.iter().enumerate() {
                let passes = allowed.is_none_or(|a| a.contains(key));
                if !passes || !column.is_valid(row) || !state.is_live(key) {
                    continue;
                }
                hits.push(Hit {
                    key,
                    score: cosine(query, query_norm, &values[row * dims..(row + 1) * dims]),
                });
            }
        }
        if hits.len() > k {
            hits.select_nth_unstable_by(k, by_score);
            hits.truncate(k);
        }
        hits.sort_by(by_score);
        Ok(hits)
    }

    /// The live rows (passing `allowed`, when given) whose vectors wait in the graph's backlog
    /// (see [`crate::backlog`]), scored exactly; usually none.
    fn backlog_hits(&self, state: &State, query: &[f32], allowed: Option<&KeySet>) -> Vec<Hit> {
        let query_norm = norm(query);
        state
            .backlog
            .unindexed
            .iter()
            .filter(|key| allowed.is_none_or(|a| a.contains(**key)))
            .filter_map(|&key| {
                let vector = state.live_vector(key, self.vector_column)?;
                Some(Hit {
                    key,
                    score: cosine(query, query_norm, vector),
                })
            })
            .collect()
    }

    /// The rows of `hits`, in order, with their scores.
    pub(crate) fn gather(&self, state: &State, hits: &[Hit]) -> Result<RecordBatch, IndexError> {
        let positions: Vec<(usize, usize)> = hits
            .iter()
            .filter_map(|h| state.locations.get(&h.key).copied())
            .collect();
        let scores: Vec<f32> = hits.iter().filter(|h| state.is_live(h.key)).map(|h| h.score).collect();
        let mut columns = self.gather_columns(state, &positions)?;
        columns.push(Arc::new(Float32Array::from(scores)));
        Ok(RecordBatch::try_new(self.search_schema(), columns)?)
    }

    /// The live rows of the given document ids, in the order asked (ids without a row are
    /// skipped).
    pub fn lookup(&self, ids: &[&str]) -> Result<RecordBatch, IndexError> {
        let state = self.current();
        let positions: Vec<(usize, usize)> = ids
            .iter()
            .filter_map(|id| state.doc_keys.get(*id))
            .filter_map(|key| state.locations.get(key).copied())
            .collect();
        let columns = self.gather_columns(&state, &positions)?;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// The index's columns at `positions` (segment, row).
    pub(crate) fn gather_columns(
        &self,
        state: &State,
        positions: &[(usize, usize)],
    ) -> Result<Vec<ArrayRef>, IndexError> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len() + 1);
        for column in 0..self.schema.fields().len() {
            let sources: Vec<&dyn Array> = state.segments.iter().map(|s| s.batch.column(column).as_ref()).collect();
            columns.push(if sources.is_empty() {
                arrow::array::new_empty_array(self.schema.field(column).data_type())
            } else {
                interleave(&sources, positions)?
            });
        }
        Ok(columns)
    }
}
