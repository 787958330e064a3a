//! Per-session Meta-Knowledge settings (`SET mkflow.<name> = …`, or `MKFLOW_<NAME>` in the
//! environment) and the registry that turns them into generators.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::common::{config_field, extensions_options};
use datafusion::config::{ConfigExtension, ExtensionOptions};
use datafusion::error::DataFusionError;

use super::embedded::EmbeddedGenerator;
use super::generator::{GenerationError, Generator};
use super::local::{LocalGenerator, LocalSettings};
use super::openai::{LlmSettings, OpenAiGenerator};
use super::schema::{MetadataSchema, SchemaFileError};
use crate::embedding::LazyEmbedder;
use crate::runtime::{Device, UnknownDevice};

/// The local LLM `mkflow models pull --llm` installs (Qwen2.5-Coder-0.5B-Instruct).
pub const DEFAULT_LOCAL_MODEL: &str = "qwen2.5-0.5b-instruct";

/// The public OpenAI endpoint, used when no base URL is configured.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// The Meta-Knowledge generation backend (`mkflow.generator`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GeneratorKind {
    /// No LLM: metadata by zero-shot classification on the embedding model, questions from the
    /// text's own sentences ([`EmbeddedGenerator`]).
    #[default]
    Embedded,
    /// Any OpenAI-compatible chat-completions endpoint ([`OpenAiGenerator`]).
    OpenAi,
    /// A local LLM on ONNX Runtime, offline ([`LocalGenerator`]).
    Local,
}

impl std::fmt::Display for GeneratorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GeneratorKind::Embedded => "embedded",
            GeneratorKind::OpenAi => "openai",
            GeneratorKind::Local => "local",
        })
    }
}

/// A generator name other than `embedded`, `openai` and `local`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown generator '{0}' (mkflow.generator is 'embedded', 'openai' or 'local')")]
pub struct UnknownGenerator(pub String);

impl std::str::FromStr for GeneratorKind {
    type Err = UnknownGenerator;

    /// `embedded`, `openai` or `local`, as `mkflow.generator` spells them.
    fn from_str(text: &str) -> Result<Self, UnknownGenerator> {
        match text {
            "embedded" => Ok(GeneratorKind::Embedded),
            "openai" => Ok(GeneratorKind::OpenAi),
            "local" => Ok(GeneratorKind::Local),
            other => Err(UnknownGenerator(other.to_string())),
        }
    }
}

config_field!(GeneratorKind, value => value
    .parse()
    .map_err(|e: UnknownGenerator| DataFusionError::Configuration(e.to_string()))?);

/// The two kinds of clusters of a Meta-Knowledge index, and the one `mk_search` routes by
/// (`mkflow.route_by`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ClusterKind {
    /// Clusters from the data: spherical k-means over the synthetic questions' vectors.
    #[default]
    Topic,
    /// A document's metadata label (the first label of the schema's cluster field).
    Metadata,
}

impl std::fmt::Display for ClusterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterKind::Topic => "topic",
            ClusterKind::Metadata => "metadata",
        })
    }
}

/// A cluster kind other than `topics` and `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cluster kind '{0}' (mkflow.route_by is 'topics' or 'metadata')")]
pub struct UnknownClusterKind(pub String);

impl std::str::FromStr for ClusterKind {
    type Err = UnknownClusterKind;

    /// `topics` (or `topic`) or `metadata`.
    fn from_str(text: &str) -> Result<Self, UnknownClusterKind> {
        match text {
            "topics" | "topic" => Ok(ClusterKind::Topic),
            "metadata" => Ok(ClusterKind::Metadata),
            other => Err(UnknownClusterKind(other.to_string())),
        }
    }
}

config_field!(ClusterKind, value => value
    .parse()
    .map_err(|e: UnknownClusterKind| DataFusionError::Configuration(e.to_string()))?);

// `Device` is the type of `mkflow.local_device` only, so its refusal names that setting.
config_field!(Device, value => value
    .parse()
    .map_err(|e: UnknownDevice| DataFusionError::Configuration(format!("mkflow.local_device: {e}")))?);

