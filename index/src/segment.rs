//! A block of rows with their keys: the unit the row store reads, writes and holds in memory.

use std::sync::Arc;

use arrow::array::RecordBatch;

use crate::mapped::MappedFile;

/// Rows and their `u64` keys, one key per row. Cheap to clone (both parts are shared), so a
/// commit can start its next state from the current one without copying rows.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// The rows.
    pub(crate) batch: RecordBatch,
    /// Their keys, one per row.
    pub(crate) keys: Arc<[u64]>,
    /// The row file whose pages hold the rows (`None`: they are on the heap).
    pub(crate) file: Option<Arc<MappedFile>>,
}

impl Segment {
    /// Rows held on the heap (not yet written).
    pub(crate) fn in_memory(batch: RecordBatch, keys: Arc<[u64]>) -> Self {
        Segment {
            batch,
            keys,
            file: None,
        }
    }
}
