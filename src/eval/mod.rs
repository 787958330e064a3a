//! `mkflow eval`: retrieval quality of each retrieval mode on a BEIR dataset, measured through
//! the normal paths (the ingestion pipeline builds the index, SQL answers every query).
//!
//! Modes:
//! - `doc`: `vector_search` over document vectors (HNSW);
//! - `exact`: brute-force cosine ranking in plain SQL (`ORDER BY cosine_distance(…)`), the
//!   reference the ANN search is checked against;
//! - `bm25`: `text_search` (BM25 over the title and body);
//! - `hybrid`: `hybrid_search` (`vector_search` and `text_search` fused by reciprocal rank);
//! - `qa`: `qa_search` over the synthetic questions, a document scoring as its best question;
//! - `qa_hybrid`: `hybrid_search` on the Meta-Knowledge index: documents and their synthetic
//!   questions, each by vector and by BM25, fused by reciprocal rank (a document ranked by its
//!   best question in the question searches);
//! - `mk`: `mk_search` (route, rewrite, match questions, fuse), a document ranked by its best
//!   QA pair;
//! - `explicit`: think-then-embed, `vector_search(…, reasoning => 'explicit')`: the session's
//!   LLM writes a rationale for the query and query + rationale is embedded (needs the `local`
//!   or `openai` generator);
//! - `latent`: `vector_search` over a second index, `<name>_latent_<model>`, whose documents and
//!   queries are embedded by `--latent-model` (a LaSER model, e.g. one `mkflow train laser`
//!   made): the reasoning happens in the encoder's K latent steps, no text is written;
//! - `chunk_doc`, `chunk_bm25`, `chunk_hybrid`: `vector_search`, `text_search` and
//!   `hybrid_search` on a chunked index of the same corpus (`chunk_tokens` 200, the title read
//!   before every chunk), a document ranked by its best chunk.
//!
//! `qa` and `mk` need the prepare stage: when either is asked for, the index is built with
//! a Meta-Knowledge side (`mk_metadata`, `mk_qa`, `mk_cluster` on the session's generator)
//! and every mode runs on it. The chunked modes build a second index, `<name>_chunked`.
//!
//! Reports nDCG@10, Recall@100, MRR@10 per mode, ANN-vs-exact recall@10, index build
//! throughput and query latency, and writes `eval.json`, one TREC run file per mode and
//! `chart.svg`. With `--judge`, answers from doc, qa and mk retrieval are judged too
//! ([`judge`]).

pub mod dataset;
pub mod judge;
pub mod metrics;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use indicatif::{ProgressBar, ProgressStyle};

pub use dataset::BeirDataset;
pub use metrics::Scores;
pub use report::{EvalReport, ModeReport};

use crate::Engine;
use mkflow_udfs::embedding::EmbedUdf;

/// How many results each query retrieves (enough for Recall@100).
pub const RUN_DEPTH: usize = 100;

/// A retrieval mode `eval` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// HNSW search over document vectors (`vector_search`).
    Doc,
    /// Exact cosine ranking over document vectors, in plain SQL.
    Exact,
    /// BM25 over the documents' text (`text_search`).
    Bm25,
    /// Dense and BM25 fused (`hybrid_search`).
    Hybrid,
    /// Matching the synthetic questions (`qa_search`).
    Qa,
    /// Documents and synthetic questions, dense and BM25, fused (`hybrid_search` on a
    /// Meta-Knowledge index).
    QaHybrid,
    /// Meta-Knowledge retrieval (`mk_search`).
    Mk,
    /// `vector_search` on the chunked index: a document scores as its best chunk.
    ChunkDoc,
    /// `text_search` on the chunked index.
    ChunkBm25,
    /// `hybrid_search` on the chunked index.
    ChunkHybrid,
    /// `vector_search` with the query and an LLM's rationale (`reasoning => 'explicit'`).
    Explicit,
    /// `vector_search` on the index the latent (LaSER) model embedded.
    Latent,
}

/// Tokens per chunk of the chunked index the chunked modes search.
pub const EVAL_CHUNK_TOKENS: usize = 200;

