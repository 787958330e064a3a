//! The Meta-Knowledge side of a knowledge index (`OPTIONS ('meta_knowledge' 'true')`):
//! a questions index beside the documents (one row per synthetic question, with its answer,
//! document, cluster and metadata, and its own vector) and the clusters with their summaries.
//!
//! Layout inside the index directory: `questions/` (a knowledge index keyed by
//! `question_id` = `<doc_id>#<n>`) and `clusters.json` (summaries). Every document upsert
//! replaces the document's questions; every commit recomputes cluster sizes and centroids;
//! summaries are rewritten only for clusters that changed enough (see [`SummaryPolicy`]).

mod attachment;
pub mod clusters;
mod tables;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use mkflow_index::vectors_to_array;
use mkflow_udfs::EmbedQueue;
use mkflow_udfs::mk::{ClusterBrief, ClusterDigest, qa_type};

pub use attachment::{MkAttachment, MkServices};
pub use clusters::{Cluster, Summary, SummaryPolicy};
use clusters::{SummaryFile, cluster_shapes};
pub use tables::ClustersTable;

use mkflow_index::{Analyzer, IndexError, IndexSettings, KnowledgeIndex, MANIFEST_FILE, TextColumn};

/// Subdirectory of the questions index.
pub const QUESTIONS_DIR: &str = "questions";
/// File of the cluster summaries.
pub const CLUSTERS_FILE: &str = "clusters.json";
/// Document column holding the metadata struct.
pub const METADATA_COLUMN: &str = "metadata";
/// Document column holding the synthetic QA pairs.
pub const QA_COLUMN: &str = "qa";
/// Document (and question) column holding the cluster key.
pub const CLUSTER_COLUMN: &str = "cluster_name";

/// Most questions a summary is written from (an even sample beyond).
const DIGEST_QUESTIONS: usize = 200;

/// Questions of a Meta-Knowledge index, and its clusters.
#[derive(Debug)]
pub struct MkIndex {
    dir: PathBuf,
    questions: Arc<KnowledgeIndex>,
    /// The summaries as persisted in `clusters.json` (read once, written on change).
    summaries: Mutex<SummaryFile>,
    clusters: RwLock<Vec<Cluster>>,
}

/// The question rows built from a batch of documents, before they are committed.
#[derive(Debug)]
pub struct PendingQuestions {
    batches: Vec<RecordBatch>,
    documents: HashSet<String>,
}

/// The columns a document table needs for Meta-Knowledge: `metadata` (of the given type),
/// `qa` and `cluster_name`, appended to `columns` unless declared.
pub fn document_columns(columns: &Schema, metadata_type: DataType) -> Schema {
    let mut fields: Vec<Field> = columns.fields().iter().map(|f| f.as_ref().clone()).collect();
    for (name, data_type) in [
        (METADATA_COLUMN, metadata_type),
        (QA_COLUMN, qa_type()),
        (CLUSTER_COLUMN, DataType::Utf8),
    ] {
        if columns.field_with_name(name).is_err() {
            fields.push(Field::new(name, data_type, true));
        }
    }
    Schema::new(fields)
}

impl MkIndex {
    /// Whether the index in `dir` has a Meta-Knowledge side.
    pub fn exists(dir: &Path) -> bool {
        dir.join(QUESTIONS_DIR).join(MANIFEST_FILE).is_file()
    }

