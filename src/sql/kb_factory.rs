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
//!   `embedding`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::CreateExternalTable;

use super::KbRegistry;
use super::kb_table::{IngestProgress, KbTable, index_error};
use crate::index::{IndexSettings, KnowledgeIndex, Quantization};
use crate::models::ModelRegistry;

/// The `STORED AS` name of knowledge indexes.
pub const KB_FORMAT: &str = "KB";

/// Creates or opens knowledge indexes for `CREATE EXTERNAL TABLE … STORED AS KB`.
#[derive(Debug)]
pub struct KbTableFactory {
    data_dir: PathBuf,
    models: Arc<ModelRegistry>,
    registry: Arc<KbRegistry>,
    progress: Arc<IngestProgress>,
}

impl KbTableFactory {
    /// A factory placing relative locations under `data_dir`.
    pub fn new(
        data_dir: PathBuf,
        models: Arc<ModelRegistry>,
        registry: Arc<KbRegistry>,
        progress: Arc<IngestProgress>,
    ) -> Self {
        KbTableFactory {
            data_dir,
            models,
            registry,
            progress,
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

    fn settings(&self, cmd: &CreateExternalTable) -> Result<IndexSettings> {
        let option = |name: &str| {
            cmd.options
                .iter()
                .find(|(k, _)| k.as_str() == name || k.strip_prefix("format.") == Some(name))
                .map(|(_, v)| v.clone())
        };
        let known = ["model", "dimensions", "quantization", "key_column", "vector_column"];
        for key in cmd.options.keys() {
            let bare = key.strip_prefix("format.").unwrap_or(key);
            if !known.contains(&bare) {
                return plan_err!("unknown option '{bare}' for STORED AS KB (known: {})", known.join(", "));
            }
        }
        let model = option("model").unwrap_or_else(|| self.models.default_model().spec().name.clone());
        let dimensions = match option("dimensions") {
            Some(d) => {
                d.parse::<usize>().ok().filter(|d| *d > 0).ok_or_else(|| {
                    DataFusionError::Plan(format!("option dimensions: '{d}' is not a positive integer"))
                })?
            }
            None => match self.models.get(&model) {
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
        Ok(IndexSettings {
            model,
            dimensions,
            quantization,
            key_column: option("key_column").unwrap_or_else(|| "doc_id".into()),
            vector_column: option("vector_column").unwrap_or_else(|| "embedding".into()),
        })
    }
}

#[async_trait]
impl TableProviderFactory for KbTableFactory {
    async fn create(&self, _state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let [location] = cmd.locations.as_slice() else {
            return plan_err!("STORED AS KB takes one LOCATION (a directory)");
        };
        let dir = self.resolve(location);
        let columns = cmd.schema.as_arrow().clone();
        let index = if columns.fields().is_empty() {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || KnowledgeIndex::open(dir))
        } else {
            let settings = self.settings(cmd)?;
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || KnowledgeIndex::open_or_create(dir, &columns, &settings))
        }
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(index_error)?;
        let index = Arc::new(index);
        self.registry.insert(cmd.name.table(), index.clone());
        Ok(Arc::new(KbTable::new(index, self.progress.clone())))
    }
}
