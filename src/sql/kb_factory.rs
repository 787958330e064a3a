//! `CREATE EXTERNAL TABLE name (columns…) STORED AS KB LOCATION 'dir' [OPTIONS (…)]`.
//!
//! Creates the knowledge index in `dir` (relative paths are under the data directory), or opens
//! the one already there. Options:
//! - `model`: embedding model of the vectors (default: the session's default model); its
//!   dimension sizes the vector column;
//! - `dimensions`: vector length, for vectors that come from elsewhere (model then names them);
//! - `quantization`: `f32` (default), `f16` or `i8`, how the ANN graph stores vectors;
//! - `key_column`: the document-id column upserts replace by (default `doc_id`);
//! - `vector_column`: the vector column, appended to the declared columns (default
//!   `embedding`);
//! - `text_columns`: the columns indexed for full-text search (`text_search`, `hybrid_search`),
//!   separated by commas, each optionally with its analyzer (`'title:simple, body'`); `''`
//!   for none. Default: every declared text column but the key column;
//! - `text_analyzer`: the analyzer of the text columns that name none: `english` (default:
//!   words, lowercased, English stop words removed, Snowball-stemmed), another Snowball
//!   language (`french`, `german`, …), `simple` (words, lowercased) or `whitespace`;
//! - `meta_knowledge`: `true` gives the index a Meta-Knowledge side: the columns `metadata`
//!   (the session's metadata schema, see `mkflow.metadata_schema`), `qa` and `cluster_name` are
//!   appended (fill them with `mk_metadata`, `mk_qa`, `mk_cluster`), and every insert keeps
//!   the questions index and the cluster summaries current (`<name>_questions`,
//!   `<name>_clusters`, `qa_search`, `mk_search`);
//! - `chunk_tokens`: cut each document's long text into chunks of at most this many tokens
//!   (the model's tokenizer counts), each with a vector and a BM25 entry of its own; the index
//!   keeps one row per document and its searches rank documents by their best chunk
//!   (`best_chunk`, …), `chunk_search` returns passages, the chunks are the table
//!   `<name>_chunks`. With it: `chunk_overlap` (tokens repeated from the chunk before;
//!   default a tenth of `chunk_tokens`), `chunk_column` (the column cut; default the first of
//!   `body`, `text`, `content` declared), `chunk_context` (a column read before every chunk,
//!   default `title` when declared, `''` for none). The document rows get no full-text index
//!   of their own unless `text_columns` asks; a document inserted without a vector (`NULL`)
//!   gets the normalised mean of its chunks' vectors. Changing these options for an existing
//!   index cuts its documents again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::Schema;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::CreateExternalTable;

use mkflow_udfs::mk::MkOptions;

use super::KbSchema;
use super::kb_entry::KbEntry;
use super::kb_table::{IngestProgress, KbTable};
use crate::chunks::{ChunkIndex, ChunkSettings};
use crate::mk::{MkAttachment, MkIndex, MkServices, document_columns, topic_policy};
use crate::support::blocking;
use crate::support::index_error;
use mkflow_index::fulltext::default_text_columns;
use mkflow_index::{Analyzer, IndexSettings, KnowledgeIndex, MANIFEST_FILE, Quantization, TextColumn};

/// The `STORED AS` name of knowledge indexes.
pub const KB_FORMAT: &str = "KB";

/// Creates or opens knowledge indexes for `CREATE EXTERNAL TABLE … STORED AS KB`.
#[derive(Debug)]
pub struct KbTableFactory {
    data_dir: PathBuf,
    registry: Arc<KbSchema>,
    progress: Arc<IngestProgress>,
    mk_services: Arc<MkServices>,
}

impl KbTableFactory {
    /// A factory placing relative locations under `data_dir`.
    pub fn new(
        data_dir: PathBuf,
        registry: Arc<KbSchema>,
        progress: Arc<IngestProgress>,
        mk_services: Arc<MkServices>,
    ) -> Self {
        KbTableFactory {
            data_dir,
            registry,
            progress,
            mk_services,
        }
    }

