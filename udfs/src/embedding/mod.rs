//! Text embeddings on ONNX Runtime.
//!
//! - [`EmbeddingModelSpec`] describes a model: the ONNX file, its `tokenizer.json`, pooling,
//!   normalisation, the token limits, and how queries and documents are written ([`Prompts`],
//!   by [`TextRole`]).
//! - [`Embedder`] is one loaded model (one ONNX Runtime session) that embeds texts in
//!   token-budget batches ([`batching`]) on the calling thread.
//! - [`EmbedQueue`] owns an [`Embedder`] on a worker thread and serves every caller of the
//!   process, batching concurrent requests ([`queue`]).
//! - [`EmbedUdf`] exposes it to SQL as the async function `embed(text)`; [`LazyEmbedder`] loads
//!   the model and starts its queue on first use.

pub mod batching;
mod model;
mod prompt;
pub mod queue;
mod spec;
mod udf;

pub use batching::BatchingStrategy;
pub use model::{EmbedError, Embedder, EmbedderStats, Embeddings};
pub use prompt::{Prompts, TextRole};
pub use queue::EmbedQueue;
pub use spec::{EmbeddingModelSpec, Pooling};
pub use udf::{EmbedUdf, LazyEmbedder};
