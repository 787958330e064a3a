//! Text queries: plain terms by default, tantivy's query language when asked for.

use tantivy::Index;
use tantivy::Term;
use tantivy::query::{BooleanQuery, EmptyQuery, Occur, Query, QueryParser, QueryParserError, TermQuery};
use tantivy::schema::{Field, IndexRecordOption};

use super::{Analyzer, TextColumn};
use crate::IndexError;

/// How a query text is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QuerySyntax {
    /// The text's words, analyzed like the column, each optional (BM25 sums what matches).
    /// Nothing in the text is an operator: any text is a valid query.
    #[default]
    Terms,
    /// tantivy's query language: `+must -not "a phrase" title:word word^2 (a OR b)`, fields
    /// being the text column names.
    Tantivy,
}

impl QuerySyntax {
    /// Parses `terms` or `tantivy`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "terms" | "plain" => Some(QuerySyntax::Terms),
            "tantivy" => Some(QuerySyntax::Tantivy),
            _ => None,
        }
    }
}

/// A full-text query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextQuery {
    /// The query text.
    pub text: String,
    /// The text column searched (`None`: all of them, as one text).
    pub column: Option<String>,
    /// How the text is read.
    pub syntax: QuerySyntax,
}

impl TextQuery {
    /// A plain-terms query over all text columns.
    pub fn terms(text: impl Into<String>) -> Self {
        TextQuery {
            text: text.into(),
            column: None,
            syntax: QuerySyntax::Terms,
        }
    }

    /// The tantivy query searching `field` (analyzed with `analyzer`).
    pub(crate) fn build(
        &self,
        index: &Index,
        field: Field,
        analyzer: Analyzer,
        columns: &[TextColumn],
        all: Field,
    ) -> Result<Box<dyn Query>, IndexError> {
        match self.syntax {
            QuerySyntax::Terms => {
                let clauses: Vec<(Occur, Box<dyn Query>)> = analyzer
                    .terms_in(index.tokenizers(), &self.text)
                    .into_iter()
                    .map(|term| {
                        let query: Box<dyn Query> = Box::new(TermQuery::new(
                            Term::from_field_text(field, &term),
                            IndexRecordOption::WithFreqs,
                        ));
                        (Occur::Should, query)
                    })
                    .collect();
                if clauses.is_empty() {
                    return Ok(Box::new(EmptyQuery));
                }
                Ok(Box::new(BooleanQuery::new(clauses)))
            }
            QuerySyntax::Tantivy => {
                let default_field = if self.column.is_some() { field } else { all };
                let parser = QueryParser::for_index(index, vec![default_field]);
                let (query, errors) = parser.parse_query_lenient(&self.text);
                match errors.into_iter().next() {
                    None => Ok(query),
                    Some(error) => Err(IndexError::QuerySyntax(describe(error, columns))),
                }
            }
        }
    }
}

/// A query-language error, in words naming where and what.
fn describe(error: QueryParserError, columns: &[TextColumn]) -> String {
    match error {
        QueryParserError::SyntaxError(message) => format!("syntax error: {message}"),
        QueryParserError::FieldDoesNotExist(field) => format!(
            "no text column '{field}' (text columns: {})",
            columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}
