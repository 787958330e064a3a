//! The knowledge index: an Arrow row store plus a usearch ANN graph over one vector column,
//! persisted in a directory and committed atomically.
//!
//! Directory layout (generation `G` is the manifest's commit counter):
//! - `manifest.json`: model, dimension, quantization, key and vector columns, current files;
//! - `rows-G.arrow`: every live row (Arrow IPC file) with its `u64` key in column `_key`;
//! - `ann-G.usearch`: the HNSW graph with the vectors of those keys;
//! - `delta-G.arrow`: rows upserted by a later commit `G` (same format), replayed on open;
//! - `commit.log`: the manifests (and delta files' bytes) of the small commits since
//!   `manifest.json` was last written, each durable after one flush of this preallocated file;
//!   opening replays it into the files (see [`commit_log`]);
//! - `fulltext/`: the tantivy BM25 index over the text columns, committed with generation `G`
//!   as its payload just before the manifest (see [`fulltext`]).
//!
//! An upsert that is small next to the index (at most an eighth of its rows) writes only its
//! rows as a delta, so a streaming micro-batch costs time proportional to what it adds, not to
//! the index. Once the deltas would hold more than a quarter of the index or number
//! [`MAX_DELTA_FILES`], for larger upserts, and on every delete, the commit rewrites the rows and
//! the graph in full and drops the deltas (amortised, each row is rewritten a bounded number of
//! times) — or, with background compaction on, leaves that rewrite to [`KnowledgeIndex::compact`]
//! run off the write path (see [`compaction`]). Reopening loads the graph as saved and re-inserts the delta rows' vectors, so
//! answers match the pre-crash index within HNSW's approximation (exactly, once compacted).
//!
//! Rows are upserted by the key column (`doc_id` by default): a row whose key exists replaces
//! the old row and its vector. Each [`KnowledgeIndex::upsert`] or [`KnowledgeIndex::delete`]
//! is one commit; it is all-or-nothing, on disk and in memory.

#![warn(missing_docs)]

mod ann;
mod backlog;
mod commit;
mod commit_log;
mod compaction;
mod error;
mod faults;
mod files;
pub mod fulltext;
mod group;
mod layered;
mod manifest;
mod mapped;
mod offsets;
mod retire;
mod rewrite;
mod search;
mod segment;
mod state;
mod text_search;
pub mod vector;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{Field, Schema, SchemaRef};

pub use ann::{AnnIndex, Hit, Quantization};
pub use backlog::MAX_BACKLOG;
pub use commit_log::LOG_FILE;
pub use error::IndexError;
pub use fulltext::{Analyzer, QuerySyntax, TextColumn, TextQuery, TextStatistics};
pub use group::GroupCommit;
pub use manifest::{MANIFEST_FILE, Manifest};
pub use offsets::SourceOffsets;
pub use rewrite::{MAX_DEFERRED_DELTAS, MAX_DELTA_FILES};
pub use search::{DEFAULT_EXACT_SEARCH_MAX_ROWS, RowPredicate, SCORE_COLUMN};
pub use vector::{vector_type, vector_values, vectors_to_array};

#[cfg(test)]
mod backlog_tests;
#[cfg(test)]
mod commit_log_tests;
#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod text_tests;

use commit_log::{Durability, SharedLog, not_the_writer};
use files::{KEY_FIELD, remove_stray_files};
use fulltext::{FullText, default_text_columns};
use group::{Companions, Retained};
use manifest::FORMAT_VERSION;
use segment::Segment;
use state::{State, doc_ids, live_rows, load_state};
use vector::{extract_vectors, vectors_to_column};

/// Settings of a new knowledge index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSettings {
    /// Embedding model whose vectors the index holds.
    pub model: String,
    /// Vector length.
    pub dimensions: usize,
    /// Storage of vectors in the ANN graph.
    pub quantization: Quantization,
    /// Document-identifier column (upsert key).
    pub key_column: String,
    /// Vector column (appended to the declared columns when absent).
    pub vector_column: String,
    /// Columns indexed for full-text search (BM25); `None`: every string column but the key
    /// column, with the English analyzer; empty: no full-text index.
    pub text_columns: Option<Vec<TextColumn>>,
}

