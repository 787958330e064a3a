//! `CREATE EXTERNAL TABLE notes STORED AS TEXT_FILES LOCATION 'dir/' [OPTIONS ('extensions' 'md,txt')]`
//!
//! One row per file under the directory (recursively, in path order):
//! - `doc_id`: the path relative to the directory;
//! - `title`: the first Markdown heading, else the first non-empty line, else the file name;
//! - `body`: the file's text;
//! - `path`: the full path;
//! - `modified`: last modification time;
//! - `error`: why the file could not be read (then `title` and `body` are null); a bad file
//!   never stops the scan.
//!
//! Options: `extensions` (default `md,markdown,txt`), `commit_rows` (files per batch, and per
//! commit of an `INSERT` into a knowledge index that reads the directory; default 256; a batch
//! also ends at 32 MiB of files) and `resume` (`true` by default: such an `INSERT` stores its
//! position in the listing with each commit, and a run after a crash or a stop goes on after
//! the last file committed; see `streaming/directory.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMillisecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{Result, plan_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::CreateExternalTable;

use super::resumable::ResumeOptions;
use crate::support::batch_table::{BatchSource, BatchTable, blocking_batches};

/// The `STORED AS` name of text-file directories.
pub const TEXT_FILES_FORMAT: &str = "TEXT_FILES";

const DEFAULT_EXTENSIONS: &[&str] = &["md", "markdown", "txt"];

/// Files read together (one batch of rows, one commit of an `INSERT`) unless the table's
/// `commit_rows` says otherwise.
const DEFAULT_COMMIT_ROWS: usize = 256;

/// A batch also ends once its files hold this many bytes, so large files keep memory bounded.
const MAX_BATCH_BYTES: u64 = 32 << 20;

/// Creates [`TextFilesTable`]s.
#[derive(Debug, Default)]
pub struct TextFilesFactory;

#[async_trait]
impl TableProviderFactory for TextFilesFactory {
    async fn create(&self, _state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let [location] = cmd.locations.as_slice() else {
            return plan_err!("STORED AS TEXT_FILES takes one LOCATION (a directory)");
        };
        let mut extensions: Vec<String> = DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect();
        let mut options = ResumeOptions::new(DEFAULT_COMMIT_ROWS);
        for (key, value) in &cmd.options {
            let key = key.strip_prefix("format.").unwrap_or(key);
            if key == "extensions" {
                extensions = value
                    .split(',')
                    .map(|e| e.trim().trim_start_matches('.').to_lowercase())
                    .filter(|e| !e.is_empty())
                    .collect();
            } else if !options.take(key, value, "files")? {
                return plan_err!(
                    "unknown option '{key}' for STORED AS TEXT_FILES (known: extensions, commit_rows, resume)"
                );
            }
        }
        let root = PathBuf::from(location);
        if !root.is_dir() {
            return plan_err!("TEXT_FILES location {} is not a directory", root.display());
        }
        Ok(Arc::new(TextFilesTable::new(
            TextFilesSource::new(root, extensions).with_options(options),
        )))
    }
}

/// A directory of text files as a table.
pub type TextFilesTable = BatchTable<TextFilesSource>;

/// The files of a directory as rows, read afresh at every scan, a batch of files at a time.
#[derive(Debug)]
pub struct TextFilesSource {
    root: PathBuf,
    extensions: Vec<String>,
    options: ResumeOptions,
    schema: SchemaRef,
}

