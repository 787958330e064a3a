//! One loaded embedding model: tokenizer + ONNX Runtime session + pooling.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{EmbeddingModelSpec, Pooling, Prompts, TextRole};
use crate::decoder::{ChatTemplate, DecoderModel, Graph};
use crate::runtime::{Device, RuntimeError, build_session, init_onnx_runtime};

/// Errors raised while loading or running an embedding model.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A model file is missing or unreadable.
    #[error("embedding model '{model}': {message}")]
    Model {
        /// The model's name.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// Tokenisation failed.
    #[error("tokenizer of '{model}': {message}")]
    Tokenizer {
        /// The model's name.
        model: String,
        /// What the tokenizer said.
        message: String,
    },
    /// ONNX Runtime failed while running the model.
    #[error("running '{model}': {message}")]
    Inference {
        /// The model's name.
        model: String,
        /// What ONNX Runtime said.
        message: String,
    },
}

/// Embeddings of a list of texts: `vectors` holds `dimensions` floats per text, row-major;
/// texts that had no content (null, empty or whitespace) are `false` in `present` and zero in
/// `vectors`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Vector length.
    pub dimensions: usize,
    /// `dimensions` floats per input text.
    pub vectors: Vec<f32>,
    /// Whether each input text got an embedding.
    pub present: Vec<bool>,
    /// Tokens fed to the model (after truncation, before padding); texts whose vectors were
    /// still in the recent-texts cache cost none.
    pub tokens: usize,
}

impl Embeddings {
    /// The vector of text `i`, if it has one.
    pub fn get(&self, i: usize) -> Option<&[f32]> {
        self.present[i].then(|| &self.vectors[i * self.dimensions..(i + 1) * self.dimensions])
    }
}

/// The names of the model's inputs and the output used for pooling.
#[derive(Debug)]
struct ModelIo {
    input_ids: String,
    attention_mask: Option<String>,
    token_type_ids: Option<String>,
    output: String,
}

/// Texts embedded most recently: a pipeline that embeds a document (`embed`) and classifies
/// it (`mk_metadata`) pays for one model call, and repeated queries for none. Keyed by the text
/// the model reads, its role's template applied, so a query and a document of the same words
/// share a vector only when the model writes them alike.
#[derive(Debug, Default)]
struct RecentVectors {
    vectors: HashMap<Arc<str>, Arc<[f32]>>,
    order: VecDeque<Arc<str>>,
}

/// Texts whose vectors [`RecentVectors`] keeps.
const RECENT_VECTORS: usize = 8192;

impl RecentVectors {
    fn get(&self, text: &str) -> Option<Arc<[f32]>> {
        self.vectors.get(text).cloned()
    }

    fn insert(&mut self, text: &str, vector: &[f32]) {
        let text: Arc<str> = Arc::from(text);
        if self.vectors.insert(text.clone(), Arc::from(vector)).is_none() {
            self.order.push_back(text);
        }
        while self.order.len() > RECENT_VECTORS {
            if let Some(old) = self.order.pop_front() {
                self.vectors.remove(&old);
            }
        }
    }
}

/// What an [`Embedder`] has done since it was loaded (for metrics).
#[derive(Debug, Default)]
pub struct EmbedderStats {
    /// Texts run through the model (recent-texts cache hits excluded).
    pub texts: std::sync::atomic::AtomicU64,
    /// Tokens fed to the model.
    pub tokens: std::sync::atomic::AtomicU64,
    /// Nanoseconds spent in model calls.
    pub model_nanos: std::sync::atomic::AtomicU64,
    /// Model calls (batches run through the model).
    pub calls: std::sync::atomic::AtomicU64,
}

/// How an [`Embedder`] turns token ids into vectors.
enum Backend {
    /// An encoder (BERT-like) graph whose token vectors are pooled.
    Encoder {
        session: Mutex<Session>,
        io: ModelIo,
        pad_id: i64,
    },
    /// An exported decoder's latent graph: LaSER latent steps, then the mean of the soft tokens'
    /// hidden states (the last token's for 0 steps).
    Latent { model: Box<DecoderModel>, steps: usize },
}

