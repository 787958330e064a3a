//! Resumable file inserts: an `INSERT INTO <knowledge index> SELECT … FROM <JSONL table>`
//! whose plan works row by row (projections, filters, UDFs — no aggregate, sort, join or
//! `LIMIT`) runs once per batch of `commit_rows` lines, and each batch commits together with
//! the file position after it. Memory stays at a batch or two however large the file, and a
//! run after a crash (or a stop) goes on at the last committed line: every line is inserted
//! once.
//!
//! The position is kept under `file:<canonical path>` (the byte offset), `…#lines` (lines
//! before it, so dead letters keep their line numbers) and `…#check` (a fingerprint of the
//! file's first and last 4 KiB before the offset). A run over a file whose fingerprint no
//! longer matches, or that is shorter than the position, reads it from the start (and says
//! so); a file that only grew is read from where the last run stopped, so appending lines and
//! re-running ingests just the new ones. `OPTIONS ('resume' 'false')` reads the whole file
//! every time. Standard input (`LOCATION '-'`) commits in batches too but has no position.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::LogicalPlan;

use super::control::StreamControl;
use super::insert::{Piece, PieceInsert};
use crate::sources::{DeadLetter, DecodedLines, JsonlSource, JsonlTable, LinePosition};
use mkflow_index::SourceOffsets;

/// Bytes hashed at each end of the read part of a file to recognise it on the next run.
const FINGERPRINT_WINDOW: u64 = 4096;

/// An `INSERT` into a knowledge index that reads a JSON Lines table, committed batch by batch
/// with its file position.
#[derive(Debug)]
pub struct FileInsert {
    insert: PieceInsert,
}

impl FileInsert {
    /// Recognises an `INSERT INTO <knowledge index> … FROM <JSONL table>` that can run batch by
    /// batch: one JSONL scan, a knowledge index as the target, and a plan that works row by
    /// row. Any other insert runs whole, as one commit.
    pub fn find(plan: &LogicalPlan) -> Result<Option<Self>> {
        let found = PieceInsert::find_row_by_row(plan, |provider| provider.is::<JsonlTable>())?;
        Ok(found.map(|insert| FileInsert { insert }))
    }

    fn jsonl(&self) -> &Arc<JsonlSource> {
        self.insert
            .source()
            .downcast_ref::<JsonlTable>()
            .expect("checked by find()")
            .source()
    }

    /// Runs the insert from the stored position to the end of the file (or until `control`
    /// stops it, after a commit); returns the rows written by this run.
    pub async fn run(&self, ctx: &SessionContext, pipeline: &str, control: &StreamControl) -> Result<u64> {
        let source = self.jsonl().clone();
        let target = self.insert.target_name().to_string();
        let keys = source.resumes().then(|| PositionKeys::of(source.path()));
        let start = match &keys {
            Some(keys) => self.stored_position(keys, pipeline)?,
            None => LinePosition::default(),
        };
        if start.byte > 0 {
            log::info!(
                "pipeline {pipeline}: {} was read into '{target}' up to line {}: going on from there",
                source.source(),
                start.line
            );
        }
        let read = {
            let (source, path) = (source.clone(), source.path().to_path_buf());
            let keys = keys.clone();
            move |emit: &mut dyn FnMut(Piece<(Vec<DeadLetter>, LinePosition)>) -> bool| {
                let mut failed = None;
                source.decode_from(start, |lines| {
                    let offsets = match &keys {
                        Some(keys) => match fingerprint(&path, lines.end.byte) {
                            Ok(check) => keys.offsets(lines.end, check),
                            Err(e) => {
                                // The batch could not be committed with its position: fail the
                                // insert rather than end it early as if the file had.
                                failed = Some(read_error(&path.display().to_string(), e));
                                return false;
                            }
                        },
                        None => SourceOffsets::new(),
                    };
                    let DecodedLines { batch, refused, end } = lines;
                    emit(Piece {
                        rows: batch,
                        offsets,
                        meta: (refused, end),
                    })
                })?;
                failed.map_or(Ok(()), Err)
            }
        };
        let (mut refused, mut end) = (0usize, start);
        let run = self
            .insert
            .run_pieces(ctx, control, &source.source(), read, |(letters, at)| {
                refused += source.dead_letters().record(letters);
                end = at;
            })
            .await?;
        if run.stopped {
            log::info!(
                "pipeline {pipeline}: stopped after line {} of {}; the next run goes on from there",
                end.line,
                source.source()
            );
        }
        if keys.is_some() && end.byte == self.file_length()? && run.commits == 0 {
            log::info!(
                "pipeline {pipeline}: nothing new in {} since the last run",
                source.source()
            );
        }
        if refused > 0 {
            log::warn!(
                "pipeline {pipeline}: {refused} bad records of {} went to the dead_letters table",
                source.source()
            );
        }
        log::debug!(
            "pipeline {pipeline}: {} rows into '{target}' in {} commits",
            run.written,
            run.commits
        );
        Ok(run.written)
    }

