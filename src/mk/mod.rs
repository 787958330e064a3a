//! The Meta-Knowledge side of a knowledge index (`OPTIONS ('meta_knowledge' 'true')`):
//! a questions index beside the documents (one row per synthetic question, with its answer,
//! document, cluster and metadata, and its own vector) and the clusters with their summaries.
//!
//! Two kinds of clusters: the metadata clusters (each document's metadata label) and the
//! topics (clusters from the data: spherical k-means over the question vectors, kept up to date
//! incrementally, see [`topics`]).
//!
//! Layout inside the index directory: `questions/` (a knowledge index keyed by
//! `question_id` = `<doc_id>#<n>`), `clusters.json` (summaries of both kinds) and
//! `topics.json` (the topics' names and centroids). Every document upsert replaces the
//! document's questions (and moves them between topics and metadata clusters, see [`tally`]);
//! every commit rebuilds the cluster list from those running totals and re-fits the topics when
//! they drifted — work in proportion to what the commit changed, not to the index; summaries
//! are rewritten only for clusters that changed enough (see [`SummaryPolicy`]).

mod attachment;
pub mod clusters;
pub mod personas;
mod tables;
mod tally;
pub mod topics;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use mkflow_index::vectors_to_array;
use mkflow_udfs::mk::{ClusterBrief, ClusterDigest, ClusterKind, qa_type};
use mkflow_udfs::{EmbedQueue, TextRole};

pub use attachment::{MkAttachment, MkServices, PersonaRow, topic_policy};
use clusters::SummaryFile;
pub use clusters::{Cluster, Summary, SummaryPolicy};
pub use personas::Persona;
use personas::PersonaFile;
pub use tables::ClustersTable;
use tally::MetadataTally;
pub use topics::TopicPolicy;
use topics::{MIN_QUESTIONS, TOPIC_PREFIX, Topics, sample_step};

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

/// Whether `column` of a Meta-Knowledge index's documents holds what they say (not the key, the
/// vector or a column the prepare stage adds).
pub fn is_document_column(documents: &KnowledgeIndex, column: &str) -> bool {
    let manifest = documents.manifest();
    ![
        manifest.key_column.as_str(),
        manifest.vector_column.as_str(),
        METADATA_COLUMN,
        QA_COLUMN,
        CLUSTER_COLUMN,
    ]
    .contains(&column)
}

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
    /// The topics and every question's membership (`None` until there are enough questions).
    topics: RwLock<Option<Topics>>,
    /// The metadata clusters' running sizes and centroid sums.
    tally: Mutex<MetadataTally>,
    /// The personas as persisted in `personas.json`.
    personas: Mutex<PersonaFile>,
}

/// The question rows built from a batch of documents, before they are committed.
#[derive(Debug)]
pub struct PendingQuestions {
    batches: Vec<RecordBatch>,
    documents: HashSet<String>,
    /// Each written document's metadata cluster.
    clusters: Vec<(String, Option<String>)>,
}

/// A question removed from the index, as its topics and metadata cluster knew it.
#[derive(Debug)]
struct TakenQuestion {
    document: String,
    cluster: Option<String>,
    vector: Vec<f32>,
}

