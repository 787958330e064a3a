//! Blocking work (index file I/O, fsync, graph inserts and searches) runs on tokio's blocking
//! pool, never on an executor thread; index errors reach DataFusion as external errors, so the
//! server can tell a caller's mistake (a wrong dimension) from a failure.

use datafusion::common::{DataFusionError, Result};
use mkflow_index::IndexError;

/// An error blocking work may end with, as DataFusion carries it.
pub trait EngineError: Send + 'static {
    /// The error as a DataFusion error (index errors keep their type, for status codes).
    fn into_engine(self) -> DataFusionError;
}

impl EngineError for IndexError {
    fn into_engine(self) -> DataFusionError {
        index_error(self)
    }
}

impl EngineError for DataFusionError {
    fn into_engine(self) -> DataFusionError {
        self
    }
}

/// Runs blocking work off the async executor.
pub async fn blocking<T: Send + 'static, E: EngineError>(
    work: impl FnOnce() -> std::result::Result<T, E> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(EngineError::into_engine)
}

/// An index error as a DataFusion error (kept as its type, for status codes and messages).
pub fn index_error(e: IndexError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}
