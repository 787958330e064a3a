//! The full-text side of a knowledge index: a tantivy BM25 index (k1 = 1.2, b = 0.75) over the
//! text columns, in the index directory's `fulltext/`, committed in the same commit as the rows.
//!
//! One tantivy document per row: its key (`_key`, a fast field), its document id (`_doc`, for
//! upserts and deletes), each text column in a field of the column's name, and — when there
//! are several — all of them in `_all`, the field a search without a column reads (as if the
//! row's texts were one document).
//!
//! **Commit protocol.** A commit stages its rows and deletes in the tantivy writer, writes the
//! row files, commits tantivy with the new generation as the commit's payload, and only then
//! writes the manifest. A crash before the tantivy commit leaves tantivy at the manifest's
//! generation; a crash between the two leaves tantivy one generation ahead. On open, a tantivy
//! index whose payload is not the manifest's generation — or that is missing, corrupt, or
//! built for other columns — is rebuilt from the rows, with a warning. So the rows, the text
//! index and the stored source offsets never disagree.
//!
//! Every published state carries the tantivy `Searcher` of its own generation: a search reads
//! the text index and the rows of the same commit.

mod analyzer;
mod query;
mod statistics;
pub(crate) mod view;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use tantivy::collector::{FilterCollector, TopDocs};
use tantivy::indexer::IndexWriterOptions;
use tantivy::schema::{FAST, Field, INDEXED, IndexRecordOption, STRING, TextFieldIndexing, TextOptions};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

pub use analyzer::{Analyzer, TextColumn};
pub use query::{QuerySyntax, TextQuery};
use statistics::GivenStatistics;
pub use statistics::TextStatistics;
use view::TextView;

use crate::state::State;
use crate::{Hit, IndexError};

/// The text index's directory inside the index directory.
pub const FULLTEXT_DIR: &str = "fulltext";

/// Field names of the bookkeeping fields (reserved: no text column may take them).
const KEY_FIELD: &str = "_key";
const DOC_FIELD: &str = "_doc";
const ALL_FIELD: &str = "_all";

/// The text indexes open in this process, by index directory: opening an index twice (two
/// engines over one data directory) shares one, since a directory has one writer.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<FullText>>>> = LazyLock::new(Default::default);

/// Memory the tantivy writer buffers before it flushes a segment on its own.
const WRITER_MEMORY_BYTES: usize = 64 << 20;

/// The text columns to index by default: every string column but the key column.
pub fn default_text_columns(schema: &Schema, key_column: &str) -> Vec<TextColumn> {
    schema
        .fields()
        .iter()
        .filter(|f| f.name() != key_column && is_text_type(f.data_type()))
        .map(|f| TextColumn {
            name: f.name().clone(),
            analyzer: Analyzer::default(),
        })
        .collect()
}