    /// Where a `LOCATION` points.
    pub fn resolve(&self, location: &str) -> PathBuf {
        let path = Path::new(location);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.data_dir.join(path)
        }
    }

    /// The settings `cmd` asks for; an index already in `dir` keeps its text columns unless
    /// `text_columns` is given (a new chunked index has none: its chunks are indexed).
    fn settings(&self, cmd: &CreateExternalTable, dir: &Path) -> Result<IndexSettings> {
        let option = |name: &str| option(cmd, name);
        let known = [
            "model",
            "dimensions",
            "quantization",
            "key_column",
            "vector_column",
            "text_columns",
            "text_analyzer",
            "meta_knowledge",
            "chunk_tokens",
            "chunk_overlap",
            "chunk_column",
            "chunk_context",
        ];
        for key in cmd.options.keys() {
            let bare = key.strip_prefix("format.").unwrap_or(key);
            if !known.contains(&bare) {
                return plan_err!("unknown option '{bare}' for STORED AS KB (known: {})", known.join(", "));
            }
        }
        let model = option("model").unwrap_or_else(|| self.mk_services.models.default_model().spec().name.clone());
        let dimensions = match option("dimensions") {
            Some(d) => {
                d.parse::<usize>().ok().filter(|d| *d > 0).ok_or_else(|| {
                    DataFusionError::Plan(format!("option dimensions: '{d}' is not a positive integer"))
                })?
            }
            None => match self.mk_services.models.get(&model) {
                Some(m) => m.spec().dimensions,
                None => {
                    return plan_err!(
                        "unknown model '{model}': install it under the mkflow home, or give OPTIONS ('dimensions' 'N') for vectors computed elsewhere"
                    );
                }
            },
        };
        let quantization = match option("quantization") {
            Some(q) => Quantization::parse(&q).map_err(index_error)?,
            None => Quantization::F32,
        };
        let key_column = option("key_column").unwrap_or_else(|| "doc_id".into());
        let analyzer = text_analyzer(cmd)?;
        let text_columns = match option("text_columns") {
            Some(list) => Some(
                TextColumn::parse_list(&list, analyzer)
                    .map_err(|e| DataFusionError::Plan(format!("option text_columns: {e}")))?,
            ),
            None if dir.join(MANIFEST_FILE).is_file() => None,
            None if option("chunk_tokens").is_some() => Some(Vec::new()),
            None => Some(
                default_text_columns(cmd.schema.as_arrow(), &key_column)
                    .into_iter()
                    .map(|c| TextColumn { analyzer, ..c })
                    .collect(),
            ),
        };
        Ok(IndexSettings {
            model,
            dimensions,
            quantization,
            key_column,
            vector_column: option("vector_column").unwrap_or_else(|| "embedding".into()),
            text_columns,
        })
    }
}

/// The analyzer option `text_analyzer` names (default: English).
fn text_analyzer(cmd: &CreateExternalTable) -> Result<Analyzer> {
    match option(cmd, "text_analyzer") {
        Some(name) => name
            .parse::<Analyzer>()
            .map_err(|e| DataFusionError::Plan(format!("option text_analyzer: {e}"))),
        None => Ok(Analyzer::default()),
    }
}

/// The chunk settings `cmd` asks for (`chunk_tokens` and its companions), if any.
fn chunk_settings(cmd: &CreateExternalTable, columns: &Schema, key_column: &str) -> Result<Option<ChunkSettings>> {
    let option = |name: &str| option(cmd, name);
    let Some(tokens) = option("chunk_tokens") else {
        for companion in ["chunk_overlap", "chunk_column", "chunk_context"] {
            if option(companion).is_some() {
                return plan_err!("option {companion} needs chunk_tokens (e.g. OPTIONS ('chunk_tokens' '200'))");
            }
        }
        return Ok(None);
    };
    ChunkSettings::from_options(
        columns,
        key_column,
        &tokens,
        option("chunk_overlap").as_deref(),
        option("chunk_column").as_deref(),
        option("chunk_context").as_deref(),
    )
    .map(Some)
    .map_err(DataFusionError::Plan)
}

