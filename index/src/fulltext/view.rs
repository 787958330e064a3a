//! The text index as one committed generation sees it.

use std::fmt;

use tantivy::Searcher;

/// The text index of one generation: a searcher over exactly its live rows.
#[derive(Clone)]
pub(crate) struct TextView {
    searcher: Searcher,
}

impl TextView {
    pub(crate) fn new(searcher: Searcher) -> Self {
        TextView { searcher }
    }

    pub(crate) fn searcher(&self) -> &Searcher {
        &self.searcher
    }
}

impl fmt::Debug for TextView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextView")
            .field("documents", &self.searcher.num_docs())
            .finish_non_exhaustive()
    }
}
