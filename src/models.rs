//! The models a session can use, by name: embedding models and rerankers; and the query
//! adapters of the indexes they search ([`crate::adapter`]).
//!
//! The catalog's default model is always known (its files may still need `mkflow models
//! pull`); any directory `models/<name>/` under the mkflow home holding a `mkflow-model.json`
//! adds an embedding model, one holding a `mkflow-reranker.json` a cross-encoder reranker
//! (relative paths in them are resolved against that directory). `mkflow models add` writes
//! such directories.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mkflow_udfs::rerank::{RERANKER_SPEC_FILE, RerankerSpec, Rerankers};
use mkflow_udfs::{EmbeddingModelSpec, LazyEmbedder};

use crate::adapter::Adapters;
use crate::assets::{DEFAULT_MODEL, MODEL_SPEC_FILE, catalog_spec};
use mkflow_index::KnowledgeIndex;

/// Models by name, loaded lazily.
#[derive(Debug)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<LazyEmbedder>>,
    default: String,
    rerankers: Rerankers,
    adapters: Adapters,
}

/// Why the model registry could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A `mkflow-model.json` could not be read.
    #[error("{path}: {source}")]
    Unreadable {
        /// The description file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `mkflow-model.json` is not a valid model description.
    #[error("{path} is not a valid model description: {source}")]
    Invalid {
        /// The description file.
        path: PathBuf,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// The default model asked for is not installed.
    #[error("unknown model '{name}' (known: {known})")]
    Unknown {
        /// The model asked for.
        name: String,
        /// The installed models, comma-separated.
        known: String,
    },
}

impl ModelRegistry {
    /// The catalog model plus every model described under `home/models`. `default` names the
    /// model `embed()` uses (the catalog default when `None`); `threads` sets ONNX Runtime's
    /// intra-op threads for models that do not set their own.
    pub fn discover(
        home: &Path,
        onnx_runtime: PathBuf,
        default: Option<&str>,
        threads: Option<usize>,
    ) -> Result<Self, ModelError> {
        let mut specs = vec![catalog_spec(home, &DEFAULT_MODEL)];
        let mut reranker_specs = Vec::new();
        if let Ok(entries) = fs::read_dir(home.join("models")) {
            for entry in entries.flatten() {
                let path = entry.path().join(MODEL_SPEC_FILE);
                if path.is_file() {
                    specs.push(read_spec(&path)?);
                }
                let path = entry.path().join(RERANKER_SPEC_FILE);
                if path.is_file() {
                    let mut spec: RerankerSpec = read_json(&path)?;
                    resolve_paths(&path, [&mut spec.model_path, &mut spec.tokenizer_path]);
                    if spec.intra_threads == 0 {
                        spec.intra_threads = threads.unwrap_or(0);
                    }
                    reranker_specs.push(spec);
                }
            }
        }
        let rerankers = Rerankers::new(reranker_specs, Some(onnx_runtime.clone()));
        let models = specs
            .into_iter()
            .map(|mut spec| {
                if spec.intra_threads == 0 {
                    spec.intra_threads = threads.unwrap_or(0);
                }
                spec
            })
            .map(|spec| {
                (
                    spec.name.clone(),
                    Arc::new(LazyEmbedder::new(spec, Some(onnx_runtime.clone()))),
                )
            })
            .collect::<BTreeMap<_, _>>();
        let default = default.unwrap_or(DEFAULT_MODEL.name).to_string();
        if !models.contains_key(&default) {
            return Err(ModelError::Unknown {
                name: default,
                known: models.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(ModelRegistry {
            models,
            default,
            rerankers,
            adapters: Adapters::default(),
        })
    }

    /// The installed models' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LazyEmbedder>> {
        self.models.get(name).cloned()
    }

    /// The model `index` was built with (its queries and questions are embedded with it).
    pub fn model_of(&self, index: &KnowledgeIndex) -> datafusion::common::Result<Arc<LazyEmbedder>> {
        let name = index.manifest().model;
        self.get(&name).ok_or_else(|| {
            datafusion::common::DataFusionError::Plan(format!(
                "index '{}' was built with model '{name}', which is not installed",
                index.dir().display()
            ))
        })
    }

    /// The model `embed()` uses.
    pub fn default_model(&self) -> Arc<LazyEmbedder> {
        self.models[&self.default].clone()
    }

    /// All known embedding models.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LazyEmbedder>> {
        self.models.values()
    }

    /// The query adapters of the indexes searched.
    pub fn adapters(&self) -> &Adapters {
        &self.adapters
    }

    /// A text query as a vector searching `index`'s rows: embedded as a query by the index's
    /// model, then mapped by the index's query adapter when it has one.
    pub async fn search_vector(&self, index: &KnowledgeIndex, text: &str) -> datafusion::common::Result<Vec<f32>> {
        let external = |e| datafusion::common::DataFusionError::External(Box::new(e));
        let queue = self.model_of(index)?.get_async().await.map_err(external)?;
        let vector = queue.embed_query(text).await.map_err(external)?;
        Ok(self.adapters.adapt(index, vector))
    }

    /// The registered rerankers.
    pub fn rerankers(&self) -> &Rerankers {
        &self.rerankers
    }
}

/// Reads a JSON model description.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = fs::read_to_string(path).map_err(|source| ModelError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Resolves relative file paths of the description at `path` against its directory.
fn resolve_paths<const N: usize>(path: &Path, files: [&mut PathBuf; N]) {
    let dir = path.parent().unwrap_or(Path::new("."));
    for file in files {
        if file.is_relative() {
            *file = dir.join(&*file);
        }
    }
}

/// Reads a `mkflow-model.json`, resolving relative file paths against its directory.
pub fn read_spec(path: &Path) -> Result<EmbeddingModelSpec, ModelError> {
    let mut spec: EmbeddingModelSpec = read_json(path)?;
    resolve_paths(path, [&mut spec.model_path, &mut spec.tokenizer_path]);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_models_are_discovered_with_paths_relative_to_their_directory() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("models/tiny");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(MODEL_SPEC_FILE),
            r#"{"name": "tiny", "model_path": "model.onnx", "tokenizer_path": "tokenizer.json",
                "dimensions": 32, "pooling": "cls", "normalize": false, "max_tokens": 64}"#,
        )
        .unwrap();
        let registry =
            ModelRegistry::discover(home.path(), PathBuf::from("libonnxruntime.so"), Some("tiny"), Some(3)).unwrap();
        let spec = registry.default_model().spec().clone();
        assert_eq!(spec.dimensions, 32);
        assert_eq!(spec.intra_threads, 3);
        assert_eq!(spec.model_path, dir.join("model.onnx"));
        assert!(registry.get(DEFAULT_MODEL.name).is_some());
        let err = ModelRegistry::discover(home.path(), PathBuf::from("x"), Some("nope"), None).unwrap_err();
        assert!(err.to_string().contains("unknown model 'nope'"), "{err}");
    }
}
