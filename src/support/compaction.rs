//! Background compaction of the knowledge indexes the engine writes: after each commit, an
//! index whose deltas have grown is compacted on tokio's blocking pool, so micro-batches and
//! searches never wait for a full rewrite (see `mkflow_index`'s `compaction` module).

use std::sync::Arc;
use std::time::Instant;

use mkflow_index::KnowledgeIndex;

/// Leaves `index`'s full rewrites to the background from now on, and starts one when due (at
/// most one runs per index; a failed one leaves the deltas, and a later commit tries again).
pub fn after_commit(index: &Arc<KnowledgeIndex>) {
    index.set_background_compaction(true);
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