extensions_options! {
    /// Meta-Knowledge settings of a session: `SET mkflow.generator = 'openai'`, or the
    /// environment variable `MKFLOW_GENERATOR=openai` for every session of a process.
    pub struct MkOptions {
        /// Generation backend: `embedded` (no LLM; see the README), `openai` (any
        /// OpenAI-compatible chat-completions endpoint: OpenAI, vLLM, llama-server, Ollama) or
        /// `local` (a local LLM on ONNX Runtime, offline; see `local_model`).
        pub generator: GeneratorKind, default = GeneratorKind::Embedded
        /// Metadata schema file (JSON); empty for the built-in research-paper schema.
        pub metadata_schema: String, default = String::new()
        /// Most synthetic questions per document.
        pub max_questions: usize, default = 6
        /// Sub-queries an LLM writes per query in `mk_search`.
        pub rewrite_queries: usize, default = 3
        /// The clusters `mk_search` routes by: `topics` (from the data: spherical k-means over
        /// the question vectors) or `metadata` (each document's metadata label).
        pub route_by: ClusterKind, default = ClusterKind::Topic
        /// Topics a re-fit makes; 0 for √(questions / 2), between 2 and 256 (at most 1024).
        pub topic_clusters: usize, default = 0
        /// A question also belongs to every topic within this cosine similarity of its
        /// nearest one (at most two topics).
        pub topic_overlap: f64, default = 0.03
        /// Topics are re-fitted once the questions added or removed since the last fit reach
        /// this share of it (or new questions fit their topics clearly worse).
        pub topic_refit_growth: f64, default = 0.5
        /// Most clusters `mk_search` routes a query to.
        pub route_clusters: usize, default = 3
        /// `mk_search` routes to every cluster whose centroid is within this cosine similarity
        /// of the nearest one (at most `route_clusters`): an ambiguous query is not forced into
        /// one cluster, a clear one is.
        pub route_margin: f64, default = 0.05
        /// The weight of the original query's ranking in `mk_search`'s fusion.
        pub original_query_weight: f64, default = 1.0
        /// The weight of the rewritten sub-queries' rankings together (each gets its share).
        pub rewrite_weight: f64, default = 0.5
        /// The weight of each of the documents' own rankings for the original query (by
        /// vector, and by BM25 when the index has text columns) in `mk_search`'s fusion: they
        /// add evidence to the QA pairs' documents. 0 ranks by the QA pairs alone.
        pub document_weight: f64, default = 1.0
        /// `mk_search` matches its sub-queries only inside the routed clusters (the paper's
        /// behaviour); when false routing only shapes the rewrites (through the clusters'
        /// summaries) and every sub-query is matched across all clusters, so a wrong route
        /// cannot hide the best answer.
        pub strict_routing: bool, default = false
        /// `mk_search` fuses its rankings per document: each ranking counts a document once,
        /// at the rank of its best question, and the document is shown by the question that
        /// added most. When false, per question (a document's questions compete).
        pub fuse_documents: bool, default = false
        /// A cluster's summary is rewritten once its question count changed by this fraction.
        pub summary_growth: f64, default = 0.25
        /// ... or once it is older than this many seconds and its questions changed.
        pub summary_max_age_secs: u64, default = 86_400
        /// Base URL of the chat-completions endpoint, up to `/v1`.
        pub llm_base_url: String, default = OPENAI_BASE_URL.to_string()
        /// Model name sent to the endpoint.
        pub llm_model: String, default = String::new()
        /// Environment variable holding the endpoint's API key.
        pub llm_api_key_env: String, default = "OPENAI_API_KEY".to_string()
        /// Requests in flight at once.
        pub llm_concurrency: usize, default = 4
        /// Seconds before a request times out.
        pub llm_timeout_secs: u64, default = 120
        /// Retries after a 429, 5xx, timeout or connection error.
        pub llm_max_retries: usize, default = 3
        /// Ask for JSON answers with `response_format` (turn off for endpoints that refuse it).
        pub llm_json_mode: bool, default = true
        /// The `local` generator's model: a name under `<mkflow home>/llms/` or an export
        /// directory of `scripts/export_decoder.py`.
        pub local_model: String, default = DEFAULT_LOCAL_MODEL.to_string()
        /// Where the local model runs: `cpu` or `cuda` (falls back to the CPU with a warning).
        pub local_device: Device, default = Device::Cpu
        /// Most tokens per local answer (a JSON answer is wrapped up within them).
        pub local_max_new_tokens: usize, default = 640
        /// Most conversations the local model answers together in one batch.
        pub local_batch_size: usize, default = 4
        /// Sampling temperature of the local model; 0 decodes greedily (reproducible).
        pub local_temperature: f64, default = 0.0
    }
}

impl ConfigExtension for MkOptions {
    const PREFIX: &'static str = "mkflow";
}

