//! The index's files: Arrow IPC row files (rows with their hidden `u64` keys), written
//! atomically, and the clean-up of files no manifest names.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use arrow::ipc::convert::fb_to_schema;
use arrow::ipc::reader::{FileDecoder, FileReader, read_footer_length};
use arrow::ipc::writer::FileWriter;
use arrow::ipc::{Block, root_as_footer};
use memmap2::Mmap;

use crate::faults::{self, Stage};
use crate::mapped::MappedFile;
use crate::segment::Segment;
use crate::{IndexError, Manifest};

/// Name of the hidden key column inside row files.
pub(crate) const KEY_FIELD: &str = "_key";

/// The row schema of an Arrow IPC row file (without the key column), and where its key
/// column is.
fn row_schema(path: &Path, stored_schema: &Schema) -> Result<(SchemaRef, usize), IndexError> {
    let key_position = stored_schema
        .index_of(KEY_FIELD)
        .map_err(|_| IndexError::Invalid(format!("{} lacks the {KEY_FIELD} column", path.display())))?;
    let fields: Vec<_> = stored_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != key_position)
        .map(|(_, f)| f.clone())
        .collect();
    Ok((Arc::new(Schema::new(fields)), key_position))
}

fn open_rows(path: &Path) -> Result<FileReader<std::io::BufReader<fs::File>>, IndexError> {
    let file = fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    FileReader::try_new(std::io::BufReader::new(file), None).map_err(|e| unreadable(path, e))
}

/// A row file that cannot be read, named, with what to do about it.
fn unreadable(path: &Path, e: impl std::fmt::Display) -> IndexError {
    IndexError::Invalid(format!(
        "{} is not a readable Arrow row file ({e}); the index's rows cannot be recovered from it \
         (hint: restore the directory from a backup, or re-ingest the documents into a new LOCATION)",
        path.display()
    ))
}

/// The row schema of an Arrow IPC row file, without reading its rows.
pub(crate) fn read_schema(path: &Path) -> Result<SchemaRef, IndexError> {
    let reader = open_rows(path)?;
    Ok(row_schema(path, &reader.schema())?.0)
}

/// Whether the rows of a mapped file are checked (UTF-8, offsets) as they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Check everything: a file from disk, maybe damaged.
    Full,
    /// Trust the file: this process has just written it from checked rows.
    WrittenHere,
}

/// Reads an Arrow IPC row file: its schema without the key column, and each batch with its
/// keys. The rows stay in the file's pages (memory-mapped); only the keys are copied.
pub(crate) fn read_rows(path: &Path, check: Check) -> Result<(SchemaRef, Vec<Segment>), IndexError> {
    let file = fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    // SAFETY: row files are written whole under a temporary name, renamed into place and never
    // changed afterwards (a later generation writes new files); a mapping stays valid after its
    // file is deleted.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| IndexError::io(path, e))?;
    let len = map.len();
    if len < 10 + 8 {
        return Err(unreadable(path, "the file is too short"));
    }
    let pointer = NonNull::new(map.as_ptr().cast_mut()).ok_or_else(|| unreadable(path, "empty mapping"))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
    let file = Arc::new(MappedFile::new(map, name));
    // SAFETY: the pointer and length are the mapping's, which the buffer keeps alive.
    let buffer = unsafe { Buffer::from_custom_allocation(pointer, len, file.clone()) };
    let trailer = len - 10;
    let footer_length =
        read_footer_length(buffer[trailer..].try_into().expect("10 bytes")).map_err(|e| unreadable(path, e))?;
    let footer_start = trailer
        .checked_sub(footer_length)
        .ok_or_else(|| unreadable(path, "the footer is longer than the file"))?;
    let footer = root_as_footer(&buffer[footer_start..trailer]).map_err(|e| unreadable(path, e))?;
    let stored_schema = Arc::new(fb_to_schema(
        footer
            .schema()
            .ok_or_else(|| unreadable(path, "no schema in the footer"))?,
    ));
    let (schema, key_position) = row_schema(path, &stored_schema)?;
    let mut decoder = FileDecoder::new(stored_schema, footer.version());
    if check == Check::WrittenHere {
        // SAFETY: the file was written by this process, from rows arrow had validated.
        decoder = unsafe { decoder.with_skip_validation(true) };
    }
    let block_data = |block: &Block| {
        let start = usize::try_from(block.offset()).ok()?;
        let length = usize::try_from(block.bodyLength()).ok()? + usize::try_from(block.metaDataLength()).ok()?;
        (start.checked_add(length)? <= footer_start).then(|| buffer.slice_with_length(start, length))
    };
    for block in footer.dictionaries().iter().flatten() {
        let data = block_data(block).ok_or_else(|| unreadable(path, "a dictionary lies outside the file"))?;
        decoder.read_dictionary(block, &data).map_err(|e| unreadable(path, e))?;
    }
    let mut segments = Vec::new();
    for block in footer.recordBatches().iter().flatten() {
        let data = block_data(block).ok_or_else(|| unreadable(path, "a batch lies outside the file"))?;
        let Some(batch) = decoder
            .read_record_batch(block, &data)
            .map_err(|e| unreadable(path, e))?
        else {
            continue;
        };
        let keys: Arc<[u64]> = Arc::from(
            batch
                .column(key_position)
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(|| unreadable(path, format!("{KEY_FIELD} is not a UInt64 column")))?
                .values()
                .as_ref(),
        );
        let mut columns = batch.columns().to_vec();
        columns.remove(key_position);
        segments.push(Segment {
            batch: RecordBatch::try_new(schema.clone(), columns)?,
            keys,
            file: Some(file.clone()),
        });
    }
    if check == Check::Full {
        file.release_pages();
    }
    Ok((schema, segments))
}

