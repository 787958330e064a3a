//! Full-text (BM25) search over a knowledge index, with row filters evaluated inside the search.
//!
//! Like vector search, it reads the state published when it starts — rows and text index of the
//! same generation — and a filter becomes a set of allowed keys that the text index's collector
//! consults for every matching document, so the answer holds `k` rows whenever `k` matching
//! rows contain a query term.

use std::sync::Arc;

use arrow::array::RecordBatch;

use crate::fulltext::TextColumn;
use crate::{IndexError, KnowledgeIndex, RowPredicate, TextQuery, TextStatistics};

impl KnowledgeIndex {
    /// The columns indexed for full-text search (empty: none).
    pub fn text_columns(&self) -> Vec<TextColumn> {
        self.full_text
            .as_ref()
            .map(|f| f.columns().to_vec())
            .unwrap_or_default()
    }

    /// Checks that `query` can run (its column is indexed, its syntax parses), without
    /// running it.
    pub fn check_text_query(&self, query: &TextQuery) -> Result<(), IndexError> {
        match &self.full_text {
            Some(full_text) => full_text.check(query),
            None => Err(self.no_full_text()),
        }
    }

    fn no_full_text(&self) -> IndexError {
        IndexError::Invalid(format!(
            "{} has no full-text index (hint: create it with OPTIONS ('text_columns' 'col1, col2'))",
            self.dir.display()
        ))
    }

    /// The `k` rows scoring best for `query` under BM25 among those passing `filter`, best
    /// first, as one batch of [`KnowledgeIndex::search_schema`] (`score`: the BM25 score).
    /// Rows containing none of the query's terms never answer.
    pub fn text_search(
        &self,
        query: &TextQuery,
        k: usize,
        filter: Option<&RowPredicate<'_>>,
    ) -> Result<RecordBatch, IndexError> {
        self.text_search_with(query, k, filter, None)
    }

    /// [`KnowledgeIndex::text_search`] scored with `statistics` in place of this index's own
    /// where given: the statistics summed over the shards of one table (see
    /// [`KnowledgeIndex::text_statistics`]), so every shard scores as one index would.
    pub fn text_search_with(
        &self,
        query: &TextQuery,
        k: usize,
        filter: Option<&RowPredicate<'_>>,
        statistics: Option<&TextStatistics>,
    ) -> Result<RecordBatch, IndexError> {
        let state = self.current();
        let (Some(full_text), Some(view)) = (&self.full_text, &state.text) else {
            return Err(self.no_full_text());
        };
        let k = k.min(state.locations.len());
        let hits = match filter {
            None => full_text.search(view, query, k, None::<fn(u64) -> bool>, statistics)?,
            Some(filter) => {
                let allowed = Arc::new(self.allowed_keys(&state, filter, false)?);
                full_text.search(view, query, k, Some(move |key| allowed.contains(key)), statistics)?
            }
        };
        self.gather(&state, &hits)
    }

    /// The BM25 statistics of `query` in this index's published state: documents, tokens of
    /// the fields it reads, documents holding each of its terms.
    pub fn text_statistics(&self, query: &TextQuery) -> Result<TextStatistics, IndexError> {
        let state = self.current();
        let (Some(full_text), Some(view)) = (&self.full_text, &state.text) else {
            return Err(self.no_full_text());
        };
        full_text.statistics(view, query)
    }
}
