//! The state of an index at one committed generation: its row segments, which rows are live,
//! the document → key map and the ANN graph; and how a generation on disk is loaded into it.
//!
//! A [`State`] is never changed once searches can see it: a commit clones the current one (the
//! rows and keys are shared, only the maps are copied), changes the clone, writes its files and
//! then publishes it in place of the old one. Searches hold the state they started with, so a
//! commit — fsync and full rewrite included — never makes them wait. The ANN graph is the one
//! part shared between successive states and changed in place (usearch searches and inserts
//! concurrently); a search therefore keeps only the graph's hits that are live in its own state.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};

use crate::files::{Check, read_rows};
use crate::fulltext::view::TextView;
use crate::layered::LayeredMap;
use crate::segment::Segment;
use crate::vector::extract_vectors;
use crate::{AnnIndex, IndexError, Manifest, vector_values};

/// Everything a commit changes.
#[derive(Debug, Clone)]
pub(crate) struct State {
    /// The committed generation's manifest.
    pub(crate) manifest: Manifest,
    /// Row blocks: the full rows file's, then one per delta or upsert since.
    pub(crate) segments: Vec<Segment>,
    /// Live key → (segment, row). Removed keys are absent.
    pub(crate) locations: LayeredMap<u64, (usize, usize)>,
    /// Document id → live key.
    pub(crate) doc_keys: LayeredMap<Arc<str>, u64>,
    /// Live rows that have a vector (the most a search can return).
    pub(crate) vectors: usize,
    /// The HNSW graph over the live rows' vectors (shared with the states before and after).
    pub(crate) ann: Arc<AnnIndex>,
    /// The full-text index as of this generation (`None`: no text columns).
    pub(crate) text: Option<TextView>,
    /// Graph changes waiting for a background task or for a compaction's copy of the graph
    /// to end (see [`crate::backlog`]).
    pub(crate) backlog: Arc<GraphBacklog>,
}

impl State {
    /// Whether `key` is a live row of this state.
    pub(crate) fn is_live(&self, key: u64) -> bool {
        self.locations.contains_key(&key)
    }

    /// Whether the row at `(segment, row)` has a vector.
    fn has_vector(&self, (segment, row): (usize, usize), vector_column: usize) -> bool {
        self.segments[segment].batch.column(vector_column).is_valid(row)
    }

    /// Makes the rows of `segment` the live rows of their documents (`ids`, one per row). A
    /// document's previous row stops being live, and its vector leaves the graph — or leaves
    /// `pending` when its key is `pending_from` or later (added by the same commit, not in the
    /// graph yet). Each row's vector joins `pending`. Returns how many rows replaced a row whose
    /// vector was in the graph.
    pub(crate) fn place_segment(
        &mut self,
        segment: Segment,
        ids: Vec<String>,
        vectors: Vec<Option<Vec<f32>>>,
        vector_column: usize,
        pending: &mut Vec<(u64, Vec<f32>)>,
        pending_from: u64,
    ) -> Result<usize, IndexError> {
        let segment_index = self.segments.len();
        let mut replaced = 0;
        let keys = segment.keys.clone();
        self.segments.push(segment);
        for (row, ((&key, id), vector)) in keys.iter().zip(ids).zip(vectors).enumerate() {
            if let Some(old) = self.doc_keys.insert(Arc::from(id), key)
                && let Some(location) = self.locations.remove(&old)
            {
                if self.has_vector(location, vector_column) {
                    self.vectors -= 1;
                }
                if old >= pending_from {
                    pending.retain(|(k, _)| *k != old);
                } else {
                    self.unindex(old);
                    replaced += 1;
                }
            }
            self.locations.insert(key, (segment_index, row));
            if let Some(vector) = vector {
                self.vectors += 1;
                pending.push((key, vector));
            }
        }
        Ok(replaced)
    }

