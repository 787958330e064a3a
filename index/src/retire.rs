//! Freeing replaced generations off the readers' path.
//!
//! A commit publishes its state in place of the previous one; searches that started before still
//! hold the previous one. Whoever drops the last reference frees that generation's rows — a
//! large allocation, milliseconds to give back — and that should not be a search. So a
//! replaced state nobody reads is freed by the committing thread at once, and one still read is
//! handed to a reaper thread, which frees it once its last reader is done.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::state::State;

/// How often the reaper looks whether the states it holds are still read.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// The reaper thread's inbox, started on first use (one per process).
static REAPER: OnceLock<Mutex<Sender<Arc<State>>>> = OnceLock::new();

/// Frees `replaced` now if nobody reads it, else once its last reader is done — never on a
/// reader's thread.
pub(crate) fn retire(replaced: Arc<State>) {
    if Arc::strong_count(&replaced) == 1 {
        return drop(replaced);
    }
    let inbox = REAPER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel();
        let started = std::thread::Builder::new()
            .name("index-reaper".into())
            .spawn(move || reap(receiver));
        if let Err(e) = started {
            log::warn!("cannot start the index reaper thread ({e}): readers free replaced generations");
        }
        Mutex::new(sender)
    });
    // Without a reaper (its thread could not start) the last reader frees the state.
    let _ = inbox.lock().unwrap_or_else(|e| e.into_inner()).send(replaced);
}

/// Holds retired states and frees each once it is the only one holding it.
fn reap(inbox: Receiver<Arc<State>>) {
    let mut held: Vec<Arc<State>> = Vec::new();
    loop {
        let received = if held.is_empty() {
            inbox.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            inbox.recv_timeout(REAP_EVERY)
        };
        match received {
            Ok(state) => held.push(state),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        held.retain(|state| Arc::strong_count(state) > 1);
    }
}
