//! mkflow: streams of documents into a retrieval knowledge base that answers SQL.
//!
//! Documents are read as DataFusion tables ([`sources`]), transformed by UDFs (the
//! `mkflow-udfs` crate: `embed(text)`, `mk_metadata`, `mk_qa`, …) and upserted into a persistent
//! [`index`] (Arrow rows + usearch HNSW), whose Meta-Knowledge side ([`mk`]) keeps synthetic
//! questions and cluster summaries. Queries use SQL with [`sql`] extensions such as `vector_search`. The
//! [`engine`] ties these together; the `mkflow` binary is its command line.

pub mod assets;
pub mod engine;
pub mod eval;
pub mod index;
pub mod llm_assets;
pub mod metrics;
pub mod mk;
pub mod models;
pub mod server;
pub mod sources;
pub mod sql;
pub mod statement;
pub mod streaming;

pub use engine::{Engine, EngineConfig};