    /// Stops `key` from being live (a delete); its vector leaves the graph.
    pub(crate) fn remove(&mut self, key: u64, doc_id: &str, vector_column: usize) -> Result<(), IndexError> {
        if let Some(location) = self.locations.remove(&key)
            && self.has_vector(location, vector_column)
        {
            self.vectors -= 1;
        }
        self.doc_keys.remove(&Arc::from(doc_id));
        self.unindex(key);
        Ok(())
    }
}

/// Reads the generation named by `manifest`: the full rows and graph, then each delta in order.
pub(crate) fn load_state(dir: &Path, manifest: Manifest) -> Result<(SchemaRef, State), IndexError> {
    let rows_path = dir.join(&manifest.rows_file);
    let (schema, base) = read_rows(&rows_path, Check::Full)?;
    let ann_path = dir.join(&manifest.ann_file);
    let ann = AnnIndex::load(&ann_path, manifest.dimensions, manifest.quantization);
    let column = |role: &str, name: &str| {
        schema
            .index_of(name)
            .map_err(|_| IndexError::Invalid(format!("{role} column '{name}' missing from {}", rows_path.display())))
    };
    let key_column = column("key", &manifest.key_column)?;
    let vector_column = column("vector", &manifest.vector_column)?;
    let (mut locations, mut keys_of) = (HashMap::new(), HashMap::new());
    let mut vectors = 0;
    let mut segments = Vec::new();
    for segment in base {
        let ids = doc_ids(&segment.batch, key_column, &manifest.key_column)?;
        let with_vectors = segment.batch.column(vector_column);
        vectors += with_vectors.len() - with_vectors.null_count();
        for (row, (&key, id)) in segment.keys.iter().zip(ids).enumerate() {
            locations.insert(key, (segments.len(), row));
            keys_of.insert(Arc::<str>::from(id), key);
        }
        segments.push(segment);
    }
    let ann = match ann {
        Ok(ann) => ann,
        Err(e) => {
            log::warn!(
                "{}: cannot load the ANN graph ({e}); rebuilding it from the {} rows of {}",
                ann_path.display(),
                locations.len(),
                rows_path.display()
            );
            graph_of(&segments, vector_column, &manifest)?
        }
    };
    let mut state = State {
        manifest,
        segments,
        locations: LayeredMap::from(locations),
        doc_keys: LayeredMap::from(keys_of),
        vectors,
        ann: Arc::new(ann),
        text: None,
        backlog: Default::default(),
    };
    repair_graph(&mut state, vector_column)?;
    for delta in state.manifest.deltas.clone() {
        let (delta_schema, segments) = read_rows(&dir.join(&delta), Check::Full)?;
        if delta_schema != schema {
            return Err(IndexError::Invalid(format!(
                "{} does not have the index's columns",
                dir.join(&delta).display()
            )));
        }
        for segment in segments {
            replay(&mut state, segment, key_column, vector_column)?;
        }
    }
    Ok((schema, state))
}

/// An ANN graph over the vectors of `segments` (a full rows file's: every row live).
fn graph_of(segments: &[Segment], vector_column: usize, manifest: &Manifest) -> Result<AnnIndex, IndexError> {
    let ann = AnnIndex::new(manifest.dimensions, manifest.quantization)?;
    for segment in segments {
        let vectors = extract_vectors(segment.batch.column(vector_column), manifest.dimensions)?;
        let items: Vec<(u64, &[f32])> = segment
            .keys
            .iter()
            .zip(&vectors)
            .filter_map(|(key, vector)| Some((*key, vector.as_deref()?)))
            .collect();
        ann.add_many(&items)?;
    }
    Ok(ann)
}

/// Applies a delta segment as its upsert did: each row replaces the live row of its document
/// and its vector joins the graph.
fn replay(state: &mut State, segment: Segment, key_column: usize, vector_column: usize) -> Result<(), IndexError> {
    let ids = doc_ids(&segment.batch, key_column, &state.manifest.key_column)?;
    let vectors = extract_vectors(segment.batch.column(vector_column), state.manifest.dimensions)?;
    let first_key = segment.keys.first().copied().unwrap_or(state.manifest.next_key);
    let mut additions = Vec::new();
    state.place_segment(segment, ids, vectors, vector_column, &mut additions, first_key)?;
    let items: Vec<(u64, &[f32])> = additions.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    state.apply_graph(&items, vector_column)
}