/// A loaded embedding model, shared by every query and pipeline of a process.
pub struct Embedder {
    spec: EmbeddingModelSpec,
    tokenizer: Tokenizer,
    prompts: Prompts,
    backend: Backend,
    device: Device,
    recent: Mutex<RecentVectors>,
    stats: EmbedderStats,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("Embedder");
        s.field("model", &self.spec.name).field("device", &self.device);
        match &self.backend {
            Backend::Encoder { io, .. } => s.field("io", io),
            Backend::Latent { steps, .. } => s.field("latent_steps", steps),
        };
        s.finish()
    }
}

impl Embedder {
    /// Loads the tokenizer and creates the ONNX Runtime session. `onnx_runtime` names the
    /// `libonnxruntime` file when the process has not loaded one yet (else `ORT_DYLIB_PATH`).
    pub fn load(spec: EmbeddingModelSpec, onnx_runtime: Option<&Path>) -> Result<Self, EmbedError> {
        let model_error = |message: String| EmbedError::Model {
            model: spec.name.clone(),
            message,
        };
        for (what, path) in [("model", &spec.model_path), ("tokenizer", &spec.tokenizer_path)] {
            if !path.is_file() {
                return Err(model_error(format!(
                    "{what} file {} not found (hint: `mkflow models pull`)",
                    path.display()
                )));
            }
        }
        let mut tokenizer = Tokenizer::from_file(&spec.tokenizer_path)
            .map_err(|e| model_error(format!("cannot read {}: {e}", spec.tokenizer_path.display())))?;
        // tokenizer.json files often hard-code padding and truncation; we pad per call and
        // truncate to the spec's limit instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| model_error(format!("bad truncation setting: {e}")))?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0) as i64;

        let (backend, device, chat) = match spec.latent_steps {
            None => {
                let environment = init_onnx_runtime(onnx_runtime)?;
                let loaded = build_session(environment, &spec.model_path, spec.resolved_threads(), spec.device)
                    .map_err(|e| model_error(e.to_string()))?;
                let io = model_io(&loaded.session).map_err(|e| model_error(e.to_string()))?;
                let session = Mutex::new(loaded.session);
                (Backend::Encoder { session, io, pad_id }, loaded.device, None)
            }
            Some(0) => {
                return Err(model_error(
                    "latent_steps must be at least 1: it is LaSER's K, the hidden states pooled (1 is plain \
                     last-token pooling, 3 LaSER's default)"
                        .into(),
                ));
            }
            Some(_) if spec.pooling != Pooling::LastToken => {
                return Err(model_error(format!(
                    "a latent decoder pools its last token and soft tokens, so \"pooling\" must be \"last_token\", not {:?}",
                    spec.pooling
                )));
            }
            Some(steps) => {
                let dir = spec.model_path.parent().unwrap_or(Path::new("."));
                let model = DecoderModel::load(dir, Graph::Latent, spec.resolved_threads(), spec.device, onnx_runtime)
                    .map_err(|e| model_error(e.to_string()))?;
                if model.config().hidden_size != spec.dimensions {
                    return Err(model_error(format!(
                        "the decoder's hidden size is {}, the model description says {} dimensions",
                        model.config().hidden_size,
                        spec.dimensions
                    )));
                }
                // The prompt and its K − 1 soft tokens must fit the decoder's context.
                let room = model.config().max_position.saturating_sub(steps - 1).max(1);
                if room < spec.max_tokens {
                    tokenizer
                        .with_truncation(Some(TruncationParams {
                            max_length: room,
                            ..Default::default()
                        }))
                        .map_err(|e| model_error(format!("bad truncation setting: {e}")))?;
                }
                let device = model.device();
                let chat = match &model.config().chat_template {
                    Some(source) if spec.chat_template => Some(
                        ChatTemplate::new(
                            source,
                            model.config().bos_token.as_deref(),
                            model.config().eos_token.as_deref(),
                        )
                        .map_err(|e| model_error(e.to_string()))?,
                    ),
                    _ => None,
                };
                (
                    Backend::Latent {
                        model: Box::new(model),
                        steps,
                    },
                    device,
                    chat,
                )
            }
        };
        let prompts = Prompts::new(&spec, chat.as_ref()).map_err(model_error)?;
        Ok(Embedder {
            spec,
            tokenizer,
            prompts,
            backend,
            device,
            recent: Mutex::new(RecentVectors::default()),
            stats: EmbedderStats::default(),
        })
    }

