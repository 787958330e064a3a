//! The generation backends behind the Meta-Knowledge UDFs: one trait, chosen per pipeline
//! (`SET mkflow.generator = 'embedded' | 'openai'`).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A document to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Document<'a> {
    /// Its title, when it has one.
    pub title: Option<&'a str>,
    /// Its text.
    pub body: &'a str,
}

impl Document<'_> {
    /// Title and body joined as `concat_ws('. ', title, body)` joins them, so that the
    /// embedding of this text is shared with `embed(concat_ws('. ', title, body))`.
    pub fn full_text(&self) -> String {
        match self.title.filter(|t| !t.is_empty()) {
            Some(title) => format!("{title}. {}", self.body),
            None => self.body.to_string(),
        }
    }
}

/// A synthetic question with its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaPair {
    /// A question a reader who has not seen the document could ask.
    pub question: String,
    /// Its answer, from the document.
    pub answer: String,
}

/// What the prepare step yields for one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Metadata, valid for the pipeline's schema.
    pub metadata: Map<String, Value>,
    /// Synthetic question/answer pairs.
    pub qa: Vec<QaPair>,
}

/// A cluster, as its summary is written from.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDigest {
    /// The cluster key.
    pub cluster: String,
    /// Documents in the cluster.
    pub documents: usize,
    /// Its synthetic questions (for large clusters, a representative sample).
    pub questions: Vec<String>,
    /// One vector per question, row-major (empty when unavailable).
    pub vectors: Vec<f32>,
    /// The summary being replaced, if any.
    pub previous_summary: Option<String>,
}

/// A cluster as query rewriting sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterBrief {
    /// The cluster key.
    pub cluster: String,
    /// Its Meta-Knowledge summary.
    pub summary: String,
}

/// One numbered piece of evidence an answer may cite (`[n]`, counted from 1 in the order given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The synthetic question that matched the query (empty when the evidence is a passage).
    pub question: String,
    /// Its answer, from the document.
    pub answer: String,
    /// The document it came from.
    pub doc_id: String,
    /// The document's title, when it has one.
    pub title: Option<String>,
}

/// The six criteria the seed paper (Mombaerts et al., 2024) judges a retrieval-augmented answer
/// on, each with what the judge is told it means.
pub const CRITERIA: [(&str, &str); 6] = [
    (
        "recall",
        "how much of the information needed to answer the query the context and answer cover",
    ),
    (
        "precision",
        "how much of the context and answer is relevant to the query, without noise",
    ),
    (
        "specificity",
        "how precisely the answer addresses the particulars of the query, not generalities",
    ),
    (
        "breadth",
        "how many of the relevant aspects and perspectives of the query it covers",
    ),
    ("depth", "how thorough and detailed its treatment of the query is"),
    ("relevancy", "how well the answer, as a whole, serves the user's query"),
];

/// An answer as a judge sees it: the text and the evidence it was written from.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'a> {
    /// The answer.
    pub answer: &'a str,
    /// The numbered evidence it cites.
    pub evidence: &'a [Evidence],
}

/// What a judge is asked about the answers to `query`.
#[derive(Debug, Clone, Copy)]
pub enum Judging<'a> {
    /// One answer: a score from 1 to 5 per criterion.
    Absolute {
        /// The user's query.
        query: &'a str,
        /// The answer judged.
        answer: Judged<'a>,
    },
    /// Two answers: which is better per criterion.
    Pairwise {
        /// The user's query.
        query: &'a str,
        /// Answer A.
        first: Judged<'a>,
        /// Answer B.
        second: Judged<'a>,
    },
}

/// A judge's verdict, one value per criterion in [`CRITERIA`] order: a score from 1 to 5
/// (absolute), or −1 when answer A is better, 0 for a tie, 1 when B is (pairwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The values.
    pub scores: Vec<f32>,
}

/// Why a generation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    /// The backend could not be reached or kept failing.
    #[error("{backend}: request failed: {message}")]
    Request {
        /// Backend name.
        backend: String,
        /// What went wrong.
        message: String,
    },
    /// The backend answered, but not with something usable.
    #[error("{backend}: unusable answer: {message}")]
    InvalidOutput {
        /// Backend name.
        backend: String,
        /// What was wrong with it.
        message: String,
    },
    /// The embedded generator's model failed.
    #[error("embedded generator: {0}")]
    Model(String),
}