/// The value of option `name` (with or without DataFusion's `format.` prefix).
fn option(cmd: &CreateExternalTable, name: &str) -> Option<String> {
    cmd.options
        .iter()
        .find(|(k, _)| k.as_str() == name || k.strip_prefix("format.") == Some(name))
        .map(|(_, v)| v.clone())
}

impl KbTableFactory {
    /// `index` with its Meta-Knowledge side (created when `create_mk`; topics fitted and
    /// missing summaries written with `options`) and its chunks (cut with `chunks`, else as
    /// stored), when it has them.
    pub async fn attach(
        &self,
        index: Arc<KnowledgeIndex>,
        create_mk: bool,
        options: &MkOptions,
        chunks: Option<(ChunkSettings, Analyzer)>,
    ) -> Result<KbEntry> {
        let mk = if create_mk || MkIndex::exists(index.dir()) {
            let (documents, topics) = (index.clone(), topic_policy(options));
            let mk = blocking(move || MkIndex::open_or_create(&documents, topics)).await?;
            let mk = MkAttachment {
                index: Arc::new(mk),
                services: self.mk_services.clone(),
            };
            // Clusters without a summary (topics fitted just now, say) get one; an index whose
            // generator cannot start still opens.
            if let Err(e) = mk.refresh_summaries(options).await {
                log::warn!("{}: cluster summaries not written: {e}", index.dir().display());
            }
            Some(mk)
        } else {
            None
        };
        let chunks = if chunks.is_some() || ChunkIndex::exists(index.dir()) {
            let embedder = self.mk_services.models.model_of(&index)?;
            let documents = index.clone();
            let (settings, analyzer) = match chunks {
                Some((settings, analyzer)) => (Some(settings), analyzer),
                None => (None, Analyzer::default()),
            };
            let chunks = blocking(move || ChunkIndex::open_or_create(&documents, settings, analyzer, embedder)).await?;
            Some(Arc::new(chunks))
        } else {
            None
        };
        Ok(KbEntry { index, mk, chunks })
    }
}

#[async_trait]
impl TableProviderFactory for KbTableFactory {
    async fn create(&self, state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let [location] = cmd.locations.as_slice() else {
            return plan_err!("STORED AS KB takes one LOCATION (a directory)");
        };
        let dir = self.resolve(location);
        let meta_knowledge = match option(cmd, "meta_knowledge").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return plan_err!("option meta_knowledge: '{other}' is not true or false"),
        };
        let mut columns = cmd.schema.as_arrow().clone();
        let (index, chunks) = if columns.fields().is_empty() {
            let index = blocking(move || KnowledgeIndex::open(dir)).await?;
            let chunks = chunk_settings(cmd, &index.schema(), &index.manifest().key_column)?;
            (index, chunks)
        } else {
            let settings = self.settings(cmd, &dir)?;
            // Checked before anything is created.
            let chunks = chunk_settings(cmd, &columns, &settings.key_column)?;
            if meta_knowledge {
                let options = MkOptions::of(state.config_options());
                let schema = self
                    .mk_services
                    .generators
                    .schema(&options)
                    .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
                columns = document_columns(&columns, schema.data_type());
            }
            let index = blocking(move || KnowledgeIndex::open_or_create(dir, &columns, &settings)).await?;
            (index, chunks)
        };
        let chunks = match chunks {
            Some(settings) => Some((settings, text_analyzer(cmd)?)),
            None => None,
        };
        let options = MkOptions::of(state.config_options());
        let entry = self.attach(Arc::new(index), meta_knowledge, &options, chunks).await?;
        self.registry.insert(cmd.name.table(), entry.clone());
        Ok(Arc::new(KbTable::new(
            &cmd.name.to_string(),
            entry,
            self.progress.clone(),
        )))
    }
}
