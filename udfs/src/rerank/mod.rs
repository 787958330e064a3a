//! Cross-encoder reranking: a BERT-like ONNX model that reads a query and a text together and
//! scores how well the text answers the query — slower than comparing vectors, so it reorders
//! the top of a list another search found.
//!
//! - [`RerankerSpec`] is the model's description (`mkflow-reranker.json` beside it, written by
//!   `mkflow models add --kind reranker`);
//! - [`Reranker`] runs it (pairs tokenised together, truncated longest-first to the model's
//!   limit, padded per batch); the score is the model's logit (one output), or the log-odds
//!   of the second class against the first (two outputs);
//! - [`LazyReranker`] loads it on first use; [`RerankUdf`] is `rerank(query, text [, model])`.

mod udf;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::runtime::{Device, build_session, init_onnx_runtime};

pub use udf::RerankUdf;

/// The file describing a reranker, in its directory.
pub const RERANKER_SPEC_FILE: &str = "mkflow-reranker.json";

/// Pairs scored per model call.
const PAIRS_PER_CALL: usize = 16;

/// Everything needed to load and run a cross-encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankerSpec {
    /// The name `rerank(…, 'name')` and `reranker => 'name'` use.
    pub name: String,
    /// The ONNX model file.
    pub model_path: PathBuf,
    /// The Hugging Face `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// Query and text together are truncated (longest first) to this many tokens, special
    /// tokens included.
    pub max_tokens: usize,
    /// Threads ONNX Runtime uses inside one model call; 0 means one per available core.
    #[serde(default)]
    pub intra_threads: usize,
    /// Where the model runs.
    #[serde(default)]
    pub device: Device,
}

/// Why reranking failed.
#[derive(Debug, thiserror::Error)]
pub enum RerankError {
    /// The model or its tokenizer could not be loaded.
    #[error("reranker {model}: {message}")]
    Model {
        /// The reranker's name.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// Running the model failed.
    #[error("reranker {model}: {message}")]
    Inference {
        /// The reranker's name.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// No reranker of that name (or none at all) is registered.
    #[error("{0}")]
    Unknown(String),
}

/// The graph's input names.
#[derive(Debug)]
struct Inputs {
    input_ids: String,
    attention_mask: Option<String>,
    token_type_ids: Option<String>,
}

/// A loaded cross-encoder.
pub struct Reranker {
    spec: RerankerSpec,
    tokenizer: Tokenizer,
    session: Mutex<Session>,
    inputs: Inputs,
    output: String,
    pad_id: i64,
}

impl std::fmt::Debug for Reranker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reranker")
            .field("model", &self.spec.name)
            .field("inputs", &self.inputs)
            .finish()
    }
}

impl Reranker {
    /// Loads the tokenizer and the model (ONNX Runtime from `onnx_runtime` when the process
    /// has not loaded one yet).
    pub fn load(spec: RerankerSpec, onnx_runtime: Option<&Path>) -> Result<Self, RerankError> {
        let error = |message: String| RerankError::Model {
            model: spec.name.clone(),
            message,
        };
        for (what, path) in [("model", &spec.model_path), ("tokenizer", &spec.tokenizer_path)] {
            if !path.is_file() {
                return Err(error(format!("{what} file {} not found", path.display())));
            }
        }
        let mut tokenizer = Tokenizer::from_file(&spec.tokenizer_path)
            .map_err(|e| error(format!("cannot read {}: {e}", spec.tokenizer_path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| error(format!("bad truncation setting: {e}")))?;
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0) as i64;
        let environment = init_onnx_runtime(onnx_runtime).map_err(|e| error(e.to_string()))?;
        let threads = crate::runtime::resolve_threads(spec.intra_threads);
        let loaded =
            build_session(environment, &spec.model_path, threads, spec.device).map_err(|e| error(e.to_string()))?;
        let names: Vec<String> = loaded.session.inputs().iter().map(|i| i.name().to_string()).collect();
        let find = |name: &str| names.iter().find(|n| *n == name).cloned();
        let input_ids =
            find("input_ids").ok_or_else(|| error(format!("the model has no input_ids input (inputs: {names:?})")))?;
        let output = loaded
            .session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .find(|n| n == "logits")
            .or_else(|| loaded.session.outputs().first().map(|o| o.name().to_string()))
            .ok_or_else(|| error("the model has no outputs".into()))?;
        Ok(Reranker {
            inputs: Inputs {
                input_ids,
                attention_mask: find("attention_mask"),
                token_type_ids: find("token_type_ids"),
            },
            output,
            pad_id,
            session: Mutex::new(loaded.session),
            tokenizer,
            spec,
        })
    }

    /// The model's description.
    pub fn spec(&self) -> &RerankerSpec {
        &self.spec
    }

    /// How well each of `texts` answers `query` (higher is better).
    pub fn score(&self, query: &str, texts: &[&str]) -> Result<Vec<f32>, RerankError> {
        let mut scores = Vec::with_capacity(texts.len());
        for batch in texts.chunks(PAIRS_PER_CALL) {
            let pairs: Vec<(String, String)> = batch.iter().map(|t| (query.to_string(), t.to_string())).collect();
            let encodings = self
                .tokenizer
                .encode_batch_fast(pairs, true)
                .map_err(|e| self.inference(format!("tokenizing failed: {e}")))?;
            scores.extend(self.run(&encodings)?);
        }
        Ok(scores)
    }

    fn inference(&self, message: String) -> RerankError {
        RerankError::Inference {
            model: self.spec.name.clone(),
            message,
        }
    }

    /// One model call over tokenised pairs: one score each.
    fn run(&self, encodings: &[Encoding]) -> Result<Vec<f32>, RerankError> {
        let rows = encodings.len();
        let width = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; rows * width];
        let mut mask = vec![0i64; rows * width];
        let mut type_ids = vec![0i64; rows * width];
        for (r, encoding) in encodings.iter().enumerate() {
            for (c, (&id, &ty)) in encoding.get_ids().iter().zip(encoding.get_type_ids()).enumerate() {
                ids[r * width + c] = id as i64;
                mask[r * width + c] = 1;
                type_ids[r * width + c] = ty as i64;
            }
        }
        let tensor = |data| input_tensor([rows, width], data).map_err(|e| self.inference(e.to_string()));
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            vec![(Cow::from(self.inputs.input_ids.as_str()), tensor(&ids)?)];
        if let Some(name) = &self.inputs.attention_mask {
            inputs.push((Cow::from(name.as_str()), tensor(&mask)?));
        }
        if let Some(name) = &self.inputs.token_type_ids {
            inputs.push((Cow::from(name.as_str()), tensor(&type_ids)?));
        }
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run(inputs).map_err(|e| self.inference(e.to_string()))?;
        let (shape, logits) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| self.inference(e.to_string()))?;
        let classes = match shape.len() {
            1 => 1,
            2 => shape[1] as usize,
            _ => 0,
        };
        if shape.first().copied() != Some(rows as i64) || !(1..=2).contains(&classes) {
            return Err(self.inference(format!(
                "expected one or two logits per pair, got output shape {shape:?}"
            )));
        }
        Ok(logits
            .chunks(classes)
            .map(|row| if classes == 1 { row[0] } else { row[1] - row[0] })
            .collect())
    }
}