    /// Where the model runs (after any fallback to the CPU).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The model's description.
    pub fn spec(&self) -> &EmbeddingModelSpec {
        &self.spec
    }

    /// Tokenises texts (truncated to the model's limit); returns one encoding per text.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Encoding>, EmbedError> {
        self.tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer {
                model: self.spec.name.clone(),
                message: e.to_string(),
            })
    }

    /// Texts, tokens and model time since the model was loaded.
    pub fn stats(&self) -> &EmbedderStats {
        &self.stats
    }

    /// Forgets the recently embedded texts, so the next calls run the model for every text
    /// (benchmarks measure the model, not the cache).
    pub fn forget_recent(&self) {
        *self.recent.lock().unwrap_or_else(|e| e.into_inner()) = RecentVectors::default();
    }

    /// Embeds documents ([`Embedder::embed_as`] in [`TextRole::Document`]).
    pub fn embed(&self, texts: &[Option<&str>]) -> Result<Embeddings, EmbedError> {
        self.embed_as(texts, TextRole::Document)
    }

    /// Embeds texts in `role` (written with its template first). `None`, empty and
    /// whitespace-only texts get no vector (see [`Embeddings::present`]); texts longer than the
    /// model's `max_tokens` are truncated.
    ///
    /// This runs the model on the calling thread. Queries and pipelines go through the model's
    /// [`EmbedQueue`](super::EmbedQueue) instead, which batches concurrent callers.
    pub fn embed_as(&self, texts: &[Option<&str>], role: TextRole) -> Result<Embeddings, EmbedError> {
        let (mut out, misses) = self.recalled(texts, role);
        if misses.is_empty() {
            return Ok(out);
        }
        let contents: Vec<&str> = misses.iter().map(|(_, text)| text.as_ref()).collect();
        let encodings = self.tokenize(&contents)?;
        let lengths: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
        out.tokens = lengths.iter().sum();
        let started = std::time::Instant::now();
        for call in self.spec.batching.plan(&lengths) {
            let batch: Vec<&Encoding> = call.iter().map(|&i| &encodings[i]).collect();
            let pooled = self.run_encoded(&batch)?;
            let placed: Vec<(usize, &str)> = call.iter().map(|&i| (misses[i].0, misses[i].1.as_ref())).collect();
            self.place(&mut out, &placed, &pooled);
        }
        self.record(contents.len(), out.tokens, started.elapsed());
        Ok(out)
    }

    /// `texts` written for `role` — as the model reads them — and the answer as far as the
    /// recent-texts cache knows it, with the written texts it does not know (and their
    /// positions), which still need the model. Texts without content are neither.
    pub(crate) fn recalled<'t>(
        &self,
        texts: &[Option<&'t str>],
        role: TextRole,
    ) -> (Embeddings, Vec<(usize, Cow<'t, str>)>) {
        let dims = self.spec.dimensions;
        let mut out = Embeddings {
            dimensions: dims,
            vectors: vec![0.0; texts.len() * dims],
            present: vec![false; texts.len()],
            tokens: 0,
        };
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let misses = texts
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                t.filter(|s| !s.trim().is_empty())
                    .map(|s| (i, self.prompts.render(role, s)))
            })
            .filter(|(slot, text)| match recent.get(text) {
                Some(vector) => {
                    out.vectors[slot * dims..(slot + 1) * dims].copy_from_slice(&vector);
                    out.present[*slot] = true;
                    false
                }
                None => true,
            })
            .collect();
        (out, misses)
    }

    /// Puts the pooled vectors of one model call (one per `(slot, text)`, in order) into `out`
    /// and remembers them in the recent-texts cache.
    pub(crate) fn place(&self, out: &mut Embeddings, texts: &[(usize, &str)], pooled: &[f32]) {
        let dims = self.spec.dimensions;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for (row, &(slot, text)) in texts.iter().enumerate() {
            let vector = &pooled[row * dims..(row + 1) * dims];
            out.vectors[slot * dims..(slot + 1) * dims].copy_from_slice(vector);
            out.present[slot] = true;
            recent.insert(text, vector);
        }
    }

    /// Counts texts and tokens run through the model and the time it took.
    pub(crate) fn record(&self, texts: usize, tokens: usize, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.texts.fetch_add(texts as u64, Relaxed);
        self.stats.tokens.fetch_add(tokens as u64, Relaxed);
        self.stats.model_nanos.fetch_add(elapsed.as_nanos() as u64, Relaxed);
    }

    /// Embeds one query (the query template applied) on the calling thread; errors when the
    /// text is empty.
    pub fn embed_query(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let embeddings = self.embed_as(&[Some(text)], TextRole::Query)?;
        embeddings
            .get(0)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| EmbedError::Inference {
                model: self.spec.name.clone(),
                message: "cannot embed an empty text".into(),
            })
    }

    /// Runs one model call over already-tokenised texts and returns the pooled, optionally
    /// normalised vectors, `dimensions` floats per text.
    pub fn run_encoded(&self, batch: &[&Encoding]) -> Result<Vec<f32>, EmbedError> {
        let dims = self.spec.dimensions;
        self.stats.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut pooled = match &self.backend {
            Backend::Encoder { session, io, pad_id } => self.run_encoder(session, io, *pad_id, batch)?,
            Backend::Latent { model, steps } => {
                let ids: Vec<&[u32]> = batch.iter().map(|e| e.get_ids()).collect();
                model
                    .latent_embeddings(&ids, *steps)
                    .map_err(|e| EmbedError::Inference {
                        model: self.spec.name.clone(),
                        message: e.to_string(),
                    })?
            }
        };
        if pooled.len() != batch.len() * dims {
            return Err(EmbedError::Inference {
                model: self.spec.name.clone(),
                message: format!(
                    "model produced {} values per text, spec says {dims}",
                    pooled.len() / batch.len().max(1)
                ),
            });
        }
        if self.spec.normalize {
            pooled.chunks_mut(dims).for_each(l2_normalize);
        }
        Ok(pooled)
    }

    /// An encoder call: texts right-padded to the longest, token vectors pooled.
    fn run_encoder(
        &self,
        session: &Mutex<Session>,
        io: &ModelIo,
        pad_id: i64,
        batch: &[&Encoding],
    ) -> Result<Vec<f32>, EmbedError> {
        let rows = batch.len();
        let width = batch.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; rows * width];
        let mut mask = vec![0i64; rows * width];
        let mut type_ids = vec![0i64; rows * width];
        for (r, encoding) in batch.iter().enumerate() {
            let base = r * width;
            for (c, (&id, &ty)) in encoding.get_ids().iter().zip(encoding.get_type_ids()).enumerate() {
                ids[base + c] = id as i64;
                mask[base + c] = 1;
                type_ids[base + c] = ty as i64;
            }
        }
        let inference_error = |message: String| EmbedError::Inference {
            model: self.spec.name.clone(),
            message,
        };
        let shape = [rows, width];
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![(
            Cow::from(io.input_ids.as_str()),
            input_tensor(shape, &ids).map_err(|e| inference_error(e.to_string()))?,
        )];
        if let Some(name) = &io.attention_mask {
            inputs.push((
                Cow::from(name.as_str()),
                input_tensor(shape, &mask).map_err(|e| inference_error(e.to_string()))?,
            ));
        }
        if let Some(name) = &io.token_type_ids {
            inputs.push((
                Cow::from(name.as_str()),
                input_tensor(shape, &type_ids).map_err(|e| inference_error(e.to_string()))?,
            ));
        }
        let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run(inputs).map_err(|e| inference_error(e.to_string()))?;
        let (out_shape, hidden) = outputs[io.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| inference_error(e.to_string()))?;
        match out_shape.len() {
            // Already pooled by the model: [rows, dims].
            2 => Ok(hidden.to_vec()),
            3 => Ok(pool(
                hidden,
                &mask,
                rows,
                width,
                out_shape[2] as usize,
                self.spec.pooling,
            )),
            _ => Err(inference_error(format!("unexpected output shape {out_shape:?}"))),
        }
    }
}

