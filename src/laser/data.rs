//! The LaSER training set of a Meta-Knowledge index: every synthetic question is a query, its
//! document the positive, the documents nearest it (by the index's own vectors) its hard
//! negatives, and its document's metadata and its answer the explicit reasoning the teacher reads.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use ndarray::ArrayView2;
use serde::Serialize;

use mkflow_index::KnowledgeIndex;
use mkflow_udfs::{Prompts, TextRole};

use crate::adapter::data::{shared_dimensions, text_column, vectors};
use crate::adapter::train::mine_hard_negatives;
use crate::mk::{METADATA_COLUMN, is_document_column};
use crate::support::SplitMix;

/// One training question, as the trainer reads it (`examples.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// The question, written as the model writes queries.
    pub query: String,
    /// Its document's line in `documents.jsonl`.
    pub positive: usize,
    /// The documents nearest the question that are not its own.
    pub negatives: Vec<usize>,
    /// The explicit reasoning, one segment per thought: the document's metadata, the answer.
    pub reasoning: Vec<String>,
    /// Held out of training: scored before and after to see what training did.
    pub held_out: bool,
}

/// The training set: documents (written as the model writes documents) and questions.
#[derive(Debug, Default)]
pub struct TrainingData {
    /// Document texts as the model reads them.
    pub documents: Vec<String>,
    /// The documents' own texts (before the template), for the export's parity probe.
    pub raw_documents: Vec<String>,
    /// The questions' own texts, in the order of `examples`.
    pub raw_queries: Vec<String>,
    /// One per question with a document.
    pub examples: Vec<Example>,
    /// Questions left out: their document has no text or vector, or is gone.
    pub orphans: usize,
}

/// What to read and how to split it.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Document columns joined (with ". ") into the text the model reads; empty: every text
    /// column but the key and the Meta-Knowledge columns.
    pub text_columns: Vec<String>,
    /// Hard negatives mined per question.
    pub hard_negatives: usize,
    /// Share of the questions held out of training.
    pub held_out: f64,
    /// Most questions held out (they are encoded before and after training).
    pub max_held_out: usize,
    /// Seed of the split.
    pub seed: u64,
}

/// The document columns that make its text: `wanted`, or every text column but the key and the
/// Meta-Knowledge ones.
fn document_text_columns(index: &KnowledgeIndex, wanted: &[String]) -> Result<Vec<String>, String> {
    let schema = index.schema();
    if !wanted.is_empty() {
        for name in wanted {
            if schema.field_with_name(name).is_err() {
                let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(format!(
                    "no column '{name}' in the documents (columns: {})",
                    known.join(", ")
                ));
            }
        }
        return Ok(wanted.to_vec());
    }
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .filter(|f| f.data_type().is_string() && is_document_column(index, f.name()))
        .map(|f| f.name().clone())
        .collect();
    if columns.is_empty() {
        return Err("the documents have no text column (hint: name them with --text-columns)".into());
    }
    Ok(columns)
}

