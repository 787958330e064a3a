//! The dead-letter table: records a source could not turn into rows, with the raw payload,
//! where it came from and why it was refused. Sources keep running; nothing is lost silently.
//!
//! Entries are kept in memory for the session and appended to `dead_letters.jsonl` in the data
//! directory, so `SELECT * FROM dead_letters` shows them in later sessions too. Re-reading the
//! same bad record (a pipeline run twice) does not add it twice.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::Result;
use mkflow_udfs::mk::FailureLog;
use serde::{Deserialize, Serialize};

use crate::support::batch_table::Snapshot;
use crate::support::now_ms;

/// File (in the data directory) where dead letters persist.
pub const DEAD_LETTERS_FILE: &str = "dead_letters.jsonl";

/// One refused record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The source (e.g. the file path).
    pub source: String,
    /// Position in the source (line number for files).
    pub position: u64,
    /// The raw record.
    pub payload: String,
    /// Why it was refused.
    pub error: String,
    /// When it was recorded (milliseconds since the Unix epoch).
    pub recorded_at_ms: i64,
}

/// Longest payload kept for a failed generation (characters).
const MAX_GENERATION_PAYLOAD: usize = 4000;

/// Failed generations (metadata, questions, summaries, rewrites) become dead letters whose
/// source names the step and backend, and whose payload is the document.
impl FailureLog for DeadLetters {
    fn record(&self, what: &str, document: &str, error: &str) {
        log::warn!("{what}: {error}");
        let payload: String = document.chars().take(MAX_GENERATION_PAYLOAD).collect();
        DeadLetters::record(
            self,
            vec![DeadLetter {
                source: what.to_string(),
                position: 0,
                payload,
                error: error.to_string(),
                recorded_at_ms: now_ms(),
            }],
        );
    }
}

/// Identifies a record: (source, position, payload).
type RecordIdentity = (String, u64, String);

/// Recorded letters, in arrival order, and the identities already seen.
type Entries = (Vec<DeadLetter>, HashSet<RecordIdentity>);

/// The dead-letter store and its table.
#[derive(Debug)]
pub struct DeadLetters {
    file: Option<PathBuf>,
    entries: Mutex<Entries>,
    schema: SchemaRef,
}

impl DeadLetters {
    /// A store persisted in `data_dir` (loading what earlier sessions recorded), or in memory
    /// only when `data_dir` is `None`.
    pub fn open(data_dir: Option<&Path>) -> Self {
        let file = data_dir.map(|d| d.join(DEAD_LETTERS_FILE));
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            for entry in text.lines().filter_map(|l| serde_json::from_str::<DeadLetter>(l).ok()) {
                if seen.insert((entry.source.clone(), entry.position, entry.payload.clone())) {
                    entries.push(entry);
                }
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("position", DataType::UInt64, false),
            Field::new("payload", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, false),
            Field::new("recorded_at", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]));
        DeadLetters {
            file,
            entries: Mutex::new((entries, seen)),
            schema,
        }
    }

    /// Records refused records (skipping ones already recorded); returns how many were new.
    pub fn record(&self, letters: Vec<DeadLetter>) -> usize {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (entries, seen) = &mut *guard;
        let fresh: Vec<DeadLetter> = letters
            .into_iter()
            .filter(|l| seen.insert((l.source.clone(), l.position, l.payload.clone())))
            .collect();
        if let Some(path) = &self.file
            && !fresh.is_empty()
        {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| {
                    for letter in &fresh {
                        writeln!(f, "{}", serde_json::to_string(letter).expect("dead letter serialises"))?;
                    }
                    Ok(())
                });
            if let Err(e) = written {
                log::error!("cannot persist dead letters to {}: {e}", path.display());
            }
        }
        let count = fresh.len();
        entries.extend(fresh);
        count
    }

    /// Number of recorded dead letters.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Whether nothing was refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn batch(&self) -> Result<RecordBatch> {
        let guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entries = &guard.0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| e.source.as_str()))),
            Arc::new(UInt64Array::from_iter_values(entries.iter().map(|e| e.position))),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| e.payload.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| e.error.as_str()))),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                entries.iter().map(|e| e.recorded_at_ms),
            )),
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// `SELECT * FROM dead_letters`: the letters recorded when the scan starts.
impl Snapshot for DeadLetters {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn snapshot(&self) -> Result<RecordBatch> {
        self.batch()
    }
}
