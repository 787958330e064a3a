//! The knowledge index: an Arrow row store plus a usearch ANN graph over one vector column,
//! persisted in a directory and committed atomically.
//!
//! Directory layout (generation `G` is the manifest's commit counter):
//! - `manifest.json`: model, dimension, quantization, key and vector columns, current files;
//! - `rows-G.arrow`: every live row (Arrow IPC file) with its `u64` key in column `_key`;
//! - `ann-G.usearch`: the HNSW graph with the vectors of those keys;
//! - `delta-G.arrow`: rows upserted by a later commit `G` (same format), replayed on open.
//!
//! An upsert that is small next to the index (at most an eighth of its rows) writes only its
//! rows as a delta, so a streaming micro-batch costs time proportional to what it adds, not to
//! the index. Once the deltas would hold more than a quarter of the index or number
//! [`MAX_DELTA_FILES`], for larger upserts, and on every delete, the commit rewrites the rows and
//! the graph in full and drops the deltas (amortised, each row is rewritten a bounded number of
//! times). Reopening loads the graph as saved and re-inserts the delta rows' vectors, so
//! answers match the pre-crash index within HNSW's approximation (exactly, once compacted).
//!
//! Rows are upserted by the key column (`doc_id` by default): a row whose key exists replaces
//! the old row and its vector. Each [`KnowledgeIndex::upsert`] or [`KnowledgeIndex::delete`]
//! is one commit; it is all-or-nothing, on disk and in memory.

mod ann;
mod manifest;
mod search;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;

pub use ann::{AnnIndex, Hit, Quantization};
pub use manifest::{MANIFEST_FILE, Manifest};
pub use search::{DEFAULT_EXACT_SEARCH_MAX_ROWS, RowPredicate, SCORE_COLUMN};

#[cfg(test)]
mod tests;

use manifest::{FORMAT_VERSION, sync_dir};

/// Name of the hidden key column inside row files.
const KEY_FIELD: &str = "_key";

/// Most delta files before a commit rewrites the index in full.
pub const MAX_DELTA_FILES: usize = 32;

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
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// Evaluating a row filter failed.
    #[error("filter: {0}")]
    Filter(String),
}

impl IndexError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

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
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpsertStats {
    /// Rows written.
    pub rows: usize,
    /// Of those, rows that replaced an existing row with the same key.
    pub replaced: usize,
}

/// A block of rows with their keys.
#[derive(Debug, Clone)]
struct Segment {
    batch: RecordBatch,
    keys: Vec<u64>,
}

/// Everything that changes on commit.
#[derive(Debug)]
struct State {
    manifest: Manifest,
    segments: Vec<Segment>,
    /// Live key → (segment, row). Removed keys are absent.
    locations: HashMap<u64, (usize, usize)>,
    /// Document id → live key.
    doc_keys: HashMap<String, u64>,
    ann: AnnIndex,
}

impl State {
    /// Makes the rows of `segment` the live rows of their documents (`ids`, one per row). A
    /// document's previous row stops being live, and its vector leaves the graph — or leaves
    /// `pending` when its key is `pending_from` or later (added by the same commit, not in the
    /// graph yet). Each row's vector joins `pending`. Returns how many rows replaced a row whose
    /// vector was in the graph.
    fn place_segment(
        &mut self,
        segment: Segment,
        ids: Vec<String>,
        vectors: Vec<Option<Vec<f32>>>,
        pending: &mut Vec<(u64, Vec<f32>)>,
        pending_from: u64,
    ) -> Result<usize, IndexError> {
        let segment_index = self.segments.len();
        let mut replaced = 0;
        for (row, ((&key, id), vector)) in segment.keys.iter().zip(ids).zip(vectors).enumerate() {
            if let Some(old) = self.doc_keys.insert(id, key) {
                self.locations.remove(&old);
                if old >= pending_from {
                    pending.retain(|(k, _)| *k != old);
                } else {
                    self.ann.remove(old)?;
                    replaced += 1;
                }
            }
            self.locations.insert(key, (segment_index, row));
            if let Some(vector) = vector {
                pending.push((key, vector));
            }
        }
        self.segments.push(segment);
        Ok(replaced)
    }
}

