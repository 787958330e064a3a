//! When continuous and resumable inserts stop, and the state each pipeline reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// State of a pipeline, for readiness and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineState {
    /// Running its statements; no stream consuming yet.
    Starting,
    /// A continuous statement has its partitions assigned and is consuming.
    Streaming,
    /// Consuming, but a partition holds records it does not deliver (the reason names it).
    Stalled(String),
    /// All statements finished.
    Finished,
    /// A statement failed with this error.
    Failed(String),
}

/// Controls continuous statements: when they stop, and what they report.
#[derive(Debug, Clone, Default)]
pub struct StreamControl {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) until_caught_up: bool,
    states: Arc<Mutex<BTreeMap<String, PipelineState>>>,
}

impl StreamControl {
    /// Streams run until [`StreamControl::stop`]; with `until_caught_up` they also end once
    /// every partition has been read to its end (batch-style runs, tests, benchmarks).
    pub fn new(until_caught_up: bool) -> Self {
        StreamControl {
            until_caught_up,
            ..Default::default()
        }
    }

    /// Asks every stream (and resumable insert) to finish its in-flight micro-batch, commit it
    /// and return.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records the state of pipeline `name`.
    pub fn set_state(&self, name: &str, state: PipelineState) {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), state);
    }

    /// Every pipeline's state.
    pub fn states(&self) -> BTreeMap<String, PipelineState> {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