/// A batch validated for an upsert, with its document ids and vectors.
type Prepared = (RecordBatch, Vec<String>, Vec<Option<Vec<f32>>>);

/// What an upsert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpsertStats {
    /// Rows written.
    pub rows: usize,
    /// Of those, rows that replaced an existing row with the same key.
    pub replaced: usize,
}

/// A persistent knowledge index. Cheap to share (`Arc`); reads run concurrently with each other
/// and with commits (each read sees one committed generation, whole), commits run one at a time.
#[derive(Debug)]
pub struct KnowledgeIndex {
    dir: PathBuf,
    schema: SchemaRef,
    key_column: usize,
    vector_column: usize,
    dimensions: usize,
    /// The full-text index (`None`: no text columns).
    full_text: Option<Arc<FullText>>,
    /// The published state: reads clone the `Arc` and go on with it; a commit replaces it.
    current: RwLock<Arc<State>>,
    /// Held by a commit from its first change to its publication: one commit at a time.
    writer: Mutex<()>,
    exact_search_max_rows: AtomicUsize,
    /// Whether full rewrites are left to [`KnowledgeIndex::compact`] (see [`compaction`]).
    background_compaction: AtomicBool,
    /// Set while a compaction runs (one at a time).
    compacting: AtomicBool,
    /// Set by commits while deltas pile up: a background compaction then writes at full speed.
    compaction_hurry: Arc<AtomicBool>,
    /// Held while the graph changes or a compaction copies it (see [`backlog`]).
    graph_gate: Mutex<()>,
    /// Whether the graph inserts of small upserts are left to [`KnowledgeIndex::index_backlog`].
    background_indexing: AtomicBool,
    /// The indexes committed together with this one (see [`group`]).
    companions: Companions,
    /// Replaced files kept for the generation a parent index names (companions only).
    retained: Retained,
    /// Where small commits become durable (taken under the writer lock), shared by this
    /// process's handles on the directory.
    log: SharedLog,
    /// Set while [`KnowledgeIndex::upkeep_log`] runs (one at a time).
    log_upkeep: AtomicBool,
}