/// Adds every document of `documents` to `tally` under its metadata cluster (one scan, when
/// the index is opened).
fn tally_documents(documents: &KnowledgeIndex, tally: &mut MetadataTally) -> Result<(), IndexError> {
    let schema = documents.schema();
    let (key, cluster) = (
        schema.index_of(&documents.manifest().key_column)?,
        schema.index_of(CLUSTER_COLUMN)?,
    );
    for batch in documents.snapshot()? {
        let ids = datafusion::arrow::compute::cast(batch.column(key), &DataType::Utf8)?;
        let clusters = datafusion::arrow::compute::cast(batch.column(cluster), &DataType::Utf8)?;
        let (ids, clusters) = (ids.as_string::<i32>(), clusters.as_string::<i32>());
        for row in (0..batch.num_rows()).filter(|&r| ids.is_valid(r) && clusters.is_valid(r)) {
            tally.set_document(ids.value(row), Some(clusters.value(row)));
        }
    }
    Ok(())
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
    /// Topics are read back (every question placed in them) or, when there are none yet,
    /// fitted with `policy`.
    pub fn open_or_create(documents: &KnowledgeIndex, policy: TopicPolicy) -> Result<Self, IndexError> {
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
        // The questions commit together with the documents (one generation names both).
        let questions = documents.open_companion(QUESTIONS_DIR, &columns, &settings)?;
        let mk = MkIndex {
            summaries: Mutex::new(SummaryFile::read(&documents.dir().join(CLUSTERS_FILE))?),
            dir: documents.dir().to_path_buf(),
            questions,
            clusters: RwLock::new(Vec::new()),
            topics: RwLock::new(None),
            tally: Mutex::new(MetadataTally::new(manifest.dimensions)),
            personas: Mutex::new(PersonaFile::read(documents.dir())?),
        };
        let mut topics = Topics::read(&mk.dir, mk.questions.manifest().dimensions)?;
        let mut tally = MetadataTally::new(manifest.dimensions);
        mk.for_each_question(|question, document, cluster, vector| {
            tally.add_question(cluster, vector);
            if let Some(topics) = topics.as_mut() {
                topics.place(question, document, vector);
            }
        })?;
        tally_documents(documents, &mut tally)?;
        *mk.tally.lock().unwrap_or_else(|e| e.into_inner()) = tally;
        if let Some(mut topics) = topics {
            topics.settle(None);
            *mk.topics.write().unwrap_or_else(|e| e.into_inner()) = Some(topics);
        }
        mk.refresh_clusters(policy)?;
        Ok(mk)
    }

    /// The questions index.
    pub fn questions(&self) -> &Arc<KnowledgeIndex> {
        &self.questions
    }

    /// The clusters: metadata clusters, then topics, each kind largest first.
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
            clusters: Vec::new(),
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
                let cluster = clusters.is_valid(row).then(|| clusters.value(row).to_string());
                pending.clusters.push((id.to_string(), cluster));
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
                .embed_blocking(&texts, TextRole::Query)
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

    /// Replaces the questions of the documents in `pending` with its questions, moving them
    /// between topics and metadata clusters: a question replaced by itself (a document
    /// delivered again) stays in its topic and is no change.
    pub fn commit_questions(&self, pending: &PendingQuestions) -> Result<(), IndexError> {
        // One commit: a document's questions are replaced by key (a delta), and only those past
        // its new count are deleted (a full rewrite, when there are any).
        let replaced = self
            .questions
            .replace_where_in("doc_id", &pending.documents, &pending.batches)?;
        let mut removed = self.questions_of(&replaced)?;
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        for old in removed.values() {
            tally.remove_question(old.cluster.as_deref(), &old.vector);
        }
        for (document, cluster) in &pending.clusters {
            tally.set_document(document, cluster.as_deref());
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let mut changes = 0;
        self.visit_questions(&pending.batches, |question, document, cluster, vector| {
            tally.add_question(cluster, vector);
            let Some(topics) = topics.as_mut() else { return };
            match removed.remove(question) {
                Some(old) if old.vector == vector => return,
                Some(old) => topics.remove(question, &old.document, &old.vector),
                None => {}
            }
            topics.add(question, document, vector);
            changes += 1;
        })?;
        if let Some(topics) = topics.as_mut() {
            for (question, old) in &removed {
                topics.remove(question, &old.document, &old.vector);
            }
            topics.note_changes(changes + removed.len());
        }
        Ok(())
    }

    /// Removes deleted documents from the clusters, and their questions (from their topics
    /// too).
    pub fn remove_questions_of(&self, documents: &HashSet<String>) -> Result<usize, IndexError> {
        let removed = self.take_questions_of(documents)?;
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        for old in removed.values() {
            tally.remove_question(old.cluster.as_deref(), &old.vector);
        }
        documents.iter().for_each(|d| tally.remove_document(d));
        if let Some(topics) = self.topics.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
            for (question, old) in &removed {
                topics.remove(question, &old.document, &old.vector);
            }
            topics.note_changes(removed.len());
        }
        Ok(removed.len())
    }

    /// Deletes the questions of documents; returns them by question id.
    fn take_questions_of(&self, documents: &HashSet<String>) -> Result<HashMap<String, TakenQuestion>, IndexError> {
        self.questions_of(&self.questions.take_where_in("doc_id", documents)?)
    }

    /// The question rows of `removed` by question id.
    fn questions_of(&self, removed: &RecordBatch) -> Result<HashMap<String, TakenQuestion>, IndexError> {
        let mut taken = HashMap::new();
        self.visit_questions(std::slice::from_ref(removed), |question, document, cluster, vector| {
            let question_row = TakenQuestion {
                document: document.to_string(),
                cluster: cluster.map(str::to_string),
                vector: vector.to_vec(),
            };
            taken.insert(question.to_string(), question_row);
        })?;
        Ok(taken)
    }

    /// Calls `visit` with (question id, document id, metadata cluster, vector) for every
    /// question row of `batches` that has a vector.
    fn visit_questions(
        &self,
        batches: &[RecordBatch],
        mut visit: impl FnMut(&str, &str, Option<&str>, &[f32]),
    ) -> Result<(), IndexError> {
        let schema = self.questions.schema();
        let (ids, documents) = (schema.index_of("question_id")?, schema.index_of("doc_id")?);
        let cluster_column = schema.index_of(CLUSTER_COLUMN)?;
        let vector_column = schema.index_of(&self.questions.manifest().vector_column)?;
        let dims = self.questions.manifest().dimensions;
        for batch in batches {
            let (question_ids, doc_ids) = (
                batch.column(ids).as_string::<i32>(),
                batch.column(documents).as_string::<i32>(),
            );
            let clusters = batch.column(cluster_column).as_string::<i32>();
            let vectors = batch.column(vector_column);
            let values = mkflow_index::vector_values(vectors);
            for row in (0..batch.num_rows()).filter(|&r| vectors.is_valid(r)) {
                visit(
                    question_ids.value(row),
                    doc_ids.value(row),
                    clusters.is_valid(row).then(|| clusters.value(row)),
                    &values[row * dims..(row + 1) * dims],
                );
            }
        }
        Ok(())
    }

    /// [`visit_questions`](Self::visit_questions) over every question of the index.
    fn for_each_question(&self, visit: impl FnMut(&str, &str, Option<&str>, &[f32])) -> Result<(), IndexError> {
        self.visit_questions(&self.questions.snapshot()?, visit)
    }

    /// Fits the topics anew over every question (names kept where a topic stayed), writes
    /// them, and drops the summaries of topics that are gone.
    fn refit_topics(&self, policy: TopicPolicy) -> Result<(), IndexError> {
        let started = std::time::Instant::now();
        let count = self.questions.len();
        let dims = self.questions.manifest().dimensions;
        let step = sample_step(count);
        let (mut sample, mut seen) = (Vec::new(), 0usize);
        self.for_each_question(|_, _, _, vector| {
            if seen % step == 0 {
                sample.extend_from_slice(vector);
            }
            seen += 1;
        })?;
        let previous = self.topics.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut topics = Topics::fit(
            &sample,
            dims,
            policy.topics_for(seen),
            policy.overlap,
            previous.as_ref(),
        );
        let mut similarity = 0.0f64;
        self.for_each_question(|question, document, _, vector| {
            similarity += f64::from(topics.place(question, document, vector).unwrap_or(0.0));
        })?;
        topics.settle(Some((similarity / seen.max(1) as f64) as f32));
        topics.write(&self.dir)?;
        log::info!(
            "{}: {} topics fitted over {seen} questions in {:.2} s",
            self.dir.display(),
            topics.len(),
            started.elapsed().as_secs_f64()
        );
        let mut file = self.summaries.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = file
            .summaries
            .keys()
            .filter(|name| name.starts_with(TOPIC_PREFIX) && !topics.has(name))
            .cloned()
            .collect();
        if !gone.is_empty() {
            let mut next = SummaryFile {
                summaries: file.summaries.clone(),
            };
            gone.iter().for_each(|name| drop(next.summaries.remove(name)));
            next.write(&self.dir.join(CLUSTERS_FILE))?;
            *file = next;
        }
        *self.topics.write().unwrap_or_else(|e| e.into_inner()) = Some(topics);
        Ok(())
    }

    /// Rebuilds the cluster list from the metadata clusters' running totals and the topics,
    /// re-fitting the topics first when `policy` says they drifted (after every commit).
    pub fn refresh_clusters(&self, policy: TopicPolicy) -> Result<(), IndexError> {
        let refit = match &*self.topics.read().unwrap_or_else(|e| e.into_inner()) {
            None => self.questions.len() >= MIN_QUESTIONS,
            Some(topics) => {
                topics.drifted(policy.refit_growth)
                    || (policy.clusters > 0 && policy.topics_for(self.questions.len()) != topics.len())
            }
        };
        if refit {
            self.refit_topics(policy)?;
        }
        let shapes = self.tally.lock().unwrap_or_else(|e| e.into_inner()).shapes();
        let summaries = &self.summaries.lock().unwrap_or_else(|e| e.into_inner()).summaries;
        let mut clusters: Vec<Cluster> = shapes
            .into_iter()
            .filter(|(_, s)| s.documents > 0 || s.questions > 0)
            .map(|(name, shape)| Cluster {
                summary: summaries.get(&name).cloned(),
                name,
                kind: ClusterKind::Metadata,
                documents: shape.documents,
                questions: shape.questions,
                centroid: shape.centroid,
            })
            .collect();
        if let Some(topics) = &*self.topics.read().unwrap_or_else(|e| e.into_inner()) {
            clusters.extend(topics.shapes().into_iter().map(|topic| Cluster {
                summary: summaries.get(&topic.name).cloned(),
                name: topic.name,
                kind: ClusterKind::Topic,
                documents: topic.documents,
                questions: topic.questions,
                centroid: topic.centroid,
            }));
        }
        clusters.sort_by(|a, b| {
            (a.kind == ClusterKind::Topic)
                .cmp(&(b.kind == ClusterKind::Topic))
                .then(b.documents.cmp(&a.documents))
                .then_with(|| a.name.cmp(&b.name))
        });
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
        let id_column = schema.index_of("question_id")?;
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let vector_column = schema.index_of(&self.questions.manifest().vector_column)?;
        let dims = self.questions.manifest().dimensions;
        let mut rows: HashMap<&str, Vec<(String, Vec<f32>)>> =
            clusters.iter().map(|c| (c.as_str(), Vec::new())).collect();
        for batch in self.questions.snapshot()? {
            let questions = batch.column(question_column).as_string::<i32>();
            let names = batch.column(cluster_column).as_string::<i32>();
            let ids = batch.column(id_column).as_string::<i32>();
            let vectors = batch.column(vector_column);
            let values = mkflow_index::vector_values(vectors);
            for row in (0..batch.num_rows()).filter(|&r| vectors.is_valid(r)) {
                let metadata = names.is_valid(row).then(|| names.value(row));
                let its_topics = topics.iter().flat_map(|t| t.topics_of(ids.value(row)));
                for cluster in metadata.into_iter().chain(its_topics) {
                    if let Some(wanted) = rows.get_mut(cluster) {
                        wanted.push((
                            questions.value(row).to_string(),
                            values[row * dims..(row + 1) * dims].to_vec(),
                        ));
                    }
                }
            }
        }
        drop(topics);
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

    /// The clusters of `kind` nearest to `query` by centroid, best first: at most `count`, and
    /// only those within `margin` of the nearest one's score, with their scores.
    pub fn route(&self, query: &[f32], kind: ClusterKind, count: usize, margin: f32) -> Vec<(Cluster, f32)> {
        let candidates = self.clusters().into_iter().filter(|c| c.kind == kind).collect();
        route_among(candidates, query, count, margin)
    }

    /// The personas, by name.
    pub fn personas(&self) -> Vec<Persona> {
        let file = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        file.personas.values().cloned().collect()
    }

    /// The persona called `name`.
    pub fn persona(&self, name: &str) -> Option<Persona> {
        let file = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        file.personas.get(name).cloned()
    }

    /// Adds or replaces personas by name (one atomic write); a persona whose interests did
    /// not change keeps its summary.
    pub fn put_personas(&self, personas: Vec<Persona>) -> Result<(), IndexError> {
        let mut file = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        let next = file.with(personas);
        next.write(&self.dir)?;
        *file = next;
        Ok(())
    }

    /// Removes the personas named in `names`; returns how many there were.
    pub fn delete_personas(&self, names: &HashSet<String>) -> Result<usize, IndexError> {
        let mut file = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        let (next, removed) = file.without(names);
        if removed > 0 {
            next.write(&self.dir)?;
            *file = next;
        }
        Ok(removed)
    }

    /// The clusters of `persona`: those it names (of either kind), else the topics (metadata
    /// clusters before the first fit) nearest its description, as `mk_search` routes.
    pub fn persona_clusters(&self, persona: &Persona, count: usize, margin: f32) -> Vec<Cluster> {
        if persona.clusters.is_empty() {
            let kind = match self.topics.read().unwrap_or_else(|e| e.into_inner()).is_some() {
                true => ClusterKind::Topic,
                false => ClusterKind::Metadata,
            };
            return self
                .route(&persona.description_vector, kind, count, margin)
                .into_iter()
                .map(|(c, _)| c)
                .collect();
        }
        self.clusters()
            .into_iter()
            .filter(|c| persona.clusters.contains(&c.name))
            .collect()
    }

    /// Personas whose summary `policy` says to (re)write at `now_ms`, with their clusters
    /// (routed as by `count` and `margin`) and those clusters' question count now.
    pub fn stale_personas(
        &self,
        policy: &SummaryPolicy,
        now_ms: i64,
        count: usize,
        margin: f32,
    ) -> Vec<(Persona, Vec<String>, usize)> {
        self.personas()
            .into_iter()
            .filter_map(|persona| {
                let clusters = self.persona_clusters(&persona, count, margin);
                let questions = clusters.iter().map(|c| c.questions).sum();
                let shape = Cluster {
                    name: persona.name.clone(),
                    kind: ClusterKind::Topic,
                    documents: 0,
                    questions,
                    centroid: Vec::new(),
                    summary: persona.summary.clone(),
                };
                shape
                    .needs_summary(policy, now_ms)
                    .then(|| (persona, clusters.into_iter().map(|c| c.name).collect(), questions))
            })
            .collect()
    }

    /// What a persona's summary is written from: an even sample of its clusters' questions.
    pub fn persona_digest(&self, persona: &Persona, clusters: &[String]) -> Result<ClusterDigest, IndexError> {
        let parts = self.digests(clusters)?;
        let dims = self.questions.manifest().dimensions;
        let (mut questions, mut vectors, mut documents) = (Vec::new(), Vec::new(), 0);
        for part in parts {
            documents += part.documents;
            vectors.extend(part.vectors);
            questions.extend(part.questions);
        }
        let step = questions.len().div_ceil(DIGEST_QUESTIONS).max(1);
        let keep: Vec<usize> = (0..questions.len()).step_by(step).collect();
        let full_vectors = vectors.len() == questions.len() * dims;
        Ok(ClusterDigest {
            cluster: persona.name.clone(),
            documents,
            vectors: if full_vectors {
                keep.iter()
                    .flat_map(|&i| vectors[i * dims..(i + 1) * dims].iter().copied())
                    .collect()
            } else {
                Vec::new()
            },
            questions: keep.iter().map(|&i| questions[i].clone()).collect(),
            previous_summary: persona.summary.as_ref().map(|s| s.text.clone()),
        })
    }

    /// Records a persona's new summary, written by `generator` from `questions` questions.
    pub fn set_persona_summary(
        &self,
        name: &str,
        text: String,
        questions: usize,
        generator: &str,
        now_ms: i64,
    ) -> Result<(), IndexError> {
        let mut file = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = file.clone();
        let Some(persona) = next.personas.get_mut(name) else {
            return Ok(());
        };
        persona.summary = Some(Summary {
            text,
            version: persona.summary.as_ref().map_or(0, |s| s.version) + 1,
            written_at_ms: now_ms,
            questions,
            generator: generator.to_string(),
        });
        next.write(&self.dir)?;
        *file = next;
        Ok(())
    }

    /// The topics of each question (by id), nearest first; empty lists before the first fit.
    pub fn topics_of(&self, questions: &StringArray) -> Vec<Vec<String>> {
        match &*self.topics.read().unwrap_or_else(|e| e.into_inner()) {
            Some(topics) => topics.topics_of_each(questions.iter()),
            None => vec![Vec::new(); questions.len()],
        }
    }

    /// Which rows of a batch of question rows belong to one of `clusters` (of `kind`).
    pub fn in_clusters(
        &self,
        batch: &RecordBatch,
        kind: ClusterKind,
        clusters: &HashSet<&str>,
    ) -> Result<BooleanArray, IndexError> {
        Ok(match kind {
            ClusterKind::Metadata => {
                let names = batch
                    .column(batch.schema().index_of(CLUSTER_COLUMN)?)
                    .as_string::<i32>();
                names
                    .iter()
                    .map(|c| Some(c.is_some_and(|c| clusters.contains(c))))
                    .collect()
            }
            ClusterKind::Topic => {
                let ids = batch.column(batch.schema().index_of("question_id")?).as_string::<i32>();
                let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
                ids.iter()
                    .map(|id| Some(id.is_some_and(|id| topics.as_ref().is_some_and(|t| t.in_any(id, clusters)))))
                    .collect()
            }
        })
    }
}

/// Of `candidates`, those nearest to `query` by centroid, best first: at most `count`, and only
/// those within `margin` of the nearest one's score, with their scores.
pub fn route_among(candidates: Vec<Cluster>, query: &[f32], count: usize, margin: f32) -> Vec<(Cluster, f32)> {
    let mut scored: Vec<(Cluster, f32)> = candidates
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