/// Writes segments (rows with their keys) to an Arrow IPC row file, one at a time, atomically
/// (temporary file, fsync, rename on [`RowWriter::finish`]).
pub(crate) struct RowWriter {
    path: PathBuf,
    tmp: TempFile,
    schema: SchemaRef,
    writer: FileWriter<std::io::BufWriter<PacedFile>>,
    segments: usize,
}

impl RowWriter {
    /// Starts the row file `path` for rows of `schema`, written at `pace`.
    pub(crate) fn create(path: &Path, schema: &SchemaRef, pace: Pace) -> Result<Self, IndexError> {
        let mut fields = vec![Field::new(KEY_FIELD, DataType::UInt64, false)];
        fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
        let file_schema = Arc::new(Schema::new(fields));
        let tmp = TempFile(path.with_extension("arrow.tmp"));
        let file = fs::File::create(&tmp.0).map_err(|e| IndexError::io(&tmp.0, e))?;
        faults::check(path, Stage::Write).map_err(|e| IndexError::io(&tmp.0, e))?;
        let writer = FileWriter::try_new(std::io::BufWriter::new(PacedFile::new(file, pace)), &file_schema)?;
        Ok(RowWriter {
            path: path.to_path_buf(),
            tmp,
            schema: file_schema,
            writer,
            segments: 0,
        })
    }

    /// Appends one segment (one row block of the file).
    pub(crate) fn write(&mut self, segment: &Segment) -> Result<(), IndexError> {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(segment.keys.to_vec()))];
        columns.extend(segment.batch.columns().iter().cloned());
        self.writer
            .write(&RecordBatch::try_new(self.schema.clone(), columns)?)?;
        self.segments += 1;
        // A rewrite copies mapped rows: keep only the segment being copied resident.
        if let Some(file) = &segment.file {
            file.release_pages();
        }
        Ok(())
    }

    /// Flushes the file to disk and moves it into place; returns its segments, read back from
    /// it (from then on they live in its pages, memory-mapped, instead of the heap).
    pub(crate) fn finish(self) -> Result<Vec<Segment>, IndexError> {
        self.finish_with(true)
    }

    /// [`RowWriter::finish`] without the flush: for a file whose bytes the commit log holds.
    fn finish_unflushed(self) -> Result<Vec<Segment>, IndexError> {
        self.finish_with(false)
    }

    fn finish_with(mut self, flush: bool) -> Result<Vec<Segment>, IndexError> {
        self.writer.finish()?;
        let file = self
            .writer
            .into_inner()?
            .into_inner()
            .map_err(|e| IndexError::io(&self.tmp.0, e.into_error()))?
            .file;
        if flush {
            faults::check(&self.path, Stage::Sync)
                .and_then(|_| file.sync_all())
                .map_err(|e| IndexError::io(&self.tmp.0, e))?;
        }
        self.tmp.rename_to(&self.path)?;
        let (_, mapped) = read_rows(&self.path, Check::WrittenHere)?;
        if mapped.len() != self.segments {
            return Err(IndexError::Invalid(format!(
                "{} holds {} row blocks, not the {} just written",
                self.path.display(),
                mapped.len(),
                self.segments
            )));
        }
        Ok(mapped)
    }
}

