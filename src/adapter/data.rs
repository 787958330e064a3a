//! The training pairs of a knowledge index: every synthetic question's vector, and its
//! document's row among the documents' vectors.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

use mkflow_index::KnowledgeIndex;

/// Question and document vectors, row-major, with each question's document row.
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    /// The vectors' dimension.
    pub dimensions: usize,
    /// One vector per question.
    pub questions: Vec<f32>,
    /// The row in `documents` of each question's document.
    pub positives: Vec<usize>,
    /// One vector per document.
    pub documents: Vec<f32>,
    /// Questions left out because their document has no vector (or is gone).
    pub orphans: usize,
}

/// A column of `batch` as text.
pub(crate) fn text_column(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, String> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column '{name}'"))?;
    let column = cast(column, &DataType::Utf8).map_err(|e| e.to_string())?;
    let text = column.as_string::<i32>();
    Ok((0..text.len())
        .map(|i| (!text.is_null(i)).then(|| text.value(i).to_string()))
        .collect())
}

/// The vectors of `batch`'s vector column `name` (None for a row without one).
pub(crate) fn vectors(batch: &RecordBatch, name: &str) -> Result<Vec<Option<Vec<f32>>>, String> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no vector column '{name}'"))?;
    let list = column
        .as_fixed_size_list_opt()
        .ok_or_else(|| format!("column '{name}' holds no vectors"))?;
    Ok((0..list.len())
        .map(|i| {
            (!list.is_null(i)).then(|| {
                list.value(i)
                    .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                    .values()
                    .to_vec()
            })
        })
        .collect())
}

/// The dimension `documents` and its `questions` share (an error if they do not).
pub(crate) fn shared_dimensions(documents: &KnowledgeIndex, questions: &KnowledgeIndex) -> Result<usize, String> {
    let (d, q) = (documents.manifest().dimensions, questions.manifest().dimensions);
    if q == d {
        Ok(d)
    } else {
        Err(format!("the questions have {q} dimensions, the documents {d}"))
    }
}

/// Reads the pairs of `documents` and its `questions` index (their live rows now).
pub fn read_pairs(documents: &KnowledgeIndex, questions: &KnowledgeIndex) -> Result<Pairs, String> {
    let manifest = documents.manifest();
    let d = shared_dimensions(documents, questions)?;
    let mut pairs = Pairs {
        dimensions: d,
        ..Pairs::default()
    };
    let mut row_of: HashMap<String, usize> = HashMap::new();
    for batch in documents.snapshot().map_err(|e| e.to_string())? {
        let keys = text_column(&batch, &manifest.key_column)?;
        let vectors = vectors(&batch, &manifest.vector_column)?;
        for (key, vector) in keys.into_iter().zip(vectors) {
            if let (Some(key), Some(vector)) = (key, vector)
                && vector.len() == d
            {
                row_of.insert(key, row_of.len());
                pairs.documents.extend_from_slice(&vector);
            }
        }
    }
    let vector_column = questions.manifest().vector_column;
    for batch in questions.snapshot().map_err(|e| e.to_string())? {
        let doc_ids = text_column(&batch, "doc_id")?;
        let vectors = vectors(&batch, &vector_column)?;
        for (doc, vector) in doc_ids.into_iter().zip(vectors) {
            match (doc.and_then(|d| row_of.get(&d).copied()), vector) {
                (Some(row), Some(vector)) if vector.len() == d => {
                    pairs.questions.extend_from_slice(&vector);
                    pairs.positives.push(row);
                }
                _ => pairs.orphans += 1,
            }
        }
    }
    Ok(pairs)
}