/// A reranker loaded on first use (load errors are reported to that call and retried by the
/// next).
#[derive(Debug)]
pub struct LazyReranker {
    spec: RerankerSpec,
    onnx_runtime: Option<PathBuf>,
    loaded: OnceLock<Arc<Reranker>>,
    loading: Mutex<()>,
}

impl LazyReranker {
    /// A reranker for `spec`, loading ONNX Runtime from `onnx_runtime` when needed.
    pub fn new(spec: RerankerSpec, onnx_runtime: Option<PathBuf>) -> Self {
        LazyReranker {
            spec,
            onnx_runtime,
            loaded: OnceLock::new(),
            loading: Mutex::new(()),
        }
    }

    /// The model's description.
    pub fn spec(&self) -> &RerankerSpec {
        &self.spec
    }

    /// The loaded model, loading it now if needed (blocks: call it off the async runtime).
    pub fn get(&self) -> Result<Arc<Reranker>, RerankError> {
        if let Some(model) = self.loaded.get() {
            return Ok(model.clone());
        }
        let _loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = self.loaded.get() {
            return Ok(model.clone());
        }
        let model = Arc::new(Reranker::load(self.spec.clone(), self.onnx_runtime.as_deref())?);
        Ok(self.loaded.get_or_init(|| model).clone())
    }

    /// Scores `texts` against `query` on tokio's blocking pool (loading the model first if
    /// needed): model work never runs on an async executor thread.
    pub async fn score_blocking(self: &Arc<Self>, query: String, texts: Vec<String>) -> Result<Vec<f32>, RerankError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            this.get()?.score(&query, &texts)
        })
        .await
        .map_err(|e| RerankError::Inference {
            model: self.spec.name.clone(),
            message: e.to_string(),
        })?
    }
}

/// The registered rerankers, by name.
#[derive(Debug, Default, Clone)]
pub struct Rerankers {
    models: std::collections::BTreeMap<String, Arc<LazyReranker>>,
}

impl Rerankers {
    /// Rerankers from their descriptions.
    pub fn new(specs: Vec<RerankerSpec>, onnx_runtime: Option<PathBuf>) -> Self {
        Rerankers {
            models: specs
                .into_iter()
                .map(|spec| {
                    (
                        spec.name.clone(),
                        Arc::new(LazyReranker::new(spec, onnx_runtime.clone())),
                    )
                })
                .collect(),
        }
    }

    /// Every reranker, by name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LazyReranker>> {
        self.models.values()
    }

    /// The reranker called `name`, or without a name the only one registered.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<LazyReranker>, RerankError> {
        const HINT: &str = "register a cross-encoder with `mkflow models add --kind reranker --name NAME --onnx model.onnx --tokenizer tokenizer.json`";
        let known = || self.models.keys().cloned().collect::<Vec<_>>().join(", ");
        match name {
            Some(name) => self.models.get(name).cloned().ok_or_else(|| {
                RerankError::Unknown(format!("no reranker called '{name}' (known: {}); {HINT}", known()))
            }),
            None => match self.models.len() {
                1 => Ok(self.models.values().next().expect("one").clone()),
                0 => Err(RerankError::Unknown(format!("no reranker is registered: {HINT}"))),
                _ => Err(RerankError::Unknown(format!(
                    "several rerankers are registered ({}): name one",
                    known()
                ))),
            },
        }
    }
}

/// A borrowed `[rows, width]` int64 tensor as a session input.
fn input_tensor(shape: [usize; 2], data: &[i64]) -> ort::Result<SessionInputValue<'_>> {
    TensorRef::from_array_view((shape, data)).map(SessionInputValue::from)
}
