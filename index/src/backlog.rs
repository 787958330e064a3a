//! Changes to the ANN graph that wait: inserting a vector into the HNSW graph is the costly
//! part of a small commit (milliseconds per vector at 100k × 384), and nothing may change the
//! graph while a background compaction copies it.
//!
//! A commit that does not change the graph itself records its changes in its state's
//! [`GraphBacklog`] and publishes: searches score the backlog's rows exactly and merge them
//! with the graph's hits, so a row is found from the moment its commit is published. Who
//! applies the backlog:
//! - with [`KnowledgeIndex::set_background_indexing`] on, a small upsert always leaves its
//!   vectors to the backlog (up to [`MAX_BACKLOG`] of them, past which a commit applies it
//!   inline), and the caller runs [`KnowledgeIndex::index_backlog`] off the write path;
//! - otherwise a commit applies the backlog with its own vectors, unless a compaction is
//!   copying the graph at that moment;
//! - a full commit, which writes the graph, waits for the copy and applies everything.
//!
//! A compaction's graph file is the graph without its snapshot's backlog: its manifest lists
//! the keys it lacks and the keys it still holds ([`Manifest::ann_missing`],
//! [`Manifest::ann_removed`](crate::Manifest::ann_removed)), which opening repairs.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, TryLockError};

use crate::state::State;
use crate::{IndexError, KnowledgeIndex};

/// Most vectors a backlog holds: a commit that would grow it further applies it inline.
pub const MAX_BACKLOG: usize = 4096;

/// Upserts adding at least this many vectors insert them inline, on all cores.
const INLINE_ADDITIONS: usize = 256;

impl KnowledgeIndex {
    /// Leaves the graph inserts of small upserts to [`KnowledgeIndex::index_backlog`], run by
    /// the caller off the write path (see the module docs).
    pub fn set_background_indexing(&self, on: bool) {
        self.background_indexing.store(on, Ordering::SeqCst);
    }

    /// Whether the published state has graph changes waiting.
    pub fn backlog_due(&self) -> bool {
        !self.current().backlog.is_empty()
    }

    /// Applies the published state's graph backlog to the graph, then publishes the state
    /// without it; returns how many changes it applied. Commits go on meanwhile (leaving their
    /// own changes to the next call); waits while a compaction copies the graph.
    pub fn index_backlog(&self) -> Result<usize, IndexError> {
        let applied = {
            let _gate = self.lock_graph();
            let mut state = (*self.current()).clone();
            let backlog = state.backlog.clone();
            if backlog.is_empty() {
                return Ok(0);
            }
            state.apply_graph(&[], self.vector_column)?;
            backlog
        };
        let unindexed: HashSet<u64> = applied.unindexed.iter().copied().collect();
        let unremoved: HashSet<u64> = applied.unremoved.iter().copied().collect();
        let _writer = self.lock_writer();
        let mut next = (*self.current()).clone();
        let backlog = Arc::make_mut(&mut next.backlog);
        backlog.unindexed.retain(|key| !unindexed.contains(key));
        backlog.unremoved.retain(|key| !unremoved.contains(key));
        self.publish(next);
        Ok(unindexed.len() + unremoved.len())
    }

    /// Applies `state`'s backlog and `additions` to the graph — or records `additions` in the
    /// backlog instead, when background indexing takes them or a compaction is copying the
    /// graph (`wait`: never; a full commit that writes the graph waits for the copy).
    pub(crate) fn update_graph(
        &self,
        state: &mut State,
        additions: &[(u64, &[f32])],
        wait: bool,
    ) -> Result<(), IndexError> {
        let waiting = state.backlog.unindexed.len() + state.backlog.unremoved.len();
        let fits = waiting + additions.len() <= MAX_BACKLOG;
        let defer = self.background_indexing.load(Ordering::SeqCst) && additions.len() < INLINE_ADDITIONS && fits;
        let gate = match (wait || !fits, defer) {
            (true, _) => Some(self.lock_graph()),
            (false, true) => None,
            (false, false) => match self.graph_gate.try_lock() {
                Ok(gate) => Some(gate),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            },
        };
        match gate {
            Some(_gate) => state.apply_graph(additions, self.vector_column),
            None => {
                let backlog = Arc::make_mut(&mut state.backlog);
                backlog.unindexed.extend(additions.iter().map(|(key, _)| *key));
                Ok(())
            }
        }
    }

    /// Takes the graph gate: no graph change runs while it is held.
    pub(crate) fn lock_graph(&self) -> MutexGuard<'_, ()> {
        self.graph_gate.lock().unwrap_or_else(|e| e.into_inner())
    }
}
