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

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::{CreateExternalTable, Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use crate::sql::memory_scan;

use super::dead_letters::{DeadLetter, DeadLetters};
use super::records::JsonRecordDecoder;

/// The `STORED AS` name of validated JSON Lines files.
pub const JSONL_FORMAT: &str = "JSONL";

/// The `LOCATION` that means standard input.
pub const STDIN_LOCATION: &str = "-";

/// Standard input, read to its end by the first scan that needs it.
static STDIN: std::sync::OnceLock<std::io::Result<Vec<u8>>> = std::sync::OnceLock::new();

/// Lines decoded together when all of them are valid.
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
        Ok(Arc::new(JsonlTable {
            path,
            schema: Arc::new(cmd.schema.as_arrow().clone()),
            dead_letters: self.dead_letters.clone(),
        }))
    }
}

/// A JSON Lines file read afresh at every scan; bad lines go to the dead-letter table.
#[derive(Debug)]
pub struct JsonlTable {
    path: PathBuf,
    schema: SchemaRef,
    dead_letters: Arc<DeadLetters>,
}

impl JsonlTable {
    /// Decodes the file: rows of valid lines, dead letters for the others.
    fn read(&self) -> Result<(Vec<RecordBatch>, Vec<DeadLetter>)> {
        let read_error = |e: &std::io::Error| DataFusionError::Execution(format!("cannot read {}: {e}", self.source()));
        let owned;
        let bytes: &[u8] = if self.path.as_os_str() == STDIN_LOCATION {
            STDIN
                .get_or_init(|| {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes)
                })
                .as_ref()
                .map_err(read_error)?
        } else {
            owned = std::fs::read(&self.path).map_err(|e| read_error(&e))?;
            &owned
        };
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<(u64, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i as u64 + 1, l))
            .collect();
        let decoder = JsonRecordDecoder::new(self.schema.clone());
        let mut batches = Vec::new();
        let mut refused = Vec::new();
        for chunk in lines.chunks(LINES_PER_BATCH) {
            let texts: Vec<&str> = chunk.iter().map(|(_, l)| *l).collect();
            let decoded = decoder.decode(&texts)?;
            batches.push(decoded.batch);
            refused.extend(decoded.refused.into_iter().map(|(i, error)| DeadLetter {
                source: self.source(),
                position: chunk[i].0,
                payload: chunk[i].1.to_string(),
                error,
                recorded_at_ms: crate::mk::now_ms(),
            }));
        }
        Ok((batches, refused))
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

#[async_trait]
impl TableProvider for JsonlTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (batches, refused) = self.read()?;
        let new = self.dead_letters.record(refused);
        if new > 0 {
            log::warn!("{}: {new} bad records went to the dead_letters table", self.source());
        }
        memory_scan(batches, self.schema.clone(), projection, limit)
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
        let table = JsonlTable {
            path: path.clone(),
            schema: Arc::new(Schema::new(vec![
                Field::new("doc_id", DataType::Utf8, false),
                Field::new("year", DataType::Int64, true),
            ])),
            dead_letters: dead_letters.clone(),
        };
        let (batches, refused) = table.read().unwrap();
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
}