/// A borrowed `[rows, width]` int64 tensor as a session input.
fn input_tensor(shape: [usize; 2], data: &[i64]) -> ort::Result<SessionInputValue<'_>> {
    TensorRef::from_array_view((shape, data)).map(SessionInputValue::from)
}

/// How an encoder graph departs from the usual Hugging Face encoder contract.
#[derive(Debug, thiserror::Error)]
enum ModelIoError {
    /// No `input_ids` input; the graph's inputs are listed.
    #[error("model has no input_ids input (inputs: {0:?})")]
    NoInputIds(Vec<String>),
    /// No output at all to pool.
    #[error("model has no outputs")]
    NoOutputs,
}

/// Finds the input names and the output to pool, failing with a clear message for a model
/// that does not follow the usual Hugging Face encoder contract.
fn model_io(session: &Session) -> Result<ModelIo, ModelIoError> {
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let find = |name: &str| inputs.iter().find(|i| **i == name).map(|s| s.to_string());
    let input_ids =
        find("input_ids").ok_or_else(|| ModelIoError::NoInputIds(inputs.iter().map(|s| s.to_string()).collect()))?;
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let output = ["sentence_embedding", "last_hidden_state", "token_embeddings"]
        .iter()
        .find(|name| outputs.contains(name))
        .map(|s| s.to_string())
        .or_else(|| outputs.first().map(|s| s.to_string()))
        .ok_or(ModelIoError::NoOutputs)?;
    Ok(ModelIo {
        input_ids,
        attention_mask: find("attention_mask"),
        token_type_ids: find("token_type_ids"),
        output,
    })
}

