//! Chunked knowledge indexes (`OPTIONS ('chunk_tokens' 'N')`): each document's long text is cut
//! into passages within the embedding model's token limit and every passage gets a vector and a
//! BM25 entry of its own, while the index keeps one row per document. Searches score a document
//! by its best chunk ([`search`]).
//!
//! Layout inside the index directory: `chunks/` (a knowledge index keyed by `chunk_id` =
//! `<doc_id>#<n>`: the document, the chunk's position, context, text, character offsets in the
//! chunked column and tokens, and its vector) and `chunking.json` ([`ChunkSettings`]).
//!
//! The chunks index is a companion of the documents (see `mkflow_index::GroupCommit`): an
//! upsert replaces its documents' chunks and a delete removes them inside the documents' group
//! commit, so one manifest generation names documents and chunks alike, and a crash in between
//! reopens with the chunks of the documents' generation.

pub mod search;
mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use mkflow_index::{
    Analyzer, IndexError, IndexSettings, KnowledgeIndex, MANIFEST_FILE, TextColumn, vector_type, vectors_to_array,
};
use mkflow_udfs::chunking::{Chunk, Chunker};
use mkflow_udfs::{LazyEmbedder, TextRole};

pub use settings::{CHUNKING_FILE, ChunkSettings};

/// Subdirectory of the chunks index.
pub const CHUNKS_DIR: &str = "chunks";
/// Documents chunked and embedded per model call batch when the chunks are rebuilt.
const REBUILD_DOCUMENTS: usize = 256;

/// The chunks of a chunked index's documents.
#[derive(Debug)]
pub struct ChunkIndex {
    chunks: Arc<KnowledgeIndex>,
    settings: ChunkSettings,
    chunker: Chunker,
    embedder: Arc<LazyEmbedder>,
}

/// The chunk rows built from a batch of documents, before they are committed, and the
/// documents with the vectors they lacked filled in.
#[derive(Debug)]
pub struct PendingChunks {
    chunks: Vec<RecordBatch>,
    /// Chunks of each document of the batch (documents without text have none).
    counts: HashMap<String, usize>,
    /// The inserted documents, a missing document vector replaced by the mean of its chunks'.
    pub documents: Vec<RecordBatch>,
}

impl PendingChunks {
    /// Chunk rows built.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(RecordBatch::num_rows).sum()
    }

    /// Whether no chunk was built.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The columns of the chunks index (the vector column is appended by the index).
fn chunk_columns() -> Schema {
    Schema::new(vec![
        Field::new("chunk_id", DataType::Utf8, false),
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("chunk_index", DataType::Int32, false),
        Field::new("context", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
        Field::new("start_char", DataType::Int64, false),
        Field::new("end_char", DataType::Int64, false),
        Field::new("tokens", DataType::Int32, false),
    ])
}

/// A column of `batch` as text (cast when it is another string type).
fn text_column(batch: &RecordBatch, name: &str) -> Result<ArrayRef, IndexError> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| IndexError::Invalid(format!("the inserted rows have no '{name}' column")))?;
    Ok(cast(column, &DataType::Utf8)?)
}

impl ChunkIndex {
    /// Whether the index in `dir` is chunked.
    pub fn exists(dir: &std::path::Path) -> bool {
        dir.join(CHUNKING_FILE).is_file()
    }

    /// Opens the chunks of `documents`, creating them (chunking every document already there)
    /// when the index was not chunked, and rebuilding them when `settings` differ from those
    /// they were cut with or the chunks index is missing. `settings` None keeps the stored ones;
    /// `analyzer` is the BM25 analyzer of new chunks.
    pub fn open_or_create(
        documents: &KnowledgeIndex,
        settings: Option<ChunkSettings>,
        analyzer: Analyzer,
        embedder: Arc<LazyEmbedder>,
    ) -> Result<Self, IndexError> {
        let dir = documents.dir();
        let stored = ChunkSettings::read(dir)?;
        let Some(settings) = settings.or_else(|| stored.clone()) else {
            return Err(IndexError::Invalid(format!("{} is not a chunked index", dir.display())));
        };
        settings.check(&documents.schema()).map_err(IndexError::Invalid)?;
        let spec = embedder.spec();
        let chunker = Chunker::load(&spec.name, &spec.tokenizer_path, spec.max_tokens)
            .map_err(|e| IndexError::Invalid(e.to_string()))?;
        chunker
            .check(settings.max_tokens, settings.overlap_tokens)
            .map_err(|e| IndexError::Invalid(format!("chunk_tokens / chunk_overlap: {e}")))?;
        let manifest = documents.manifest();
        let chunks_dir = dir.join(CHUNKS_DIR);
        let rebuild = stored.as_ref() != Some(&settings) || !chunks_dir.join(MANIFEST_FILE).is_file();
        let mut text_columns = vec![TextColumn {
            name: "text".into(),
            analyzer,
        }];
        if settings.context.is_some() {
            text_columns.insert(
                0,
                TextColumn {
                    name: "context".into(),
                    analyzer,
                },
            );
        }
        let index_settings = IndexSettings {
            model: manifest.model,
            dimensions: manifest.dimensions,
            quantization: manifest.quantization,
            key_column: "chunk_id".into(),
            vector_column: manifest.vector_column,
            text_columns: (!chunks_dir.join(MANIFEST_FILE).is_file() || rebuild).then_some(text_columns),
        };
        // The chunks commit together with the documents (one generation names both).
        let chunks = documents.open_companion(CHUNKS_DIR, &chunk_columns(), &index_settings)?;
        let index = ChunkIndex {
            chunks,
            settings,
            chunker,
            embedder,
        };
        if rebuild {
            let group = documents.lock_group();
            index.rebuild(documents)?;
            group.commit()?;
            index.settings.write(dir)?;
        }
        Ok(index)
    }

