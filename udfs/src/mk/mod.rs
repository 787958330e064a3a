//! Meta-Knowledge preparation (Mombaerts et al., 2024): per document, metadata from a schema
//! and synthetic question/answer pairs; per cluster of documents, a Meta-Knowledge summary;
//! per query, sub-queries conditioned on that summary.
//!
//! - [`Generator`]: the backends — [`EmbeddedGenerator`] (no LLM), [`OpenAiGenerator`] (any
//!   OpenAI-compatible endpoint) and [`LocalGenerator`] (a local LLM on the decoder runtime,
//!   offline), chosen by [`MkOptions`] through a [`GeneratorRegistry`].
//! - [`MetadataSchema`]: the fields extracted and their Arrow types.
//! - SQL: `mk_metadata`, `mk_qa` ([`PrepareUdf`]), `mk_cluster` ([`ClusterUdf`]) and the
//!   aggregate `mk_summary` ([`SummaryUdaf`]).

mod chat;
mod embedded;
mod generator;
mod local;
mod openai;
mod options;
pub mod prompts;
mod schema;
pub mod text;
mod udf;

pub use chat::{AnswerFormat, ChatBackend, ChatGenerator, ChatLimits};
pub use embedded::EmbeddedGenerator;
pub use generator::{
    CRITERIA, ClusterBrief, ClusterDigest, Document, Evidence, FailureLog, GenerationCounts, GenerationError,
    GenerationStats, Generator, Judged, Judging, Prepared, QaPair, REASONING_NEEDS_AN_LLM, Verdict,
};
pub use local::{LocalBackend, LocalGenerator, LocalSettings};
pub use openai::{LlmSettings, OpenAiBackend, OpenAiGenerator};
pub use options::{
    ClusterKind, DEFAULT_LOCAL_MODEL, GeneratorKind, GeneratorRegistry, MkOptions, OPENAI_BASE_URL, SettingsError,
    UnknownClusterKind, UnknownGenerator,
};
pub use schema::{
    FieldKind, Label, MetadataError, MetadataField, MetadataSchema, SchemaError, SchemaFileError, UNCLUSTERED,
    first_string, string_list_type,
};
pub use udf::{ClusterUdf, PrepareUdf, PreparedPart, Preparer, SummaryUdaf, qa_type};