    /// Where the last run stopped, if the index stored a position for this very file.
    fn stored_position(&self, keys: &PositionKeys, pipeline: &str) -> Result<LinePosition> {
        let stored = self.insert.target().source_offsets();
        let Some(byte) = stored.get(&keys.byte) else {
            return Ok(LinePosition::default());
        };
        let position = LinePosition {
            byte: byte.max(0) as u64,
            line: stored.get(&keys.lines).unwrap_or(0).max(0) as u64,
        };
        let source = self.jsonl().source();
        let same_file = position.byte <= self.file_length()?
            && stored.get(&keys.check)
                == Some(fingerprint(self.jsonl().path(), position.byte).map_err(|e| read_error(&source, e))?);
        if !same_file {
            log::warn!(
                "pipeline {pipeline}: {source} is not the file read up to line {} by an earlier run: reading it from the start",
                position.line
            );
            return Ok(LinePosition::default());
        }
        Ok(position)
    }

    fn file_length(&self) -> Result<u64> {
        let source = self.jsonl();
        std::fs::metadata(source.path())
            .map(|m| m.len())
            .map_err(|e| read_error(&source.source(), e))
    }
}

/// The source-offset keys of one file's position.
#[derive(Clone)]
struct PositionKeys {
    byte: String,
    lines: String,
    check: String,
}

impl PositionKeys {
    fn of(path: &Path) -> Self {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let byte = format!("file:{}", path.display());
        PositionKeys {
            lines: format!("{byte}#lines"),
            check: format!("{byte}#check"),
            byte,
        }
    }

    fn offsets(&self, at: LinePosition, check: i64) -> SourceOffsets {
        [
            (self.byte.clone(), at.byte as i64),
            (self.lines.clone(), at.line as i64),
            (self.check.clone(), check),
        ]
        .into_iter()
        .collect()
    }
}

/// A 64-bit FNV-1a hash of the first and the last [`FINGERPRINT_WINDOW`] bytes of the file's
/// first `end` bytes.
fn fingerprint(path: &Path, end: u64) -> std::io::Result<i64> {
    let mut file = std::fs::File::open(path)?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let head = end.min(FINGERPRINT_WINDOW);
    let tail_start = end.saturating_sub(FINGERPRINT_WINDOW).max(head);
    let mut buffer = Vec::with_capacity(2 * FINGERPRINT_WINDOW as usize);
    (&mut file).take(head).read_to_end(&mut buffer)?;
    file.seek(SeekFrom::Start(tail_start))?;
    file.take(end - tail_start).read_to_end(&mut buffer)?;
    if buffer.len() as u64 != head + (end - tail_start) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file is shorter than the position",
        ));
    }
    hash ^= end;
    for byte in buffer {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(hash as i64)
}

fn read_error(source: &str, e: std::io::Error) -> DataFusionError {
    DataFusionError::Execution(format!("cannot read {source}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_tells_an_appended_file_from_a_rewritten_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        let lines: String = (0..2000).map(|i| format!("{{\"doc_id\": \"d{i}\"}}\n")).collect();
        std::fs::write(&path, &lines).unwrap();
        let end = lines.len() as u64 / 2;
        let before = fingerprint(&path, end).unwrap();
        assert_ne!(
            before,
            fingerprint(&path, end - 1).unwrap(),
            "the position is part of it"
        );
        std::fs::write(&path, format!("{lines}{{\"doc_id\": \"new\"}}\n")).unwrap();
        assert_eq!(before, fingerprint(&path, end).unwrap(), "appending keeps it");
        for changed in [
            lines.replacen("d0\"", "x0\"", 1),
            lines.replacen(&format!("d{}\"", 1000), "xyz\"", 1),
        ] {
            std::fs::write(&path, changed).unwrap();
            assert_ne!(
                before,
                fingerprint(&path, end).unwrap(),
                "a rewrite near either end changes it"
            );
        }
        std::fs::write(&path, &lines[..100]).unwrap();
        assert!(
            fingerprint(&path, end).is_err(),
            "a shorter file has no fingerprint at the position"
        );
    }
}