/// Counters a backend keeps, for metrics.
#[derive(Debug, Default)]
pub struct GenerationStats {
    /// Generation calls made (documents prepared, summaries, rewrites).
    pub calls: AtomicU64,
    /// HTTP requests sent (LLM backends).
    pub requests: AtomicU64,
    /// Answers served from the persistent cache.
    pub cache_hits: AtomicU64,
    /// Requests repeated after a 429, 5xx, timeout or connection error.
    pub retries: AtomicU64,
    /// Answers that failed validation (each triggers one corrective retry).
    pub invalid_outputs: AtomicU64,
    /// Calls that ended in an error.
    pub errors: AtomicU64,
    /// Prompt tokens the backend reported.
    pub prompt_tokens: AtomicU64,
    /// Generated tokens the backend reported.
    pub completion_tokens: AtomicU64,
}

/// A copy of [`GenerationStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GenerationCounts {
    /// See [`GenerationStats::calls`].
    pub calls: u64,
    /// See [`GenerationStats::requests`].
    pub requests: u64,
    /// See [`GenerationStats::cache_hits`].
    pub cache_hits: u64,
    /// See [`GenerationStats::retries`].
    pub retries: u64,
    /// See [`GenerationStats::invalid_outputs`].
    pub invalid_outputs: u64,
    /// See [`GenerationStats::errors`].
    pub errors: u64,
    /// See [`GenerationStats::prompt_tokens`].
    pub prompt_tokens: u64,
    /// See [`GenerationStats::completion_tokens`].
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for GenerationCounts {
    fn add_assign(&mut self, other: Self) {
        self.calls += other.calls;
        self.requests += other.requests;
        self.cache_hits += other.cache_hits;
        self.retries += other.retries;
        self.invalid_outputs += other.invalid_outputs;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

impl GenerationStats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counts(&self) -> GenerationCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GenerationCounts {
            calls: get(&self.calls),
            requests: get(&self.requests),
            cache_hits: get(&self.cache_hits),
            retries: get(&self.retries),
            invalid_outputs: get(&self.invalid_outputs),
            errors: get(&self.errors),
            prompt_tokens: get(&self.prompt_tokens),
            completion_tokens: get(&self.completion_tokens),
        }
    }
}

/// Why a generator without an LLM cannot write a rationale, and what to set instead.
pub const REASONING_NEEDS_AN_LLM: &str = "writing a rationale for a query needs an LLM: SET mkflow.generator = 'local' \
     (after `mkflow models pull --llm qwen2.5-0.5b`) or 'openai'";

/// A generation backend: prepares documents, summarises clusters, rewrites queries.
#[async_trait]
pub trait Generator: Send + Sync + Debug {
    /// A name for messages and cache keys (e.g. `embedded`, `openai:gpt-4o-mini`).
    fn name(&self) -> String;

    /// Metadata and synthetic QA pairs for each document; a failure affects only its document.
    async fn prepare(&self, documents: &[Document<'_>]) -> Vec<Result<Prepared, GenerationError>>;

    /// The Meta-Knowledge summary of a cluster: the key concepts, methods and trends its
    /// questions cover.
    async fn summarize(&self, cluster: &ClusterDigest) -> Result<String, GenerationError>;

    /// Sub-queries for `query`, conditioned on the summaries of the clusters it was routed to.
    /// The original query need not be among them (the caller always searches it too).
    async fn rewrite(&self, query: &str, clusters: &[ClusterBrief]) -> Result<Vec<String>, GenerationError>;

    /// Think-then-embed: a short rationale for `query` (what a document answering it would
    /// say), embedded with the query in its place; generators without an LLM refuse.
    async fn reason(&self, query: &str) -> Result<String, GenerationError>;

    /// The "read" step: an answer to `query` from `evidence` (retrieved QA pairs), citing its
    /// pieces as `[n]`.
    async fn answer(&self, query: &str, evidence: &[Evidence]) -> Result<String, GenerationError>;

    /// Judges answers on the seed paper's six criteria ([`CRITERIA`]); generators without an
    /// LLM refuse.
    async fn judge(&self, task: &Judging<'_>) -> Result<Verdict, GenerationError>;

    /// The backend's counters.
    fn stats(&self) -> &GenerationStats;
}

/// Where generation failures are recorded (the engine's dead-letter table), so a bad answer
/// costs one document its metadata and questions, never the pipeline.
pub trait FailureLog: Send + Sync + Debug {
    /// Records that `what` failed for `document` (its text) with `error`.
    fn record(&self, what: &str, document: &str, error: &str);
}
