//! `mkflow models add`: registers an ONNX model the user has (a cross-encoder reranker or an
//! embedding model) under the mkflow home, where the model registry finds it: its files are
//! copied into `models/<name>/` with a description, and the model is loaded and run once so a
//! model that cannot serve is refused now rather than at the first query.

use std::fs;
use std::path::{Path, PathBuf};

use mkflow_udfs::rerank::{RERANKER_SPEC_FILE, Reranker, RerankerSpec};
use mkflow_udfs::{BatchingStrategy, Device, Embedder, EmbeddingModelSpec, Pooling};

use crate::assets::{MODEL_SPEC_FILE, onnx_runtime_path};

/// What kind of model is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A cross-encoder scoring (query, text) pairs: `rerank()`, `rerank => N`.
    Reranker,
    /// An encoder whose pooled output is a text's vector: `OPTIONS ('model' 'name')`.
    Embedding,
}

/// A model to register.
#[derive(Debug, Clone)]
pub struct NewModel {
    /// Its kind.
    pub kind: ModelKind,
    /// The name queries and indexes use.
    pub name: String,
    /// The ONNX file.
    pub model: PathBuf,
    /// The Hugging Face `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Token limit of one input (special tokens included).
    pub max_tokens: usize,
    /// Embedding models: the vector length.
    pub dimensions: Option<usize>,
    /// Embedding models: how token vectors are pooled.
    pub pooling: Pooling,
    /// Embedding models: whether vectors are scaled to unit length.
    pub normalize: bool,
    /// Embedding models: how a query is written before it is embedded (`{text}`, `{instruction}`).
    pub query_template: Option<String>,
    /// Embedding models: how a document is written before it is embedded (`{text}`).
    pub document_template: Option<String>,
    /// Embedding models: the task instruction the templates' `{instruction}` stands for.
    pub instruction: Option<String>,
}

/// Why a model could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// A name that cannot be a directory name.
    #[error("model name '{0}' may hold only letters, digits, '.', '-' and '_'")]
    Name(String),
    /// The name is taken.
    #[error("a model called '{name}' is already registered in {} (remove that directory to replace it)", .dir.display())]
    Exists {
        /// The name.
        name: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A file is missing or could not be copied.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An option the kind needs is missing or wrong.
    #[error("{0}")]
    Option(String),
    /// The model failed to load or run: nothing was registered.
    #[error("the model does not work, nothing was registered: {0}")]
    Broken(String),
}

/// Copies `from` to `to`, naming the file that failed.
fn copy(from: &Path, to: &Path) -> Result<(), AddError> {
    fs::copy(from, to).map(drop).map_err(|source| AddError::Io {
        path: from.to_path_buf(),
        source,
    })
}

/// Checks that `name` can be a model's directory under the mkflow home: letters, digits, '.',
/// '-' and '_', not empty and not hidden.
pub fn check_model_name(name: &str) -> Result<(), AddError> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if name.is_empty() || !name.chars().all(valid) || name.starts_with('.') {
        return Err(AddError::Name(name.to_string()));
    }
    Ok(())
}

