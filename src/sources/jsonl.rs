//! `CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, …) STORED AS JSONL
//! LOCATION 'docs.jsonl'`: JSON Lines with declared, typed columns, where a bad record never
//! fails the scan. A line that is not a JSON object, has a value of the wrong type, or lacks a
//! `NOT NULL` column goes to the `dead_letters` table with its line number and error; every
//! other line becomes a row. Fields not declared are ignored.
//!
//! `LOCATION '-'` reads standard input instead (to its end, once per process:
//! `cat docs.jsonl | mkflow run pipeline.sql`).
//!
//! Options: `commit_rows` (lines per batch, and per commit of an `INSERT` into a knowledge
//! index that reads the file; default 4096) and `resume` (`true` by default: such an `INSERT`
//! stores the file position with each commit and the next run goes on from there; see
//! `streaming/file.rs`).
//!
//! (DataFusion's own `STORED AS JSON` infers the schema instead, and fails the query on the
//! first malformed line.)

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::CreateExternalTable;

use super::dead_letters::{DeadLetter, DeadLetters};
use super::records::JsonRecordDecoder;
use super::resumable::ResumeOptions;
use crate::support::batch_table::{BatchSource, BatchTable, blocking_batches};
use crate::support::now_ms;

/// The `STORED AS` name of validated JSON Lines files.
pub const JSONL_FORMAT: &str = "JSONL";

/// The `LOCATION` that means standard input.
pub const STDIN_LOCATION: &str = "-";

/// Standard input, read to its end by the first scan that needs it.
static STDIN: std::sync::OnceLock<std::io::Result<Vec<u8>>> = std::sync::OnceLock::new();

/// Lines decoded together (one batch of rows, one commit of an `INSERT`) unless the table's
/// `commit_rows` says otherwise.
const DEFAULT_COMMIT_ROWS: usize = 4096;

/// A batch also ends once its lines hold this many bytes, so long records keep memory bounded.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// Creates [`JsonlTable`]s that report bad records to a dead-letter store.
#[derive(Debug)]
pub struct JsonlFactory {
    dead_letters: Arc<DeadLetters>,
}

impl JsonlFactory {
    /// A factory reporting to `dead_letters`.
    pub fn new(dead_letters: Arc<DeadLetters>) -> Self {
        JsonlFactory { dead_letters }
    }
}

#[async_trait]
impl TableProviderFactory for JsonlFactory {
    async fn create(&self, _state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let [location] = cmd.locations.as_slice() else {
            return plan_err!("STORED AS JSONL takes one LOCATION (a .jsonl file)");
        };
        if cmd.schema.fields().is_empty() {
            return plan_err!("STORED AS JSONL needs declared columns, e.g. (doc_id VARCHAR NOT NULL, body VARCHAR)");
        }
        let mut options = ResumeOptions::new(DEFAULT_COMMIT_ROWS);
        for (key, value) in &cmd.options {
            let key = key.strip_prefix("format.").unwrap_or(key);
            if !options.take(key, value, "lines")? {
                return plan_err!("unknown option '{key}' for STORED AS JSONL (known: commit_rows, resume)");
            }
        }
        let path = PathBuf::from(location);
        if location != STDIN_LOCATION && !path.is_file() {
            return plan_err!(
                "JSONL location {} is not a file (use LOCATION '{STDIN_LOCATION}' for standard input)",
                path.display()
            );
        }
        Ok(Arc::new(JsonlTable::new(JsonlSource {
            path,
            schema: Arc::new(cmd.schema.as_arrow().clone()),
            dead_letters: self.dead_letters.clone(),
            commit_rows: options.commit_rows,
            resume: options.resume,
        })))
    }
}

/// A JSON Lines file as a table.
pub type JsonlTable = BatchTable<JsonlSource>;

/// A JSON Lines file read afresh at every scan, a batch of lines at a time (memory stays at a
/// few batches whatever the file's size); bad lines go to the dead-letter table.
#[derive(Debug)]
pub struct JsonlSource {
    path: PathBuf,
    schema: SchemaRef,
    dead_letters: Arc<DeadLetters>,
    commit_rows: usize,
    resume: bool,
}