/// A persistent knowledge index. Cheap to share (`Arc`); reads run concurrently, commits one
/// at a time.
#[derive(Debug)]
pub struct KnowledgeIndex {
    dir: PathBuf,
    schema: SchemaRef,
    key_column: usize,
    vector_column: usize,
    state: RwLock<State>,
    exact_search_max_rows: AtomicUsize,
}

/// The Arrow type of a vector column of `dimensions` floats.
pub fn vector_type(dimensions: usize) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, false)),
        dimensions as i32,
    )
}

impl KnowledgeIndex {
    /// Opens the index in `dir`; errors when there is none.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IndexError> {
        let dir = dir.as_ref();
        let manifest = Manifest::read(dir)?.ok_or_else(|| {
            IndexError::Invalid(format!(
                "{} holds no knowledge index ({MANIFEST_FILE} missing)",
                dir.display()
            ))
        })?;
        let (schema, state) = load_state(dir, manifest)?;
        Self::from_parts(dir, schema, state)
    }

    /// Opens the index in `dir`, or creates it with `columns` (the vector column is appended)
    /// and `settings`. An existing index must match the settings and columns.
    pub fn open_or_create(
        dir: impl AsRef<Path>,
        columns: &Schema,
        settings: &IndexSettings,
    ) -> Result<Self, IndexError> {
        let dir = dir.as_ref();
        if Manifest::read(dir)?.is_some() {
            let index = Self::open(dir)?;
            index.check_compatible(columns, settings)?;
            return Ok(index);
        }
        fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let schema = table_schema(columns, settings)?;
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
        };
        let state = State {
            ann: AnnIndex::new(settings.dimensions, settings.quantization)?,
            manifest,
            segments: Vec::new(),
            locations: HashMap::new(),
            doc_keys: HashMap::new(),
        };
        let index = Self::from_parts(dir, schema, state)?;
        {
            let mut state = index.state.write().unwrap_or_else(|e| e.into_inner());
            index.persist(&mut state)?;
        }
        Ok(index)
    }

    fn from_parts(dir: &Path, schema: SchemaRef, state: State) -> Result<Self, IndexError> {
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
            state: RwLock::new(state),
            exact_search_max_rows: AtomicUsize::new(search::DEFAULT_EXACT_SEARCH_MAX_ROWS),
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
        self.read_state().manifest.clone()
    }

    /// Live rows.
    pub fn len(&self) -> usize {
        self.read_state().locations.len()
    }

    /// Whether the index holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vectors in the ANN graph, its capacity, and the bytes it uses.
    pub fn ann_stats(&self) -> (usize, usize, usize) {
        let state = self.read_state();
        (state.ann.len(), state.ann.capacity(), state.ann.memory_usage())
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live row, in key order within each commit.
    pub fn snapshot(&self) -> Result<Vec<RecordBatch>, IndexError> {
        let state = self.read_state();
        state
            .segments
            .iter()
            .map(|segment| live_rows(segment, &state.locations))
            .filter(|b| !matches!(b, Ok(b) if b.num_rows() == 0))
            .collect()
    }

    /// Where streaming sources resume: the offsets stored by the last commit that carried them.
    pub fn source_offsets(&self) -> BTreeMap<String, i64> {
        self.read_state().manifest.source_offsets.clone()
    }

    /// Inserts or replaces rows (by the key column) and commits. Batches must have the index's
    /// columns in order; the vector column may be a fixed-size or variable list of floats of the
    /// index's dimension, or null (row stored, not searchable by vector).
    pub fn upsert(&self, batches: &[RecordBatch]) -> Result<UpsertStats, IndexError> {
        self.upsert_from_source(batches, &BTreeMap::new())
    }

    /// [`KnowledgeIndex::upsert`] that also records, in the same atomic commit, where the
    /// streaming sources that produced `batches` resume (merged into the stored offsets). With
    /// offsets and no rows it still commits the offsets (a micro-batch of refused records).
    pub fn upsert_from_source(
        &self,
        batches: &[RecordBatch],
        offsets: &BTreeMap<String, i64>,
    ) -> Result<UpsertStats, IndexError> {
        // Validate and convert everything before touching the index: an error leaves it as is.
        let prepared = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| self.prepare(b))
            .collect::<Result<Vec<_>, _>>()?;
        let mut stats = UpsertStats::default();
        if prepared.is_empty() && offsets.is_empty() {
            return Ok(stats);
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if prepared.is_empty() {
            let mut manifest = state.manifest.clone();
            manifest
                .source_offsets
                .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
            manifest.write_atomic(&self.dir)?;
            state.manifest = manifest;
            return Ok(stats);
        }
        let applied = (|| {
            state
                .manifest
                .source_offsets
                .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
            let first_new_segment = state.segments.len();
            let mut additions: Vec<(u64, Vec<f32>)> = Vec::new();
            let first_new_key = state.manifest.next_key;
            for (batch, doc_ids, vectors) in prepared {
                let first_key = state.manifest.next_key;
                let keys: Vec<u64> = (first_key..first_key + batch.num_rows() as u64).collect();
                state.manifest.next_key += batch.num_rows() as u64;
                stats.rows += keys.len();
                stats.replaced +=
                    state.place_segment(Segment { batch, keys }, doc_ids, vectors, &mut additions, first_new_key)?;
            }
            let items: Vec<(u64, &[f32])> = additions.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            state.ann.add_many(&items)?;
            self.commit_upsert(&mut state, first_new_segment)
        })();
        if let Err(e) = applied {
            self.rollback(&mut state);
            return Err(e);
        }
        Ok(stats)
    }

    /// Deletes the rows for which `predicate` is true and commits; returns their document ids.
    pub fn delete(&self, predicate: &RowPredicate<'_>) -> Result<Vec<String>, IndexError> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let key_name = &state.manifest.key_column;
        let mut doomed: Vec<(u64, String)> = Vec::new();
        for segment in &state.segments {
            let mask = predicate(&segment.batch)?;
            if mask.true_count() == 0 {
                continue;
            }
            let ids = doc_ids(&segment.batch, self.key_column, key_name)?;
            for (row, (&key, id)) in segment.keys.iter().zip(ids).enumerate() {
                if mask.is_valid(row) && mask.value(row) && state.locations.contains_key(&key) {
                    doomed.push((key, id));
                }
            }
        }
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let applied = (|| {
            for (key, doc_id) in &doomed {
                state.locations.remove(key);
                state.doc_keys.remove(doc_id);
                state.ann.remove(*key)?;
            }
            self.persist(&mut state)
        })();
        if let Err(e) = applied {
            self.rollback(&mut state);
            return Err(e);
        }
        Ok(doomed.into_iter().map(|(_, id)| id).collect())
    }

    /// Restores the last committed state after a failed commit.
    fn rollback(&self, state: &mut State) {
        let committed = state.manifest.generation;
        match Manifest::read(&self.dir).and_then(|m| {
            let manifest = m.ok_or_else(|| IndexError::Invalid("manifest vanished".into()))?;
            load_state(&self.dir, manifest)
        }) {
            Ok((_, restored)) => *state = restored,
            Err(e) => log::error!(
                "index {}: rollback to generation {committed} failed: {e}",
                self.dir.display()
            ),
        }
    }

    /// Validates a batch and splits out its document ids and vectors.
    #[allow(clippy::type_complexity)]
    fn prepare(&self, batch: &RecordBatch) -> Result<(RecordBatch, Vec<String>, Vec<Option<Vec<f32>>>), IndexError> {
        if batch.num_columns() != self.schema.fields().len() {
            return Err(IndexError::Invalid(format!(
                "expected {} columns ({}), got {}",
                self.schema.fields().len(),
                self.column_names().join(", "),
                batch.num_columns()
            )));
        }
        let doc_ids = doc_ids(batch, self.key_column, self.schema.field(self.key_column).name())?;
        let dims = self.read_state().manifest.dimensions;
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

    /// Commits an upsert whose rows are `state.segments[first_new..]`: as a delta file when the
    /// deltas stay small, else in full.
    fn commit_upsert(&self, state: &mut State, first_new: usize) -> Result<(), IndexError> {
        let new_rows: usize = state.segments[first_new..].iter().map(|s| s.keys.len()).sum();
        let manifest = &state.manifest;
        if manifest.rows_file.is_empty()
            || manifest.deltas.len() >= MAX_DELTA_FILES
            || new_rows * 8 > manifest.rows
            || manifest.delta_rows + new_rows > manifest.rows / 4
        {
            return self.persist(state);
        }
        let generation = manifest.generation + 1;
        let delta_file = format!("delta-{generation}.arrow");
        write_rows(&self.dir.join(&delta_file), &self.schema, &state.segments[first_new..])?;
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.rows = state.locations.len();
        manifest.deltas.push(delta_file);
        manifest.delta_rows += new_rows;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        Ok(())
    }

    /// Compacts live rows into one segment and writes a new generation in full (rows and
    /// graph), dropping the deltas.
    fn persist(&self, state: &mut State) -> Result<(), IndexError> {
        let compacted = compact(&self.schema, state)?;
        let generation = state.manifest.generation + 1;
        let rows_file = format!("rows-{generation}.arrow");
        let ann_file = format!("ann-{generation}.usearch");
        write_rows(
            &self.dir.join(&rows_file),
            &self.schema,
            std::slice::from_ref(&compacted),
        )?;
        state.ann.save(&self.dir.join(&ann_file))?;
        fsync_file(&self.dir.join(&ann_file))?;
        let mut old_files = vec![state.manifest.rows_file.clone(), state.manifest.ann_file.clone()];
        old_files.extend(state.manifest.deltas.iter().cloned());
        let mut manifest = state.manifest.clone();
        manifest.generation = generation;
        manifest.rows = compacted.keys.len();
        manifest.rows_file = rows_file;
        manifest.ann_file = ann_file;
        manifest.deltas.clear();
        manifest.delta_rows = 0;
        manifest.write_atomic(&self.dir)?;
        state.manifest = manifest;
        // Rebuild the in-memory maps around the compacted segment.
        state.locations = compacted
            .keys
            .iter()
            .enumerate()
            .map(|(row, &key)| (key, (0, row)))
            .collect();
        state.segments = vec![compacted];
        for old in old_files.iter().filter(|f| !f.is_empty()) {
            let _ = fs::remove_file(self.dir.join(old));
        }
        Ok(())
    }
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

/// Reads an Arrow IPC row file: its schema without the key column, and each batch with its keys.
fn read_rows(path: &Path) -> Result<(SchemaRef, Vec<Segment>), IndexError> {
    let file = fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    let reader = FileReader::try_new(std::io::BufReader::new(file), None)?;
    let stored_schema = reader.schema();
    let key_position = stored_schema
        .index_of(KEY_FIELD)
        .map_err(|_| IndexError::Invalid(format!("{} lacks the {KEY_FIELD} column", path.display())))?;
    let fields: Vec<_> = stored_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != key_position)
        .map(|(_, f)| f.clone())
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let mut segments = Vec::new();
    for batch in reader {
        let batch = batch?;
        let keys: Vec<u64> = batch
            .column(key_position)
            .as_primitive::<datafusion::arrow::datatypes::UInt64Type>()
            .values()
            .to_vec();
        let mut columns = batch.columns().to_vec();
        columns.remove(key_position);
        segments.push(Segment {
            batch: RecordBatch::try_new(schema.clone(), columns)?,
            keys,
        });
    }
    Ok((schema, segments))
}

/// Reads the generation named by `manifest`: the full rows and graph, then each delta in order.
fn load_state(dir: &Path, manifest: Manifest) -> Result<(SchemaRef, State), IndexError> {
    let rows_path = dir.join(&manifest.rows_file);
    let (schema, base) = read_rows(&rows_path)?;
    let ann = AnnIndex::load(
        &dir.join(&manifest.ann_file),
        manifest.dimensions,
        manifest.quantization,
    )?;
    let column = |role: &str, name: &str| {
        schema
            .index_of(name)
            .map_err(|_| IndexError::Invalid(format!("{role} column '{name}' missing from {}", rows_path.display())))
    };
    let key_column = column("key", &manifest.key_column)?;
    let vector_column = column("vector", &manifest.vector_column)?;
    let mut state = State {
        manifest,
        segments: Vec::new(),
        locations: HashMap::new(),
        doc_keys: HashMap::new(),
        ann,
    };
    for segment in base {
        let ids = doc_ids(&segment.batch, key_column, &state.manifest.key_column)?;
        for (row, (&key, id)) in segment.keys.iter().zip(ids).enumerate() {
            state.locations.insert(key, (state.segments.len(), row));
            state.doc_keys.insert(id, key);
        }
        state.segments.push(segment);
    }
    for delta in state.manifest.deltas.clone() {
        let (delta_schema, segments) = read_rows(&dir.join(&delta))?;
        if delta_schema != schema {
            return Err(IndexError::Invalid(format!(
                "{} does not have the index's columns",
                dir.join(&delta).display()
            )));
        }
        for segment in segments {
            replay(&mut state, segment, key_column, vector_column)?;
        }
    }
    remove_stray_files(dir, &state.manifest);
    Ok((schema, state))
}

/// Applies a delta segment as its upsert did: each row replaces the live row of its document
/// and its vector joins the graph.
fn replay(state: &mut State, segment: Segment, key_column: usize, vector_column: usize) -> Result<(), IndexError> {
    let ids = doc_ids(&segment.batch, key_column, &state.manifest.key_column)?;
    let vectors = extract_vectors(segment.batch.column(vector_column), state.manifest.dimensions)?;
    let first_key = segment.keys.first().copied().unwrap_or(state.manifest.next_key);
    let mut additions = Vec::new();
    state.place_segment(segment, ids, vectors, &mut additions, first_key)?;
    let items: Vec<(u64, &[f32])> = additions.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    state.ann.add_many(&items)
}

/// Deletes files of generations other than the manifest's (left by an interrupted commit).
fn remove_stray_files(dir: &Path, manifest: &Manifest) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_data = ((name.starts_with("rows-") || name.starts_with("delta-")) && name.ends_with(".arrow"))
            || (name.starts_with("ann-") && name.ends_with(".usearch"))
            || name.ends_with(".tmp");
        if is_data && name != manifest.rows_file && name != manifest.ann_file && !manifest.deltas.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The key column of `batch` as text, one id per row; a null key is an error naming the row.
fn doc_ids(batch: &RecordBatch, key_column: usize, key_name: &str) -> Result<Vec<String>, IndexError> {
    let ids = cast(batch.column(key_column), &DataType::Utf8)?;
    let ids: &StringArray = ids.as_string();
    (0..ids.len())
        .map(|row| {
            ids.is_valid(row)
                .then(|| ids.value(row).to_string())
                .ok_or_else(|| IndexError::Invalid(format!("row {row}: key column '{key_name}' is null")))
        })
        .collect()
}

/// The rows of `segment` whose keys are still live.
fn live_rows(segment: &Segment, locations: &HashMap<u64, (usize, usize)>) -> Result<RecordBatch, IndexError> {
    let mask: BooleanArray = segment.keys.iter().map(|k| Some(locations.contains_key(k))).collect();
    if mask.true_count() == segment.keys.len() {
        return Ok(segment.batch.clone());
    }
    Ok(filter_record_batch(&segment.batch, &mask)?)
}

/// All live rows as one segment.
fn compact(schema: &SchemaRef, state: &State) -> Result<Segment, IndexError> {
    let mut batches = Vec::new();
    let mut keys = Vec::new();
    for segment in &state.segments {
        let live: Vec<u64> = segment
            .keys
            .iter()
            .copied()
            .filter(|k| state.locations.contains_key(k))
            .collect();
        if live.is_empty() {
            continue;
        }
        batches.push(live_rows(segment, &state.locations)?);
        keys.extend(live);
    }
    let batch = concat_batches(schema, &batches)?;
    Ok(Segment { batch, keys })
}

/// Writes segments (rows with their keys) to an Arrow IPC file, atomically (temporary file,
/// fsync, rename).
fn write_rows(path: &Path, schema: &SchemaRef, segments: &[Segment]) -> Result<(), IndexError> {
    let mut fields = vec![Field::new(KEY_FIELD, DataType::UInt64, false)];
    fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
    let file_schema = Arc::new(Schema::new(fields));
    let tmp = path.with_extension("arrow.tmp");
    let file = fs::File::create(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
    let mut writer = FileWriter::try_new(std::io::BufWriter::new(file), &file_schema)?;
    for segment in segments {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(segment.keys.clone()))];
        columns.extend(segment.batch.columns().iter().cloned());
        writer.write(&RecordBatch::try_new(file_schema.clone(), columns)?)?;
    }
    writer.finish()?;
    let file = writer
        .into_inner()?
        .into_inner()
        .map_err(|e| IndexError::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| IndexError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| IndexError::io(path, e))?;
    Ok(())
}