impl KnowledgeIndex {
    /// Opens the index in `dir`; errors when there is none.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IndexError> {
        let dir = dir.as_ref();
        let no_index = || {
            IndexError::Invalid(format!(
                "{} holds no knowledge index ({MANIFEST_FILE} missing)",
                dir.display()
            ))
        };
        Manifest::read(dir)?.ok_or_else(no_index)?;
        let log = commit_log::attach(dir)?;
        let writer = log.lock().unwrap_or_else(|e| e.into_inner()).is_writer();
        let manifest = Manifest::read_latest(dir)?.ok_or_else(no_index)?;
        let (schema, mut state) = load_state(dir, manifest)?;
        if writer {
            remove_stray_files(dir, &state.manifest, &Default::default());
        }
        let columns = match &state.manifest.text_columns {
            Some(columns) => columns.clone(),
            None => default_text_columns(&schema, &state.manifest.key_column),
        };
        state.manifest.text_columns = Some(columns.clone());
        let full_text = open_full_text(dir, &schema, columns)?;
        if let Some(full_text) = &full_text {
            state.text = Some(full_text.sync(&state)?);
        }
        Self::from_parts(dir, schema, state, full_text, log)
    }

    /// Opens the index in `dir`, or creates it with `columns` (the vector column is appended)
    /// and `settings`. An existing index must match the settings and columns; when the settings
    /// name other text columns, its text index is rebuilt for them.
    pub fn open_or_create(
        dir: impl AsRef<Path>,
        columns: &Schema,
        settings: &IndexSettings,
    ) -> Result<Self, IndexError> {
        let dir = dir.as_ref();
        if Manifest::read(dir)?.is_some() {
            let log = commit_log::attach(dir)?;
            let mut manifest = Manifest::read_latest(dir)?.expect("the manifest was just read");
            if let Some(wanted) = &settings.text_columns
                && manifest.text_columns.as_ref() != Some(wanted)
            {
                if !log.lock().unwrap_or_else(|e| e.into_inner()).is_writer() {
                    return Err(not_the_writer(dir));
                }
                let schema = files::read_schema(&dir.join(&manifest.rows_file))?;
                fulltext::check_text_columns(&schema, wanted)?;
                log::info!(
                    "{}: text columns are now '{}'; rebuilding the text index",
                    dir.display(),
                    wanted
                        .iter()
                        .map(|c| format!("{}:{}", c.name, c.analyzer))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                manifest.text_columns = Some(wanted.clone());
                manifest.write_atomic(dir)?;
            }
            let index = Self::open(dir)?;
            index.check_compatible(columns, settings)?;
            return Ok(index);
        }
        fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let log = commit_log::attach(dir)?;
        let schema = table_schema(columns, settings)?;
        let text_columns = match &settings.text_columns {
            Some(columns) => columns.clone(),
            None => default_text_columns(&schema, &settings.key_column),
        };
        let full_text = open_full_text(dir, &schema, text_columns.clone())?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            generation: 0,
            model: settings.model.clone(),
            dimensions: settings.dimensions,
            quantization: settings.quantization,
            key_column: settings.key_column.clone(),
            vector_column: settings.vector_column.clone(),
            next_key: 0,
            rows: 0,
            rows_file: String::new(),
            ann_file: String::new(),
            deltas: Vec::new(),
            delta_rows: 0,
            source_offsets: Default::default(),
            text_columns: Some(text_columns),
            text_generation: None,
            ann_missing: Vec::new(),
            ann_removed: Vec::new(),
            companions: Default::default(),
            log_epoch: 0,
        };
        let state = State {
            ann: Arc::new(AnnIndex::new(settings.dimensions, settings.quantization)?),
            manifest,
            segments: Vec::new(),
            locations: Default::default(),
            doc_keys: Default::default(),
            vectors: 0,
            text: None,
            backlog: Default::default(),
        };
        let index = Self::from_parts(dir, schema, state, full_text, log)?;
        {
            index.check_writer()?;
            let _writer = index.lock_writer();
            let mut next = (*index.current()).clone();
            index.persist(&mut next)?;
            index.publish(next);
        }
        Ok(index)
    }

    fn from_parts(
        dir: &Path,
        schema: SchemaRef,
        state: State,
        full_text: Option<Arc<FullText>>,
        log: SharedLog,
    ) -> Result<Self, IndexError> {
        let position = |name: &str| {
            schema
                .index_of(name)
                .map_err(|_| IndexError::Invalid(format!("column '{name}' is not in the index schema")))
        };
        let key_column = position(&state.manifest.key_column)?;
        let vector_column = position(&state.manifest.vector_column)?;
        Ok(KnowledgeIndex {
            dir: dir.to_path_buf(),
            schema,
            key_column,
            vector_column,
            dimensions: state.manifest.dimensions,
            full_text,
            current: RwLock::new(Arc::new(state)),
            writer: Mutex::new(()),
            exact_search_max_rows: AtomicUsize::new(search::DEFAULT_EXACT_SEARCH_MAX_ROWS),
            background_compaction: AtomicBool::new(false),
            compacting: AtomicBool::new(false),
            compaction_hurry: Arc::new(AtomicBool::new(false)),
            graph_gate: Mutex::new(()),
            background_indexing: AtomicBool::new(false),
            companions: Companions::default(),
            retained: Retained::default(),
            log,
            log_upkeep: AtomicBool::new(false),
        })
    }

    fn check_compatible(&self, columns: &Schema, settings: &IndexSettings) -> Result<(), IndexError> {
        let manifest = self.manifest();
        let mismatch = |what: &str, have: String, want: String| {
            Err(IndexError::Invalid(format!(
                "{} already holds an index with {what} {have}, not {want} (hint: use another LOCATION or delete the directory)",
                self.dir.display()
            )))
        };
        if manifest.model != settings.model {
            return mismatch("model", manifest.model, settings.model.clone());
        }
        if manifest.dimensions != settings.dimensions {
            return mismatch(
                "dimension",
                manifest.dimensions.to_string(),
                settings.dimensions.to_string(),
            );
        }
        for field in columns.fields() {
            match self.schema.field_with_name(field.name()) {
                Ok(_) => {}
                Err(_) => {
                    return mismatch(
                        "columns",
                        self.column_names().join(", "),
                        format!("a column '{}'", field.name()),
                    );
                }
            }
        }
        Ok(())
    }

    fn column_names(&self) -> Vec<String> {
        self.schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    /// The directory holding the index.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The columns of the index (declared columns plus the vector column).
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Filtered searches passing at most this many rows are exact (brute force over the
    /// passing rows) instead of a filtered HNSW walk.
    pub fn exact_search_max_rows(&self) -> usize {
        self.exact_search_max_rows.load(Ordering::Relaxed)
    }

    /// Sets [`KnowledgeIndex::exact_search_max_rows`].
    pub fn set_exact_search_max_rows(&self, rows: usize) {
        self.exact_search_max_rows.store(rows, Ordering::Relaxed);
    }

    /// The columns of the index, by reference.
    pub fn schema_ref(&self) -> &SchemaRef {
        &self.schema
    }

    /// A copy of the current manifest.
    pub fn manifest(&self) -> Manifest {
        self.current().manifest.clone()
    }

    /// Live rows.
    pub fn len(&self) -> usize {
        self.current().locations.len()
    }

    /// Whether the index holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vectors in the ANN graph, its capacity, and the bytes it uses.
    pub fn ann_stats(&self) -> (usize, usize, usize) {
        let state = self.current();
        (state.ann.len(), state.ann.capacity(), state.ann.memory_usage())
    }

    /// The published state (a commit in progress does not change it).
    pub(crate) fn current(&self) -> Arc<State> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `next` the state every later read sees. The replaced state is freed after the
    /// lock is released, and never by a reader (see [`retire`]): freeing a generation's rows
    /// takes milliseconds, which no search should wait for.
    fn publish(&self, next: State) {
        let next = Arc::new(next);
        let replaced = std::mem::replace(&mut *self.current.write().unwrap_or_else(|e| e.into_inner()), next);
        retire::retire(replaced);
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live row, in key order within each commit.
    pub fn snapshot(&self) -> Result<Vec<RecordBatch>, IndexError> {
        let state = self.current();
        state
            .segments
            .iter()
            .map(|segment| live_rows(segment, &state.locations))
            .filter(|b| !matches!(b, Ok(b) if b.num_rows() == 0))
            .collect()
    }

    /// Where streaming sources resume: the offsets stored by the last commit that carried them.
    pub fn source_offsets(&self) -> SourceOffsets {
        self.current().manifest.source_offsets.clone()
    }

    /// Inserts or replaces rows (by the key column) and commits. Batches must have the index's
    /// columns in order; the vector column may be a fixed-size or variable list of floats of the
    /// index's dimension, or null (row stored, not searchable by vector).
    pub fn upsert(&self, batches: &[RecordBatch]) -> Result<UpsertStats, IndexError> {
        self.upsert_from_source(batches, &SourceOffsets::new())
    }

    /// [`KnowledgeIndex::upsert`] that also records, in the same atomic commit, where the
    /// streaming sources that produced `batches` resume (merged into the stored offsets). With
    /// offsets and no rows it still commits the offsets (a micro-batch of refused records).
    pub fn upsert_from_source(
        &self,
        batches: &[RecordBatch],
        offsets: &SourceOffsets,
    ) -> Result<UpsertStats, IndexError> {
        let _writer = self.lock_writer();
        self.upsert_locked(batches, offsets)
    }

    /// [`KnowledgeIndex::upsert_from_source`] for a caller holding the writer lock.
    fn upsert_locked(&self, batches: &[RecordBatch], offsets: &SourceOffsets) -> Result<UpsertStats, IndexError> {
        self.check_writer()?;
        // Validate and convert everything before touching the index: an error leaves it as is.
        let prepared = self.prepare_all(batches)?;
        let mut stats = UpsertStats::default();
        if prepared.is_empty() && offsets.is_empty() {
            return Ok(stats);
        }
        let mut next = (*self.current()).clone();
        if prepared.is_empty() {
            let mut manifest = next.manifest.clone();
            manifest.source_offsets.merge(offsets);
            self.write_manifest(&mut manifest, Durability::Logged { delta: None })?;
            next.manifest = manifest;
            self.publish(next);
            return Ok(stats);
        }
        let applied = (|| {
            next.manifest.source_offsets.merge(offsets);
            let first_new_segment = self.stage_upsert(&mut next, prepared, &mut stats)?;
            self.commit_upsert(&mut next, first_new_segment)
        })();
        match applied {
            Ok(()) => {
                self.publish(next);
                Ok(stats)
            }
            Err(e) => {
                self.recover();
                Err(e)
            }
        }
    }

    /// Places validated rows into `next` (each replacing its document's row) and stages their
    /// text and vectors; returns the index of the first new segment.
    fn stage_upsert(
        &self,
        next: &mut State,
        prepared: Vec<Prepared>,
        stats: &mut UpsertStats,
    ) -> Result<usize, IndexError> {
        let first_new_segment = next.segments.len();
        let mut additions: Vec<(u64, Vec<f32>)> = Vec::new();
        let first_new_key = next.manifest.next_key;
        for (batch, doc_ids, vectors) in prepared {
            let first_key = next.manifest.next_key;
            let keys: Arc<[u64]> = (first_key..first_key + batch.num_rows() as u64).collect();
            next.manifest.next_key += batch.num_rows() as u64;
            if let Some(full_text) = &self.full_text {
                full_text.stage_rows(&batch, &keys, next)?;
            }
            stats.rows += keys.len();
            stats.replaced += next.place_segment(
                Segment::in_memory(batch, keys),
                doc_ids,
                vectors,
                self.vector_column,
                &mut additions,
                first_new_key,
            )?;
        }
        let items: Vec<(u64, &[f32])> = additions.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.update_graph(next, &items, false)?;
        Ok(first_new_segment)
    }

    /// Replaces, in one commit, the rows whose text column `column` holds one of `values` with
    /// `batches`: a row whose key `batches` upserts again is replaced, the others are deleted
    /// (a document's synthetic questions, say, when it is delivered again). Returns the rows
    /// replaced or deleted, as they were. A commit that only replaces is a delta commit; one
    /// that deletes rewrites the index in full, as every delete does.
    pub fn replace_where_in(
        &self,
        column: &str,
        values: &std::collections::HashSet<String>,
        batches: &[RecordBatch],
    ) -> Result<RecordBatch, IndexError> {
        self.check_writer()?;
        let position = self.schema.index_of(column)?;
        let prepared = self.prepare_all(batches)?;
        let upserted: std::collections::HashSet<String> =
            prepared.iter().flat_map(|(_, ids, _)| ids.iter().cloned()).collect();
        let _writer = self.lock_writer();
        let mut next = (*self.current()).clone();
        let old = match values.is_empty() {
            true => Vec::new(),
            false => self.matching_rows(&next, &where_in(position, values))?,
        };
        let taken = self.rows_of(&next, &old)?;
        if old.is_empty() && prepared.is_empty() {
            return Ok(taken);
        }
        let applied = (|| {
            let mut deleted = false;
            for (key, id) in old.iter().filter(|(_, id)| !upserted.contains(id)) {
                self.stage_delete(&mut next, *key, id)?;
                deleted = true;
            }
            let first_new_segment = self.stage_upsert(&mut next, prepared, &mut UpsertStats::default())?;
            match deleted {
                true => self.persist(&mut next),
                false => self.commit_upsert(&mut next, first_new_segment),
            }
        })();
        match applied {
            Ok(()) => {
                self.publish(next);
                Ok(taken)
            }
            Err(e) => {
                self.recover();
                Err(e)
            }
        }
    }

    /// Deletes the rows whose text column `column` holds one of `values` and commits; returns
    /// their document ids (a companion index's rows of deleted documents, say).
    pub fn delete_where_in(
        &self,
        column: &str,
        values: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, IndexError> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let position = self.schema.index_of(column)?;
        Ok(self.remove_rows(&where_in(position, values), false)?.0)
    }

    /// Like [`delete_where_in`](Self::delete_where_in), but returns the deleted rows themselves
    /// (as they were before the delete), for a caller keeping a structure derived from them.
    pub fn take_where_in(
        &self,
        column: &str,
        values: &std::collections::HashSet<String>,
    ) -> Result<RecordBatch, IndexError> {
        let position = self.schema.index_of(column)?;
        let empty = || RecordBatch::new_empty(self.schema.clone());
        if values.is_empty() {
            return Ok(empty());
        }
        Ok(self
            .remove_rows(&where_in(position, values), true)?
            .1
            .unwrap_or_else(empty))
    }

    /// Deletes the rows for which `predicate` is true and commits; returns their document ids.
    pub fn delete(&self, predicate: &RowPredicate<'_>) -> Result<Vec<String>, IndexError> {
        Ok(self.remove_rows(predicate, false)?.0)
    }

    /// Deletes the live rows for which `predicate` is true and commits; returns their document
    /// ids and, when `gather` is set, the rows (none when nothing matched).
    fn remove_rows(
        &self,
        predicate: &RowPredicate<'_>,
        gather: bool,
    ) -> Result<(Vec<String>, Option<RecordBatch>), IndexError> {
        let _writer = self.lock_writer();
        self.remove_rows_locked(predicate, gather)
    }

    /// [`KnowledgeIndex::remove_rows`] for a caller holding the writer lock.
    fn remove_rows_locked(
        &self,
        predicate: &RowPredicate<'_>,
        gather: bool,
    ) -> Result<(Vec<String>, Option<RecordBatch>), IndexError> {
        self.check_writer()?;
        let mut next = (*self.current()).clone();
        let doomed = self.matching_rows(&next, predicate)?;
        if doomed.is_empty() {
            return Ok((Vec::new(), None));
        }
        let rows = match gather {
            true => Some(self.rows_of(&next, &doomed)?),
            false => None,
        };
        let applied = (|| {
            for (key, doc_id) in &doomed {
                self.stage_delete(&mut next, *key, doc_id)?;
            }
            self.persist(&mut next)
        })();
        match applied {
            Ok(()) => {
                self.publish(next);
                Ok((doomed.into_iter().map(|(_, id)| id).collect(), rows))
            }
            Err(e) => {
                self.recover();
                Err(e)
            }
        }
    }

    /// Stops row `key` (of document `doc_id`) from being live in `next`, its text with it.
    fn stage_delete(&self, next: &mut State, key: u64, doc_id: &str) -> Result<(), IndexError> {
        next.remove(key, doc_id, self.vector_column)?;
        if let Some(full_text) = &self.full_text {
            full_text.stage_delete(doc_id)?;
        }
        Ok(())
    }

    /// The live rows of `state` at `rows` (key, document id), as one batch.
    fn rows_of(&self, state: &State, rows: &[(u64, String)]) -> Result<RecordBatch, IndexError> {
        let positions: Vec<(usize, usize)> = rows
            .iter()
            .filter_map(|(key, _)| state.locations.get(key).copied())
            .collect();
        Ok(RecordBatch::try_new(
            self.schema.clone(),
            self.gather_columns(state, &positions)?,
        )?)
    }

    /// The live rows of `state` for which `predicate` is true: (key, document id).
    fn matching_rows(&self, state: &State, predicate: &RowPredicate<'_>) -> Result<Vec<(u64, String)>, IndexError> {
        let key_name = &state.manifest.key_column;
        let mut matching = Vec::new();
        for segment in &state.segments {
            let mask = predicate(&segment.batch)?;
            if mask.true_count() == 0 {
                continue;
            }
            let ids = doc_ids(&segment.batch, self.key_column, key_name)?;
            for (row, (&key, id)) in segment.keys.iter().zip(ids).enumerate() {
                if mask.is_valid(row) && mask.value(row) && state.is_live(key) {
                    matching.push((key, id));
                }
            }
        }
        Ok(matching)
    }

    /// After a failed commit (its caller holds the writer lock): publishes the last committed
    /// generation as read back from the files its manifest names, since the failed commit may
    /// have changed the shared graph. Should even that fail, the published state stays: its
    /// searches drop the graph's hits it does not hold and fill in exactly, so they stay correct.
    fn recover(&self) {
        let manifest = self.current().manifest.clone();
        let committed = manifest.generation;
        if let Some(full_text) = &self.full_text {
            full_text.rollback();
        }
        match load_state(&self.dir, manifest).and_then(|(schema, mut state)| {
            remove_stray_files(&self.dir, &state.manifest, &self.retained.files());
            state.manifest.text_columns = self.current().manifest.text_columns.clone();
            if let Some(full_text) = &self.full_text {
                state.text = Some(full_text.sync(&state)?);
            }
            Ok((schema, state))
        }) {
            Ok((_, restored)) => self.publish(restored),
            Err(e) => log::error!(
                "index {}: reloading generation {committed} after a failed commit failed: {e}",
                self.dir.display()
            ),
        }
    }

    /// [`KnowledgeIndex::prepare`] for every non-empty batch.
    fn prepare_all(&self, batches: &[RecordBatch]) -> Result<Vec<Prepared>, IndexError> {
        batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| self.prepare(b))
            .collect()
    }

    /// Validates a batch and splits out its document ids and vectors.
    fn prepare(&self, batch: &RecordBatch) -> Result<Prepared, IndexError> {
        if batch.num_columns() != self.schema.fields().len() {
            return Err(IndexError::Invalid(format!(
                "expected {} columns ({}), got {}",
                self.schema.fields().len(),
                self.column_names().join(", "),
                batch.num_columns()
            )));
        }
        let doc_ids = doc_ids(batch, self.key_column, self.schema.field(self.key_column).name())?;
        let dims = self.dimensions;
        let vectors = extract_vectors(batch.column(self.vector_column), dims)?;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
        for (i, field) in self.schema.fields().iter().enumerate() {
            let column = batch.column(i);
            if i == self.vector_column {
                columns.push(vectors_to_column(&vectors, dims)?);
            } else if column.data_type() == field.data_type() {
                columns.push(column.clone());
            } else {
                columns.push(
                    cast(column, field.data_type())
                        .map_err(|e| IndexError::Invalid(format!("column '{}': {e}", field.name())))?,
                );
            }
        }
        let batch =
            RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| IndexError::Invalid(e.to_string()))?;
        Ok((batch, doc_ids, vectors))
    }
}

