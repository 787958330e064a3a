//! Background upkeep of the knowledge indexes the engine writes: after each commit, the
//! vectors a small commit left out of the ANN graph are inserted, a commit log more than half
//! full is made larger or checkpointed, and an index whose deltas have grown is compacted, all
//! on tokio's blocking pool, so micro-batches and searches never wait for graph inserts, a
//! full log or a full rewrite (see `mkflow_index`'s `backlog`, `commit_log` and `compaction`
//! modules).

use std::sync::Arc;
use std::time::Instant;

use mkflow_index::{IndexError, KnowledgeIndex};

/// Leaves `index`'s graph inserts and full rewrites to the background from now on, and starts
/// them when due (at most one compaction runs per index; a failed one leaves the deltas, and a
/// later commit tries again).
pub fn after_commit(index: &Arc<KnowledgeIndex>) {
    index.set_background_compaction(true);
    index.set_background_indexing(true);
    if index.backlog_due() {
        in_background(index, KnowledgeIndex::index_backlog, |index, e| {
            log::warn!(
                "{}: inserting vectors into the graph failed ({e}); searches score them exactly until a later commit tries again",
                index.dir().display()
            )
        });
    }
    if index.log_upkeep_due() {
        in_background(index, KnowledgeIndex::upkeep_log, |index, e| {
            log::warn!(
                "{}: checkpointing the commit log failed ({e}); a commit that finds it full writes the manifest in full",
                index.dir().display()
            )
        });
    }
    if !index.compaction_due() {
        return;
    }
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        match index.compact() {
            Ok(true) => log::info!(
                "{}: compacted {} rows in the background in {:.2} s",
                index.dir().display(),
                index.len(),
                started.elapsed().as_secs_f64()
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "{}: background compaction failed ({e}); the deltas stay, and a later commit tries again",
                index.dir().display()
            ),
        }
    });
}

/// Runs `job` on `index` on the blocking pool; `failed` reports its error.
fn in_background<T: 'static>(
    index: &Arc<KnowledgeIndex>,
    job: fn(&KnowledgeIndex) -> Result<T, IndexError>,
    failed: fn(&KnowledgeIndex, IndexError),
) {
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = job(&index) {
            failed(&index, e);
        }
    });
}