/// Registers `model` under `home`; returns its directory and what the test run gave.
pub fn add_model(home: &Path, model: &NewModel) -> Result<(PathBuf, String), AddError> {
    check_model_name(&model.name)?;
    let dir = home.join("models").join(&model.name);
    if dir.join(MODEL_SPEC_FILE).exists() || dir.join(RERANKER_SPEC_FILE).exists() {
        return Err(AddError::Exists {
            name: model.name.clone(),
            dir,
        });
    }
    if model.max_tokens < 2 {
        return Err(AddError::Option("--max-tokens must be at least 2".into()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AddError::Io { path, source }
    };
    for file in [&model.model, &model.tokenizer] {
        fs::metadata(file).map_err(io(file))?;
    }
    // Built beside its final place, then renamed: a failed add leaves nothing registered.
    let staging = home.join("models").join(format!(".adding-{}", model.name));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    let result = stage(model, &staging);
    match result {
        Ok(report) => {
            fs::rename(&staging, &dir).map_err(io(&dir))?;
            Ok((dir, report))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Copies the files into `dir`, writes the description, loads and runs the model once.
fn stage(model: &NewModel, dir: &Path) -> Result<String, AddError> {
    copy(&model.model, &dir.join("model.onnx"))?;
    // Weights stored beside the graph (ONNX external data) travel with it, under their names.
    if let (Some(parent), Some(stem)) = (model.model.parent(), model.model.file_name()) {
        for suffix in ["_data", ".data"] {
            let mut name = stem.to_os_string();
            name.push(suffix);
            let data = parent.join(&name);
            if data.is_file() {
                copy(&data, &dir.join(&name))?;
            }
        }
    }
    copy(&model.tokenizer, &dir.join("tokenizer.json"))?;
    let runtime = onnx_runtime_path(dir.parent().and_then(Path::parent).unwrap_or(dir));
    let runtime = runtime.is_file().then_some(runtime);
    let write = |file: &str, json: String| {
        fs::write(dir.join(file), json).map_err(|source| AddError::Io {
            path: dir.join(file),
            source,
        })
    };
    match model.kind {
        ModelKind::Reranker => {
            let spec = RerankerSpec {
                name: model.name.clone(),
                model_path: "model.onnx".into(),
                tokenizer_path: "tokenizer.json".into(),
                max_tokens: model.max_tokens,
                intra_threads: 0,
                device: Device::Cpu,
            };
            write(
                RERANKER_SPEC_FILE,
                serde_json::to_string_pretty(&spec).expect("serialises"),
            )?;
            let loaded = Reranker::load(
                RerankerSpec {
                    model_path: dir.join("model.onnx"),
                    tokenizer_path: dir.join("tokenizer.json"),
                    ..spec
                },
                runtime.as_deref(),
            )
            .map_err(|e| AddError::Broken(e.to_string()))?;
            let scores = loaded
                .score(
                    "what is mkflow",
                    &["mkflow turns documents into a knowledge base", "the weather is mild"],
                )
                .map_err(|e| AddError::Broken(e.to_string()))?;
            Ok(format!("test pair scores: {:.4}, {:.4}", scores[0], scores[1]))
        }
        ModelKind::Embedding => {
            let dimensions = model
                .dimensions
                .ok_or_else(|| AddError::Option("an embedding model needs --dimensions".into()))?;
            let spec = EmbeddingModelSpec {
                name: model.name.clone(),
                model_path: "model.onnx".into(),
                tokenizer_path: "tokenizer.json".into(),
                dimensions,
                pooling: model.pooling,
                normalize: model.normalize,
                max_tokens: model.max_tokens,
                batching: BatchingStrategy::default(),
                intra_threads: 0,
                device: Device::Cpu,
                latent_steps: None,
                query_template: model.query_template.clone(),
                document_template: model.document_template.clone(),
                instruction: model.instruction.clone(),
                chat_template: false,
            };
            write(
                MODEL_SPEC_FILE,
                serde_json::to_string_pretty(&spec).expect("serialises"),
            )?;
            let loaded = Embedder::load(
                EmbeddingModelSpec {
                    model_path: dir.join("model.onnx"),
                    tokenizer_path: dir.join("tokenizer.json"),
                    ..spec
                },
                runtime.as_deref(),
            )
            .map_err(|e| AddError::Broken(e.to_string()))?;
            let vector = loaded
                .embed_query("mkflow turns documents into a knowledge base")
                .map_err(|e| AddError::Broken(e.to_string()))?;
            Ok(format!("test text embedded: {} dimensions", vector.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_is_a_plain_visible_directory_name() {
        assert!(check_model_name("smol-laser_1.0").is_ok());
        for bad in ["", ".hidden", "a/b", "../up", "with space"] {
            assert!(matches!(check_model_name(bad), Err(AddError::Name(_))), "{bad:?}");
        }
    }
}
