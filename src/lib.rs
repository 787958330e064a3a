//! mkflow: streams of documents into a retrieval knowledge base that answers SQL.
//!
//! Documents are read as DataFusion tables ([`sources`]), transformed by UDFs (the
//! `mkflow-udfs` crate: `embed(text)`, `mk_metadata`, `mk_qa`, …) and upserted into a persistent
//! knowledge index (the `mkflow-index` crate: Arrow rows + usearch HNSW), whose Meta-Knowledge side ([`mk`]) keeps synthetic
//! questions and cluster summaries. Queries use SQL with [`sql`] extensions such as `vector_search`. The
//! [`engine`] ties these together; the `mkflow` binary is its command line. `ARCHITECTURE.md`
//! at the repository root draws the dataflow and says what each module may import.

#![warn(missing_docs)]

pub mod access;
pub mod adapter;
pub mod assets;
pub mod chunks;
pub mod cluster;
pub mod engine;
pub mod eval;
pub mod laser;
pub mod llm_assets;
pub mod metrics;
pub mod mk;
pub mod model_add;
pub mod models;
pub mod server;
pub mod sources;
pub mod sql;
pub mod statement;
pub mod streaming;
pub mod support;

pub use engine::{Engine, EngineConfig};
