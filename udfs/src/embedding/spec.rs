//! The description of an embedding model, as stored in `mkflow-model.json` beside the model.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::BatchingStrategy;
use crate::runtime::Device;

/// How token vectors become one text vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean of the token vectors under the attention mask (sentence-transformers' default).
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The last non-padding token's vector (decoder models).
    LastToken,
}

/// Everything needed to load and run an embedding model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingModelSpec {
    /// Name recorded in knowledge indexes built with this model (e.g. `all-MiniLM-L6-v2`).
    pub name: String,
    /// The ONNX model file.
    pub model_path: PathBuf,
    /// The Hugging Face `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// Output dimension of the embeddings.
    pub dimensions: usize,
    /// How token vectors are pooled.
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (so cosine similarity is a dot product).
    pub normalize: bool,
    /// Texts longer than this many tokens (special tokens included) are truncated.
    pub max_tokens: usize,
    /// How texts are grouped into model calls.
    #[serde(default)]
    pub batching: BatchingStrategy,
    /// Threads ONNX Runtime uses inside one model call; 0 means one per available core.
    #[serde(default)]
    pub intra_threads: usize,
    /// Where the model runs (`cpu`, or `cuda` with a fallback to the CPU).
    #[serde(default)]
    pub device: Device,
    /// Set for a decoder exported by `scripts/export_decoder.py` (`model_path` is its
    /// `latent.onnx`): LaSER's `K`, the number of hidden states pooled — the prefill's last one
    /// and `K − 1` soft tokens' (at least 1; 1 is plain last-token pooling, 3 LaSER's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_steps: Option<usize>,
    /// How a query is written before tokenisation: `{text}` stands for the query and
    /// `{instruction}` for [`instruction`](Self::instruction), e.g. LaSER's
    /// `Instruct: {instruction}\nQuery: {text}`. None: the query as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_template: Option<String>,
    /// How a document is written before tokenisation (`{text}` stands for it). None: as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_template: Option<String>,
    /// The task instruction the templates' `{instruction}` stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    /// Wrap both roles' texts in the decoder's chat template (one user turn and the assistant's
    /// prompt) followed by an empty think block, as LaSER's `add_chat_template` does. Decoders
    /// exported with a chat template only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_template: bool,
}

impl EmbeddingModelSpec {
    /// The thread count to give ONNX Runtime, resolving 0 to the number of available cores.
    pub fn resolved_threads(&self) -> usize {
        crate::runtime::resolve_threads(self.intra_threads)
    }
}
