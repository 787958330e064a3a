//! The engine: what every session shares — models, knowledge indexes, generators, dead
//! letters, running streams, and a template session state with mkflow's functions and table
//! formats registered — and the sessions made from it ([`Session`]).
//!
//! Every statement runs in a session. Each network request gets a session of its own, and so
//! does each pipeline: a `SET` lasts as long as its session, and a source table a session
//! creates is seen by it alone, while knowledge indexes (the data directory) are shared by all.
//! The engine keeps one local session of its own for [`Engine::sql`] and [`Engine::run_script`]
//! (the command line, the shell, tests).

mod authorize;
mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList, TableFunctionImpl,
};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{SessionContext, SessionState};
use datafusion::execution::disk_manager::{DiskManager, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionConfig;
use mkflow_udfs::chunking::ChunkUdf;
use mkflow_udfs::mk::{GenerationCounts, Generator, GeneratorRegistry, MkOptions};
use mkflow_udfs::rerank::RerankUdf;
use mkflow_udfs::{EmbedUdf, bounded};

use crate::access::{Access, Limits};
use crate::assets;
use crate::cluster::planner::coordinator_state;
use crate::cluster::{Cluster, ShardMap, ShardedFunction, ShardedTables};
use crate::metrics::{self, EmbeddingTotals, GenerationTotals, IndexSize, ScrapeSources};
use crate::mk::MkServices;
use crate::models::ModelRegistry;
use crate::sources::kafka::{KAFKA_FORMAT, KafkaFactory};
use crate::sources::{DeadLetters, JSONL_FORMAT, JsonlFactory, TEXT_FILES_FORMAT, TextFilesFactory};
use crate::sql::async_calls::AsyncCalls;
use crate::sql::call_args::CallMarker;
use crate::sql::catalog::{CHUNKS_SUFFIX, QUESTIONS_SUFFIX, SearchTarget};
use crate::sql::fusion::{HybridSearchFunction, RrfFunction, SearchFunctions};
use crate::sql::kb_entry::KbEntry;
use crate::sql::kb_factory::KB_FORMAT;
use crate::sql::kb_table::IngestProgress;
use crate::sql::mk_answer::MkAnswerFunction;
use crate::sql::mk_search::MkSearchFunction;
use crate::sql::parameters::WithParameters;
use crate::sql::text_search::TextSearchFunction;
use crate::sql::{KbSchema, KbTableFactory, SessionSchema, VectorSearchFunction};
use crate::streaming::StreamControl;
use crate::support::batch_table::SnapshotView;
use crate::support::{BatchTable, blocking};
use mkflow_index::{KnowledgeIndex, MANIFEST_FILE};

pub use session::{PreparedStatement, Session, StatementResult};

/// Where an engine keeps and finds things, and the bounds its sessions are held to.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Knowledge indexes live here: every subdirectory with a manifest is registered as a table
    /// named after it, and relative `LOCATION`s of `STORED AS KB` resolve here.
    pub data_dir: PathBuf,
    /// The mkflow home with models and the ONNX Runtime library.
    pub home: PathBuf,
    /// Model `embed()` uses (the catalog default when `None`).
    pub default_model: Option<String>,
    /// ONNX Runtime threads per model call (one per core when `None`).
    pub embed_threads: Option<usize>,
    /// Streaming statements end once their topics are read to the end, instead of running
    /// until stopped.
    pub until_caught_up: bool,
    /// Query bounds. Network sessions are held to all of them (and get a memory pool of
    /// `max_query_memory`); local sessions only to `max_value_bytes` and
    /// `max_expression_depth`, the bounds that keep the process alive.
    pub limits: Limits,
    /// Meta-Knowledge settings every session starts from (`name` → value, without the
    /// `mkflow.` prefix), applied over the `MKFLOW_*` environment: the `[mkflow]` table of the
    /// server configuration. The settings that name files, URLs or environment variables come
    /// only from here, the environment and pipeline files, never from a network client.
    pub mk_settings: Vec<(String, String)>,
    /// Directories besides the data directory that network clients' `LOCATION`s may name.
    pub allowed_paths: Vec<PathBuf>,
    /// The shard map of a coordinator: its sharded tables are served from their workers
    /// (see [`crate::cluster`]).
    pub shard_map: Option<ShardMap>,
}