fn fsync_file(path: &Path) -> Result<(), IndexError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a vector column (fixed-size or variable list of floats) as one optional vector per
/// row, refusing vectors of the wrong length.
fn extract_vectors(column: &ArrayRef, dims: usize) -> Result<Vec<Option<Vec<f32>>>, IndexError> {
    let as_f32 = |values: &ArrayRef| -> Result<Vec<f32>, IndexError> {
        let values = cast(values, &DataType::Float32)?;
        Ok(values
            .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
            .values()
            .to_vec())
    };
    let rows: Vec<Option<ArrayRef>> = match column.data_type() {
        DataType::FixedSizeList(_, _) => {
            let list = column.as_fixed_size_list();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::List(_) => {
            let list = column.as_list::<i32>();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::LargeList(_) => {
            let list = column.as_list::<i64>();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::Null => vec![None; column.len()],
        other => {
            return Err(IndexError::Invalid(format!(
                "the vector column must be a list of floats (e.g. embed(text)), got {other}"
            )));
        }
    };
    rows.into_iter()
        .map(|row| {
            row.map(|values| {
                let vector = as_f32(&values)?;
                if vector.len() != dims {
                    return Err(IndexError::DimensionMismatch {
                        expected: dims,
                        found: vector.len(),
                    });
                }
                if vector.iter().any(|x| !x.is_finite()) {
                    return Err(IndexError::Invalid("vector holds NaN or infinite values".into()));
                }
                Ok(vector)
            })
            .transpose()
        })
        .collect()
}

fn vectors_to_column(vectors: &[Option<Vec<f32>>], dims: usize) -> Result<ArrayRef, IndexError> {
    let mut flat = Vec::with_capacity(vectors.len() * dims);
    for v in vectors {
        match v {
            Some(v) => flat.extend_from_slice(v),
            None => flat.extend(std::iter::repeat_n(0.0, dims)),
        }
    }
    let present: Vec<bool> = vectors.iter().map(Option::is_some).collect();
    mkflow_udfs::embedding::vectors_to_array(flat, present, dims).map_err(|e| IndexError::Invalid(e.to_string()))
}

/// Exposes a vector column's values as a flat slice (nulls are zero vectors).
pub fn vector_values(column: &ArrayRef) -> &[f32] {
    let list: &FixedSizeListArray = column.as_fixed_size_list();
    list.values()
        .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
        .values()
}