impl MkOptions {
    /// Settings that name a file, a URL or an environment variable: a server takes them from
    /// its configuration, its environment and its pipeline files only, never from a network
    /// client (which could otherwise read the server's files or send its secrets elsewhere).
    pub const SERVER_ONLY: [&'static str; 4] = ["llm_base_url", "llm_api_key_env", "local_model", "metadata_schema"];

    /// The settings a session's configuration holds (the defaults when it holds none).
    pub fn of(config: &datafusion::config::ConfigOptions) -> Self {
        config.extensions.get::<MkOptions>().cloned().unwrap_or_default()
    }

    /// Defaults overridden by `MKFLOW_<NAME>` environment variables (e.g. `MKFLOW_LLM_MODEL`).
    pub fn from_env() -> Result<Self, SettingsError> {
        let mut options = MkOptions::default();
        for entry in options.entries() {
            let variable = format!("MKFLOW_{}", entry.key.to_uppercase());
            if let Ok(value) = std::env::var(&variable) {
                options
                    .set(&entry.key, &value)
                    .map_err(|source| SettingsError::Environment { variable, source })?;
            }
        }
        Ok(options)
    }

    /// What identifies the generator these options make: every setting with its value, so that
    /// no setting, present or future, can be left out and reuse a generator made for others.
    fn generator_key(&self) -> GeneratorKey {
        self.entries().into_iter().map(|e| (e.key, e.value)).collect()
    }
}

/// Every setting of an [`MkOptions`] with its value, in declaration order.
type GeneratorKey = Vec<(String, Option<String>)>;

/// Why Meta-Knowledge settings cannot be read or turned into a generator.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// An `MKFLOW_<NAME>` environment variable holds a value its setting refuses.
    #[error("environment variable {variable}: {source}")]
    Environment {
        /// The variable, e.g. `MKFLOW_GENERATOR`.
        variable: String,
        /// The setting's refusal, naming the accepted values.
        source: DataFusionError,
    },
    /// The metadata schema file cannot be loaded.
    #[error(transparent)]
    Schema(#[from] SchemaFileError),
    /// The `openai` generator has no model name.
    #[error("the openai generator needs a model: SET mkflow.llm_model = '…' (or MKFLOW_LLM_MODEL)")]
    NoLlmModel,
    /// The public OpenAI endpoint was chosen but the key's environment variable is unset.
    #[error("the OpenAI API needs a key in ${0} (or SET mkflow.llm_base_url to a local endpoint)")]
    NoApiKey(String),
    /// The `local` generator's model is not installed.
    #[error(
        "local model '{name}' not found at {} (hint: `mkflow models pull --llm` installs {}; \
         scripts/export_decoder.py exports others)",
        .dir.display(),
        DEFAULT_LOCAL_MODEL
    )]
    LocalModelNotFound {
        /// `mkflow.local_model` as set.
        name: String,
        /// The directory it was looked for in.
        dir: PathBuf,
    },
    /// The generator could not be created.
    #[error(transparent)]
    Generator(#[from] GenerationError),
}

/// Where local LLMs live.
#[derive(Debug, Clone)]
struct LocalModels {
    dir: PathBuf,
    onnx_runtime: PathBuf,
}

/// Builds generators and metadata schemas from [`MkOptions`], once per distinct setting.
#[derive(Debug)]
pub struct GeneratorRegistry {
    embedder: Arc<LazyEmbedder>,
    cache_dir: Option<PathBuf>,
    local_models: Option<LocalModels>,
    generators: Mutex<HashMap<GeneratorKey, Arc<dyn Generator>>>,
    schemas: Mutex<HashMap<String, Arc<MetadataSchema>>>,
}

impl GeneratorRegistry {
    /// A registry whose embedded generator uses `embedder`, and whose LLM generators keep
    /// their answer cache in `cache_dir`.
    pub fn new(embedder: Arc<LazyEmbedder>, cache_dir: Option<&Path>) -> Self {
        GeneratorRegistry {
            embedder,
            cache_dir: cache_dir.map(Path::to_path_buf),
            local_models: None,
            generators: Mutex::new(HashMap::new()),
            schemas: Mutex::new(HashMap::new()),
        }
    }

    /// Local LLMs are looked up by name in `dir`, and run on the ONNX Runtime library
    /// `onnx_runtime`.
    pub fn with_local_models(mut self, dir: PathBuf, onnx_runtime: PathBuf) -> Self {
        self.local_models = Some(LocalModels { dir, onnx_runtime });
        self
    }

