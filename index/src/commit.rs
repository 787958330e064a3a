//! Commit policy: a small upsert writes only its rows as a delta file; a large one, too many
//! deltas (unless a background compaction will take them, see [`crate::compaction`]), or a
//! delete rewrites rows and graph in full and drops the deltas.
//!
//! A commit works on the next [`State`], not the published one: searches keep reading the
//! published state while the files are written and flushed, and see the next one only once
//! its manifest is durable — in the commit log for a delta, which leaves its delta file
//! unflushed (see [`crate::commit_log`]). The text index commits between the row files and the
//! manifest.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::commit_log::Durability;
use crate::faults::{self, Stage};
use crate::files::{Pace, fsync_file, write_rows_unflushed};
use crate::layered::LayeredMap;
use crate::rewrite::{MAX_DEFERRED_DELTAS, deltas_grown, locations_of, write_compacted};
use crate::state::State;
use crate::{IndexError, KnowledgeIndex};

impl KnowledgeIndex {
    /// Commits an upsert whose rows are `state.segments[first_new..]`: as a delta file when the
    /// deltas stay small, else in full.
    pub(crate) fn commit_upsert(&self, state: &mut State, first_new: usize) -> Result<(), IndexError> {
        let new_rows: usize = state.segments[first_new..].iter().map(|s| s.keys.len()).sum();
        let manifest = &state.manifest;
        let grown = deltas_grown(manifest.deltas.len(), manifest.delta_rows + new_rows, manifest.rows);
        let deferred = self.background_compaction.load(Ordering::SeqCst) && manifest.deltas.len() < MAX_DEFERRED_DELTAS;
        self.compaction_hurry
            .store(manifest.deltas.len() >= MAX_DEFERRED_DELTAS * 3 / 4, Ordering::Relaxed);
        if manifest.rows_file.is_empty() || new_rows * 8 > manifest.rows || (grown && !deferred) {
            return self.persist(state);
        }
        let generation = manifest.generation + 1;
        let delta_file = format!("delta-{generation}.arrow");
        let mapped = write_rows_unflushed(&self.dir.join(&delta_file), &self.schema, &state.segments[first_new..])?;
        state.segments.truncate(first_new);
        state.segments.extend(mapped);
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.text_generation = None; // committed with this generation, below
        manifest.rows = state.locations.len();
        manifest.deltas.push(delta_file.clone());
        manifest.delta_rows += new_rows;
        self.commit_text(state, generation)?;
        self.write_manifest(
            &mut manifest,
            Durability::Logged {
                delta: Some(&delta_file),
            },
        )?;
        state.manifest = manifest;
        Ok(())
    }

    /// Compacts the live rows into few segments and writes a new generation in full (rows and
    /// graph), dropping the deltas.
    pub(crate) fn persist(&self, state: &mut State) -> Result<(), IndexError> {
        // The graph written must hold every live row's vector: wait for a compaction's copy.
        self.update_graph(state, &[], true)?;
        let generation = state.manifest.generation + 1;
        let rows_file = format!("rows-{generation}.arrow");
        let ann_file = format!("ann-{generation}.usearch");
        let compacted = write_compacted(&self.dir.join(&rows_file), &self.schema, state, Pace::AtOnce)?;
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
        manifest.ann_missing.clear();
        manifest.ann_removed.clear();
        manifest.deltas.clear();
        manifest.delta_rows = 0;
        self.commit_text(state, generation)?;
        self.write_manifest(&mut manifest, Durability::Checkpoint)?;
        state.manifest = manifest;
        // Rebuild the in-memory maps around the compacted segments: fresh bases, no changes.
        state.locations = LayeredMap::from(locations_of(&compacted));
        state.doc_keys = LayeredMap::from(state.doc_keys.flattened());
        state.segments = compacted;
        self.retained.discard(&self.dir, replaced, generation, &HashSet::new());
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
