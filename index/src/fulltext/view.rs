//! The text index as one committed generation sees it.

use std::fmt;

use tantivy::Searcher;
use tantivy::columnar::Column;

use super::KEY_FIELD;
use crate::IndexError;

/// The text index of one generation: a searcher over exactly its live rows, and each of its
/// segments' row-key column (opened once per generation, not per search).
#[derive(Clone)]
pub(crate) struct TextView {
    searcher: Searcher,
    keys: Vec<Column<u64>>,
}

impl TextView {
    pub(crate) fn new(searcher: Searcher) -> Result<Self, IndexError> {
        let keys = searcher
            .segment_readers()
            .iter()
            .map(|segment| segment.fast_fields().u64(KEY_FIELD))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IndexError::FullText(format!("reading row keys: {e}")))?;
        Ok(TextView { searcher, keys })
    }

    pub(crate) fn searcher(&self) -> &Searcher {
        &self.searcher
    }

    /// The row key of document `doc` of segment `segment`.
    pub(crate) fn key(&self, segment: u32, doc: u32) -> Option<u64> {
        self.keys.get(segment as usize)?.first(doc)
    }
}

impl fmt::Debug for TextView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextView")
            .field("documents", &self.searcher.num_docs())
            .finish_non_exhaustive()
    }
}
