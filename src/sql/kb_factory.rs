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
//!   `<name>_clusters`, `qa_search`, `mk_search`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::CreateExternalTable;

use mkflow_udfs::mk::MkOptions;

use super::KbSchema;
use super::kb_table::{IngestProgress, KbTable};
use crate::mk::{MkAttachment, MkIndex, MkServices, document_columns};
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
    /// `text_columns` is given.
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
        let analyzer = match option("text_analyzer") {
            Some(name) => name
                .parse::<Analyzer>()
                .map_err(|e| DataFusionError::Plan(format!("option text_analyzer: {e}")))?,
            None => Analyzer::default(),
        };
        let text_columns = match option("text_columns") {
            Some(list) => Some(
                TextColumn::parse_list(&list, analyzer)
                    .map_err(|e| DataFusionError::Plan(format!("option text_columns: {e}")))?,
            ),
            None if dir.join(MANIFEST_FILE).is_file() => None,
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

/// The value of option `name` (with or without DataFusion's `format.` prefix).
fn option(cmd: &CreateExternalTable, name: &str) -> Option<String> {
    cmd.options
        .iter()
        .find(|(k, _)| k.as_str() == name || k.strip_prefix("format.") == Some(name))
        .map(|(_, v)| v.clone())
}

impl KbTableFactory {
    /// Opens the index in `dir`'s Meta-Knowledge side (creating it when `create`), if any.
    pub async fn attach_mk(&self, index: &Arc<KnowledgeIndex>, create: bool) -> Result<Option<MkAttachment>> {
        if !create && !MkIndex::exists(index.dir()) {
            return Ok(None);
        }
        let documents = index.clone();
        let mk = blocking(move || MkIndex::open_or_create(&documents)).await?;
        Ok(Some(MkAttachment {
            index: Arc::new(mk),
            services: self.mk_services.clone(),
        }))
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
        let index = if columns.fields().is_empty() {
            blocking(move || KnowledgeIndex::open(dir)).await?
        } else {
            let settings = self.settings(cmd, &dir)?;
            if meta_knowledge {
                let options = MkOptions::of(state.config_options());
                let schema = self
                    .mk_services
                    .generators
                    .schema(&options)
                    .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
                columns = document_columns(&columns, schema.data_type());
            }
            blocking(move || KnowledgeIndex::open_or_create(dir, &columns, &settings)).await?
        };
        let index = Arc::new(index);
        let mk = self.attach_mk(&index, meta_knowledge).await?;
        self.registry.insert(cmd.name.table(), index.clone(), mk.clone());
        Ok(Arc::new(KbTable::new(
            &cmd.name.to_string(),
            index,
            self.progress.clone(),
            mk,
        )))
    }
}
