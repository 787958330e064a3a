//! Commit policy: a small upsert writes only its rows as a delta file; a large one, too many
//! deltas (unless a background compaction will take them, see [`crate::compaction`]), or a
//! delete rewrites rows and graph in full and drops the deltas.
//!
//! A commit works on the next [`State`], not the published one: searches keep reading the
//! published state while the files are written and flushed, and see the next one only once
//! its manifest is on disk. The text index commits between the row files and the manifest.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;

use crate::compaction::{MAX_DEFERRED_DELTAS, deltas_grown};
use crate::faults::{self, Stage};
use crate::files::{fsync_file, remove_files_of, write_rows};
use crate::layered::LayeredMap;
use crate::segment::Segment;
use crate::state::{State, live_rows};
use crate::{IndexError, KnowledgeIndex};

/// Most delta files before a commit rewrites the index in full.
pub const MAX_DELTA_FILES: usize = 32;

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
        write_rows(&self.dir.join(&delta_file), &self.schema, &state.segments[first_new..])?;
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.rows = state.locations.len();
        manifest.deltas.push(delta_file);
        manifest.delta_rows += new_rows;
        self.commit_text(state, generation)?;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        Ok(())
    }

    /// Compacts live rows into one segment and writes a new generation in full (rows and
    /// graph), dropping the deltas.
    pub(crate) fn persist(&self, state: &mut State) -> Result<(), IndexError> {
        let compacted = compact_rows(&self.schema, state)?;
        let generation = state.manifest.generation + 1;
        let rows_file = format!("rows-{generation}.arrow");
        let ann_file = format!("ann-{generation}.usearch");
        write_rows(
            &self.dir.join(&rows_file),
            &self.schema,
            std::slice::from_ref(&compacted),
        )?;
        let ann_path = self.dir.join(&ann_file);
        faults::check(&ann_path, Stage::Write).map_err(|e| IndexError::io(&ann_path, e))?;
        state.ann.save(&ann_path)?;
        fsync_file(&self.dir.join(&ann_file))?;
        let replaced = state.manifest.clone();
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.rows = compacted.keys.len();
        manifest.rows_file = rows_file;
        manifest.ann_file = ann_file;
        manifest.deltas.clear();
        manifest.delta_rows = 0;
        self.commit_text(state, generation)?;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        // Rebuild the in-memory maps around the compacted segment: fresh bases, no changes.
        state.locations = LayeredMap::from(
            compacted
                .keys
                .iter()
                .enumerate()
                .map(|(row, &key)| (key, (0, row)))
                .collect::<HashMap<_, _>>(),
        );
        state.doc_keys = LayeredMap::from(state.doc_keys.flattened());
        state.segments = vec![compacted];
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

/// All live rows as one segment.
pub(crate) fn compact_rows(schema: &SchemaRef, state: &State) -> Result<Segment, IndexError> {
    let mut batches = Vec::new();
    let mut keys = Vec::new();
    for segment in &state.segments {
        let live: Vec<u64> = segment.keys.iter().copied().filter(|&k| state.is_live(k)).collect();
        if live.is_empty() {
            continue;
        }
        batches.push(live_rows(segment, &state.locations)?);
        keys.extend(live);
    }
    let batch = concat_batches(schema, &batches)?;
    Ok(Segment {
        batch,
        keys: Arc::from(keys),
    })
}
