//! Inserts that run as a sequence of commits instead of one: an `INSERT INTO <knowledge index>
//! … FROM <source>` whose source can be read piece by piece runs its plan once per piece, each
//! piece committed to the index together with the source position after it (a
//! [`mkflow_index::SourceOffsets`] session-config extension the index sink stores). The next
//! run resumes from the stored positions: a crash at any moment neither loses nor repeats a
//! record, and memory stays bounded by a piece or two whatever the source's size.
//!
//! - [`ContinuousInsert`] (`kafka`): an unbounded stream of micro-batches from a Kafka topic;
//! - [`FileInsert`] (`file`): a JSON Lines file in batches of lines, resumed at its byte offset;
//! - [`DirectoryInsert`] (`directory`): a `TEXT_FILES` directory in batches of files, resumed
//!   after the last file committed;
//! - `insert`: what both share (recognising the statement, swapping a piece in for the scan,
//!   running it with its positions);
//! - [`StreamControl`]: when they stop and what state they report.

mod control;
mod directory;
mod file;
mod insert;
mod kafka;

pub use control::{PipelineState, StreamControl};
pub use directory::DirectoryInsert;
pub use file::FileInsert;
pub use insert::count_batch;
pub use kafka::ContinuousInsert;
