//! The decoder runtime: causal language models exported to one ONNX contract
//! (`scripts/export_decoder.py`), run on ONNX Runtime with a KV cache.
//!
//! - [`DecoderModel`]: one graph, batched over left-padded sequences; the cache stays on the
//!   model's device (GPU memory under CUDA) between steps.
//! - Latent-reasoning embeddings ([`DecoderModel::latent_embeddings`], LaSER-style `K` soft-token
//!   steps) — what `embed()` runs for a model whose `mkflow-model.json` sets `latent_steps`.
//! - Generation ([`DecoderModel::generate`], [`LocalLlm::chat`]): greedy or temperature
//!   sampling, stop tokens, the model's chat template — the `local` Meta-Knowledge generator —
//!   and constrained decoding to a JSON shape ([`constrain`]), batched across conversations.

mod chat;
mod config;
pub mod constrain;
mod generate;
mod latent;
mod llm;
mod model;

pub use chat::{ChatTemplate, ChatTemplateError};
pub use config::{
    DECODER_CONFIG_FILE, DecoderConfig, DecoderConfigError, GENERATION_GRAPH, LATENT_GRAPH, TOKENIZER_FILE,
};
pub use generate::{Generated, RowConstraint, Sampling};
pub use llm::{ChatAnswer, ChatRequest, LocalLlm};
pub use model::{DecoderError, DecoderModel, Graph};
