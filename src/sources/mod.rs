//! Document sources as DataFusion tables.
//!
//! - JSON Lines: DataFusion's own `STORED AS JSON` reads newline-delimited JSON files.
//! - Directories of text and Markdown files: [`TextFilesFactory`] (`STORED AS TEXT_FILES`).

mod text_files;

pub use text_files::{TEXT_FILES_FORMAT, TextFilesFactory, TextFilesTable};