/// The key column of `batch` as text, one id per row; a null key is an error naming the row.
pub(crate) fn doc_ids(batch: &RecordBatch, key_column: usize, key_name: &str) -> Result<Vec<String>, IndexError> {
    let ids = cast(batch.column(key_column), &DataType::Utf8)?;
    let ids: &StringArray = ids.as_string();
    (0..ids.len())
        .map(|row| {
            ids.is_valid(row)
                .then(|| ids.value(row).to_string())
                .ok_or_else(|| IndexError::Invalid(format!("row {row}: key column '{key_name}' is null")))
        })
        .collect()
}

/// The rows of `segment` whose keys are still live.
pub(crate) fn live_rows(
    segment: &Segment,
    locations: &LayeredMap<u64, (usize, usize)>,
) -> Result<RecordBatch, IndexError> {
    let mask: BooleanArray = segment.keys.iter().map(|k| Some(locations.contains_key(k))).collect();
    if mask.true_count() == segment.keys.len() {
        return Ok(segment.batch.clone());
    }
    Ok(filter_record_batch(&segment.batch, &mask)?)
}

/// Graph changes recorded while the graph could not be changed (see [`crate::backlog`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct GraphBacklog {
    /// Keys whose vectors the graph is still to receive (their rows may have left since).
    pub(crate) unindexed: Vec<u64>,
    /// Keys whose rows left but whose vectors the graph still holds.
    pub(crate) unremoved: Vec<u64>,
}

impl GraphBacklog {
    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.unindexed.is_empty() && self.unremoved.is_empty()
    }
}

impl State {
    /// The vector of live row `key` (`None`: not live, or without a vector).
    pub(crate) fn live_vector(&self, key: u64, vector_column: usize) -> Option<&[f32]> {
        let (segment, row) = *self.locations.get(&key)?;
        let column = self.segments[segment].batch.column(vector_column);
        let dims = self.manifest.dimensions;
        column
            .is_valid(row)
            .then(|| &vector_values(column)[row * dims..(row + 1) * dims])
    }

    /// Records that the rows of `key` left (its vector leaves the graph with the backlog).
    pub(crate) fn unindex(&mut self, key: u64) {
        Arc::make_mut(&mut self.backlog).unremoved.push(key);
    }

    /// Applies the backlog and adds `additions` to the graph. The caller holds the graph gate
    /// (or owns the graph, while loading). Keys the graph already holds are not added again:
    /// applying a backlog twice changes nothing, and replaying a delta over a compaction's graph
    /// that already holds some of its rows adds only the others.
    pub(crate) fn apply_graph(&mut self, additions: &[(u64, &[f32])], vector_column: usize) -> Result<(), IndexError> {
        let backlog = std::mem::take(Arc::make_mut(&mut self.backlog));
        for key in backlog.unremoved {
            self.ann.remove(key)?;
        }
        let mut items: Vec<(u64, &[f32])> = backlog
            .unindexed
            .iter()
            .filter(|key| !self.ann.contains(**key))
            .filter_map(|&key| Some((key, self.live_vector(key, vector_column)?)))
            .collect();
        items.extend(additions.iter().filter(|(key, _)| !self.ann.contains(*key)));
        self.ann.add_many(&items)
    }
}

/// Repairs a graph loaded from `manifest`'s graph file written by a compaction: removes the
/// vectors of rows that had left and adds those of rows it lacked (see [`crate::backlog`]).
pub(crate) fn repair_graph(state: &mut State, vector_column: usize) -> Result<(), IndexError> {
    let manifest = &state.manifest;
    if manifest.ann_missing.is_empty() && manifest.ann_removed.is_empty() {
        return Ok(());
    }
    let backlog = Arc::make_mut(&mut state.backlog);
    backlog.unremoved.extend(&manifest.ann_removed);
    backlog.unindexed.extend(&manifest.ann_missing);
    state.apply_graph(&[], vector_column)
}