impl EngineConfig {
    /// Data in `data_dir`, assets in the default home.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            home: assets::home_dir(),
            default_model: std::env::var("MKFLOW_MODEL").ok(),
            embed_threads: None,
            until_caught_up: false,
            limits: Limits::default(),
            mk_settings: Vec::new(),
            allowed_paths: Vec::new(),
            shard_map: None,
        }
    }
}

/// What the sessions of one engine share.
pub(crate) struct Shared {
    /// Meta-Knowledge models, generators and failure log.
    pub(crate) mk_services: Arc<MkServices>,
    /// The continuous statements of every session.
    pub(crate) streams: StreamControl,
    /// The data directory's indexes and the engine's own tables.
    kbs: Arc<KbSchema>,
    /// The data directory.
    pub(crate) data_dir: PathBuf,
    /// Network sessions' disk manager: spilling disabled, so a request past its memory is
    /// refused instead of filling the disk.
    network_disk: Arc<DiskManager>,
}

/// A DataFusion engine with mkflow's extensions, and the sessions made from it.
pub struct Engine {
    /// Everything registered; every session starts from a copy.
    base: SessionState,
    config: EngineConfig,
    models: Arc<ModelRegistry>,
    kb_factory: Arc<KbTableFactory>,
    progress: Arc<IngestProgress>,
    dead_letters: Arc<DeadLetters>,
    shared: Arc<Shared>,
    /// The allowed directories of network sessions, resolved once (the data directory first).
    network_paths: Vec<PathBuf>,
    /// The engine's own local session ([`Engine::sql`]).
    session: Session,
    /// The cluster a coordinator serves (`EngineConfig::shard_map`).
    cluster: Option<Arc<Cluster>>,
}

/// Subdirectory of the data directory where LLM answers are cached.
pub const GENERATION_CACHE_DIR: &str = "cache";

