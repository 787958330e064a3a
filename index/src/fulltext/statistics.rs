//! BM25 statistics of one text query over one index, to be summed over several indexes (the
//! shards of one table) so that each scores its documents as one index holding all of them
//! would: documents, tokens per field, documents per query term.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tantivy::query::Bm25StatisticsProvider;
use tantivy::schema::Field;
use tantivy::{Searcher, Term};

/// The statistics BM25 scores a query with (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextStatistics {
    /// Documents in the index.
    pub documents: u64,
    /// Tokens in each field the query reads, by the field's number.
    pub tokens: Vec<(u32, u64)>,
    /// Documents holding each of the query's terms: the term's field number, its value as
    /// tantivy serializes it (type and bytes), and the count.
    pub term_documents: Vec<(u32, Vec<u8>, u64)>,
}

impl TextStatistics {
    /// The statistics of `terms` in `searcher`.
    pub(crate) fn of(searcher: &Searcher, terms: &[Term]) -> tantivy::Result<Self> {
        let mut fields: Vec<Field> = terms.iter().map(Term::field).collect();
        fields.sort();
        fields.dedup();
        let tokens = fields
            .into_iter()
            .map(|field| Ok((field.field_id(), searcher.total_num_tokens(field)?)))
            .collect::<tantivy::Result<_>>()?;
        let mut term_documents = Vec::with_capacity(terms.len());
        for term in terms {
            let (field, value) = key(term);
            if !term_documents.iter().any(|(f, v, _)| *f == field && *v == value) {
                term_documents.push((field, value, searcher.doc_freq(term)?));
            }
        }
        Ok(TextStatistics {
            documents: searcher.num_docs(),
            tokens,
            term_documents,
        })
    }

    /// Adds `other`'s counts to these (another shard's statistics of the same query).
    pub fn add(&mut self, other: &TextStatistics) {
        self.documents += other.documents;
        for (field, tokens) in &other.tokens {
            match self.tokens.iter_mut().find(|(f, _)| f == field) {
                Some((_, mine)) => *mine += tokens,
                None => self.tokens.push((*field, *tokens)),
            }
        }
        for (field, value, documents) in &other.term_documents {
            match self
                .term_documents
                .iter_mut()
                .find(|(f, v, _)| f == field && v == value)
            {
                Some((_, _, mine)) => *mine += documents,
                None => self.term_documents.push((*field, value.clone(), *documents)),
            }
        }
    }
}

/// A term's field number and serialized value (its type and bytes).
fn key(term: &Term) -> (u32, Vec<u8>) {
    (term.field().field_id(), term.value().as_serialized().to_vec())
}

/// Scores with given statistics, falling back to the searcher's own for what they lack.
pub(crate) struct GivenStatistics<'a> {
    documents: u64,
    tokens: HashMap<u32, u64>,
    term_documents: HashMap<(u32, Vec<u8>), u64>,
    searcher: &'a Searcher,
}

impl<'a> GivenStatistics<'a> {
    pub(crate) fn new(statistics: &'a TextStatistics, searcher: &'a Searcher) -> Self {
        GivenStatistics {
            documents: statistics.documents,
            tokens: statistics.tokens.iter().copied().collect(),
            term_documents: statistics
                .term_documents
                .iter()
                .map(|(field, value, n)| ((*field, value.clone()), *n))
                .collect(),
            searcher,
        }
    }
}

impl Bm25StatisticsProvider for GivenStatistics<'_> {
    fn total_num_tokens(&self, field: Field) -> tantivy::Result<u64> {
        match self.tokens.get(&field.field_id()) {
            Some(tokens) => Ok(*tokens),
            None => self.searcher.total_num_tokens(field),
        }
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        Ok(self.documents)
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        match self.term_documents.get(&key(term)) {
            Some(documents) => Ok(*documents),
            None => self.searcher.doc_freq(term),
        }
    }
}