impl TextFilesSource {
    /// A source of the files under `root` whose extension is in `extensions`.
    pub fn new(root: PathBuf, extensions: Vec<String>) -> Self {
        let schema = Arc::new(Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("title", DataType::Utf8, true),
            Field::new("body", DataType::Utf8, true),
            Field::new("path", DataType::Utf8, false),
            Field::new("modified", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("error", DataType::Utf8, true),
        ]));
        TextFilesSource {
            root,
            extensions,
            options: ResumeOptions::new(DEFAULT_COMMIT_ROWS),
            schema,
        }
    }

    /// The source with `options` (`commit_rows`, `resume`).
    pub fn with_options(self, options: ResumeOptions) -> Self {
        TextFilesSource { options, ..self }
    }

    /// The directory read.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether an `INSERT` from this directory stores its position and resumes from it.
    pub fn resumes(&self) -> bool {
        self.options.resume
    }

    /// The files under the directory with one of the extensions, in path order.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| self.extensions.contains(&e.to_lowercase()))
                {
                    files.push(path);
                }
            }
        }
        files.sort();
        files
    }

    /// `files` split into the batches they are read in: `commit_rows` files, fewer where
    /// their sizes add up to [`MAX_BATCH_BYTES`].
    pub fn batches_of<'f>(&self, files: &'f [PathBuf]) -> Vec<&'f [PathBuf]> {
        let mut batches = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, file) in files.iter().enumerate() {
            if i > start && (i - start == self.options.commit_rows || bytes >= MAX_BATCH_BYTES) {
                batches.push(&files[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += std::fs::metadata(file).map_or(0, |m| m.len());
        }
        if start < files.len() {
            batches.push(&files[start..]);
        }
        batches
    }

    /// The rows of `files`, one per file (see the module docs).
    pub fn batch(&self, files: &[PathBuf]) -> Result<RecordBatch> {
        let mut doc_id = StringBuilder::new();
        let mut title = StringBuilder::new();
        let mut body = StringBuilder::new();
        let mut path = StringBuilder::new();
        let mut modified = TimestampMillisecondBuilder::new();
        let mut error = StringBuilder::new();
        for file in files {
            let relative = file.strip_prefix(&self.root).unwrap_or(file);
            doc_id.append_value(relative.to_string_lossy());
            path.append_value(file.to_string_lossy());
            modified.append_option(
                std::fs::metadata(file)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as i64),
            );
            match read_text(file) {
                Ok(text) => {
                    title.append_value(title_of(&text, file));
                    body.append_value(&text);
                    error.append_null();
                }
                Err(message) => {
                    title.append_null();
                    body.append_null();
                    error.append_value(message);
                }
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(doc_id.finish()),
            Arc::new(title.finish()),
            Arc::new(body.finish()),
            Arc::new(path.finish()),
            Arc::new(modified.finish()),
            Arc::new(error.finish()),
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

fn read_text(file: &Path) -> std::result::Result<String, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The first Markdown heading, else the first non-empty line, else the file stem.
fn title_of(text: &str, file: &Path) -> String {
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find_map(|l| {
            l.strip_prefix('#')
                .map(|h| h.trim_start_matches('#').trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .or_else(|| lines().next().map(|l| l.chars().take(200).collect()))
        .unwrap_or_else(|| file.file_stem().unwrap_or_default().to_string_lossy().to_string())
}

impl BatchSource for TextFilesSource {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn stream(self: Arc<Self>, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        blocking_batches(self.schema.clone(), move |sender| {
            let files = self.files();
            for chunk in self.batches_of(&files) {
                if !sender.send(self.batch(chunk)?) {
                    break;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};

    #[test]
    fn titles_come_from_headings_then_first_lines() {
        assert_eq!(title_of("\n# Hello world\nbody", Path::new("a.md")), "Hello world");
        assert_eq!(title_of("first line\nsecond", Path::new("a.txt")), "first line");
        assert_eq!(title_of("  \n", Path::new("dir/empty.txt")), "empty");
    }

    #[test]
    fn unreadable_files_become_error_rows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.md"), "# Good\ntext").unwrap();
        std::fs::write(dir.path().join("bad.txt"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(dir.path().join("skip.bin"), "ignored").unwrap();
        let source = TextFilesSource::new(dir.path().to_path_buf(), vec!["md".into(), "txt".into()]);
        let batch = &source.batch(&source.files()).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let ids = batch.column(0).as_string::<i32>();
        let errors = batch.column(5).as_string::<i32>();
        assert_eq!(ids.value(0), "bad.txt");
        assert!(errors.value(0).contains("not UTF-8"));
        assert_eq!(ids.value(1), "good.md");
        assert!(errors.is_null(1));
        assert_eq!(batch.column(1).as_string::<i32>().value(1), "Good");
    }

    #[test]
    fn batches_end_at_commit_rows_files_or_at_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("{i}.txt")), "small").unwrap();
        }
        let big = vec![b'x'; (MAX_BATCH_BYTES / 2 + 1) as usize];
        for name in ["b1.txt", "b2.txt", "b3.txt"] {
            std::fs::write(dir.path().join(name), &big).unwrap();
        }
        let options = ResumeOptions {
            commit_rows: 10,
            resume: true,
        };
        let source = TextFilesSource::new(dir.path().to_path_buf(), vec!["txt".into()]).with_options(options);
        let files = source.files();
        let sizes: Vec<usize> = source.batches_of(&files).iter().map(|b| b.len()).collect();
        // The ten small files, then the big ones two at a time (the second passes the limit).
        assert_eq!(sizes, vec![10, 2, 1]);
        assert_eq!(sizes.iter().sum::<usize>(), files.len());
    }
}