impl Engine {
    /// Builds the engine: registers `embed`, the Meta-Knowledge functions, `vector_search`,
    /// `qa_search`, `mk_search`, the `KB`, `JSONL`, `TEXT_FILES` and `KAFKA` formats, the
    /// `dead_letters` table, and every knowledge index found in the data directory.
    /// Meta-Knowledge settings start from `MKFLOW_*` environment variables, then the
    /// configuration's [`EngineConfig::mk_settings`].
    pub async fn new(config: EngineConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            DataFusionError::Execution(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let models = Arc::new(
            ModelRegistry::discover(
                &config.home,
                assets::onnx_runtime_path(&config.home),
                config.default_model.as_deref(),
                config.embed_threads,
            )
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?,
        );
        let progress = Arc::new(IngestProgress::default());
        let kbs = Arc::new(KbSchema::new(progress.clone()));
        let dead_letters = Arc::new(DeadLetters::open(Some(&config.data_dir)));
        let mk_services = Arc::new(MkServices {
            models: models.clone(),
            generators: Arc::new(
                GeneratorRegistry::new(
                    models.default_model(),
                    Some(&config.data_dir.join(GENERATION_CACHE_DIR)),
                )
                .with_local_models(
                    config.home.join(assets::LOCAL_LLM_DIR),
                    assets::onnx_runtime_path(&config.home),
                ),
            ),
            failures: dead_letters.clone(),
        });
        let mut mk_options = MkOptions::from_env().map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        for (name, value) in &config.mk_settings {
            use datafusion::config::ExtensionOptions;
            mk_options.set(name, value).map_err(|e| {
                DataFusionError::Configuration(format!("setting mkflow.{name} of the configuration: {e}"))
            })?;
        }
        let session_config = SessionConfig::new()
            .with_information_schema(true)
            .with_option_extension(mk_options)
            .with_create_default_catalog_and_schema(false);
        let ctx = SessionContext::new_with_config(session_config);
        let kb_factory = Arc::new(KbTableFactory::new(
            config.data_dir.clone(),
            kbs.clone(),
            progress.clone(),
            mk_services.clone(),
        ));
        {
            let state_ref = ctx.state_ref();
            let mut state = state_ref.write();
            let factories = state.table_factories_mut();
            factories.insert(KB_FORMAT.into(), kb_factory.clone());
            factories.insert(TEXT_FILES_FORMAT.into(), Arc::new(TextFilesFactory));
            factories.insert(JSONL_FORMAT.into(), Arc::new(JsonlFactory::new(dead_letters.clone())));
            factories.insert(KAFKA_FORMAT.into(), Arc::new(KafkaFactory::new(dead_letters.clone())));
        }
        metrics::install_udf_observer();
        ctx.register_udf(EmbedUdf::new("embed", models.default_model()).into_scalar_udf());
        ctx.register_udf(RerankUdf::new(models.rerankers().clone()).into_scalar_udf());
        ctx.register_udf(ScalarUDF::new_from_impl(ChunkUdf::new(
            models.default_model().spec().clone(),
        )));
        let builtins: Vec<Arc<ScalarUDF>> = ctx.state().scalar_functions().values().cloned().collect();
        for udf in &builtins {
            if let Some(guarded) = bounded::bound(udf, config.limits.max_value_bytes) {
                ctx.register_udf(guarded);
            }
        }
        kbs.register_global(
            "dead_letters",
            Arc::new(BatchTable::new(SnapshotView(dead_letters.clone()))),
        )?;
        let mut searches = SearchFunctions::new();
        for (name, target) in [
            ("vector_search", SearchTarget::Documents),
            ("qa_search", SearchTarget::Questions),
            ("chunk_search", SearchTarget::Chunks),
        ] {
            searches.insert(
                name,
                Arc::new(VectorSearchFunction::new(
                    kbs.clone(),
                    models.clone(),
                    mk_services.generators.clone(),
                    target,
                )),
            );
        }
        for (name, target) in [
            ("text_search", SearchTarget::Documents),
            ("qa_text_search", SearchTarget::Questions),
            ("chunk_text_search", SearchTarget::Chunks),
        ] {
            searches.insert(name, Arc::new(TextSearchFunction::new(kbs.clone(), target)));
        }
        searches.insert("mk_search", Arc::new(MkSearchFunction::new(kbs.clone())));
        let fusable = Arc::new(searches.clone());
        for (name, target) in [
            ("hybrid_search", SearchTarget::Documents),
            ("qa_hybrid_search", SearchTarget::Questions),
            ("chunk_hybrid_search", SearchTarget::Chunks),
        ] {
            searches.insert(
                name,
                Arc::new(HybridSearchFunction::new(
                    kbs.clone(),
                    target,
                    fusable.clone(),
                    models.clone(),
                )),
            );
        }
        let searches = Arc::new(searches);
        let cluster = config.shard_map.clone().map(|map| Arc::new(Cluster::new(map)));
        if let Some(cluster) = &cluster {
            kbs.set_remote(Arc::new(ShardedTables(cluster.clone())));
        }
        // Each behind WithParameters: a prepared statement's `$1` may stand for any argument.
        for (name, function) in searches.iter() {
            let function = match &cluster {
                Some(cluster) => Arc::new(ShardedFunction::new(name, function.clone(), cluster.clone())),
                None => function.clone(),
            };
            ctx.register_udtf(name, WithParameters::new(name, function));
        }
        // On a coordinator, rrf's searches refuse sharded tables (they would run here, where
        // the shards are not).
        let searches: Arc<SearchFunctions> = match &cluster {
            Some(cluster) => Arc::new(
                searches
                    .iter()
                    .map(|(name, function)| {
                        let refusing = ShardedFunction::refusing_in("rrf", name, function.clone(), cluster.clone());
                        (*name, Arc::new(refusing) as Arc<dyn TableFunctionImpl>)
                    })
                    .collect(),
            ),
            None => searches,
        };
        let rrf = Arc::new(RrfFunction::new(searches.clone()));
        ctx.register_udtf("rrf", WithParameters::new("rrf", rrf));
        // Not a ranking (one answer row), so not among the searches rrf fuses.
        let mk_answer = Arc::new(MkAnswerFunction::new(kbs.clone()));
        ctx.register_udtf("mk_answer", WithParameters::new("mk_answer", mk_answer));
        // Search calls passed to rrf(…) and named arguments plan as these markers.
        let mut markers: Vec<&str> = searches.keys().copied().collect();
        markers.push("rrf");
        for marker in CallMarker::all(&markers) {
            ctx.register_udf(marker);
        }
        ctx.add_analyzer_rule(Arc::new(AsyncCalls));
        session::register_mk_functions(&ctx, &mk_services)?;
        let base = match &cluster {
            Some(cluster) => coordinator_state(ctx.state(), cluster.map())?,
            None => ctx.state(),
        };
        let shared = Arc::new(Shared {
            mk_services,
            streams: StreamControl::new(config.until_caught_up),
            kbs,
            data_dir: config.data_dir.clone(),
            network_disk: Arc::new(DiskManager::builder().with_mode(DiskManagerMode::Disabled).build()?),
        });
        let network_paths = allowed_directories(&config)?;
        let own = Access {
            limits: config.limits.clone(),
            ..Access::default()
        };
        let session = Session::start(new_state(&base, &shared, own)?, shared.clone());
        let engine = Engine {
            base,
            models,
            kb_factory,
            progress,
            dead_letters,
            shared,
            network_paths,
            session,
            config,
            cluster,
        };
        engine.register_data_dir().await?;
        Ok(engine)
    }

    /// The cluster this engine coordinates, if it is a coordinator.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// A new local session (a pipeline's): trusted, with the engine's limits.
    pub fn local_session(&self) -> Result<Session> {
        let access = Access {
            limits: self.config.limits.clone(),
            ..Access::default()
        };
        Ok(Session::start(
            new_state(&self.base, &self.shared, access)?,
            self.shared.clone(),
        ))
    }

    /// A new session for a network client with `role`: its `LOCATION`s confined to the data
    /// directory and the allowed paths, server-only settings refused, and a memory pool of
    /// `max_query_memory` for its operators.
    pub fn network_session(&self, role: crate::access::Role) -> Result<Session> {
        let access = Access::network(role, self.config.limits.clone(), self.network_paths.clone());
        Ok(Session::start(
            new_state(&self.base, &self.shared, access)?,
            self.shared.clone(),
        ))
    }

    /// Registers every knowledge index under the data directory as a table named after its
    /// directory.
    async fn register_data_dir(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.config.data_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if path.join(MANIFEST_FILE).is_file() {
                let index = blocking(move || KnowledgeIndex::open(path)).await?;
                self.register_index(&name, Arc::new(index)).await?;
            }
        }
        Ok(())
    }

