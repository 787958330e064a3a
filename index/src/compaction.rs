//! Compaction off the write path: rewriting the rows and graph in full, done by a caller's
//! background task instead of inside a commit.
//!
//! With [`KnowledgeIndex::set_background_compaction`] on, a small upsert always commits as a
//! delta (up to [`MAX_DEFERRED_DELTAS`] files, past which a commit compacts inline again, so a
//! compactor that never runs cannot let deltas grow without bound), and the caller runs
//! [`KnowledgeIndex::compact`] when [`KnowledgeIndex::compaction_due`] says so. A compaction:
//!
//! 1. holding the graph gate (see [`crate::backlog`]; commits go on meanwhile, leaving their
//!    graph changes to the backlog): takes the published state S and a copy of the graph,
//!    which is S's but for S's backlog (recorded in the new manifest, repaired on open);
//! 2. without any lock: writes S's live rows as one rows file and the graph copy as its graph
//!    file (flushed every MiB and held to a modest rate unless deltas pile up, so a commit's
//!    fsync never queues behind much of it) — commits
//!    and searches go on meanwhile;
//! 3. under the writer lock, briefly: when nothing but deltas was committed since S, publishes
//!    a new generation whose rows and graph are those files and whose deltas are the ones
//!    committed since S; otherwise (a delete or a full commit came first) drops its files and does nothing.
//!
//! The in-memory graph stays the shared one; only the files and the row layout change.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::commit_log::Durability;
use crate::files::{Pace, write_paced};
use crate::layered::LayeredMap;
use crate::mapped::MappedFile;
use crate::rewrite::{deltas_grown, locations_of, write_compacted};
use crate::segment::Segment;
use crate::state::{State, doc_ids};
use crate::{IndexError, KnowledgeIndex};

/// Clears the "compacting" flag when a compaction ends, however it ends.
struct Running<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl KnowledgeIndex {
    /// Leaves full rewrites to [`KnowledgeIndex::compact`] (run by the caller off the write
    /// path) instead of doing them inside the commit that finds the deltas grown.
    pub fn set_background_compaction(&self, on: bool) {
        self.background_compaction.store(on, Ordering::SeqCst);
    }

    /// Whether the deltas have grown enough that a compaction should run.
    pub fn compaction_due(&self) -> bool {
        let manifest = &self.current().manifest;
        deltas_grown(manifest.deltas.len(), manifest.delta_rows, manifest.rows)
    }