    /// The chunks index.
    pub fn chunks(&self) -> &Arc<KnowledgeIndex> {
        &self.chunks
    }

    /// How the documents are cut.
    pub fn settings(&self) -> &ChunkSettings {
        &self.settings
    }

    /// Cuts every document of `documents` again, replacing all chunks.
    fn rebuild(&self, documents: &KnowledgeIndex) -> Result<(), IndexError> {
        let rows = documents.snapshot()?;
        let total: usize = rows.iter().map(RecordBatch::num_rows).sum();
        if total > 0 {
            eprintln!(
                "chunking {total} documents of {} ({} tokens a chunk)",
                documents.dir().display(),
                self.settings.max_tokens
            );
        }
        self.chunks
            .delete(&|batch| Ok(BooleanArray::from(vec![true; batch.num_rows()])))?;
        let key_column = documents.manifest().key_column;
        for batch in rows {
            let mut start = 0;
            while start < batch.num_rows() {
                let length = REBUILD_DOCUMENTS.min(batch.num_rows() - start);
                let pending = self.pending(&[batch.slice(start, length)], &key_column, None)?;
                self.chunks.upsert(&pending.chunks)?;
                start += length;
            }
        }
        Ok(())
    }

    /// Cuts and embeds the documents of `batches` (keyed by `key_column`); with
    /// `vector_column`, a document without a vector gets the normalised mean of its chunks'.
    /// Nothing is committed yet.
    pub fn pending(
        &self,
        batches: &[RecordBatch],
        key_column: &str,
        vector_column: Option<&str>,
    ) -> Result<PendingChunks, IndexError> {
        let embedder = self
            .embedder
            .get()
            .map_err(|e| IndexError::Invalid(format!("cannot load the model to embed chunks: {e}")))?;
        let dims = embedder.model().spec().dimensions;
        let mut pending = PendingChunks {
            chunks: Vec::new(),
            counts: HashMap::new(),
            documents: Vec::new(),
        };
        for batch in batches {
            let ids = text_column(batch, key_column)?;
            let ids = ids.as_string::<i32>();
            let texts = text_column(batch, &self.settings.column)?;
            let texts = texts.as_string::<i32>();
            let contexts = match &self.settings.context {
                Some(name) => Some(text_column(batch, name)?),
                None => None,
            };
            let contexts = contexts.as_ref().map(|c| c.as_string::<i32>());
            // Each chunk with its document's row and context.
            let mut cut: Vec<(usize, Option<&str>, Chunk)> = Vec::new();
            for row in 0..batch.num_rows() {
                if ids.is_null(row) {
                    continue;
                }
                let id = ids.value(row);
                let text = if texts.is_null(row) { "" } else { texts.value(row) };
                let chunks = self
                    .chunker
                    .chunks(text, self.settings.max_tokens, self.settings.overlap_tokens)
                    .map_err(|e| IndexError::Invalid(format!("document '{id}': {e}")))?;
                pending.counts.insert(id.to_string(), chunks.len());
                let context = contexts
                    .filter(|c| c.is_valid(row))
                    .map(|c| c.value(row).trim())
                    .filter(|c| !c.is_empty());
                cut.extend(chunks.into_iter().map(|chunk| (row, context, chunk)));
            }
            let inputs: Vec<String> = cut
                .iter()
                .map(|(_, context, chunk)| match context {
                    Some(context) => format!("{context}. {}", chunk.text),
                    None => chunk.text.clone(),
                })
                .collect();
            let embeddings = if inputs.is_empty() {
                None
            } else {
                let texts: Vec<Option<&str>> = inputs.iter().map(|t| Some(t.as_str())).collect();
                Some(
                    embedder
                        .embed_blocking(&texts, TextRole::Document)
                        .map_err(|e| IndexError::Invalid(format!("cannot embed chunks: {e}")))?,
                )
            };
            pending.documents.push(match (vector_column, &embeddings) {
                (Some(column), Some(embeddings)) => fill_document_vectors(batch, column, dims, &cut, embeddings)?,
                _ => batch.clone(),
            });
            let Some(embeddings) = embeddings else {
                continue;
            };
            let doc = |row: usize| ids.value(row).to_string();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from_iter_values(
                    cut.iter().map(|(row, _, c)| format!("{}#{}", ids.value(*row), c.index)),
                )),
                Arc::new(StringArray::from_iter_values(cut.iter().map(|(row, _, _)| doc(*row)))),
                Arc::new(Int32Array::from_iter_values(cut.iter().map(|(_, _, c)| c.index as i32))),
                Arc::new(cut.iter().map(|(_, context, _)| *context).collect::<StringArray>()),
                Arc::new(StringArray::from_iter_values(
                    cut.iter().map(|(_, _, c)| c.text.as_str()),
                )),
                Arc::new(Int64Array::from_iter_values(
                    cut.iter().map(|(_, _, c)| c.start_char as i64),
                )),
                Arc::new(Int64Array::from_iter_values(
                    cut.iter().map(|(_, _, c)| c.end_char as i64),
                )),
                Arc::new(Int32Array::from_iter_values(
                    cut.iter().map(|(_, _, c)| c.tokens as i32),
                )),
                vectors_to_array(embeddings.vectors, embeddings.present, dims)?,
            ];
            pending
                .chunks
                .push(RecordBatch::try_new(self.chunks.schema(), columns)?);
        }
        Ok(pending)
    }

    /// Replaces the chunks of the documents in `pending` with its chunks, in one commit: a
    /// document's chunks are replaced by key (a delta), and only those past its new count (left
    /// by a longer version of it) are deleted (a full rewrite, when there are any).
    pub fn commit(&self, pending: &PendingChunks) -> Result<(), IndexError> {
        let documents: HashSet<String> = pending.counts.keys().cloned().collect();
        self.chunks.replace_where_in("doc_id", &documents, &pending.chunks)?;
        Ok(())
    }

    /// Removes the chunks of documents.
    pub fn remove_chunks_of(&self, documents: &HashSet<String>) -> Result<usize, IndexError> {
        Ok(self.chunks.delete_where_in("doc_id", documents)?.len())
    }
}