fn is_text_type(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Checks that `columns` name distinct text columns of `schema`.
pub(crate) fn check_text_columns(schema: &Schema, columns: &[TextColumn]) -> Result<(), IndexError> {
    for (i, column) in columns.iter().enumerate() {
        if [KEY_FIELD, DOC_FIELD, ALL_FIELD].contains(&column.name.as_str()) {
            return Err(IndexError::Invalid(format!(
                "text column name '{}' is reserved",
                column.name
            )));
        }
        let field = schema.field_with_name(&column.name).map_err(|_| {
            IndexError::Invalid(format!(
                "text_columns names '{}', which is not a column (columns: {})",
                column.name,
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if !is_text_type(field.data_type()) {
            return Err(IndexError::Invalid(format!(
                "text_columns names '{}', a {} column: only text columns can be indexed for full-text search",
                column.name,
                field.data_type()
            )));
        }
        if columns[..i].iter().any(|c| c.name == column.name) {
            return Err(IndexError::Invalid(format!(
                "text_columns names '{}' twice",
                column.name
            )));
        }
    }
    Ok(())
}

/// The tantivy fields of the text index.
struct Fields {
    key: Field,
    doc: Field,
    /// The field a search without a column reads: `_all`, or the only text column's.
    all: Field,
    /// Whether `_all` is a field of its own (several text columns).
    all_is_own: bool,
    /// (position in the row schema, field) of each text column.
    columns: Vec<(usize, Field)>,
}

/// The tantivy index of one knowledge index, shared by its states.
pub(crate) struct FullText {
    dir: PathBuf,
    columns: Vec<TextColumn>,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    /// Created on the first commit (the writer takes the directory's lock: a process that only
    /// reads never takes it).
    writer: Mutex<Option<IndexWriter>>,
}

impl fmt::Debug for FullText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FullText")
            .field("dir", &self.dir)
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

fn text_error(what: &str, e: impl fmt::Display) -> IndexError {
    IndexError::FullText(format!("{what}: {e}"))
}

impl FullText {
    /// The text index in `index_dir/fulltext` for `columns` of the row `schema`: the one this
    /// process already has open there (its writer is the directory's only one), else opened —
    /// or created empty when it is missing, unreadable or built for other columns (the caller's
    /// [`FullText::sync`] then rebuilds it from the rows).
    pub(crate) fn open_shared(
        index_dir: &Path,
        schema: &Schema,
        columns: Vec<TextColumn>,
    ) -> Result<Arc<Self>, IndexError> {
        check_text_columns(schema, &columns)?;
        let dir = index_dir.join(FULLTEXT_DIR);
        let key = std::fs::canonicalize(index_dir).unwrap_or_else(|_| index_dir.to_path_buf());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, text| text.strong_count() > 0);
        if let Some(text) = open.get(&key).and_then(Weak::upgrade)
            && text.columns == columns
        {
            return Ok(text);
        }
        let text = Arc::new(Self::open(dir, schema, columns)?);
        open.insert(key, Arc::downgrade(&text));
        Ok(text)
    }

    fn open(dir: PathBuf, schema: &Schema, columns: Vec<TextColumn>) -> Result<Self, IndexError> {
        let (tantivy_schema, fields) = tantivy_schema(schema, &columns)?;
        let existing = if dir.join("meta.json").is_file() {
            match Index::open_in_dir(&dir) {
                Ok(index) if index.schema() == tantivy_schema => Some(index),
                Ok(_) => {
                    log::warn!(
                        "{}: built for other text columns; rebuilding it from the rows",
                        dir.display()
                    );
                    None
                }
                Err(e) => {
                    log::warn!("{}: unreadable ({e}); rebuilding it from the rows", dir.display());
                    None
                }
            }
        } else {
            None
        };
        let index = match existing {
            Some(index) => index,
            None => {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| IndexError::io(&dir, e))?;
                }
                std::fs::create_dir_all(&dir).map_err(|e| IndexError::io(&dir, e))?;
                Index::create_in_dir(&dir, tantivy_schema).map_err(|e| text_error("creating the text index", e))?
            }
        };
        Analyzer::register_all(columns.iter().map(|c| c.analyzer), index.tokenizers());
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| text_error("opening the text index", e))?;
        Ok(FullText {
            dir,
            columns,
            index,
            reader,
            fields,
            writer: Mutex::new(None),
        })
    }

    /// The indexed columns.
    pub(crate) fn columns(&self) -> &[TextColumn] {
        &self.columns
    }

    /// The generation the text index last committed (its commit payload).
    fn committed_generation(&self) -> Option<u64> {
        self.index.load_metas().ok()?.payload?.parse().ok()
    }

    /// The view of `state`'s generation: the committed text index when it is that generation's,
    /// else the text index rebuilt from `state`'s rows (with a warning) and committed as it.
    pub(crate) fn sync(&self, state: &State) -> Result<TextView, IndexError> {
        let generation = state.manifest.text_generation();
        let committed = self.committed_generation();
        if committed != Some(generation) {
            log::warn!(
                "{}: at generation {}, the rows at {generation}; rebuilding the text index from {} rows",
                self.dir.display(),
                committed.map_or("none".to_string(), |g| g.to_string()),
                state.locations.len()
            );
            if let Err(e) = self.rebuild(state) {
                // Another process writing this index is mid-commit (its text index commits just
                // before its manifest): read the text index as it is rather than fail.
                let Some(committed) = committed else { return Err(e) };
                log::warn!(
                    "{}: cannot rebuild ({e}); text searches in this process read generation {committed}",
                    self.dir.display()
                );
            }
        }
        self.view()
    }

    /// The view of the last commit.
    fn view(&self) -> Result<TextView, IndexError> {
        self.reader
            .reload()
            .map_err(|e| text_error("reloading the text index", e))?;
        TextView::new(self.reader.searcher())
    }

    /// Replaces the text index's documents with the live rows of `state`.
    fn rebuild(&self, state: &State) -> Result<(), IndexError> {
        let mut writer = self.writer()?;
        let writer = writer.as_mut().expect("writer created");
        writer
            .delete_all_documents()
            .map_err(|e| text_error("clearing the text index", e))?;
        for segment in &state.segments {
            let live: Vec<bool> = segment.keys.iter().map(|k| state.is_live(*k)).collect();
            self.add_rows(writer, &segment.batch, &segment.keys, Some(&live), state)?;
        }
        self.commit_locked(writer, state.manifest.text_generation())
    }

    /// The writer, created on first use.
    fn writer(&self) -> Result<MutexGuard<'_, Option<IndexWriter>>, IndexError> {
        let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let options = IndexWriterOptions::builder()
                .memory_budget_per_thread(WRITER_MEMORY_BYTES)
                .num_worker_threads(1)
                .num_merge_threads(1)
                .build();
            let writer = self.index.writer_with_options(options).map_err(|e| {
                text_error(
                    &format!(
                        "{} (hint: is another mkflow process writing this index?)",
                        self.dir.display()
                    ),
                    e,
                )
            })?;
            *guard = Some(writer);
        }
        Ok(guard)
    }

    /// Stages the rows of `batch` (keys `keys`) as the live versions of their documents: each
    /// replaces the document's earlier version, staged or committed.
    pub(crate) fn stage_rows(&self, batch: &RecordBatch, keys: &[u64], state: &State) -> Result<(), IndexError> {
        let mut writer = self.writer()?;
        let writer = writer.as_mut().expect("writer created");
        self.add_rows(writer, batch, keys, None, state)
    }

    /// Stages the removal of document `doc_id`.
    pub(crate) fn stage_delete(&self, doc_id: &str) -> Result<(), IndexError> {
        let writer = self.writer()?;
        writer
            .as_ref()
            .expect("writer created")
            .delete_term(Term::from_field_text(self.fields.doc, doc_id));
        Ok(())
    }

    /// Commits what was staged as `generation`; returns the view of it.
    pub(crate) fn commit(&self, generation: u64) -> Result<TextView, IndexError> {
        {
            let mut writer = self.writer()?;
            self.commit_locked(writer.as_mut().expect("writer created"), generation)?;
        }
        self.view()
    }

    fn commit_locked(&self, writer: &mut IndexWriter, generation: u64) -> Result<(), IndexError> {
        let mut prepared = writer
            .prepare_commit()
            .map_err(|e| text_error("committing the text index", e))?;
        prepared.set_payload(&generation.to_string());
        prepared
            .commit()
            .map_err(|e| text_error("committing the text index", e))?;
        Ok(())
    }

    /// Drops what was staged since the last commit (after a failed commit).
    pub(crate) fn rollback(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = writer.as_mut()
            && let Err(e) = w.rollback()
        {
            log::warn!("{}: rollback failed ({e}); dropping the writer", self.dir.display());
            *writer = None;
        }
    }

    /// Adds the rows of `batch` (those marked in `live`, or all) as documents, each replacing
    /// its document id's earlier version.
    fn add_rows(
        &self,
        writer: &IndexWriter,
        batch: &RecordBatch,
        keys: &[u64],
        live: Option<&[bool]>,
        state: &State,
    ) -> Result<(), IndexError> {
        let key_column = batch
            .schema()
            .index_of(&state.manifest.key_column)
            .map_err(|_| IndexError::Invalid(format!("key column '{}' missing", state.manifest.key_column)))?;
        let ids = cast(batch.column(key_column), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let texts = self
            .fields
            .columns
            .iter()
            .map(|(position, field)| Ok((cast(batch.column(*position), &DataType::Utf8)?, *field)))
            .collect::<Result<Vec<_>, IndexError>>()?;
        for (row, &key) in keys.iter().enumerate() {
            if live.is_some_and(|live| !live[row]) || ids.is_null(row) {
                continue;
            }
            let id = ids.value(row);
            let mut document = TantivyDocument::new();
            document.add_u64(self.fields.key, key);
            document.add_text(self.fields.doc, id);
            let mut all = String::new();
            for (column, field) in &texts {
                let column = column.as_string::<i32>();
                if column.is_null(row) {
                    continue;
                }
                let text = column.value(row);
                document.add_text(*field, text);
                if self.fields.all_is_own {
                    if !all.is_empty() {
                        all.push('\n');
                    }
                    all.push_str(text);
                }
            }
            if self.fields.all_is_own && !all.is_empty() {
                document.add_text(self.fields.all, &all);
            }
            writer.delete_term(Term::from_field_text(self.fields.doc, id));
            writer
                .add_document(document)
                .map_err(|e| text_error("indexing a row's text", e))?;
        }
        Ok(())
    }

    /// The field searched for `column` (`None`: all text columns).
    fn field_of(&self, column: Option<&str>) -> Result<(Field, Analyzer), IndexError> {
        match column {
            None => Ok((
                self.fields.all,
                self.columns.first().map(|c| c.analyzer).unwrap_or_default(),
            )),
            Some(name) => self
                .columns
                .iter()
                .zip(&self.fields.columns)
                .find(|(c, _)| c.name == name)
                .map(|(c, (_, field))| (*field, c.analyzer))
                .ok_or_else(|| {
                    IndexError::Invalid(format!(
                        "column '{name}' is not indexed for full-text search (text columns: {})",
                        self.column_names()
                    ))
                }),
        }
    }

    fn column_names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks that `query` names an indexed column and parses.
    pub(crate) fn check(&self, query: &TextQuery) -> Result<(), IndexError> {
        let (field, analyzer) = self.field_of(query.column.as_deref())?;
        query.build(&self.index, field, analyzer, &self.columns, self.fields.all)?;
        Ok(())
    }

    /// The `k` best-scoring rows of `view`'s generation for `query` (among those `accept` lets
    /// through, when given), best first (BM25 scores). The view holds exactly the live rows of
    /// its generation (deletes are applied when the text index commits), so an unfiltered
    /// search checks nothing per matching document.
    /// `query` as tantivy runs it.
    fn tantivy_query(&self, query: &TextQuery) -> Result<Box<dyn tantivy::query::Query>, IndexError> {
        let (field, analyzer) = self.field_of(query.column.as_deref())?;
        query.build(&self.index, field, analyzer, &self.columns, self.fields.all)
    }

    /// The BM25 statistics `query` is scored with in `view` (see [`TextStatistics`]).
    pub(crate) fn statistics(&self, view: &TextView, query: &TextQuery) -> Result<TextStatistics, IndexError> {
        let tantivy_query = self.tantivy_query(query)?;
        let mut terms = Vec::new();
        tantivy_query.query_terms(&mut |term, _| terms.push(term.clone()));
        TextStatistics::of(view.searcher(), &terms).map_err(|e| text_error("text statistics", e))
    }

    pub(crate) fn search(
        &self,
        view: &TextView,
        query: &TextQuery,
        k: usize,
        accept: Option<impl Fn(u64) -> bool + Send + Sync + Clone + 'static>,
        statistics: Option<&TextStatistics>,
    ) -> Result<Vec<Hit>, IndexError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let tantivy_query = self.tantivy_query(query)?;
        let top_k = TopDocs::with_limit(k).order_by_score();
        let searcher = view.searcher();
        let given = statistics.map(|s| GivenStatistics::new(s, searcher));
        let top = match (accept, &given) {
            (Some(accept), None) => searcher.search(
                tantivy_query.as_ref(),
                &FilterCollector::new(KEY_FIELD.to_string(), accept, top_k),
            ),
            (Some(accept), Some(given)) => searcher.search_with_statistics_provider(
                tantivy_query.as_ref(),
                &FilterCollector::new(KEY_FIELD.to_string(), accept, top_k),
                given,
            ),
            (None, None) => searcher.search(tantivy_query.as_ref(), &top_k),
            (None, Some(given)) => searcher.search_with_statistics_provider(tantivy_query.as_ref(), &top_k, given),
        }
        .map_err(|e| text_error("text search", e))?;
        Ok(top
            .into_iter()
            .filter_map(|(score, address)| {
                let key = view.key(address.segment_ord, address.doc_id)?;
                Some(Hit { key, score })
            })
            .collect())
    }
}

/// The tantivy schema for `columns` of the row `schema`.
fn tantivy_schema(schema: &Schema, columns: &[TextColumn]) -> Result<(tantivy::schema::Schema, Fields), IndexError> {
    let mut builder = tantivy::schema::Schema::builder();
    let key = builder.add_u64_field(KEY_FIELD, INDEXED | FAST);
    let doc = builder.add_text_field(DOC_FIELD, STRING);
    let text_options = |analyzer: Analyzer| {
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(&analyzer.tokenizer_name())
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
    };
    let mut fields = Vec::with_capacity(columns.len());
    for column in columns {
        let position = schema
            .index_of(&column.name)
            .map_err(|_| IndexError::Invalid(format!("text column '{}' is not a column", column.name)))?;
        fields.push((
            position,
            builder.add_text_field(&column.name, text_options(column.analyzer)),
        ));
    }
    let all_is_own = columns.len() > 1;
    let all = if all_is_own {
        builder.add_text_field(ALL_FIELD, text_options(columns[0].analyzer))
    } else {
        fields.first().map(|(_, f)| *f).unwrap_or(doc)
    };
    Ok((
        builder.build(),
        Fields {
            key,
            doc,
            all,
            all_is_own,
            columns: fields,
        },
    ))
}
