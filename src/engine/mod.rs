//! The engine: one DataFusion session with mkflow's functions, table formats and knowledge
//! indexes registered, and a way to run SQL scripts statement by statement.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF};
use datafusion::prelude::SessionConfig;
use datafusion::sql::parser::{DFParser, Statement};
use mkflow_udfs::EmbedUdf;
use mkflow_udfs::mk::{
    ClusterUdf, GenerationCounts, GeneratorRegistry, MkOptions, PrepareUdf, PreparedPart, Preparer, SummaryUdaf,
};

use crate::assets;
use crate::metrics::{self, EmbeddingTotals, GenerationTotals, IndexSize, ScrapeSources};
use crate::mk::MkServices;
use crate::models::ModelRegistry;
use crate::sources::kafka::{KAFKA_FORMAT, KafkaFactory};
use crate::sources::{DeadLetters, JSONL_FORMAT, JsonlFactory, TEXT_FILES_FORMAT, TextFilesFactory};
use crate::sql::kb_factory::KB_FORMAT;
use crate::sql::kb_table::IngestProgress;
use crate::sql::mk_search::MkSearchFunction;
use crate::sql::vector_search::SearchTarget;
use crate::sql::{KbSchema, KbTableFactory, VectorSearchFunction};
use crate::statement::StatementKind;
use crate::streaming::{ContinuousInsert, StreamControl, count_batch};
use crate::support::batch_table::SnapshotView;
use crate::support::{BatchTable, blocking};
use mkflow_index::{KnowledgeIndex, MANIFEST_FILE};

/// Where an engine keeps and finds things.
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
        }
    }
}

/// The result of one statement of a script.
#[derive(Debug)]
pub struct StatementResult {
    /// The statement, as SQL.
    pub sql: String,
    /// Its output rows.
    pub batches: Vec<RecordBatch>,
}

/// A DataFusion session with mkflow's extensions.
pub struct Engine {
    ctx: SessionContext,
    config: EngineConfig,
    models: Arc<ModelRegistry>,
    kbs: Arc<KbSchema>,
    kb_factory: Arc<KbTableFactory>,
    progress: Arc<IngestProgress>,
    dead_letters: Arc<DeadLetters>,
    mk_services: Arc<MkServices>,
    streams: StreamControl,
}

/// Subdirectory of the data directory where LLM answers are cached.
pub const GENERATION_CACHE_DIR: &str = "cache";