/// A metadata struct value as one line: `name: value; name: value` (nulls left out).
fn metadata_lines(batch: &RecordBatch) -> Result<Vec<Option<String>>, String> {
    let Some(column) = batch.column_by_name(METADATA_COLUMN) else {
        return Ok(vec![None; batch.num_rows()]);
    };
    let Some(fields) = column.as_any().downcast_ref::<datafusion::arrow::array::StructArray>() else {
        return Ok(vec![None; batch.num_rows()]);
    };
    let options = FormatOptions::default();
    let formatters: Vec<(String, &dyn Array, ArrayFormatter)> = fields
        .fields()
        .iter()
        .zip(fields.columns())
        .map(|(field, values)| {
            ArrayFormatter::try_new(values.as_ref(), &options)
                .map(|f| (field.name().replace('_', " "), values.as_ref(), f))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok((0..batch.num_rows())
        .map(|row| {
            if fields.is_null(row) {
                return None;
            }
            let parts: Vec<String> = formatters
                .iter()
                .filter(|(_, values, _)| !values.is_null(row))
                .map(|(name, _, format)| format!("{name}: {}", format.value(row)))
                .filter(|part| !part.ends_with(": ") && !part.ends_with(": []"))
                .collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        })
        .collect())
}

/// Reads the training set of `documents` and its `questions` index, writing texts with `prompts`.
pub fn read_training_set(
    documents: &KnowledgeIndex,
    questions: &KnowledgeIndex,
    prompts: &Prompts,
    options: &DataOptions,
) -> Result<TrainingData, String> {
    let manifest = documents.manifest();
    let d = shared_dimensions(documents, questions)?;
    let columns = document_text_columns(documents, &options.text_columns)?;
    let mut set = TrainingData::default();
    let mut row_of: HashMap<String, usize> = HashMap::new();
    let mut document_vectors: Vec<f32> = Vec::new();
    for batch in documents.snapshot().map_err(|e| e.to_string())? {
        let keys = text_column(&batch, &manifest.key_column)?;
        let texts: Vec<Vec<Option<String>>> = columns
            .iter()
            .map(|c| text_column(&batch, c))
            .collect::<Result<_, _>>()?;
        for (row, (key, vector)) in keys
            .into_iter()
            .zip(vectors(&batch, &manifest.vector_column)?)
            .enumerate()
        {
            let text: Vec<&str> = texts
                .iter()
                .filter_map(|column| column[row].as_deref())
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            if let (Some(key), Some(vector), false) = (key, vector, text.is_empty())
                && vector.len() == d
            {
                let text = text.join(". ");
                row_of.insert(key, set.documents.len());
                set.documents
                    .push(prompts.render(TextRole::Document, &text).into_owned());
                set.raw_documents.push(text);
                document_vectors.extend_from_slice(&vector);
            }
        }
    }
    let mut question_vectors: Vec<f32> = Vec::new();
    let vector_column = questions.manifest().vector_column;
    for batch in questions.snapshot().map_err(|e| e.to_string())? {
        let doc_ids = text_column(&batch, "doc_id")?;
        let texts = text_column(&batch, "question")?;
        let answers = text_column(&batch, "answer")?;
        let metadata = metadata_lines(&batch)?;
        let rows = doc_ids.into_iter().zip(texts).zip(answers).zip(metadata);
        for ((((doc, question), answer), metadata), vector) in rows.zip(vectors(&batch, &vector_column)?) {
            match (doc.and_then(|d| row_of.get(&d).copied()), question, vector) {
                (Some(positive), Some(question), Some(vector)) if vector.len() == d && !question.trim().is_empty() => {
                    let reasoning = metadata
                        .into_iter()
                        .chain(answer.filter(|a| !a.trim().is_empty()))
                        .collect();
                    set.examples.push(Example {
                        query: prompts.render(TextRole::Query, &question).into_owned(),
                        positive,
                        negatives: Vec::new(),
                        reasoning,
                        held_out: false,
                    });
                    set.raw_queries.push(question);
                    question_vectors.extend_from_slice(&vector);
                }
                _ => set.orphans += 1,
            }
        }
    }
    if set.examples.is_empty() {
        return Ok(set);
    }
    let positives: Vec<usize> = set.examples.iter().map(|e| e.positive).collect();
    let question_view = ArrayView2::from_shape((positives.len(), d), &question_vectors).map_err(|e| e.to_string())?;
    let document_view =
        ArrayView2::from_shape((set.documents.len(), d), &document_vectors).map_err(|e| e.to_string())?;
    let negatives = mine_hard_negatives(question_view, &positives, document_view, options.hard_negatives);
    for (example, negatives) in set.examples.iter_mut().zip(negatives) {
        example.negatives = negatives;
    }
    // The held-out questions: a seeded sample, at most `max_held_out`, never all of them.
    let wanted = ((set.examples.len() as f64 * options.held_out).round() as usize)
        .min(options.max_held_out)
        .min(set.examples.len() - 1);
    let mut order: Vec<usize> = (0..set.examples.len()).collect();
    SplitMix(options.seed).shuffle(&mut order);
    for &i in &order[..wanted] {
        set.examples[i].held_out = true;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, ListBuilder, StringArray, StringBuilder, StructArray};
    use datafusion::arrow::buffer::NullBuffer;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn metadata_becomes_one_line_of_named_values() {
        let mut keywords = ListBuilder::new(StringBuilder::new());
        keywords.append_value([Some("vitamin D"), Some("bone")]);
        keywords.append_value::<[Option<&str>; 0], _>([]);
        keywords.append_value([Some("x")]);
        let keywords = keywords.finish();
        let study = StringArray::from(vec![Some("cohort"), None, Some("trial")]);
        let fields = vec![
            Field::new("study_type", DataType::Utf8, true),
            Field::new("keywords", keywords.data_type().clone(), true),
        ];
        let metadata = StructArray::new(
            fields.into(),
            vec![Arc::new(study) as ArrayRef, Arc::new(keywords) as ArrayRef],
            Some(NullBuffer::from(vec![true, true, false])),
        );
        let schema = Schema::new(vec![Field::new(METADATA_COLUMN, metadata.data_type().clone(), true)]);
        let batch = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(metadata)]).unwrap();
        assert_eq!(
            metadata_lines(&batch).unwrap(),
            [
                Some("study type: cohort; keywords: [vitamin D, bone]".to_string()),
                None,
                None
            ]
        );
    }
}