    /// Rewrites the rows and graph of the published generation in full and drops its deltas,
    /// holding the writer lock only to publish (see the module docs).
    /// Returns whether it compacted: `false` when nothing was due, another compaction is
    /// running, or a delete or full commit came first.
    pub fn compact(&self) -> Result<bool, IndexError> {
        self.check_writer()?;
        if self.compacting.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        let _running = Running(&self.compacting);
        // No graph change runs while the gate is held, so the graph copied is the published
        // state's, but for its backlog (which the manifest lists) and changes a commit made to
        // the graph before publishing (keys of later deltas: replaying them adds nothing).
        let gate = self.lock_graph();
        let snapshot = self.current();
        let manifest = &snapshot.manifest;
        if manifest.deltas.is_empty() || !deltas_grown(manifest.deltas.len(), manifest.delta_rows, manifest.rows) {
            return Ok(false);
        }
        let graph = snapshot.ann.to_bytes()?;
        drop(gate);
        let generation = snapshot.manifest.generation;
        let rows_file = format!("rows-{generation}-compacted.arrow");
        let ann_file = format!("ann-{generation}-compacted.usearch");
        let written = (|| {
            let compacted = write_compacted(
                &self.dir.join(&rows_file),
                &self.schema,
                &snapshot,
                Pace::Background(self.compaction_hurry.clone()),
            )?;
            let ann_path = self.dir.join(&ann_file);
            write_paced(&ann_path, &graph, Pace::Background(self.compaction_hurry.clone()))?;
            Ok(compacted)
        })();
        drop(graph);
        let remove_files = || {
            let _ = fs::remove_file(self.dir.join(&rows_file));
            let _ = fs::remove_file(self.dir.join(&ann_file));
        };
        let compacted = match written {
            Ok(compacted) => compacted,
            Err(e) => {
                remove_files();
                return Err(e);
            }
        };
        let base = locations_of(&compacted);

        let writer = self.lock_writer();
        let current = self.current();
        if !only_deltas_since(&snapshot, &current) {
            remove_files();
            return Ok(false);
        }
        let mut next = (*current).clone();
        let since = snapshot.segments.len();
        let mut locations = base;
        // The rows copied that deltas since the snapshot replaced: found from those deltas'
        // rows, so the swap (commits wait for it) costs what was committed meanwhile, not a
        // pass over every row.
        let replaced = match replaced_keys(&snapshot, &current.segments[since..], self.key_column) {
            Ok(replaced) => replaced,
            Err(e) => {
                remove_files();
                return Err(e);
            }
        };
        for key in replaced {
            locations.remove(&key);
        }
        let mut segments = compacted;
        for (j, segment) in current.segments[since..].iter().enumerate() {
            let moved_to = segments.len();
            for (row, key) in segment.keys.iter().enumerate() {
                if current.locations.get(key) == Some(&(since + j, row)) {
                    locations.insert(*key, (moved_to, row));
                }
            }
            segments.push(segment.clone());
        }
        debug_assert_eq!(
            locations.len(),
            current.locations.len(),
            "the compacted rows are the live rows"
        );
        if locations.len() != current.locations.len() {
            // Not the live rows (a bug in the reasoning above): keep exactly the live ones.
            locations.retain(|key, _| current.is_live(*key));
        }
        let mut manifest = current.manifest.clone();
        manifest.generation += 1;
        manifest.rows_file = rows_file.clone();
        manifest.ann_file = ann_file.clone();
        manifest.ann_missing = snapshot.backlog.unindexed.clone();
        manifest.ann_removed = snapshot.backlog.unremoved.clone();
        manifest.deltas = current.manifest.deltas[snapshot.manifest.deltas.len()..].to_vec();
        manifest.delta_rows = current.manifest.delta_rows - snapshot.manifest.delta_rows;
        manifest.rows = locations.len();
        next.segments = segments;
        next.locations = LayeredMap::from(locations);
        // The text index is left as it is: the rows moved between files, no text changed.
        manifest.text_generation = Some(current.manifest.text_generation());
        let committed = self.write_manifest(&mut manifest, Durability::Logged { delta: None });
        if let Err(e) = committed {
            remove_files();
            self.recover();
            return Err(e);
        }
        let generation = manifest.generation;
        next.manifest = manifest;
        self.publish(next);
        drop(writer);
        let replaced = snapshot.manifest.clone();
        let shrink = unmapped_files(snapshot, current);
        self.retained.discard(&self.dir, replaced, generation, &shrink);
        Ok(true)
    }
}

/// The replaced generation's files that no one maps once `snapshot` and `current` (the states
/// before the swap) are dropped: its graph file (read into memory on open) and each row file
/// no search still reads; their blocks may be freed gradually.
fn unmapped_files(snapshot: Arc<State>, current: Arc<State>) -> HashSet<String> {
    let maps: HashMap<String, Arc<MappedFile>> = snapshot
        .segments
        .iter()
        .filter_map(|s| s.file.clone())
        .map(|file| (file.name().to_string(), file))
        .collect();
    let mut files: HashSet<String> = [snapshot.manifest.ann_file.clone()].into();
    drop((snapshot, current));
    // Ours is the last reference when no search holds a state with the file's rows; dropping it
    // unmaps the file.
    files.extend(
        maps.into_iter()
            .filter(|(_, map)| Arc::strong_count(map) == 1)
            .map(|(name, _)| name),
    );
    files
}

/// The keys of `snapshot`'s rows whose documents have rows in `later` (the segments committed
/// since it): the rows a compaction of `snapshot` copied that were replaced meanwhile. No other
/// copied row can have stopped being live: every delete commits in full, which abandons the
/// compaction.
fn replaced_keys(snapshot: &State, later: &[Segment], key_column: usize) -> Result<Vec<u64>, IndexError> {
    let mut replaced = Vec::new();
    for segment in later {
        for id in doc_ids(&segment.batch, key_column, &snapshot.manifest.key_column)? {
            if let Some(key) = snapshot.doc_keys.get(id.as_str()) {
                replaced.push(*key);
            }
        }
    }
    Ok(replaced)
}

/// Whether `current` is `snapshot` plus delta commits only: the same rows file and graph, the
/// same segments first, and `snapshot`'s deltas first.
fn only_deltas_since(snapshot: &State, current: &State) -> bool {
    current.manifest.rows_file == snapshot.manifest.rows_file
        && Arc::ptr_eq(&current.ann, &snapshot.ann)
        && current.manifest.deltas.starts_with(&snapshot.manifest.deltas)
        && current.segments.len() >= snapshot.segments.len()
        && current
            .segments
            .iter()
            .zip(&snapshot.segments)
            .all(|(a, b)| Arc::ptr_eq(&a.keys, &b.keys))
}