    /// Makes `index` queryable as table `name` and by the search functions (with its
    /// questions and clusters when it has a Meta-Knowledge side), in every session.
    pub async fn register_index(&self, name: &str, index: Arc<KnowledgeIndex>) -> Result<()> {
        let options = MkOptions::of(self.base.config_options());
        let entry = self.kb_factory.attach(index, false, &options, None).await?;
        self.shared.kbs.insert(name, entry);
        Ok(())
    }

    /// The engine's own session's DataFusion context.
    pub fn context(&self) -> &SessionContext {
        self.session.context()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The embedding models.
    pub fn models(&self) -> &Arc<ModelRegistry> {
        &self.models
    }

    /// The Meta-Knowledge generator of the engine's settings (`mkflow.generator` and the rest).
    pub fn generator(&self) -> Result<Arc<dyn Generator>> {
        let options = MkOptions::of(self.base.config_options());
        self.shared
            .mk_services
            .generators
            .generator(&options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))
    }

    /// The knowledge index registered as `name`.
    pub fn index(&self, name: &str) -> Option<Arc<KnowledgeIndex>> {
        self.shared.kbs.get(name)
    }

    /// The names of the registered knowledge indexes, sorted.
    pub fn index_names(&self) -> Vec<String> {
        self.shared.kbs.names()
    }

    /// The knowledge index registered as `name` with its Meta-Knowledge side and chunks.
    pub fn entry(&self, name: &str) -> Option<crate::sql::kb_entry::KbEntry> {
        self.shared.kbs.entry(name)
    }

    /// Records sources refused so far (the `dead_letters` table).
    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.len()
    }

    /// Rows received by knowledge-index inserts so far (for progress display).
    pub fn ingested_rows(&self) -> u64 {
        self.progress.rows()
    }

    /// Runs one or more `;`-separated statements in the engine's own session and returns the
    /// last one's rows.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        self.session.sql(sql).await
    }

    /// Runs a script statement by statement in the engine's own session (see
    /// [`Session::run_script`]).
    pub async fn run_script(
        &self,
        pipeline: &str,
        script: &str,
        before: impl FnMut(&str),
    ) -> Result<Vec<StatementResult>> {
        self.session.run_script(pipeline, script, before).await
    }

    /// Runs the SQL file at `path` as pipeline `name` in the engine's own session.
    pub async fn run_file(&self, name: &str, path: &Path, before: impl FnMut(&str)) -> Result<Vec<StatementResult>> {
        self.session.run_file(name, path, before).await
    }

    /// Controls the continuous statements of every session (stop them, see their state).
    pub fn streams(&self) -> &StreamControl {
        &self.shared.streams
    }
}

