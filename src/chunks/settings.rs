//! How a chunked index cuts its documents (`chunking.json`), from the `STORED AS KB` options.

use std::path::{Path, PathBuf};

use datafusion::arrow::datatypes::{DataType, Schema};
use serde::{Deserialize, Serialize};

use mkflow_index::IndexError;

/// File of the chunk settings, in the index directory.
pub const CHUNKING_FILE: &str = "chunking.json";

/// Columns chunked by default, the first one declared.
const DEFAULT_CHUNK_COLUMNS: [&str; 3] = ["body", "text", "content"];

/// Column prepended to every chunk by default, when declared.
const DEFAULT_CONTEXT_COLUMN: &str = "title";

/// How a chunked index cuts its documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSettings {
    /// The document column cut into chunks.
    pub column: String,
    /// A document column (e.g. the title) read before every chunk when it is embedded and
    /// indexed for BM25, so a chunk is found by what its document is about.
    pub context: Option<String>,
    /// Most tokens of the chunked column a chunk holds (the model's tokenizer counts).
    pub max_tokens: usize,
    /// Tokens a chunk repeats from the end of the one before.
    pub overlap_tokens: usize,
}

/// Whether `data_type` holds text.
fn is_text(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

impl ChunkSettings {
    /// The settings the options ask for: `chunk_tokens` (required), `chunk_overlap` (default:
    /// a tenth of `chunk_tokens`), `chunk_column` (default: the first of `body`, `text`,
    /// `content` declared) and `chunk_context` (default: `title` when declared; `''` for none),
    /// checked against the document columns.
    pub fn from_options(
        columns: &Schema,
        key_column: &str,
        chunk_tokens: &str,
        overlap: Option<&str>,
        column: Option<&str>,
        context: Option<&str>,
    ) -> Result<Self, String> {
        let number = |name: &str, value: &str| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("option {name}: '{value}' is not a whole number"))
        };
        let max_tokens = number("chunk_tokens", chunk_tokens)?;
        if max_tokens == 0 {
            return Err("option chunk_tokens: a chunk needs at least one token".into());
        }
        let overlap_tokens = match overlap {
            Some(value) => number("chunk_overlap", value)?,
            None => max_tokens / 10,
        };
        let text_columns: Vec<&str> = columns
            .fields()
            .iter()
            .filter(|f| is_text(f.data_type()) && f.name() != key_column)
            .map(|f| f.name().as_str())
            .collect();
        let column = match column {
            Some(name) => name.to_string(),
            None => DEFAULT_CHUNK_COLUMNS
                .into_iter()
                .find(|c| text_columns.contains(c))
                .ok_or_else(|| {
                    format!(
                        "option chunk_tokens: say which column to chunk with OPTIONS ('chunk_column' '…') (text columns: {})",
                        text_columns.join(", ")
                    )
                })?
                .to_string(),
        };
        let context = match context {
            Some("") => None,
            Some(name) => Some(name.to_string()),
            None => text_columns
                .contains(&DEFAULT_CONTEXT_COLUMN)
                .then(|| DEFAULT_CONTEXT_COLUMN.to_string())
                .filter(|c| *c != column),
        };
        let settings = ChunkSettings {
            column,
            context,
            max_tokens,
            overlap_tokens,
        };
        settings.check(columns)?;
        Ok(settings)
    }

    /// Checks that the chunked and context columns are text columns of `columns`.
    pub fn check(&self, columns: &Schema) -> Result<(), String> {
        let mut named = vec![("chunk_column", &self.column)];
        named.extend(self.context.as_ref().map(|c| ("chunk_context", c)));
        for (option, name) in named {
            match columns.field_with_name(name) {
                Ok(field) if is_text(field.data_type()) => {}
                Ok(field) => {
                    return Err(format!(
                        "option {option}: column '{name}' is {}, not text",
                        field.data_type()
                    ));
                }
                Err(_) => return Err(format!("option {option}: there is no column '{name}'")),
            }
        }
        if self.context.as_ref() == Some(&self.column) {
            return Err(format!(
                "option chunk_context: '{}' is the chunked column itself",
                self.column
            ));
        }
        Ok(())
    }

    /// The settings stored in `dir`, if it is a chunked index.
    pub fn read(dir: &Path) -> Result<Option<Self>, IndexError> {
        let path = dir.join(CHUNKING_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| IndexError::Invalid(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IndexError::Io { path, source: e }),
        }
    }

    /// Stores the settings in `dir` atomically (temporary file, fsync, rename).
    pub fn write(&self, dir: &Path) -> Result<(), IndexError> {
        let path = dir.join(CHUNKING_FILE);
        let temporary: PathBuf = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("chunk settings serialise");
        let io = |source| IndexError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&temporary, text).map_err(io)?;
        std::fs::File::open(&temporary).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&temporary, &path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;

    fn columns() -> Schema {
        Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("title", DataType::Utf8, true),
            Field::new("body", DataType::Utf8, true),
            Field::new("year", DataType::Int64, true),
        ])
    }

    #[test]
    fn defaults_chunk_the_body_under_its_title() {
        let s = ChunkSettings::from_options(&columns(), "doc_id", "200", None, None, None).unwrap();
        assert_eq!(s.column, "body");
        assert_eq!(s.context.as_deref(), Some("title"));
        assert_eq!((s.max_tokens, s.overlap_tokens), (200, 20));
        let s = ChunkSettings::from_options(&columns(), "doc_id", "100", Some("0"), Some("title"), Some("")).unwrap();
        assert_eq!((s.column.as_str(), s.context, s.overlap_tokens), ("title", None, 0));
    }

    #[test]
    fn bad_options_are_named() {
        let error = |tokens, column, context| {
            ChunkSettings::from_options(&columns(), "doc_id", tokens, None, column, context).unwrap_err()
        };
        assert!(error("many", None, None).contains("chunk_tokens: 'many'"));
        assert!(error("0", None, None).contains("at least one token"));
        assert!(error("200", Some("year"), None).contains("'year' is Int64, not text"));
        assert!(error("200", Some("abstract"), None).contains("no column 'abstract'"));
        assert!(error("200", None, Some("body")).contains("the chunked column itself"));
        let only_ids = Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("summary", DataType::Utf8, true),
        ]);
        let e = ChunkSettings::from_options(&only_ids, "doc_id", "200", None, None, None).unwrap_err();
        assert!(e.contains("'chunk_column'") && e.contains("summary"), "{e}");
    }
}
