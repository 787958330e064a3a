//! Text embeddings on ONNX Runtime.
//!
//! - [`EmbeddingModelSpec`] describes a model: the ONNX file, its `tokenizer.json`, pooling,
//!   normalisation and the token limits.
//! - [`Embedder`] loads one model once (one ONNX Runtime session, shared) and embeds texts in
//!   token-budget batches ([`batching`]).
//! - [`EmbedUdf`] exposes it to SQL as `embed(text)`.

pub mod batching;
mod model;
mod spec;
mod udf;

pub use batching::BatchingStrategy;
pub use model::{EmbedError, Embedder, EmbedderStats, Embeddings};
pub use spec::{EmbeddingModelSpec, Pooling};
pub use udf::{EmbedUdf, LazyEmbedder};
