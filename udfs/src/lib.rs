//! DataFusion user-defined functions of mkflow.
//!
//! This crate holds the "prepare" work that runs inside DataFusion plans:
//! - [`embedding`]: text embeddings on ONNX Runtime (`embed(text)`), with token-budget batching.
//!
//! Every UDF works on Arrow arrays, so it composes with any DataFusion query or pipeline.

pub mod embedding;
pub mod runtime;

pub use embedding::{BatchingStrategy, EmbedUdf, Embedder, EmbeddingModelSpec, LazyEmbedder, Pooling};