/// A place in a JSON Lines source: the byte where the next line starts and how many lines
/// come before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinePosition {
    /// Offset of the next line's first byte.
    pub byte: u64,
    /// Lines before it (the next line's number is `line + 1`).
    pub line: u64,
}

/// One batch of lines, decoded.
#[derive(Debug)]
pub struct DecodedLines {
    /// The valid lines' rows.
    pub batch: RecordBatch,
    /// The refused lines.
    pub refused: Vec<DeadLetter>,
    /// Where the batch ends (and the next one starts).
    pub end: LinePosition,
}

impl JsonlSource {
    /// The file read (`-` for standard input).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the source is standard input (which has no positions to resume from).
    pub fn is_stdin(&self) -> bool {
        self.path.as_os_str() == STDIN_LOCATION
    }

    /// Lines per batch (and per commit of an `INSERT` that reads the file).
    pub fn commit_rows(&self) -> usize {
        self.commit_rows
    }

    /// Whether an `INSERT` that reads the file stores its position and goes on from there.
    pub fn resumes(&self) -> bool {
        self.resume && !self.is_stdin()
    }

    /// The dead-letter table of refused lines.
    pub fn dead_letters(&self) -> &Arc<DeadLetters> {
        &self.dead_letters
    }

    /// Decodes the source in batches of lines, handing each batch's rows and refused records to
    /// `emit` until the source ends or `emit` returns false.
    fn decode(&self, mut emit: impl FnMut(RecordBatch, Vec<DeadLetter>) -> bool) -> Result<()> {
        self.decode_from(LinePosition::default(), |lines| emit(lines.batch, lines.refused))
    }

    /// Decodes the source from `start` (the start of a line) in batches of lines, handing each
    /// to `emit` until the source ends or `emit` returns false.
    pub fn decode_from(&self, start: LinePosition, mut emit: impl FnMut(DecodedLines) -> bool) -> Result<()> {
        let read_error = |e: &std::io::Error| DataFusionError::Execution(format!("cannot read {}: {e}", self.source()));
        let mut reader: Box<dyn BufRead> = if self.is_stdin() {
            let bytes = STDIN
                .get_or_init(|| {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes)
                })
                .as_ref()
                .map_err(read_error)?;
            Box::new(bytes.get(start.byte as usize..).unwrap_or_default())
        } else {
            let mut file = std::fs::File::open(&self.path).map_err(|e| read_error(&e))?;
            file.seek(std::io::SeekFrom::Start(start.byte))
                .map_err(|e| read_error(&e))?;
            Box::new(std::io::BufReader::new(file))
        };
        let decoder = JsonRecordDecoder::new(self.schema.clone());
        let mut position = start;
        let mut buffer = Vec::new();
        let mut chunk: Vec<(u64, String)> = Vec::with_capacity(self.commit_rows.min(DEFAULT_COMMIT_ROWS));
        loop {
            chunk.clear();
            let (mut chunk_bytes, mut ended) = (0, false);
            while chunk.len() < self.commit_rows && chunk_bytes < MAX_BATCH_BYTES {
                buffer.clear();
                let read = reader.read_until(b'\n', &mut buffer).map_err(|e| read_error(&e))?;
                if read == 0 {
                    ended = true;
                    break;
                }
                position.byte += read as u64;
                position.line += 1;
                chunk_bytes += read;
                let line_number = position.line;
                let line = buffer.strip_suffix(b"\n").unwrap_or(&buffer);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let text = String::from_utf8_lossy(line);
                if !text.trim().is_empty() {
                    chunk.push((line_number, text.into_owned()));
                }
            }
            if chunk.is_empty() {
                match ended {
                    true => return Ok(()),
                    false => continue, // only blank lines so far
                }
            }
            let texts: Vec<&str> = chunk.iter().map(|(_, l)| l.as_str()).collect();
            let decoded = decoder.decode(&texts)?;
            let refused: Vec<DeadLetter> = decoded
                .refused
                .into_iter()
                .map(|(i, error)| DeadLetter {
                    source: self.source(),
                    position: chunk[i].0,
                    payload: chunk[i].1.clone(),
                    error,
                    recorded_at_ms: now_ms(),
                })
                .collect();
            let lines = DecodedLines {
                batch: decoded.batch,
                refused,
                end: position,
            };
            if !emit(lines) {
                return Ok(());
            }
        }
    }

    /// The source's name in dead letters and messages.
    pub fn source(&self) -> String {
        if self.is_stdin() {
            "stdin".into()
        } else {
            self.path.display().to_string()
        }
    }
}

