//! A hook through which the host application measures UDF calls (mkflow exports them as
//! Prometheus histograms) without this crate depending on a metrics library.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Receives one observation per UDF invocation (one Arrow batch).
pub trait UdfObserver: Send + Sync + std::fmt::Debug {
    /// `udf` processed `rows` rows in `elapsed`.
    fn observe(&self, udf: &str, rows: usize, elapsed: Duration);
}

static OBSERVER: OnceLock<Arc<dyn UdfObserver>> = OnceLock::new();

/// Installs the process's observer; later calls are ignored.
pub fn set_observer(observer: Arc<dyn UdfObserver>) {
    let _ = OBSERVER.set(observer);
}

/// Reports a UDF call that started at `started` to the observer, if one is installed.
pub(crate) fn record(udf: &str, rows: usize, started: Instant) {
    if let Some(observer) = OBSERVER.get() {
        observer.observe(udf, rows, started.elapsed());
    }
}