    /// Opens the Meta-Knowledge side of `documents`, creating its questions index if needed.
    pub fn open_or_create(documents: &KnowledgeIndex) -> Result<Self, IndexError> {
        let schema = documents.schema();
        for column in [METADATA_COLUMN, QA_COLUMN, CLUSTER_COLUMN] {
            if schema.field_with_name(column).is_err() {
                return Err(IndexError::Invalid(format!(
                    "a Meta-Knowledge index needs a '{column}' column; {} has none",
                    documents.dir().display()
                )));
            }
        }
        let metadata_type = schema
            .field_with_name(METADATA_COLUMN)
            .expect("checked")
            .data_type()
            .clone();
        let manifest = documents.manifest();
        let columns = Schema::new(vec![
            Field::new("question_id", DataType::Utf8, false),
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("question", DataType::Utf8, false),
            Field::new("answer", DataType::Utf8, false),
            Field::new(CLUSTER_COLUMN, DataType::Utf8, true),
            Field::new(METADATA_COLUMN, metadata_type, true),
        ]);
        let settings = IndexSettings {
            model: manifest.model,
            dimensions: manifest.dimensions,
            quantization: manifest.quantization,
            key_column: "question_id".into(),
            vector_column: manifest.vector_column,
            // BM25 over the questions (qa_text_search) reads what a user's query resembles.
            text_columns: Some(vec![TextColumn {
                name: "question".into(),
                analyzer: Analyzer::default(),
            }]),
        };
        let questions = KnowledgeIndex::open_or_create(documents.dir().join(QUESTIONS_DIR), &columns, &settings)?;
        let mk = MkIndex {
            summaries: Mutex::new(SummaryFile::read(&documents.dir().join(CLUSTERS_FILE))?),
            dir: documents.dir().to_path_buf(),
            questions: Arc::new(questions),
            clusters: RwLock::new(Vec::new()),
        };
        mk.refresh_clusters(documents)?;
        Ok(mk)
    }

    /// The questions index.
    pub fn questions(&self) -> &Arc<KnowledgeIndex> {
        &self.questions
    }