    /// The metadata schema `options` name (the built-in one when none).
    pub fn schema(&self, options: &MkOptions) -> Result<Arc<MetadataSchema>, SettingsError> {
        let mut schemas = self.schemas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = schemas.get(&options.metadata_schema) {
            return Ok(s.clone());
        }
        let schema = if options.metadata_schema.is_empty() {
            MetadataSchema::default()
        } else {
            MetadataSchema::from_file(Path::new(&options.metadata_schema))?
        };
        let schema = Arc::new(schema);
        schemas.insert(options.metadata_schema.clone(), schema.clone());
        Ok(schema)
    }

    /// The generator `options` select.
    pub fn generator(&self, options: &MkOptions) -> Result<Arc<dyn Generator>, SettingsError> {
        let key = options.generator_key();
        if let Some(g) = self.generators.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(g.clone());
        }
        let schema = self.schema(options)?;
        let generator: Arc<dyn Generator> = match options.generator {
            GeneratorKind::Embedded => Arc::new(EmbeddedGenerator::new(
                self.embedder.clone(),
                schema,
                options.max_questions,
            )),
            GeneratorKind::OpenAi => Arc::new(OpenAiGenerator::new(self.llm_settings(options)?, schema)?),
            GeneratorKind::Local => Arc::new(LocalGenerator::new(self.local_settings(options)?, schema)),
        };
        let mut generators = self.generators.lock().unwrap_or_else(|e| e.into_inner());
        Ok(generators.entry(key).or_insert(generator).clone())
    }

    /// Every generator made so far (for metrics).
    pub fn generators(&self) -> Vec<Arc<dyn Generator>> {
        self.generators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The answer cache every LLM generator shares.
    fn cache_file(&self) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| d.join("generations.jsonl"))
    }

    fn local_settings(&self, options: &MkOptions) -> Result<LocalSettings, SettingsError> {
        let named = Path::new(&options.local_model);
        let model_dir = match &self.local_models {
            Some(local) if named.components().count() == 1 && !named.is_dir() => local.dir.join(named),
            _ => named.to_path_buf(),
        };
        if !model_dir.join(crate::decoder::DECODER_CONFIG_FILE).is_file() {
            return Err(SettingsError::LocalModelNotFound {
                name: options.local_model.clone(),
                dir: model_dir,
            });
        }
        Ok(LocalSettings {
            model_dir,
            device: options.local_device,
            threads: 0,
            onnx_runtime: self.local_models.as_ref().map(|l| l.onnx_runtime.clone()),
            max_new_tokens: options.local_max_new_tokens.max(1),
            batch_size: options.local_batch_size.max(1),
            temperature: options.local_temperature.max(0.0) as f32,
            max_questions: options.max_questions.max(1),
            rewrite_queries: options.rewrite_queries.max(1),
            cache_file: self.cache_file(),
        })
    }

    fn llm_settings(&self, options: &MkOptions) -> Result<LlmSettings, SettingsError> {
        if options.llm_model.is_empty() {
            return Err(SettingsError::NoLlmModel);
        }
        let api_key = std::env::var(&options.llm_api_key_env).ok().filter(|k| !k.is_empty());
        if api_key.is_none() && options.llm_base_url == OPENAI_BASE_URL {
            return Err(SettingsError::NoApiKey(options.llm_api_key_env.clone()));
        }
        Ok(LlmSettings {
            base_url: options.llm_base_url.clone(),
            model: options.llm_model.clone(),
            api_key,
            concurrency: options.llm_concurrency.max(1),
            timeout: Duration::from_secs(options.llm_timeout_secs.max(1)),
            max_retries: options.llm_max_retries,
            retry_base: Duration::from_millis(500),
            json_mode: options.llm_json_mode,
            max_questions: options.max_questions.max(1),
            rewrite_queries: options.rewrite_queries.max(1),
            cache_file: self.cache_file(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddingModelSpec;

    fn registry(home: &Path) -> GeneratorRegistry {
        let spec: EmbeddingModelSpec = serde_json::from_value(serde_json::json!({
            "name": "m", "model_path": "m.onnx", "tokenizer_path": "t.json", "dimensions": 4,
            "pooling": "mean", "normalize": true, "max_tokens": 8
        }))
        .unwrap();
        GeneratorRegistry::new(Arc::new(LazyEmbedder::new(spec, None)), None)
            .with_local_models(home.join("llms"), home.join("libonnxruntime.so"))
    }

    /// Makes `dir` look like a decoder export (the local generator loads it on first use only).
    fn fake_export(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(crate::decoder::DECODER_CONFIG_FILE), "{}").unwrap();
    }

    #[test]
    fn local_generators_are_found_by_name_or_path_and_refused_with_a_hint() {
        let home = tempfile::tempdir().unwrap();
        let registry = registry(home.path());
        let mut options = MkOptions {
            generator: GeneratorKind::Local,
            ..MkOptions::default()
        };
        let missing = registry.generator(&options).unwrap_err().to_string();
        assert!(missing.contains("mkflow models pull --llm"), "{missing}");
        assert!(missing.contains(&home.path().join("llms/qwen2.5-0.5b-instruct").display().to_string()));

        fake_export(&home.path().join("llms/qwen2.5-0.5b-instruct"));
        let local = registry.generator(&options).unwrap();
        assert_eq!(local.name(), "local:qwen2.5-0.5b-instruct");
        // The same settings give the same generator; other settings another one.
        assert!(Arc::ptr_eq(&local, &registry.generator(&options).unwrap()));
        options.local_max_new_tokens = 64;
        assert!(!Arc::ptr_eq(&local, &registry.generator(&options).unwrap()));

        // A path works too.
        let elsewhere = home.path().join("exports/qwen");
        fake_export(&elsewhere);
        options.local_model = elsewhere.display().to_string();
        assert_eq!(registry.generator(&options).unwrap().name(), "local:qwen");
    }

    #[test]
    fn settings_parse_their_names_and_refuse_others_naming_the_accepted_values() {
        let mut options = MkOptions::default();
        assert_eq!(options.generator, GeneratorKind::Embedded);
        assert_eq!(options.local_device, Device::Cpu);
        for kind in [GeneratorKind::Embedded, GeneratorKind::OpenAi, GeneratorKind::Local] {
            options.set("generator", &kind.to_string()).unwrap();
            assert_eq!(options.generator, kind);
        }
        options.set("local_device", "cuda").unwrap();
        assert_eq!(options.local_device, Device::Cuda);

        let generator = options.set("generator", "psychic").unwrap_err().to_string();
        assert!(
            generator.contains("unknown generator 'psychic' (mkflow.generator is 'embedded', 'openai' or 'local')"),
            "{generator}"
        );
        let device = options.set("local_device", "tpu").unwrap_err().to_string();
        assert!(
            device.contains("mkflow.local_device: a device is 'cpu' or 'cuda', not 'tpu'"),
            "{device}"
        );
        // Refused values leave the settings as they were.
        assert_eq!(
            (options.generator, options.local_device),
            (GeneratorKind::Local, Device::Cuda)
        );
        let entries = options.entries();
        let value = |key: &str| entries.iter().find(|e| e.key == key).unwrap().value.clone();
        assert_eq!(value("generator").as_deref(), Some("local"));
        assert_eq!(value("local_device").as_deref(), Some("cuda"));
    }

    #[test]
    fn changing_any_single_setting_makes_another_generator() {
        let home = tempfile::tempdir().unwrap();
        let registry = registry(home.path());
        fake_export(&home.path().join("llms").join(DEFAULT_LOCAL_MODEL));
        let other_model = home.path().join("exports/other");
        fake_export(&other_model);
        let schema_file = home.path().join("schema.json");
        std::fs::write(&schema_file, serde_json::to_string(&MetadataSchema::default()).unwrap()).unwrap();

        // The local generator needs no endpoint or key, so every other setting can change.
        let base = MkOptions {
            generator: GeneratorKind::Local,
            ..MkOptions::default()
        };
        let generator = registry.generator(&base).unwrap();
        for entry in base.entries() {
            // Another valid value: a real file for the paths, else the first candidate the
            // setting accepts and that changes it.
            let candidates: Vec<String> = match entry.key.as_str() {
                "metadata_schema" => vec![schema_file.display().to_string()],
                "local_model" => vec![other_model.display().to_string()],
                _ => ["7", "0.5", "true", "false", "embedded", "cuda", "metadata", "other"]
                    .map(String::from)
                    .to_vec(),
            };
            let changed = candidates
                .iter()
                .find_map(|value| {
                    let mut options = base.clone();
                    options.set(&entry.key, value).ok()?;
                    let now = options.entries().into_iter().find(|e| e.key == entry.key)?.value;
                    (now != entry.value).then_some(options)
                })
                .unwrap_or_else(|| panic!("no other value for mkflow.{} in the test", entry.key));
            let other = registry.generator(&changed).unwrap();
            assert!(
                !Arc::ptr_eq(&generator, &other),
                "mkflow.{} changed, yet the generator was reused",
                entry.key
            );
            assert!(Arc::ptr_eq(&other, &registry.generator(&changed).unwrap()));
        }
        assert!(Arc::ptr_eq(&generator, &registry.generator(&base).unwrap()));
    }
}
