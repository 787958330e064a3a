//! Document sources as DataFusion tables.
//!
//! - JSON Lines with declared columns: [`JsonlFactory`] (`STORED AS JSONL`), bad records go to
//!   the [`DeadLetters`] table; DataFusion's own `STORED AS JSON` (schema inferred) also works.
//! - Directories of text and Markdown files: [`TextFilesFactory`] (`STORED AS TEXT_FILES`).
//! - Kafka topics of JSON values: [`kafka::KafkaFactory`] (`STORED AS KAFKA`), read continuously
//!   by streaming pipelines.

pub mod dead_letters;
mod jsonl;
pub mod kafka;
pub mod records;
mod resumable;
mod text_files;

pub use dead_letters::{DeadLetter, DeadLetters};
pub use jsonl::{DecodedLines, JSONL_FORMAT, JsonlFactory, JsonlSource, JsonlTable, LinePosition, STDIN_LOCATION};
pub use resumable::ResumeOptions;
pub use text_files::{TEXT_FILES_FORMAT, TextFilesFactory, TextFilesSource, TextFilesTable};