impl Engine {
    /// Builds the session: registers `embed`, the Meta-Knowledge functions, `vector_search`,
    /// `qa_search`, `mk_search`, the `KB`, `JSONL`, `TEXT_FILES` and `KAFKA` formats, the
    /// `dead_letters` table, and every knowledge index found in the data directory.
    /// Meta-Knowledge settings start from `MKFLOW_*` environment variables.
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
        let mk_options = MkOptions::from_env().map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let session_config = SessionConfig::new()
            .with_information_schema(true)
            .with_option_extension(mk_options);
        let ctx = SessionContext::new_with_config(session_config);
        // The data directory's indexes are the tables of the default schema.
        let (catalog, schema) = {
            let options = ctx.state().config_options().catalog.clone();
            (options.default_catalog, options.default_schema)
        };
        ctx.catalog(&catalog)
            .ok_or_else(|| DataFusionError::Internal(format!("default catalog '{catalog}' missing")))?
            .register_schema(&schema, kbs.clone())?;
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
        ctx.register_udf(ScalarUDF::new_from_impl(EmbedUdf::new("embed", models.default_model())));
        ctx.register_table(
            "dead_letters",
            Arc::new(BatchTable::new(SnapshotView(dead_letters.clone()))),
        )?;
        for (name, target) in [
            ("vector_search", SearchTarget::Documents),
            ("qa_search", SearchTarget::Questions),
        ] {
            ctx.register_udtf(
                name,
                Arc::new(VectorSearchFunction::new(kbs.clone(), models.clone(), target)),
            );
        }
        ctx.register_udtf("mk_search", Arc::new(MkSearchFunction::new(kbs.clone())));
        let engine = Engine {
            ctx,
            models,
            kbs,
            kb_factory,
            progress,
            dead_letters,
            mk_services,
            streams: StreamControl::new(config.until_caught_up),
            config,
        };
        engine.register_mk_functions()?;
        engine.register_data_dir().await?;
        Ok(engine)
    }

    /// The session's Meta-Knowledge settings.
    pub fn mk_options(&self) -> MkOptions {
        MkOptions::of(self.ctx.state().config_options())
    }

    /// (Re)registers `mk_metadata`, `mk_qa`, `mk_cluster` and `mk_summary` for the session's
    /// current settings (their result types follow the metadata schema).
    fn register_mk_functions(&self) -> Result<()> {
        let options = self.mk_options();
        let generators = &self.mk_services.generators;
        let schema = generators
            .schema(&options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let generator = generators
            .generator(&options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let preparer = Arc::new(Preparer::new(
            generator.clone(),
            schema.clone(),
            self.mk_services.failures.clone(),
        ));
        for part in [PreparedPart::Metadata, PreparedPart::Questions] {
            let udf = PrepareUdf::new(part, preparer.clone());
            self.ctx
                .register_udf(AsyncScalarUDF::new(Arc::new(udf)).into_scalar_udf());
        }
        self.ctx.register_udf(ScalarUDF::new_from_impl(ClusterUdf::new(schema)));
        self.ctx
            .register_udaf(AggregateUDF::new_from_impl(SummaryUdaf::new(generator)));
        Ok(())
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
    /// questions and clusters when it has a Meta-Knowledge side).
    pub async fn register_index(&self, name: &str, index: Arc<KnowledgeIndex>) -> Result<()> {
        let mk = self.kb_factory.attach_mk(&index, false).await?;
        self.kbs.insert(name, index, mk);
        Ok(())
    }

    /// The DataFusion session.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The embedding models.
    pub fn models(&self) -> &Arc<ModelRegistry> {
        &self.models
    }

    /// The knowledge index registered as `name`.
    pub fn index(&self, name: &str) -> Option<Arc<KnowledgeIndex>> {
        self.kbs.get(name)
    }

    /// Records sources refused so far (the `dead_letters` table).
    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.len()
    }

    /// Rows received by knowledge-index inserts so far (for progress display).
    pub fn ingested_rows(&self) -> u64 {
        self.progress.rows()
    }

    /// Runs one or more `;`-separated statements and returns the last one's rows.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let mut results = self.run_script("sql", sql, |_| {}).await?;
        Ok(results.pop().map(|r| r.batches).unwrap_or_default())
    }

    /// Runs a script statement by statement; `before` is told each statement before it runs.
    /// Stops at the first failing statement, naming it in the error. `pipeline` names the
    /// script in metrics and logs; an `INSERT` reading a Kafka table runs as a continuous
    /// stream (see [`crate::streaming`]) until [`Engine::streams`] stops it.
    pub async fn run_script(
        &self,
        pipeline: &str,
        script: &str,
        mut before: impl FnMut(&str),
    ) -> Result<Vec<StatementResult>> {
        let statements = DFParser::parse_sql(script)?;
        let mut results = Vec::with_capacity(statements.len());
        let count = statements.len();
        for (i, statement) in statements.into_iter().enumerate() {
            // Rendering a statement back to SQL costs time on large literals: a single
            // statement is its own script.
            let sql = if count == 1 {
                script.trim().to_string()
            } else {
                statement.to_string()
            };
            before(&sql);
            let batches = self.execute(pipeline, statement).await.map_err(|e| {
                if count > 1 {
                    e.context(format!("statement {} of {count}: {}", i + 1, abbreviate(&sql)))
                } else {
                    e
                }
            })?;
            results.push(StatementResult { sql, batches });
        }
        Ok(results)
    }

    async fn execute(&self, pipeline: &str, statement: Statement) -> Result<Vec<RecordBatch>> {
        let sets_mk_option = StatementKind::of(&statement).sets_mkflow_option();
        let previous = sets_mk_option.then(|| self.mk_options());
        let plan = self.ctx.state().statement_to_plan(statement).await?;
        if let Some(stream) = ContinuousInsert::find(&plan)? {
            let rows = stream.run(&self.ctx, pipeline, &self.streams).await?;
            return Ok(vec![count_batch(rows)?]);
        }
        let frame = self.ctx.execute_logical_plan(plan).await?;
        let batches = frame.collect().await?;
        if let Some(previous) = previous
            && let Err(e) = self.register_mk_functions()
        {
            // Refused settings do not stay in force.
            self.ctx
                .state_ref()
                .write()
                .config_mut()
                .options_mut()
                .extensions
                .insert(previous);
            return Err(e);
        }
        Ok(batches)
    }

    /// Runs the SQL file at `path` as pipeline `name` (see [`Engine::run_script`]).
    pub async fn run_file(&self, name: &str, path: &Path, before: impl FnMut(&str)) -> Result<Vec<StatementResult>> {
        let script = std::fs::read_to_string(path)
            .map_err(|e| DataFusionError::Execution(format!("cannot read pipeline {}: {e}", path.display())))?;
        self.run_script(name, &script, before).await
    }

    /// Controls the continuous statements this engine runs (stop them, see their state).
    pub fn streams(&self) -> &StreamControl {
        &self.streams
    }
}

impl ScrapeSources for Engine {
    fn embedding_totals(&self) -> Vec<EmbeddingTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        self.models
            .all()
            .filter_map(|model| {
                let stats = model.loaded()?.stats();
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
        for generator in self.mk_services.generators.generators() {
            *by_name.entry(generator.name()).or_default() += generator.stats().counts();
        }
        by_name
            .into_iter()
            .map(|(generator, counts)| GenerationTotals { generator, counts })
            .collect()
    }

    fn index_sizes(&self) -> Vec<IndexSize> {
        let mut sizes = Vec::new();
        for name in self.kbs.names() {
            let Some((index, mk)) = self.kbs.entry(&name) else {
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
                add(format!("{name}_questions"), mk.index.questions());
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