/// The full-text index for `columns` (`None` when there are none).
fn open_full_text(dir: &Path, schema: &Schema, columns: Vec<TextColumn>) -> Result<Option<Arc<FullText>>, IndexError> {
    if columns.is_empty() {
        let stale = dir.join(fulltext::FULLTEXT_DIR);
        if stale.exists() {
            fs::remove_dir_all(&stale).map_err(|e| IndexError::io(&stale, e))?;
        }
        return Ok(None);
    }
    Ok(Some(FullText::open_shared(dir, schema, columns)?))
}

/// The declared columns plus the vector column.
fn table_schema(columns: &Schema, settings: &IndexSettings) -> Result<SchemaRef, IndexError> {
    if columns.field_with_name(&settings.key_column).is_err() {
        return Err(IndexError::Invalid(format!(
            "the index needs a key column '{}' (declare it, or set the 'key_column' option)",
            settings.key_column
        )));
    }
    let mut fields: Vec<Field> = Vec::new();
    for field in columns.fields() {
        if field.name() == KEY_FIELD {
            return Err(IndexError::Invalid(format!("column name '{KEY_FIELD}' is reserved")));
        }
        if field.name() == &settings.vector_column {
            continue;
        }
        fields.push(field.as_ref().clone());
    }
    fields.push(Field::new(
        &settings.vector_column,
        vector_type(settings.dimensions),
        true,
    ));
    Ok(Arc::new(Schema::new(fields)))
}

/// A predicate true for rows whose column at `position`, read as text, holds one of `values`.
fn where_in<'a>(
    position: usize,
    values: &'a std::collections::HashSet<String>,
) -> impl Fn(&RecordBatch) -> Result<arrow::array::BooleanArray, IndexError> + 'a {
    move |batch: &RecordBatch| {
        let column = cast(batch.column(position), &arrow::datatypes::DataType::Utf8)?;
        let column = arrow::array::AsArray::as_string::<i32>(&column);
        Ok(column
            .iter()
            .map(|value| Some(value.is_some_and(|value| values.contains(value))))
            .collect())
    }
}
