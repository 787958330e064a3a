//! DataFusion user-defined functions of mkflow.
//!
//! This crate holds the "prepare" work that runs inside DataFusion plans:
//! - [`embedding`]: text embeddings on ONNX Runtime (`embed(text)`), with token-budget batching;
//!   encoder models or LaSER latent-reasoning decoders.
//! - [`decoder`]: the decoder runtime (exported causal LMs with a KV cache): latent embeddings,
//!   generation, chat templates, the local LLM.
//! - [`chunking`]: `chunk(text [, max_tokens [, overlap_tokens]])`, long texts cut within the
//!   embedding model's token limit at section, paragraph, sentence and word boundaries.
//! - [`mk`]: Meta-Knowledge preparation — metadata (`mk_metadata`), synthetic questions
//!   (`mk_qa`), clusters (`mk_cluster`) and cluster summaries (`mk_summary`), on an embedded
//!   generator, any OpenAI-compatible LLM endpoint or a local LLM.
//!
//! - [`bounded`]: guards on DataFusion's own functions whose output can dwarf their input
//!   (`repeat`, `lpad`, `range`, …).
//!
//! Every UDF works on Arrow arrays, so it composes with any DataFusion query or pipeline.

#![warn(missing_docs)]

pub mod bounded;
pub mod chunking;
pub mod decoder;
pub mod embedding;
pub mod mk;
pub mod observe;
pub mod rerank;
pub mod runtime;

pub use embedding::{
    BatchingStrategy, EmbedQueue, EmbedUdf, Embedder, EmbeddingModelSpec, LazyEmbedder, Pooling, Prompts, TextRole,
};
pub use runtime::Device;