/// `batch` with the null vectors of its documents replaced by the normalised mean of their
/// chunks' vectors (`cut` lists each chunk's row, in the order of `embeddings`).
fn fill_document_vectors(
    batch: &RecordBatch,
    column: &str,
    dims: usize,
    cut: &[(usize, Option<&str>, Chunk)],
    embeddings: &mkflow_udfs::embedding::Embeddings,
) -> Result<RecordBatch, IndexError> {
    let Ok(position) = batch.schema().index_of(column) else {
        return Ok(batch.clone());
    };
    let original = batch.column(position);
    let missing = |row: usize| original.is_null(row);
    if !cut.iter().any(|(row, _, _)| missing(*row)) {
        return Ok(batch.clone());
    }
    // A vector column of another shape is left for the index to refuse with its own message.
    let Ok(original) = cast(original, &vector_type(dims)) else {
        return Ok(batch.clone());
    };
    let mut values = mkflow_index::vector_values(&original).to_vec();
    let mut present: Vec<bool> = (0..batch.num_rows()).map(|row| original.is_valid(row)).collect();
    let mut sums: HashMap<usize, Vec<f32>> = HashMap::new();
    for (i, (row, _, _)) in cut.iter().enumerate() {
        if let (true, Some(vector)) = (missing(*row), embeddings.get(i)) {
            let sum = sums.entry(*row).or_insert_with(|| vec![0.0; dims]);
            sum.iter_mut().zip(vector).for_each(|(s, v)| *s += v);
        }
    }
    for (row, sum) in sums {
        let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            values[row * dims..(row + 1) * dims]
                .iter_mut()
                .zip(&sum)
                .for_each(|(v, s)| *v = s / norm);
            present[row] = true;
        }
    }
    let mut columns = batch.columns().to_vec();
    columns[position] = vectors_to_array(values, present, dims)?;
    let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[position] = Field::new(column, vector_type(dims), true);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}