impl BatchSource for JsonlSource {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn stream(self: Arc<Self>, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        blocking_batches(self.schema.clone(), move |sender| {
            let mut refused_count = 0;
            let decoded = self.decode(|batch, refused| {
                refused_count += self.dead_letters.record(refused);
                sender.send(batch)
            });
            if refused_count > 0 {
                log::warn!(
                    "{}: {refused_count} bad records went to the dead_letters table",
                    self.source()
                );
            }
            decoded
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};

    #[test]
    fn bad_lines_become_dead_letters_and_good_lines_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"doc_id\": \"a\", \"year\": 2020, \"extra\": true}\n",
                "{\"doc_id\": \"b\", \"year\": \"soon\"}\n",
                "\n",
                "{\"doc_id\": \"c\", \"year\": oops}\n",
                "[1, 2]\n",
                "{\"year\": 2021}\n",
                "{\"doc_id\": \"d\"}\n",
            ),
        )
        .unwrap();
        let dead_letters = Arc::new(DeadLetters::open(Some(dir.path())));
        let source = JsonlSource {
            path: path.clone(),
            schema: Arc::new(Schema::new(vec![
                Field::new("doc_id", DataType::Utf8, false),
                Field::new("year", DataType::Int64, true),
            ])),
            dead_letters: dead_letters.clone(),
            commit_rows: DEFAULT_COMMIT_ROWS,
            resume: true,
        };
        let (mut batches, mut refused) = (Vec::new(), Vec::new());
        source
            .decode(|batch, letters| {
                batches.push(batch);
                refused.extend(letters);
                true
            })
            .unwrap();
        let ids: Vec<String> = batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .flat_map(|b| {
                let a = b.column(0).as_string::<i32>().clone();
                (0..a.len()).map(move |i| a.value(i).to_string()).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(ids, vec!["a", "d"]);
        assert!(
            batches
                .iter()
                .any(|b| b.column(1).as_primitive::<Int64Type>().iter().any(|y| y == Some(2020)))
        );
        let positions: Vec<u64> = refused.iter().map(|d| d.position).collect();
        assert_eq!(positions, vec![2, 4, 5, 6]);
        assert!(refused[3].error.contains("doc_id"), "{}", refused[3].error);
        // Recorded once even when the file is read twice, and persisted.
        assert_eq!(dead_letters.record(refused.clone()), 4);
        assert_eq!(dead_letters.record(refused), 0);
        assert_eq!(DeadLetters::open(Some(dir.path())).len(), 4);
    }

    #[tokio::test]
    async fn the_file_is_read_when_the_scan_runs_in_batches_of_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        let lines: String = (0..DEFAULT_COMMIT_ROWS * 2 + 10)
            .map(|i| format!("{{\"doc_id\": \"d{i}\"}}\n"))
            .collect();
        std::fs::write(&path, lines).unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        let source = JsonlSource {
            path: path.clone(),
            schema: Arc::new(Schema::new(vec![Field::new("doc_id", DataType::Utf8, false)])),
            dead_letters: Arc::new(DeadLetters::open(None)),
            commit_rows: DEFAULT_COMMIT_ROWS,
            resume: true,
        };
        ctx.register_table("docs", Arc::new(JsonlTable::new(source))).unwrap();
        let all = ctx
            .sql("SELECT doc_id FROM docs")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            all.iter().map(|b| b.num_rows()).sum::<usize>(),
            DEFAULT_COMMIT_ROWS * 2 + 10
        );
        assert_eq!(all.len(), 3, "one batch per {DEFAULT_COMMIT_ROWS} lines");
        let first = ctx
            .sql("SELECT doc_id FROM docs LIMIT 3")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(first.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
        // Planning reads nothing: a file gone after the plan is made fails when it runs.
        let planned = ctx.sql("SELECT count(*) FROM docs").await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let error = planned.collect().await.unwrap_err().to_string();
        assert!(error.contains("cannot read") && error.contains("docs.jsonl"), "{error}");
    }
}
