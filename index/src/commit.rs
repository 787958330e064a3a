//! Commit policy: a small upsert writes only its rows as a delta file; a large one, too many
//! deltas (unless a background compaction will take them, see [`crate::compaction`]), or a
//! delete rewrites rows and graph in full and drops the deltas.
//!
//! A commit works on the next [`State`], not the published one: searches keep reading the
//! published state while the files are written and flushed, and see the next one only once
//! its manifest is on disk. The text index commits between the row files and the manifest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;

use crate::compaction::{MAX_DEFERRED_DELTAS, deltas_grown};
use crate::faults::{self, Stage};
use crate::files::{RowWriter, fsync_file, remove_files_of, write_rows};
use crate::layered::LayeredMap;
use crate::segment::Segment;
use crate::state::{State, live_rows};
use crate::{IndexError, KnowledgeIndex};

/// Most delta files before a commit rewrites the index in full.
pub const MAX_DELTA_FILES: usize = 32;

/// A full rewrite keeps a segment whose rows are all live and whose buffers hold at least this
/// many bytes as it is (sharing its buffers), and merges smaller or thinned-out segments into
/// segments of about this size. So a rewrite copies only what it merges — its peak memory is
/// the index plus that, not twice the index — while a stream of small commits still ends up in
/// few segments.
const MERGED_SEGMENT_BYTES: usize = 32 << 20;

impl KnowledgeIndex {
    /// Commits an upsert whose rows are `state.segments[first_new..]`: as a delta file when the
    /// deltas stay small, else in full.
    pub(crate) fn commit_upsert(&self, state: &mut State, first_new: usize) -> Result<(), IndexError> {
        let new_rows: usize = state.segments[first_new..].iter().map(|s| s.keys.len()).sum();
        let manifest = &state.manifest;
        let grown = deltas_grown(manifest.deltas.len(), manifest.delta_rows + new_rows, manifest.rows);
        let deferred = self.background_compaction.load(Ordering::SeqCst) && manifest.deltas.len() < MAX_DEFERRED_DELTAS;
        if manifest.rows_file.is_empty() || new_rows * 8 > manifest.rows || (grown && !deferred) {
            return self.persist(state);
        }
        let generation = manifest.generation + 1;
        let delta_file = format!("delta-{generation}.arrow");
        let mapped = write_rows(&self.dir.join(&delta_file), &self.schema, &state.segments[first_new..])?;
        state.segments.truncate(first_new);
        state.segments.extend(mapped);
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.text_generation = None; // committed with this generation, below
        manifest.rows = state.locations.len();
        manifest.deltas.push(delta_file);
        manifest.delta_rows += new_rows;
        self.commit_text(state, generation)?;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        Ok(())
    }

    /// Compacts the live rows into few segments and writes a new generation in full (rows and
    /// graph), dropping the deltas.
    pub(crate) fn persist(&self, state: &mut State) -> Result<(), IndexError> {
        let generation = state.manifest.generation + 1;
        let rows_file = format!("rows-{generation}.arrow");
        let ann_file = format!("ann-{generation}.usearch");
        let compacted = write_compacted(&self.dir.join(&rows_file), &self.schema, state)?;
        let ann_path = self.dir.join(&ann_file);
        faults::check(&ann_path, Stage::Write).map_err(|e| IndexError::io(&ann_path, e))?;
        state.ann.save(&ann_path)?;
        fsync_file(&self.dir.join(&ann_file))?;
        let replaced = state.manifest.clone();
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.text_generation = None; // committed with this generation, below
        manifest.rows = compacted.iter().map(|s| s.keys.len()).sum();
        manifest.rows_file = rows_file;
        manifest.ann_file = ann_file;
        manifest.deltas.clear();
        manifest.delta_rows = 0;
        self.commit_text(state, generation)?;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        // Rebuild the in-memory maps around the compacted segments: fresh bases, no changes.
        state.locations = LayeredMap::from(locations_of(&compacted));
        state.doc_keys = LayeredMap::from(state.doc_keys.flattened());
        state.segments = compacted;
        remove_files_of(&self.dir, &replaced);
        Ok(())
    }
}

impl KnowledgeIndex {
    /// Commits the staged text changes as `generation`, after the row files and before the
    /// manifest: a crash between the two leaves the text index one generation ahead, which
    /// opening detects and repairs (see [`crate::fulltext`]).
    pub(crate) fn commit_text(&self, state: &mut State, generation: u64) -> Result<(), IndexError> {
        if let Some(full_text) = &self.full_text {
            state.text = Some(full_text.commit(generation)?);
        }
        Ok(())
    }
}

/// Writes all live rows of `state`, in order, to the row file `path` (see
/// [`MERGED_SEGMENT_BYTES`]), one segment at a time; returns them read back from the file.
pub(crate) fn write_compacted(path: &Path, schema: &SchemaRef, state: &State) -> Result<Vec<Segment>, IndexError> {
    let mut writer = RowWriter::create(path, schema)?;
    let mut merging = Merging::default();
    for segment in &state.segments {
        let live: Vec<u64> = segment.keys.iter().copied().filter(|&k| state.is_live(k)).collect();
        if live.is_empty() {
            continue;
        }
        let batch = live_rows(segment, &state.locations)?;
        let bytes = data_bytes(&batch);
        if live.len() == segment.keys.len() && bytes >= MERGED_SEGMENT_BYTES {
            merging.write_to(&mut writer, schema)?;
            writer.write(segment)?;
            continue;
        }
        merging.batches.push(batch);
        merging.keys.extend(live);
        merging.bytes += bytes;
        if merging.bytes >= MERGED_SEGMENT_BYTES {
            merging.write_to(&mut writer, schema)?;
        }
    }
    merging.write_to(&mut writer, schema)?;
    writer.finish()
}

/// The bytes of `batch`'s rows (not of the buffers they are part of: a row file's whole
/// mapping, a larger batch's).
fn data_bytes(batch: &arrow::array::RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Rows being merged into one segment.
#[derive(Default)]
struct Merging {
    batches: Vec<arrow::array::RecordBatch>,
    keys: Vec<u64>,
    bytes: usize,
}

impl Merging {
    /// Writes the rows gathered so far as one segment (if there are any) and starts afresh.
    fn write_to(&mut self, writer: &mut RowWriter, schema: &SchemaRef) -> Result<(), IndexError> {
        let merging = std::mem::take(self);
        if merging.keys.is_empty() {
            return Ok(());
        }
        let merged = Segment::in_memory(concat_batches(schema, &merging.batches)?, Arc::from(merging.keys));
        writer.write(&merged)
    }
}

/// Key → (segment, row) of every row of `segments`.
pub(crate) fn locations_of(segments: &[Segment]) -> HashMap<u64, (usize, usize)> {
    segments
        .iter()
        .enumerate()
        .flat_map(|(i, segment)| segment.keys.iter().enumerate().map(move |(row, &key)| (key, (i, row))))
        .collect()
}