/// A session's state: the engine's template with a catalog of its own (the shared indexes plus
/// room for the session's own tables), `access` in its configuration and, for network sessions,
/// a memory pool of `max_query_memory` and no spilling.
fn new_state(base: &SessionState, shared: &Arc<Shared>, access: Access) -> Result<SessionState> {
    let options = base.config_options().catalog.clone();
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(
        &options.default_schema,
        Arc::new(SessionSchema::new(shared.kbs.clone())),
    )?;
    let catalogs = MemoryCatalogProviderList::new();
    catalogs.register_catalog(options.default_catalog.clone(), Arc::new(catalog));
    if !access.is_network() {
        let mut state = base.clone();
        state.register_catalog_list(Arc::new(catalogs));
        state.config_mut().set_extension(Arc::new(access));
        return Ok(state);
    }
    let base_runtime = base.runtime_env();
    let runtime = Arc::new(RuntimeEnv {
        memory_pool: Arc::new(GreedyMemoryPool::new(access.limits.max_query_memory)),
        disk_manager: shared.network_disk.clone(),
        cache_manager: base_runtime.cache_manager.clone(),
        object_store_registry: base_runtime.object_store_registry.clone(),
    });
    let config = base.config().clone().with_extension(Arc::new(access));
    Ok(SessionStateBuilder::new_from_existing(base.clone())
        .with_config(config)
        .with_catalog_list(Arc::new(catalogs))
        .with_runtime_env(runtime)
        .build())
}

/// The directories network sessions may name: the data directory and the allowed paths, each
/// resolved to its real path (all must exist).
fn allowed_directories(config: &EngineConfig) -> Result<Vec<PathBuf>> {
    std::iter::once(&config.data_dir)
        .chain(&config.allowed_paths)
        .map(|dir| {
            dir.canonicalize()
                .map_err(|e| DataFusionError::Configuration(format!("allowed path {}: {e}", dir.display())))
        })
        .collect()
}

impl ScrapeSources for Engine {
    fn embedding_totals(&self) -> Vec<EmbeddingTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        self.models
            .all()
            .filter_map(|model| {
                let stats = model.loaded()?.model().stats();
                Some(EmbeddingTotals {
                    model: model.spec().name.clone(),
                    documents: stats.texts.load(Relaxed),
                    tokens: stats.tokens.load(Relaxed),
                    seconds: stats.model_nanos.load(Relaxed) as f64 / 1e9,
                })
            })
            .collect()
    }

    /// One entry per backend name: generators made for different settings of the same backend
    /// (each `SET` that changes them makes one) add up, so every metric series is unique.
    fn generation_totals(&self) -> Vec<GenerationTotals> {
        let mut by_name: std::collections::BTreeMap<String, GenerationCounts> = Default::default();
        for generator in self.shared.mk_services.generators.generators() {
            *by_name.entry(generator.name()).or_default() += generator.stats().counts();
        }
        by_name
            .into_iter()
            .map(|(generator, counts)| GenerationTotals { generator, counts })
            .collect()
    }

    fn index_sizes(&self) -> Vec<IndexSize> {
        let mut sizes = Vec::new();
        for name in self.shared.kbs.names() {
            let Some(KbEntry { index, mk, chunks }) = self.shared.kbs.entry(&name) else {
                continue;
            };
            let mut add = |label: String, index: &KnowledgeIndex| {
                let (_, capacity, memory) = index.ann_stats();
                sizes.push(IndexSize {
                    index: label,
                    rows: index.len() as u64,
                    capacity: capacity as u64,
                    memory_bytes: memory as u64,
                });
            };
            add(name.clone(), &index);
            if let Some(mk) = mk {
                add(format!("{name}{QUESTIONS_SUFFIX}"), mk.index.questions());
            }
            if let Some(chunks) = chunks {
                add(format!("{name}{CHUNKS_SUFFIX}"), chunks.chunks());
            }
        }
        sizes
    }
}

/// The first line of a statement, shortened for messages.
pub fn abbreviate(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or("").trim();
    if line.chars().count() > 80 {
        format!("{}…", line.chars().take(79).collect::<String>())
    } else {
        line.to_string()
    }
}