/// A temporary file, removed when dropped unless it was moved into place: a write that fails
/// leaves nothing behind.
struct TempFile(PathBuf);

impl TempFile {
    /// Moves the file to `path`; it is no longer temporary.
    fn rename_to(&mut self, path: &Path) -> Result<(), IndexError> {
        fs::rename(&self.0, path).map_err(|e| IndexError::io(path, e))?;
        self.0 = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// Bytes a background write sends to the disk at a time (see [`write_back`]): a commit's flush
/// then waits behind one or two pieces at most.
const PACE_BYTES: usize = 1 << 20;

/// The write rate of a background compaction while it is not in a hurry (64 MiB/s, as
/// Cassandra's `compaction_throughput`): a disk kept busy by a compaction makes every commit's
/// fsync queue behind it (measured on this project's build machine: 10-row commits' p99 went
/// from 0.7 to 9–30 ms under an unthrottled 1 MiB-paced writer, and stayed at ~3 ms under one
/// held to 50 MB/s).
pub(crate) const BACKGROUND_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;

/// How a large file is written.
#[derive(Debug, Clone)]
pub(crate) enum Pace {
    /// At once, flushed at the end (nothing else commits meanwhile: an inline full commit).
    AtOnce,
    /// Beside commits (a background compaction): in [`PACE_BYTES`] pieces, each written back
    /// as it is done, at most [`BACKGROUND_BYTES_PER_SEC`] — at full speed while the flag is set
    /// (commits set it when deltas pile up, so an inline compaction never has to take over).
    Background(Arc<AtomicBool>),
}

/// A file that writes its data back to disk every [`PACE_BYTES`] written and keeps to the
/// background rate, when paced (the caller flushes it at the end).
pub(crate) struct PacedFile {
    file: fs::File,
    pace: Pace,
    /// Bytes written since the last piece was sent to the disk.
    pending: usize,
    written: usize,
    started: Instant,
}

impl PacedFile {
    pub(crate) fn new(file: fs::File, pace: Pace) -> Self {
        PacedFile {
            file,
            pace,
            pending: 0,
            written: 0,
            started: Instant::now(),
        }
    }
}

impl std::io::Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A large buffer (a whole vector column) is written a piece at a time, or one fsync
        // would flush all of it.
        let piece = match self.pace {
            Pace::AtOnce => buf,
            Pace::Background(_) => &buf[..buf.len().min(PACE_BYTES - self.pending)],
        };
        let written = self.file.write(piece)?;
        self.pending += written;
        self.written += written;
        if let Pace::Background(hurry) = &self.pace
            && self.pending >= PACE_BYTES
        {
            write_back(&self.file, self.written - self.pending, self.pending)?;
            self.pending = 0;
            if !hurry.load(Ordering::Relaxed) {
                let due = Duration::from_secs_f64(self.written as f64 / BACKGROUND_BYTES_PER_SEC);
                std::thread::sleep(due.saturating_sub(self.started.elapsed()));
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Starts writing the `len` bytes at `offset` of `file` to the disk, once the bytes before them
/// are written: at most two pieces are in flight, none waits in the page cache for a later
/// flush, and no cache flush is asked of the disk — which every commit's flush would queue
/// behind (the commit log's included, which otherwise shares nothing with a compaction). The
/// file's final fsync makes the pieces durable.
fn write_back(file: &fs::File, offset: usize, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // (A length of 0 means "to the end of the file": the first piece waits for nothing.)
    let before = (offset > 0).then_some((0, offset, wait));
    for (from, bytes, flags) in before.into_iter().chain([(offset, len, libc::SYNC_FILE_RANGE_WRITE)]) {
        // SAFETY: sync_file_range reads its integer arguments only; the descriptor is open.
        let done = unsafe { libc::sync_file_range(file.as_raw_fd(), from as i64, bytes as i64, flags) };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` at `pace`, then flushes the whole file and its directory entry.
pub(crate) fn write_paced(path: &Path, bytes: &[u8], pace: Pace) -> Result<(), IndexError> {
    let file = fs::File::create(path).map_err(|e| IndexError::io(path, e))?;
    let mut file = PacedFile::new(file, pace);
    faults::check(path, Stage::Write)
        .and_then(|_| bytes.chunks(PACE_BYTES).try_for_each(|piece| file.write_all(piece)))
        .map_err(|e| IndexError::io(path, e))?;
    fsync_file(path)
}

/// Writes `segments` to the row file `path` (see [`RowWriter`]) without flushing it (a delta,
/// made durable by the commit log); returns them read back from it.
pub(crate) fn write_rows_unflushed(
    path: &Path,
    schema: &SchemaRef,
    segments: &[Segment],
) -> Result<Vec<Segment>, IndexError> {
    let mut writer = RowWriter::create(path, schema, Pace::AtOnce)?;
    for segment in segments {
        writer.write(segment)?;
    }
    writer.finish_unflushed()
}

/// Flushes a file and its directory entry to disk.
pub(crate) fn fsync_file(path: &Path) -> Result<(), IndexError> {
    faults::check(path, Stage::Sync)
        .and_then(|_| fs::File::open(path))
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Flushes a directory's entries (renames) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IndexError::io(dir, e))
}

/// Deletes the data files `replaced` names (after a generation that no longer needs them is
/// published); those named in `shrink` are first shrunk a piece at a time: freeing a 160 MB
/// file's blocks in one unlink held a concurrent 10-row commit's fsync ~15 ms behind the
/// journal. Only a file no one maps may shrink (a search's read of a truncated page is a crash).
pub(crate) fn remove_files_of(dir: &Path, replaced: &Manifest, shrink: &HashSet<String>) {
    for file in replaced.files() {
        let path = dir.join(file);
        if shrink.contains(file) {
            shrink_gradually(&path);
        }
        let _ = fs::remove_file(path);
    }
}

/// Pieces a file about to be deleted is shrunk by, and the pause after each (small in tests,
/// so a test's small files shrink in several pieces too).
#[cfg(not(test))]
const SHRINK_BYTES: u64 = 8 << 20;
#[cfg(not(test))]
const SHRINK_PAUSE: Duration = Duration::from_millis(20);
#[cfg(test)]
const SHRINK_BYTES: u64 = 16 << 10;
#[cfg(test)]
const SHRINK_PAUSE: Duration = Duration::from_millis(1);

/// Truncates a file no one maps [`SHRINK_BYTES`] at a time.
fn shrink_gradually(path: &Path) {
    let Ok(file) = fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    let mut len = file.metadata().map_or(0, |m| m.len());
    while len > SHRINK_BYTES {
        len -= SHRINK_BYTES;
        if file.set_len(len).and_then(|_| file.sync_all()).is_err() {
            return;
        }
        std::thread::sleep(SHRINK_PAUSE);
    }
}

/// Deletes files of generations other than the manifest's (left by an interrupted commit),
/// but those in `kept` (replaced files a companion keeps for the generation its parent names).
pub(crate) fn remove_stray_files(dir: &Path, manifest: &Manifest, kept: &HashSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_data = ((name.starts_with("rows-") || name.starts_with("delta-")) && name.ends_with(".arrow"))
            || (name.starts_with("ann-") && name.ends_with(".usearch"))
            || name.ends_with(".tmp");
        if is_data && !manifest.files().any(|f| f == name) && !kept.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}