    /// The clusters, largest first.
    pub fn clusters(&self) -> Vec<Cluster> {
        self.clusters.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Builds the question rows of a batch of documents (its `qa` column exploded), embedding
    /// the questions with `embedder`. Nothing is committed yet.
    pub fn pending_questions(
        &self,
        documents: &[RecordBatch],
        key_column: &str,
        embedder: &EmbedQueue,
    ) -> Result<PendingQuestions, IndexError> {
        let schema = self.questions.schema();
        let mut pending = PendingQuestions {
            batches: Vec::new(),
            documents: HashSet::new(),
        };
        for batch in documents.iter().filter(|b| b.num_rows() > 0) {
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| IndexError::Invalid(format!("the inserted rows have no '{name}' column")))
            };
            let ids = datafusion::arrow::compute::cast(column(key_column)?, &DataType::Utf8)?;
            let ids = ids.as_string::<i32>();
            let qa = datafusion::arrow::compute::cast(column(QA_COLUMN)?, &qa_type())?;
            let qa = qa.as_list::<i32>();
            let clusters = datafusion::arrow::compute::cast(column(CLUSTER_COLUMN)?, &DataType::Utf8)?;
            let clusters = clusters.as_string::<i32>();
            let (mut rows, mut question_ids, mut doc_ids, mut questions, mut answers) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in 0..batch.num_rows() {
                if ids.is_null(row) {
                    continue;
                }
                let id = ids.value(row);
                pending.documents.insert(id.to_string());
                if qa.is_null(row) {
                    continue;
                }
                let pairs = qa.value(row);
                let pairs = pairs.as_struct();
                let (q, a) = (pairs.column(0).as_string::<i32>(), pairs.column(1).as_string::<i32>());
                for n in 0..pairs.len() {
                    if pairs.is_null(n) || q.is_null(n) || q.value(n).trim().is_empty() {
                        continue;
                    }
                    rows.push(row as u32);
                    question_ids.push(format!("{id}#{n}"));
                    doc_ids.push(id.to_string());
                    questions.push(q.value(n).to_string());
                    answers.push(if a.is_null(n) { "" } else { a.value(n) }.to_string());
                }
            }
            if rows.is_empty() {
                continue;
            }
            let texts: Vec<Option<&str>> = questions.iter().map(|q| Some(q.as_str())).collect();
            let embeddings = embedder
                .embed_blocking(&texts)
                .map_err(|e| IndexError::Invalid(format!("cannot embed synthetic questions: {e}")))?;
            let indices = UInt32Array::from(rows);
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(question_ids)),
                Arc::new(StringArray::from(doc_ids)),
                Arc::new(StringArray::from(questions)),
                Arc::new(StringArray::from(answers)),
                take(clusters, &indices, None)?,
                datafusion::arrow::compute::cast(
                    &take(column(METADATA_COLUMN)?.as_ref(), &indices, None)?,
                    schema.field_with_name(METADATA_COLUMN)?.data_type(),
                )?,
                vectors_to_array(embeddings.vectors, embeddings.present, embeddings.dimensions)?,
            ];
            pending.batches.push(RecordBatch::try_new(schema.clone(), columns)?);
        }
        Ok(pending)
    }

    /// Replaces the questions of the documents in `pending` with its questions.
    pub fn commit_questions(&self, pending: &PendingQuestions) -> Result<(), IndexError> {
        self.remove_questions_of(&pending.documents)?;
        self.questions.upsert(&pending.batches)?;
        Ok(())
    }

    /// Removes the questions of documents.
    pub fn remove_questions_of(&self, documents: &HashSet<String>) -> Result<usize, IndexError> {
        Ok(self.questions.delete_where_in("doc_id", documents)?.len())
    }

    /// Recomputes cluster sizes and centroids from the rows (after every commit).
    pub fn refresh_clusters(&self, documents: &KnowledgeIndex) -> Result<(), IndexError> {
        let question_schema = self.questions.schema();
        let columns = (
            question_schema.index_of(CLUSTER_COLUMN)?,
            question_schema.index_of(&self.questions.manifest().vector_column)?,
        );
        let document_cluster = documents.schema().index_of(CLUSTER_COLUMN)?;
        let shapes = cluster_shapes(
            &self.questions.snapshot()?,
            columns,
            &documents.snapshot()?,
            document_cluster,
            self.questions.manifest().dimensions,
        );
        let summaries = &self.summaries.lock().unwrap_or_else(|e| e.into_inner()).summaries;
        let mut clusters: Vec<Cluster> = shapes
            .into_iter()
            .filter(|(_, s)| s.documents > 0 || s.questions > 0)
            .map(|(name, shape)| Cluster {
                summary: summaries.get(&name).cloned(),
                name,
                documents: shape.documents,
                questions: shape.questions,
                centroid: shape.centroid,
            })
            .collect();
        clusters.sort_by(|a, b| b.documents.cmp(&a.documents).then_with(|| a.name.cmp(&b.name)));
        *self.clusters.write().unwrap_or_else(|e| e.into_inner()) = clusters;
        Ok(())
    }

    /// Clusters whose summary `policy` says to (re)write at `now_ms`.
    pub fn stale_clusters(&self, policy: &SummaryPolicy, now_ms: i64) -> Vec<String> {
        self.clusters()
            .into_iter()
            .filter(|c| c.needs_summary(policy, now_ms))
            .map(|c| c.name)
            .collect()
    }

    /// What the summaries of `clusters` are written from (one pass over the questions): for
    /// each, an even sample of its questions with their vectors, and the summary being replaced.
    pub fn digests(&self, clusters: &[String]) -> Result<Vec<ClusterDigest>, IndexError> {
        let schema = self.questions.schema();
        let (question_column, cluster_column) = (schema.index_of("question")?, schema.index_of(CLUSTER_COLUMN)?);
        let vector_column = schema.index_of(&self.questions.manifest().vector_column)?;
        let dims = self.questions.manifest().dimensions;
        let mut rows: HashMap<&str, Vec<(String, Vec<f32>)>> =
            clusters.iter().map(|c| (c.as_str(), Vec::new())).collect();
        for batch in self.questions.snapshot()? {
            let questions = batch.column(question_column).as_string::<i32>();
            let names = batch.column(cluster_column).as_string::<i32>();
            let vectors = batch.column(vector_column);
            let values = mkflow_index::vector_values(vectors);
            for row in 0..batch.num_rows() {
                if !names.is_valid(row) || !vectors.is_valid(row) {
                    continue;
                }
                if let Some(wanted) = rows.get_mut(names.value(row)) {
                    wanted.push((
                        questions.value(row).to_string(),
                        values[row * dims..(row + 1) * dims].to_vec(),
                    ));
                }
            }
        }
        let states = self.clusters();
        Ok(clusters
            .iter()
            .map(|cluster| {
                let all = rows.remove(cluster.as_str()).unwrap_or_default();
                let step = all.len().div_ceil(DIGEST_QUESTIONS).max(1);
                let sample: Vec<(String, Vec<f32>)> = all.into_iter().step_by(step).collect();
                let state = states.iter().find(|c| &c.name == cluster);
                ClusterDigest {
                    cluster: cluster.clone(),
                    documents: state.map_or(0, |c| c.documents),
                    vectors: sample.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
                    questions: sample.into_iter().map(|(q, _)| q).collect(),
                    previous_summary: state.and_then(|c| c.summary.as_ref()).map(|s| s.text.clone()),
                }
            })
            .collect())
    }

    /// Records new summaries (cluster, text) written by `generator`, persisting all summaries
    /// atomically in one write.
    pub fn set_summaries(
        &self,
        written: Vec<(String, String)>,
        generator: &str,
        now_ms: i64,
    ) -> Result<(), IndexError> {
        if written.is_empty() {
            return Ok(());
        }
        // Lock order: summaries, then clusters (as in `refresh_clusters`). The file is written
        // before the clusters are locked, so searches routing meanwhile never wait for it.
        let mut file = self.summaries.lock().unwrap_or_else(|e| e.into_inner());
        let sizes: HashMap<String, usize> = self.clusters().into_iter().map(|c| (c.name, c.questions)).collect();
        let mut next = SummaryFile {
            summaries: file.summaries.clone(),
        };
        for (cluster, text) in written {
            let summary = Summary {
                text,
                version: next.summaries.get(&cluster).map_or(0, |s| s.version) + 1,
                written_at_ms: now_ms,
                questions: sizes.get(&cluster).copied().unwrap_or(0),
                generator: generator.to_string(),
            };
            next.summaries.insert(cluster, summary);
        }
        next.write(&self.dir.join(CLUSTERS_FILE))?;
        for c in self.clusters.write().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            if let Some(summary) = next.summaries.get(&c.name) {
                c.summary = Some(summary.clone());
            }
        }
        *file = next;
        Ok(())
    }

    /// The clusters nearest to `query` by centroid, best first: at most `count`, and only those
    /// within `margin` of the nearest one's score, with their scores.
    pub fn route(&self, query: &[f32], count: usize, margin: f32) -> Vec<(Cluster, f32)> {
        let mut scored: Vec<(Cluster, f32)> = self
            .clusters()
            .into_iter()
            .filter(|c| c.centroid.len() == query.len())
            .map(|c| {
                let score = c.centroid.iter().zip(query).map(|(a, b)| a * b).sum::<f32>();
                (c, score)
            })
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored.truncate(count.max(1));
        if let Some(best) = scored.first().map(|(_, s)| *s) {
            scored.retain(|(_, s)| *s >= best - margin.max(0.0));
        }
        scored
    }
}

/// The briefs of clusters that have a summary.
pub fn briefs(clusters: &[Cluster]) -> Vec<ClusterBrief> {
    clusters
        .iter()
        .filter_map(|c| {
            c.summary.as_ref().map(|s| ClusterBrief {
                cluster: c.name.clone(),
                summary: s.text.clone(),
            })
        })
        .collect()
}
