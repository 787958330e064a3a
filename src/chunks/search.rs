//! Documents of a chunked index ranked by their best chunk: a search over the chunks, deep
//! enough to hold `k` distinct documents, each document scored by its first (best) chunk and
//! returned with that chunk's text and offsets.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Int64Type, Schema, SchemaRef};
use mkflow_index::{IndexError, KnowledgeIndex, RowPredicate, SCORE_COLUMN};

use super::ChunkIndex;

/// Column of the best chunk's text in document results.
pub const BEST_CHUNK: &str = "best_chunk";
/// Column of the best chunk's position among its document's chunks.
pub const BEST_CHUNK_INDEX: &str = "best_chunk_index";
/// Column of the best chunk's first character in the chunked column.
pub const BEST_CHUNK_START: &str = "best_chunk_start";
/// Column of the character just after the best chunk.
pub const BEST_CHUNK_END: &str = "best_chunk_end";

/// Chunks read per document asked for, at first (a document often has several good chunks).
const CHUNKS_PER_DOCUMENT: usize = 4;

/// The schema of a chunked index's document results: the documents' search schema (their
/// columns and `score`) and the best chunk.
pub fn search_schema(documents: &KnowledgeIndex) -> SchemaRef {
    let mut fields: Vec<Field> = documents
        .search_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend([
        Field::new(BEST_CHUNK, DataType::Utf8, false),
        Field::new(BEST_CHUNK_INDEX, DataType::Int32, false),
        Field::new(BEST_CHUNK_START, DataType::Int64, false),
        Field::new(BEST_CHUNK_END, DataType::Int64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// A document's best chunk, as a search over the chunks found it.
struct BestChunk {
    score: f32,
    index: i32,
    text: String,
    start: i64,
    end: i64,
}

/// A search over the chunks index: `depth` chunks, best first, among those passing the filter.
pub type ChunkSearch<'a> = dyn Fn(usize, Option<&RowPredicate<'_>>) -> Result<RecordBatch, IndexError> + 'a;

impl ChunkIndex {
    /// The `k` documents of `documents` whose best chunk `search` ranks highest, among those
    /// passing `filter` (a predicate on document rows), best first, in [`search_schema`].
    pub fn best_documents(
        &self,
        documents: &KnowledgeIndex,
        k: usize,
        filter: Option<&RowPredicate<'_>>,
        search: &ChunkSearch<'_>,
    ) -> Result<RecordBatch, IndexError> {
        let allowed = filter.map(|f| passing_documents(documents, f)).transpose()?;
        let doc_column = self.chunks.schema().index_of("doc_id")?;
        let in_allowed = allowed.as_ref().map(|allowed| {
            move |batch: &RecordBatch| -> Result<BooleanArray, IndexError> {
                let ids = batch.column(doc_column).as_string::<i32>();
                Ok(ids
                    .iter()
                    .map(|id| Some(id.is_some_and(|id| allowed.contains(id))))
                    .collect())
            }
        });
        let predicate = in_allowed.as_ref().map(|p| p as &RowPredicate<'_>);
        let total = self.chunks.len();
        let mut depth = k.saturating_mul(CHUNKS_PER_DOCUMENT).max(k);
        let best = loop {
            let hits = search(depth.min(total), predicate)?;
            let best = best_per_document(&hits)?;
            if best.len() >= k || depth >= total || hits.num_rows() < depth.min(total) {
                break best;
            }
            depth = depth.saturating_mul(CHUNKS_PER_DOCUMENT);
        };
        self.documents_with(documents, best, k)
    }

    /// The rows of the best `k` documents of `best` (in order) with their best chunks; chunks
    /// whose document is not in `documents` (left by a crash) are skipped.
    fn documents_with(
        &self,
        documents: &KnowledgeIndex,
        best: Vec<(String, BestChunk)>,
        k: usize,
    ) -> Result<RecordBatch, IndexError> {
        let ids: Vec<&str> = best.iter().map(|(id, _)| id.as_str()).collect();
        let rows = documents.lookup(&ids)?;
        let key_column = documents.manifest().key_column;
        let found = cast(rows.column(rows.schema().index_of(&key_column)?), &DataType::Utf8)?;
        let found: HashSet<&str> = found.as_string::<i32>().iter().flatten().collect();
        // `lookup` keeps the order asked and skips ids without a row.
        let kept: Vec<&BestChunk> = best
            .iter()
            .filter(|(id, _)| found.contains(id.as_str()))
            .map(|(_, chunk)| chunk)
            .take(k)
            .collect();
        let rows = rows.slice(0, kept.len());
        let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
        columns.push(Arc::new(Float32Array::from_iter_values(kept.iter().map(|c| c.score))));
        columns.push(Arc::new(StringArray::from_iter_values(
            kept.iter().map(|c| c.text.as_str()),
        )));
        columns.push(Arc::new(Int32Array::from_iter_values(kept.iter().map(|c| c.index))));
        columns.push(Arc::new(Int64Array::from_iter_values(kept.iter().map(|c| c.start))));
        columns.push(Arc::new(Int64Array::from_iter_values(kept.iter().map(|c| c.end))));
        Ok(RecordBatch::try_new(search_schema(documents), columns)?)
    }
}

/// The ids of the documents passing `filter`.
fn passing_documents(documents: &KnowledgeIndex, filter: &RowPredicate<'_>) -> Result<HashSet<String>, IndexError> {
    let key_column = documents.manifest().key_column;
    let mut passing = HashSet::new();
    for batch in documents.snapshot()? {
        let mask = filter(&batch)?;
        let ids = cast(batch.column(batch.schema().index_of(&key_column)?), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        for row in 0..batch.num_rows() {
            if mask.is_valid(row) && mask.value(row) && ids.is_valid(row) {
                passing.insert(ids.value(row).to_string());
            }
        }
    }
    Ok(passing)
}

/// The first chunk of each document among `hits` (best first), in order.
fn best_per_document(hits: &RecordBatch) -> Result<Vec<(String, BestChunk)>, IndexError> {
    let column = |name: &str| {
        hits.column_by_name(name)
            .ok_or_else(|| IndexError::Invalid(format!("chunk hits lack '{name}'")))
    };
    let ids = column("doc_id")?.as_string::<i32>();
    let texts = column("text")?.as_string::<i32>();
    let positions = column("chunk_index")?.as_primitive::<Int32Type>();
    let starts = column("start_char")?.as_primitive::<Int64Type>();
    let ends = column("end_char")?.as_primitive::<Int64Type>();
    let scores = cast(column(SCORE_COLUMN)?, &DataType::Float32)?;
    let scores = scores.as_primitive::<Float32Type>();
    let mut seen = HashSet::new();
    let mut best = Vec::new();
    for row in 0..hits.num_rows() {
        let id = ids.value(row);
        if !seen.insert(id) {
            continue;
        }
        best.push((
            id.to_string(),
            BestChunk {
                score: scores.value(row),
                index: positions.value(row),
                text: texts.value(row).to_string(),
                start: starts.value(row),
                end: ends.value(row),
            },
        ));
    }
    Ok(best)
}
