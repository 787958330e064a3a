//! Resumable directory inserts: an `INSERT INTO <knowledge index> SELECT … FROM <TEXT_FILES
//! table>` whose plan works row by row runs once per batch of `commit_rows` files (in path
//! order), and each batch commits together with its place in the listing. Memory stays at a
//! batch or two however many files there are, and a run after a crash (or a stop) goes on after
//! the last file committed: every file is inserted once.
//!
//! The position is kept under `dir:<canonical path>` (files committed so far in this pass) and
//! `…#check` (a hash of the last one's path relative to the directory). The batch that ends a
//! pass stores 0 for both, so the run after a finished one reads the whole directory again
//! (each file replaces its row, keyed by `doc_id`). A run that finds the last committed file
//! gone reads from the start, and says so; files added meanwhile that sort before the position
//! are read by the next pass. `OPTIONS ('resume' 'false')` stores no position.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::common::Result;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::LogicalPlan;

use super::control::StreamControl;
use super::insert::{Piece, PieceInsert};
use crate::sources::{TextFilesSource, TextFilesTable};
use mkflow_index::SourceOffsets;

/// An `INSERT` into a knowledge index that reads a `TEXT_FILES` directory, committed batch by
/// batch with its place in the listing.
#[derive(Debug)]
pub struct DirectoryInsert {
    insert: PieceInsert,
}

impl DirectoryInsert {
    /// Recognises an `INSERT INTO <knowledge index> … FROM <TEXT_FILES table>` that can run
    /// batch by batch: one directory scan, a knowledge index as the target, and a plan that
    /// works row by row. Any other insert runs whole, as one commit.
    pub fn find(plan: &LogicalPlan) -> Result<Option<Self>> {
        let found = PieceInsert::find_row_by_row(plan, |provider| provider.is::<TextFilesTable>())?;
        Ok(found.map(|insert| DirectoryInsert { insert }))
    }

    fn directory(&self) -> &Arc<TextFilesSource> {
        self.insert
            .source()
            .downcast_ref::<TextFilesTable>()
            .expect("checked by find()")
            .source()
    }

    /// Runs the insert from the stored position to the end of the listing (or until `control`
    /// stops it, after a commit); returns the rows written by this run.
    pub async fn run(&self, ctx: &SessionContext, pipeline: &str, control: &StreamControl) -> Result<u64> {
        let source = self.directory().clone();
        let name = source.root().display().to_string();
        let keys = source.resumes().then(|| PositionKeys::of(source.root()));
        let stored = keys
            .as_ref()
            .and_then(|keys| keys.stored(&self.insert.target().source_offsets()));
        let read = {
            let (source, pipeline, target) = (
                source.clone(),
                pipeline.to_string(),
                self.insert.target_name().to_string(),
            );
            move |emit: &mut dyn FnMut(Piece<usize>) -> bool| {
                let files = source.files();
                let start = stored.map_or(0, |(done, check)| {
                    resume_at(&files, source.root(), done, check, &pipeline, &target)
                });
                let batches = source.batches_of(&files[start..]);
                let (last, mut done) = (batches.len(), start);
                for (i, batch) in batches.into_iter().enumerate() {
                    done += batch.len();
                    let rows = source.batch(batch)?;
                    let offsets = match &keys {
                        // The batch that ends the pass clears the position.
                        Some(keys) if i + 1 == last => keys.offsets(0, 0),
                        Some(keys) => keys.offsets(done, path_hash(source.root(), &files[done - 1])),
                        None => SourceOffsets::new(),
                    };
                    if !emit(Piece {
                        rows,
                        offsets,
                        meta: done,
                    }) {
                        break;
                    }
                }
                Ok(())
            }
        };
        let mut done = 0;
        let run = self
            .insert
            .run_pieces(ctx, control, &name, read, |files| done = files)
            .await?;
        if run.stopped {
            log::info!("pipeline {pipeline}: stopped after file {done} of {name}; the next run goes on from there");
        }
        log::debug!(
            "pipeline {pipeline}: {} rows into '{}' in {} commits",
            run.written,
            self.insert.target_name(),
            run.commits
        );
        Ok(run.written)
    }
}

/// Where in `files` a pass that committed `done` files, the last with path hash `check`, goes
/// on: after that file, wherever it is now, else (gone) at the start.
fn resume_at(files: &[PathBuf], root: &Path, done: usize, check: i64, pipeline: &str, target: &str) -> usize {
    // The file is most likely where it was; look there first.
    let found = files
        .get(done.wrapping_sub(1))
        .filter(|file| path_hash(root, file) == check)
        .map(|_| done)
        .or_else(|| {
            files
                .iter()
                .position(|file| path_hash(root, file) == check)
                .map(|i| i + 1)
        });
    match found {
        // Only files before the position are left: the pass is over, a new one begins.
        Some(start) if start >= files.len() => 0,
        Some(start) => {
            log::info!(
                "pipeline {pipeline}: {} was read into '{target}' up to file {start} of {}: going on from there",
                root.display(),
                files.len()
            );
            start
        }
        None => {
            log::warn!(
                "pipeline {pipeline}: the last file an earlier run read from {} into '{target}' is gone: reading the directory from the start",
                root.display()
            );
            0
        }
    }
}

/// The source-offset keys of one directory's position.
struct PositionKeys {
    done: String,
    check: String,
}

impl PositionKeys {
    fn of(root: &Path) -> Self {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| PathBuf::from(root));
        let done = format!("dir:{}", root.display());
        PositionKeys {
            check: format!("{done}#check"),
            done,
        }
    }

    /// The stored position of an unfinished pass: files committed, and the last one's hash.
    fn stored(&self, offsets: &SourceOffsets) -> Option<(usize, i64)> {
        let done = offsets.get(&self.done).filter(|done| *done > 0)?;
        Some((done as usize, offsets.get(&self.check)?))
    }

    fn offsets(&self, done: usize, check: i64) -> SourceOffsets {
        [(self.done.clone(), done as i64), (self.check.clone(), check)]
            .into_iter()
            .collect()
    }
}

/// A 64-bit FNV-1a hash of `file`'s path relative to `root` (its `doc_id`).
fn path_hash(root: &Path, file: &Path) -> i64 {
    let relative = file.strip_prefix(root).unwrap_or(file);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in relative.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_resumes_after_its_last_file_wherever_the_listing_put_it() {
        let root = Path::new("/notes");
        let listing = |names: &[&str]| -> Vec<PathBuf> { names.iter().map(|n| root.join(n)).collect() };
        let files = listing(&["a.md", "b.md", "c.md", "d.md"]);
        let check = path_hash(root, &root.join("b.md"));
        let resume = |files: &[PathBuf]| resume_at(files, root, 2, check, "p", "kb");
        assert_eq!(resume(&files), 2, "where it was");
        assert_eq!(
            resume(&listing(&["0.md", "a.md", "b.md", "c.md"])),
            3,
            "after a file added before it"
        );
        assert_eq!(
            resume(&listing(&["b.md", "c.md"])),
            1,
            "after files before it were removed"
        );
        assert_eq!(resume(&listing(&["a.md", "c.md", "d.md"])), 0, "gone: from the start");
        assert_eq!(resume(&listing(&["a.md", "b.md"])), 0, "nothing after it: a new pass");
        assert_ne!(check, path_hash(root, &root.join("a.md")));
        assert_eq!(
            check,
            path_hash(Path::new("/elsewhere"), Path::new("/elsewhere/b.md")),
            "relative to the root"
        );
    }
}