/// Pools `[rows, width, hidden]` token vectors into `[rows, hidden]` under the mask.
fn pool(hidden: &[f32], mask: &[i64], rows: usize, width: usize, dims: usize, pooling: Pooling) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * dims];
    for r in 0..rows {
        let target = &mut out[r * dims..(r + 1) * dims];
        let token = |c: usize| &hidden[(r * width + c) * dims..(r * width + c + 1) * dims];
        let row_mask = &mask[r * width..(r + 1) * width];
        match pooling {
            Pooling::Cls => target.copy_from_slice(token(0)),
            Pooling::LastToken => {
                let last = row_mask.iter().rposition(|&m| m != 0).unwrap_or(0);
                target.copy_from_slice(token(last));
            }
            Pooling::Mean => {
                let mut count = 0usize;
                for (c, _) in row_mask.iter().enumerate().filter(|(_, m)| **m != 0) {
                    target.iter_mut().zip(token(c)).for_each(|(t, v)| *t += v);
                    count += 1;
                }
                let scale = 1.0 / count.max(1) as f32;
                target.iter_mut().for_each(|t| *t *= scale);
            }
        }
    }
    out
}

/// Scales a vector to unit length (a zero vector stays zero).
pub(crate) fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_padding() {
        // 1 row, width 3 (last is padding), 2 dims.
        let hidden = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let mask = [1, 1, 0];
        assert_eq!(pool(&hidden, &mask, 1, 3, 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&hidden, &mask, 1, 3, 2, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&hidden, &mask, 1, 3, 2, Pooling::LastToken), vec![3.0, 4.0]);
    }

    #[test]
    fn normalisation_gives_unit_length() {
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = [0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
    }
}