/// Questions retrieved per query in the question-matching modes, before documents are
/// deduplicated down to [`RUN_DEPTH`].
const QUESTION_DEPTH: usize = 300;

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 12] = [
        Mode::Doc,
        Mode::Exact,
        Mode::Bm25,
        Mode::Hybrid,
        Mode::Qa,
        Mode::QaHybrid,
        Mode::Mk,
        Mode::ChunkDoc,
        Mode::ChunkBm25,
        Mode::ChunkHybrid,
        Mode::Explicit,
        Mode::Latent,
    ];

    /// The mode's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Doc => "doc",
            Mode::Exact => "exact",
            Mode::Bm25 => "bm25",
            Mode::Hybrid => "hybrid",
            Mode::Qa => "qa",
            Mode::QaHybrid => "qa_hybrid",
            Mode::Mk => "mk",
            Mode::ChunkDoc => "chunk_doc",
            Mode::ChunkBm25 => "chunk_bm25",
            Mode::ChunkHybrid => "chunk_hybrid",
            Mode::Explicit => "explicit",
            Mode::Latent => "latent",
        }
    }

    /// Whether the mode searches the chunked index.
    pub fn needs_chunks(self) -> bool {
        matches!(self, Mode::ChunkDoc | Mode::ChunkBm25 | Mode::ChunkHybrid)
    }

    /// Whether the mode needs the index's Meta-Knowledge side.
    pub fn needs_meta_knowledge(self) -> bool {
        matches!(self, Mode::Qa | Mode::QaHybrid | Mode::Mk)
    }

    /// Parses a mode name.
    pub fn parse(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The SQL answering `query` in this mode over index `kb`. The exact mode compares every
    /// row with `query_vector`, the query as the searches embed it (as a query, through the
    /// index's query adapter if it has one).
    fn sql(self, kb: &str, query: &str, query_vector: &[f32]) -> String {
        let q = sql_string(query);
        match self {
            Mode::Explicit => {
                format!("SELECT doc_id, score FROM vector_search({kb}, {q}, {RUN_DEPTH}, reasoning => 'explicit')")
            }
            Mode::Doc | Mode::ChunkDoc | Mode::Latent => {
                format!("SELECT doc_id, score FROM vector_search({kb}, {q}, {RUN_DEPTH})")
            }
            Mode::Exact => {
                let literal: Vec<String> = query_vector.iter().map(|x| format!("{x:?}")).collect();
                format!(
                    "SELECT doc_id, CAST(1 - cosine_distance(embedding, [{}]) AS FLOAT) AS score \
                     FROM {kb} ORDER BY score DESC, doc_id LIMIT {RUN_DEPTH}",
                    literal.join(", ")
                )
            }
            Mode::Bm25 | Mode::ChunkBm25 => format!("SELECT doc_id, score FROM text_search({kb}, {q}, {RUN_DEPTH})"),
            Mode::Hybrid | Mode::ChunkHybrid => {
                format!("SELECT doc_id, fused_score FROM hybrid_search({kb}, {q}, {RUN_DEPTH}, questions => false)")
            }
            Mode::QaHybrid => format!("SELECT doc_id, fused_score FROM hybrid_search({kb}, {q}, {RUN_DEPTH})"),
            Mode::Qa | Mode::Mk => format!(
                "SELECT doc_id, max(score) AS score FROM {function}({kb}, {q}, {QUESTION_DEPTH}) \
                 GROUP BY doc_id ORDER BY score DESC, doc_id LIMIT {RUN_DEPTH}",
                function = if self == Mode::Qa { "qa_search" } else { "mk_search" }
            ),
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The BEIR dataset directory.
    pub dataset: PathBuf,
    /// Judgement split (`test`).
    pub split: String,
    /// Modes to measure.
    pub modes: Vec<Mode>,
    /// Where reports go.
    pub out_dir: PathBuf,
    /// Evaluate only the first N judged queries.
    pub max_queries: Option<usize>,
    /// Also answer this many queries from doc, qa and mk retrieval and judge the answers
    /// ([`judge`]); needs the Meta-Knowledge index.
    pub judge_queries: Option<usize>,
    /// The embedding model of the `latent` mode's index (an installed LaSER model).
    pub latent_model: Option<String>,
}

/// SQL string literal.
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name`'s letters and digits, lower-cased, everything else `_`: part of a table name.
fn sql_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A table name made of the dataset name's letters and digits.
pub fn index_name(dataset: &str) -> String {
    format!("eval_{}", sql_name(dataset))
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// What an evaluation index holds besides the documents' vectors and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexKind<'a> {
    /// Nothing more.
    Plain,
    /// The Meta-Knowledge side (prepare stage).
    MetaKnowledge,
    /// Chunks of [`EVAL_CHUNK_TOKENS`] tokens.
    Chunked,
    /// Documents (and then queries) embedded by `model`, the latent mode's, through
    /// [`LATENT_EMBED`].
    Latent { model: &'a str },
}

/// The function the `latent` mode's documents are embedded with: `embed` on `--latent-model`.
const LATENT_EMBED: &str = "eval_latent_embed";

/// Builds (or reuses) the dataset's index through the ingestion pipeline; returns documents
/// indexed and build seconds (0 when reused).
async fn build_index(engine: &Engine, dataset: &BeirDataset, kb: &str, kind: IndexKind<'_>) -> Result<(usize, f64)> {
    let documents = std::fs::read_to_string(&dataset.corpus)
        .map_err(|e| DataFusionError::Execution(format!("{}: {e}", dataset.corpus.display())))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    if let Some(index) = engine.index(kb)
        && index.len() == documents
    {
        return Ok((documents, 0.0));
    }
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    spinner.set_message(match kind {
        IndexKind::MetaKnowledge => format!("preparing and embedding {documents} documents of {}", dataset.name),
        IndexKind::Chunked => format!("chunking and embedding {documents} documents of {}", dataset.name),
        IndexKind::Plain => format!("embedding {documents} documents of {}", dataset.name),
        IndexKind::Latent { model } => format!("embedding {documents} documents of {} with {model}", dataset.name),
    });
    let started = Instant::now();
    let corpus = sql_string(&dataset.corpus.to_string_lossy());
    let script = match kind {
        IndexKind::MetaKnowledge => format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {kb}_corpus STORED AS JSON LOCATION {corpus};
             CREATE EXTERNAL TABLE IF NOT EXISTS {kb} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION '{kb}' OPTIONS ('meta_knowledge' 'true');
             INSERT INTO {kb} SELECT doc_id, title, body, metadata, qa, mk_cluster(metadata), embedding FROM (
               SELECT CAST(\"_id\" AS VARCHAR) AS doc_id, title, text AS body,
                      mk_metadata(title, text) AS metadata, mk_qa(title, text) AS qa,
                      embed(concat_ws('. ', title, text)) AS embedding
               FROM {kb}_corpus);"
        ),
        IndexKind::Chunked => format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {kb}_corpus STORED AS JSON LOCATION {corpus};
             CREATE EXTERNAL TABLE IF NOT EXISTS {kb} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION '{kb}' OPTIONS ('chunk_tokens' '{EVAL_CHUNK_TOKENS}');
             INSERT INTO {kb} SELECT CAST(\"_id\" AS VARCHAR), title, text, NULL FROM {kb}_corpus;"
        ),
        IndexKind::Plain => format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {kb}_corpus STORED AS JSON LOCATION {corpus};
             CREATE EXTERNAL TABLE IF NOT EXISTS {kb} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION '{kb}';
             INSERT INTO {kb} SELECT CAST(\"_id\" AS VARCHAR), title, text, embed(trim(concat_ws(' ', title, text)))
               FROM {kb}_corpus;"
        ),
        IndexKind::Latent { model } => {
            let embedder = engine.models().get(model).ok_or_else(|| {
                DataFusionError::Plan(format!("--latent-model: no embedding model '{model}' is installed"))
            })?;
            engine
                .context()
                .register_udf(EmbedUdf::new(LATENT_EMBED, embedder).into_scalar_udf());
            format!(
                "CREATE EXTERNAL TABLE IF NOT EXISTS {kb}_corpus STORED AS JSON LOCATION {corpus};
                 CREATE EXTERNAL TABLE IF NOT EXISTS {kb} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
                   STORED AS KB LOCATION '{kb}' OPTIONS ('model' {});
                 INSERT INTO {kb} SELECT CAST(\"_id\" AS VARCHAR), title, text,
                   {LATENT_EMBED}(trim(concat_ws(' ', title, text)), 'document')
                 FROM {kb}_corpus;",
                sql_string(model)
            )
        }
    };
    engine.run_script("eval", &script, |_| {}).await?;
    spinner.finish_and_clear();
    Ok((documents, started.elapsed().as_secs_f64()))
}

/// Runs every query of `dataset` in `mode`; returns rankings and per-query latencies (ms).
async fn run_mode(
    engine: &Engine,
    kb: &str,
    queries: &[(String, String)],
    mode: Mode,
) -> Result<(HashMap<String, Vec<(String, f32)>>, Vec<f64>)> {
    let progress = bar(queries.len() as u64, mode.name());
    let mut runs = HashMap::new();
    let mut latencies = Vec::with_capacity(queries.len());
    let index = engine
        .index(kb)
        .ok_or_else(|| DataFusionError::Plan(format!("no knowledge index '{kb}'")))?;
    for (id, text) in queries {
        let started = Instant::now();
        let query_vector = match mode {
            Mode::Exact => engine.models().search_vector(&index, text).await?,
            _ => Vec::new(),
        };
        let batches = engine.sql(&mode.sql(kb, text, &query_vector)).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        runs.insert(id.clone(), ranking(&batches));
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((runs, latencies))
}

/// (doc_id, score) pairs of a result, in order.
fn ranking(batches: &[RecordBatch]) -> Vec<(String, f32)> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Float32Type};
    let mut out = Vec::new();
    for batch in batches {
        let ids = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8).expect("ids cast to text");
        let scores = datafusion::arrow::compute::cast(batch.column(1), &DataType::Float32).expect("scores are numbers");
        let (ids, scores) = (ids.as_string::<i32>(), scores.as_primitive::<Float32Type>());
        for i in 0..ids.len() {
            out.push((ids.value(i).to_string(), scores.value(i)));
        }
    }
    out
}

/// Mean overlap of the top 10 of `ann` with the top 10 of `exact`.
fn recall_at_10(ann: &HashMap<String, Vec<(String, f32)>>, exact: &HashMap<String, Vec<(String, f32)>>) -> f64 {
    let mut total = 0.0;
    for (query, reference) in exact {
        let truth: Vec<&String> = reference.iter().take(10).map(|(d, _)| d).collect();
        if truth.is_empty() {
            continue;
        }
        let found = ann
            .get(query)
            .map(|r| r.iter().take(10).filter(|(d, _)| truth.contains(&d)).count())
            .unwrap_or(0);
        total += found as f64 / truth.len() as f64;
    }
    total / exact.len().max(1) as f64
}

/// Evaluates `options.modes` on the dataset with `engine` and writes the reports.
pub async fn run(engine: &Engine, options: &EvalOptions) -> Result<EvalReport> {
    let dataset = BeirDataset::load(&options.dataset, &options.split).map_err(DataFusionError::Execution)?;
    // Refused before any work: the embedded generator cannot judge.
    let judge_with = match options.judge_queries {
        Some(_) => Some(engine.generator()?),
        None => None,
    };
    if let Some(generator) = &judge_with
        && generator.name() == "embedded"
    {
        return Err(DataFusionError::Configuration(
            "--judge needs an LLM to answer and judge: set MKFLOW_GENERATOR=local (after `mkflow models pull --llm`) or openai".into(),
        ));
    }
    // The reasoning modes' needs, checked before any work.
    let wants = |mode| options.modes.contains(&mode);
    if wants(Mode::Explicit) && engine.generator()?.name() == "embedded" {
        return Err(DataFusionError::Configuration(
            "the explicit mode needs an LLM to write rationales: set MKFLOW_GENERATOR=local (after `mkflow models pull --llm qwen2.5-0.5b`) or openai".into(),
        ));
    }
    let latent_model = match (&options.latent_model, wants(Mode::Latent)) {
        (Some(model), true) => match engine.models().get(model) {
            Some(_) => Some(model.as_str()),
            None => {
                return Err(DataFusionError::Plan(format!(
                    "--latent-model: no embedding model '{model}' is installed (known: {}); train one with `mkflow train laser`",
                    engine.models().names().join(", ")
                )));
            }
        },
        (None, true) => {
            return Err(DataFusionError::Plan(
                "the latent mode needs --latent-model NAME: the LaSER model its index is embedded with".into(),
            ));
        }
        (_, false) => None,
    };
    let meta_knowledge = options.judge_queries.is_some() || options.modes.iter().any(|m| m.needs_meta_knowledge());
    let kb = if meta_knowledge {
        format!("{}_mk", index_name(&dataset.name))
    } else {
        index_name(&dataset.name)
    };
    let kind = if meta_knowledge {
        IndexKind::MetaKnowledge
    } else {
        IndexKind::Plain
    };
    let (documents, build_seconds) = build_index(engine, &dataset, &kb, kind).await?;
    let chunked_kb = format!("{}_chunked", index_name(&dataset.name));
    let chunked_build_seconds = if options.modes.iter().any(|m| m.needs_chunks()) {
        Some(build_index(engine, &dataset, &chunked_kb, IndexKind::Chunked).await?.1)
    } else {
        None
    };
    let latent_kb = latent_model.map(|model| format!("{}_latent_{}", index_name(&dataset.name), sql_name(model)));
    if let (Some(model), Some(latent_kb)) = (latent_model, &latent_kb) {
        build_index(engine, &dataset, latent_kb, IndexKind::Latent { model }).await?;
    }
    let queries: Vec<(String, String)> = match options.max_queries {
        Some(n) => dataset.queries.iter().take(n).cloned().collect(),
        None => dataset.queries.clone(),
    };
    let qrels: HashMap<String, metrics::Judgements> = queries
        .iter()
        .filter_map(|(id, _)| dataset.qrels.get(id).map(|j| (id.clone(), j.clone())))
        .collect();
    // The exact ranking is always computed: it anchors the ANN recall check.
    let mut modes = options.modes.clone();
    if !modes.contains(&Mode::Exact) {
        modes.push(Mode::Exact);
    }
    let mut mode_runs = Vec::new();
    for mode in modes {
        let searched = match (mode, &latent_kb) {
            (Mode::Latent, Some(latent_kb)) => latent_kb,
            _ if mode.needs_chunks() => &chunked_kb,
            _ => &kb,
        };
        let (runs, latencies) = run_mode(engine, searched, &queries, mode).await?;
        mode_runs.push((mode, runs, latencies));
    }
    let exact_runs = mode_runs
        .iter()
        .find(|(m, _, _)| *m == Mode::Exact)
        .map(|(_, r, _)| r.clone())
        .unwrap_or_default();
    let ann_recall = mode_runs
        .iter()
        .find(|(m, _, _)| *m == Mode::Doc)
        .map(|(_, r, _)| recall_at_10(r, &exact_runs));
    let model = engine.index(&kb).map(|i| i.manifest().model).unwrap_or_default();
    let mode_reports = mode_runs
        .into_iter()
        .filter(|(m, _, _)| options.modes.contains(m))
        .map(|(mode, runs, latencies)| ModeReport::new(mode, runs, latencies, &qrels))
        .collect();
    let judged = match (&judge_with, options.judge_queries) {
        (Some(generator), Some(count)) => {
            Some(judge::judge(engine, generator.as_ref(), &kb, &queries, &qrels, count).await?)
        }
        _ => None,
    };
    let report = EvalReport {
        judge: judged,
        dataset: dataset.name.clone(),
        model,
        documents,
        queries: queries.len(),
        build_seconds,
        chunked_build_seconds,
        ann_recall_at_10: ann_recall,
        modes: mode_reports,
    };
    report
        .write(&options.out_dir)
        .map_err(|e| DataFusionError::Execution(format!("writing reports: {e}")))?;
    Ok(report)
}

/// The default report directory for a dataset.
pub fn default_out_dir(data_dir: &Path, dataset: &str) -> PathBuf {
    data_dir.join("eval").join(dataset)
}
