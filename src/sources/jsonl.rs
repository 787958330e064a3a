//! `CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, …) STORED AS JSONL
//! LOCATION 'docs.jsonl'`: JSON Lines with declared, typed columns, where a bad record never
//! fails the scan. A line that is not a JSON object, has a value of the wrong type, or lacks a
//! `NOT NULL` column goes to the `dead_letters` table with its line number and error; every
//! other line becomes a row. Fields not declared are ignored.
//!
//! `LOCATION '-'` reads standard input instead (to its end, once per process:
//! `cat docs.jsonl | mkflow run pipeline.sql`).
//!
//! (DataFusion's own `STORED AS JSON` infers the schema instead, and fails the query on the
//! first malformed line.)

use std::io::BufRead;
use std::path::PathBuf;
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
use crate::support::batch_table::{BatchSource, BatchTable, blocking_batches};
use crate::support::now_ms;

/// The `STORED AS` name of validated JSON Lines files.
pub const JSONL_FORMAT: &str = "JSONL";

/// The `LOCATION` that means standard input.
pub const STDIN_LOCATION: &str = "-";

/// Standard input, read to its end by the first scan that needs it.
static STDIN: std::sync::OnceLock<std::io::Result<Vec<u8>>> = std::sync::OnceLock::new();

/// Lines decoded together (one batch of rows) when all of them are valid.
const LINES_PER_BATCH: usize = 4096;

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
        if let Some(key) = cmd.options.keys().next() {
            return plan_err!("STORED AS JSONL takes no options (got '{key}')");
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
}

impl JsonlSource {
    /// Decodes the source in batches of lines, handing each batch's rows and refused records to
    /// `emit` until the source ends or `emit` returns false.
    fn decode(&self, mut emit: impl FnMut(RecordBatch, Vec<DeadLetter>) -> bool) -> Result<()> {
        let read_error = |e: &std::io::Error| DataFusionError::Execution(format!("cannot read {}: {e}", self.source()));
        let mut reader: Box<dyn BufRead> = if self.path.as_os_str() == STDIN_LOCATION {
            let bytes = STDIN
                .get_or_init(|| {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes)
                })
                .as_ref()
                .map_err(read_error)?;
            Box::new(bytes.as_slice())
        } else {
            let file = std::fs::File::open(&self.path).map_err(|e| read_error(&e))?;
            Box::new(std::io::BufReader::new(file))
        };
        let decoder = JsonRecordDecoder::new(self.schema.clone());
        let mut line_number = 0u64;
        let mut buffer = Vec::new();
        let mut chunk: Vec<(u64, String)> = Vec::with_capacity(LINES_PER_BATCH);
        loop {
            chunk.clear();
            while chunk.len() < LINES_PER_BATCH {
                buffer.clear();
                if reader.read_until(b'\n', &mut buffer).map_err(|e| read_error(&e))? == 0 {
                    break;
                }
                line_number += 1;
                let line = buffer.strip_suffix(b"\n").unwrap_or(&buffer);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let text = String::from_utf8_lossy(line);
                if !text.trim().is_empty() {
                    chunk.push((line_number, text.into_owned()));
                }
            }
            if chunk.is_empty() {
                return Ok(());
            }
            let texts: Vec<&str> = chunk.iter().map(|(_, l)| l.as_str()).collect();
            let decoded = decoder.decode(&texts)?;
            let refused = decoded
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
            if !emit(decoded.batch, refused) {
                return Ok(());
            }
        }
    }

    /// The source's name in dead letters and messages.
    fn source(&self) -> String {
        if self.path.as_os_str() == STDIN_LOCATION {
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
        let lines: String = (0..LINES_PER_BATCH * 2 + 10)
            .map(|i| format!("{{\"doc_id\": \"d{i}\"}}\n"))
            .collect();
        std::fs::write(&path, lines).unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        let source = JsonlSource {
            path: path.clone(),
            schema: Arc::new(Schema::new(vec![Field::new("doc_id", DataType::Utf8, false)])),
            dead_letters: Arc::new(DeadLetters::open(None)),
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
            LINES_PER_BATCH * 2 + 10
        );
        assert_eq!(all.len(), 3, "one batch per {LINES_PER_BATCH} lines");
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
