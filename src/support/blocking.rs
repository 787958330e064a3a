//! Index work (file I/O, fsync, graph inserts) runs on tokio's blocking pool, never on an
//! executor thread; its errors reach DataFusion as external errors, so the server can tell a
//! caller's mistake (a wrong dimension) from a failure.

use datafusion::common::{DataFusionError, Result};
use mkflow_index::IndexError;

/// Runs blocking index work off the async executor.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, IndexError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(index_error)
}

/// An index error as a DataFusion error (kept as its type, for status codes and messages).
pub fn index_error(e: IndexError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}
