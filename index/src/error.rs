//! The index's error type.

use std::path::{Path, PathBuf};

/// Errors of the knowledge index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A vector's length differs from the index's dimension.
    #[error(
        "vector dimension mismatch: the index holds {expected}-dimensional vectors, got {found} \
         (hint: embed with the index's model)"
    )]
    DimensionMismatch {
        /// The index's dimension.
        expected: usize,
        /// The offending vector's length.
        found: usize,
    },
    /// Bad input or a bad index directory.
    #[error("{0}")]
    Invalid(String),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// usearch reported an error.
    #[error("ANN index: {0}")]
    Ann(String),
    /// Arrow reported an error.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// Evaluating a row filter failed.
    #[error("filter: {0}")]
    Filter(String),
    /// The full-text index (tantivy) reported an error.
    #[error("full-text index: {0}")]
    FullText(String),
    /// A text query in tantivy's query language does not parse; the message names the position.
    #[error("text query: {0}")]
    QuerySyntax(String),
}

impl IndexError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
