//! The commit log: a small commit is durable after one flush of one preallocated file.
//!
//! A micro-batch used to flush three times: its delta file, a temporary manifest, and the
//! directory after the rename. Each of those flushes a file whose size or name changed, so
//! each waits for a file-system journal commit — which, on ext4, waits for whatever a
//! background compaction has just written. Now such a commit (a delta, an offsets-only commit,
//! a group's commit, a compaction's swap) writes its delta file without flushing it and appends
//! one record — its manifest and its delta file's bytes — to `commit.log`, then flushes the log
//! alone: `fdatasync` of blocks already written, no journal commit.
//!
//! `manifest.json` then holds the last **checkpoint**. A checkpoint (every full commit, the
//! engine's upkeep once the log is half full, and any commit that finds the log full or failed)
//! flushes the delta files its manifest names,
//! writes `manifest.json` atomically with the next log **epoch**, and starts the log over in
//! that epoch. A log whose header names another epoch than `manifest.json` was superseded by a
//! checkpoint before it could start over: its records are older than the manifest.
//!
//! The process that writes an index holds the log's lock (an OS file lock, gone with the
//! process), taken when it opens the index ([`attach`]); another process opening it then
//! reads the last commit from `manifest.json` and the log, and refuses to commit. The writer
//! first recovers: the log's records of the manifest's epoch are the commits since the
//! checkpoint. Each record's delta file is written again from the log where its bytes differ (a
//! crash may have lost them) and flushed, the last record's manifest becomes `manifest.json`,
//! and the log starts over. A record cut short or damaged (its checksum fails) is a commit that
//! never returned: it and everything after it are dropped.
//!
//! Layout: a 16-byte header (magic, epoch), then records, each `length: u32, crc32: u32,
//! epoch: u64` and a payload of `manifest length: u32, manifest JSON, delta name length: u16,
//! delta name, delta bytes`; zeros (or an older epoch's records) after the last one.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::faults::{self, Stage};
use crate::files::sync_dir;
use crate::manifest::FORMAT_VERSION;
use crate::{IndexError, KnowledgeIndex, Manifest};

/// The commit log's file name inside an index directory.
pub const LOG_FILE: &str = "commit.log";

/// The header's first bytes: what the file is, and its layout version.
const MAGIC: &[u8; 8] = b"MKFLOG\x00\x01";
/// Header bytes: magic and epoch.
const HEADER: u64 = 16;
/// Bytes before each record's payload: length, checksum, epoch.
const RECORD_HEADER: usize = 16;
/// The log's size, fixed when it is made: growing the file would change its metadata, and
/// every record's flush would then wait for the journal (and flush the new zeros). Half of it
/// holds ~200 records of 10-row micro-batches of 384-d vectors (~20 KB each) before
/// [`KnowledgeIndex::upkeep_log`] checkpoints.
#[cfg(not(test))]
const CAPACITY: u64 = 8 << 20;
#[cfg(test)]
const CAPACITY: u64 = 1 << 20;
/// How long opening waits for the log's lock before it reads as another process's reader: a
/// lock this process has just let go of can linger a moment in a child it is spawning (between
/// fork and exec the child holds a copy of every descriptor, and with it the lock).
const LOCK_PATIENCE: Duration = Duration::from_secs(2);
/// A new log's zeros are written and flushed this many bytes at a time, so another index's
/// commit waits behind one piece at most.
const FILL_PIECE: usize = 1 << 20;

/// How a commit's manifest becomes durable.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Durability<'a> {
    /// Appended to the commit log when it has room, with the delta file the commit wrote
    /// unflushed (if any); else a checkpoint.
    Logged { delta: Option<&'a str> },
    /// Written to `manifest.json` (a full commit, whose files are flushed already).
    Checkpoint,
}

/// The commit log of a directory, shared by the index handles this process has open there.
pub(crate) type SharedLog = Arc<Mutex<CommitLog>>;

/// The commit logs this process has open, by directory: a second handle on a directory shares
/// the first one's log (and never replays it under the first one's feet).
static OPEN: Mutex<BTreeMap<PathBuf, Weak<Mutex<CommitLog>>>> = Mutex::new(BTreeMap::new());

/// The open commit log of an index (see the module documentation).
#[derive(Debug)]
pub(crate) struct CommitLog {
    path: PathBuf,
    /// Holds the log's lock (an OS file lock) when this process writes the index.
    file: fs::File,
    /// Whether this process writes the index: another process holding the lock makes this one
    /// a reader, which replays nothing and commits nothing.
    writer: bool,
    /// The epoch of the records appended now; set before a restart is tried, so a failed
    /// restart never lets a later one reuse an epoch.
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    /// The file's size, zero-filled past `end`.
    capacity: u64,
    /// Delta files written since the last checkpoint and not flushed: the log holds their bytes.
    unflushed: HashSet<String>,
    /// Whether appending is unsafe: a write failed, or the log and `manifest.json` disagree on
    /// the epoch. The next commit checkpoints, which restarts the log.
    stale: bool,
}

/// The commit log of the index in `dir` (which may not hold one yet), for a new handle: the
/// one another handle of this process has open there; else this process takes the log's lock
/// and recovers (see [`CommitLog::recover`]) — or, when another process holds the lock, opens it as a reader.
pub(crate) fn attach(dir: &Path) -> Result<SharedLog, IndexError> {
    let key = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|_, log| log.strong_count() > 0);
    if let Some(log) = open.get(&key).and_then(Weak::upgrade) {
        return Ok(log);
    }
    let log = Arc::new(Mutex::new(CommitLog::open(dir)?));
    open.insert(key, Arc::downgrade(&log));
    Ok(log)
}

impl CommitLog {
    /// Opens (or creates) the log of `dir` and replays it, holding its lock; a reader's when
    /// another process holds the lock.
    fn open(dir: &Path) -> Result<Self, IndexError> {
        let path = dir.join(LOG_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| IndexError::io(&path, e))?;
        let asked = Instant::now();
        let writer = loop {
            match file.try_lock() {
                Ok(()) => break true,
                Err(fs::TryLockError::WouldBlock) if asked.elapsed() < LOCK_PATIENCE => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::WouldBlock) => break false,
                Err(fs::TryLockError::Error(e)) => return Err(IndexError::io(&path, e)),
            }
        };
        let mut log = CommitLog {
            path,
            file,
            writer,
            epoch: 0,
            end: HEADER,
            capacity: 0,
            unflushed: HashSet::new(),
            stale: true,
        };
        if !writer {
            log::info!(
                "{}: another process writes this index (it holds {LOG_FILE}'s lock); opening it to read",
                dir.display()
            );
            return Ok(log);
        }
        let manifest = Manifest::read(dir)?;
        let mut header = [0u8; HEADER as usize];
        let header_epoch = log
            .file
            .read_exact_at(&mut header, 0)
            .ok()
            .and_then(|_| epoch_of(&header));
        let (manifest_epoch, generation) = manifest.as_ref().map_or((0, 0), |m| (m.log_epoch, m.generation));
        if header_epoch.is_none() {
            // A new log (for a new index, or one made before the log). The latter's first
            // commit checkpoints, writing a manifest that says to read the log (format version
            // 2), so an older mkflow cannot open it and miss the log.
            log.fill().map_err(|e| IndexError::io(&log.path, e))?;
            log.restart(manifest_epoch).map_err(|e| IndexError::io(&log.path, e))?;
            sync_dir(dir)?;
            log.stale = generation > 0;
            return Ok(log);
        }
        log.capacity = log.file.metadata().map_err(|e| IndexError::io(&log.path, e))?.len();
        if let Some(manifest) = &manifest
            && header_epoch == Some(manifest_epoch)
        {
            log.epoch = manifest_epoch;
            log.recover(dir, manifest)?;
        } else {
            log.epoch = header_epoch.unwrap_or(0).max(manifest_epoch);
            log.stale = true;
        }
        Ok(log)
    }

    /// The log file's size (for tests).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether this process writes the index (else another process holds the log's lock).
    pub(crate) fn is_writer(&self) -> bool {
        self.writer
    }

    /// Appends one record and flushes it; `Ok(false)` when it does not fit.
    fn append(&mut self, payload: &[u8]) -> std::io::Result<bool> {
        let length = (RECORD_HEADER + payload.len()) as u64;
        if self.end + length > self.capacity {
            return Ok(false);
        }
        let mut record = Vec::with_capacity(length as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&checksum(self.epoch, payload).to_le_bytes());
        record.extend_from_slice(&self.epoch.to_le_bytes());
        record.extend_from_slice(payload);
        let written = faults::check(&self.path, Stage::Write)
            .and_then(|_| self.file.write_all_at(&record, self.end))
            .and_then(|_| faults::check(&self.path, Stage::Sync))
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            self.stale = true;
            return Err(e);
        }
        self.end += length;
        Ok(true)
    }

    /// Writes the zeros of a new log, a piece at a time, and flushes them with its size.
    fn fill(&mut self) -> std::io::Result<()> {
        let zeros = vec![0u8; FILL_PIECE];
        let mut at = 0;
        while at < CAPACITY {
            let piece = &zeros[..(CAPACITY - at).min(FILL_PIECE as u64) as usize];
            faults::check(&self.path, Stage::Write)
                .and_then(|_| self.file.write_all_at(piece, at))
                .and_then(|_| self.file.sync_data())?;
            at += piece.len() as u64;
        }
        self.file.sync_all()?;
        self.capacity = CAPACITY;
        Ok(())
    }

    /// Starts the log over, empty, in `epoch`.
    fn restart(&mut self, epoch: u64) -> std::io::Result<()> {
        self.epoch = epoch;
        self.stale = true;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&epoch.to_le_bytes());
        faults::check(&self.path, Stage::Write).and_then(|_| self.file.write_all_at(&header, 0))?;
        faults::check(&self.path, Stage::Sync).and_then(|_| self.file.sync_data())?;
        self.end = HEADER;
        self.unflushed.clear();
        self.stale = false;
        Ok(())
    }
}

/// Makes `manifest`, a generation before the commits the log of `dir` holds, the checkpoint of
/// `dir` (a companion rolled back to the generation its parent names), in an epoch no record
/// has: opening replays nothing over it.
pub(crate) fn roll_back(log: &SharedLog, dir: &Path, manifest: &Manifest) -> Result<(), IndexError> {
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    log.stale = true;
    log.epoch += 1;
    let mut manifest = manifest.clone();
    manifest.log_epoch = log.epoch;
    manifest.format_version = FORMAT_VERSION;
    manifest.write_atomic(dir)
}

/// The error of a commit in a process that does not write the index in `dir`.
pub(crate) fn not_the_writer(dir: &Path) -> IndexError {
    IndexError::Invalid(format!(
        "{}: another mkflow process writes this index (it holds {LOG_FILE}'s lock); \
         hint: commit through that process, or stop it and open the index again",
        dir.display()
    ))
}

impl KnowledgeIndex {
    /// Refuses a commit when another process writes this index (before any file is written).
    pub(crate) fn check_writer(&self) -> Result<(), IndexError> {
        match self.log.lock().unwrap_or_else(|e| e.into_inner()).writer {
            true => Ok(()),
            false => Err(not_the_writer(&self.dir)),
        }
    }

    /// Makes `manifest` durable as `durability` says (the caller holds the writer lock).
    pub(crate) fn make_durable(&self, manifest: &mut Manifest, durability: Durability<'_>) -> Result<(), IndexError> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if !log.writer {
            return Err(not_the_writer(&self.dir));
        }
        if let Durability::Logged { delta } = durability {
            if let Some(delta) = delta {
                log.unflushed.insert(delta.to_string());
            }
            let payload = if log.stale {
                None
            } else {
                Some(record_payload(&self.dir, manifest, delta)?)
            };
            // A record too large to fit, or in a full log: checkpoint instead.
            if let Some(payload) = payload
                && log.append(&payload).map_err(|e| IndexError::io(&log.path, e))?
            {
                return Ok(());
            }
        }
        self.checkpoint(&mut log, manifest)
    }

    /// Flushes the unflushed delta files `manifest` names, writes it to `manifest.json` with
    /// the next epoch, and starts the log over in that epoch.
    fn checkpoint(&self, log: &mut CommitLog, manifest: &mut Manifest) -> Result<(), IndexError> {
        let mut flushed = false;
        for delta in manifest.deltas.iter().filter(|d| log.unflushed.contains(*d)) {
            let path = self.dir.join(delta);
            faults::check(&path, Stage::Sync)
                .and_then(|_| fs::File::open(&path))
                .and_then(|f| f.sync_all())
                .map_err(|e| IndexError::io(&path, e))?;
            flushed = true;
        }
        if flushed {
            sync_dir(&self.dir)?;
        }
        // From here on the log no longer follows the manifest on disk until it restarts.
        log.stale = true;
        let epoch = log.epoch + 1;
        log.epoch = epoch;
        manifest.log_epoch = epoch;
        manifest.format_version = FORMAT_VERSION;
        manifest.write_atomic(&self.dir)?;
        if let Err(e) = log.restart(epoch) {
            // The commit is durable: only the log is unusable until the next checkpoint.
            log::warn!(
                "{}: starting the log over failed: {e}; the next commit writes the manifest in full",
                log.path.display()
            );
        }
        Ok(())
    }
}

impl KnowledgeIndex {
    /// Whether the commit log is more than half full: [`KnowledgeIndex::upkeep_log`] should make
    /// room before a commit finds it full (and checkpoints inside the commit).
    pub fn log_upkeep_due(&self) -> bool {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.writer && !log.stale && log.end > log.capacity / 2
    }

    /// Checkpoints a commit log more than half full, off the commit path (what the engine runs
    /// after its commits, as it runs [`KnowledgeIndex::index_backlog`]): the delta files the
    /// published manifest names are flushed holding no lock, then the manifest is written
    /// holding the writer lock, as a full commit would (a few milliseconds, once per hundreds
    /// of micro-batches). Commits go on meanwhile.
    pub fn upkeep_log(&self) -> Result<(), IndexError> {
        if !self.log_upkeep_due() || self.log_upkeep.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let _running = UpkeepRunning(&self.log_upkeep);
        // Flush the deltas first, so the checkpoint holding the lock has (almost) none to flush.
        let unflushed: Vec<String> = {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let manifest = &self.current().manifest;
            manifest
                .deltas
                .iter()
                .filter(|d| log.unflushed.contains(*d))
                .cloned()
                .collect()
        };
        for delta in &unflushed {
            let path = self.dir.join(delta);
            match fs::File::open(&path) {
                Ok(file) => file.sync_all().map_err(|e| IndexError::io(&path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // compacted away
                Err(e) => return Err(IndexError::io(&path, e)),
            }
        }
        sync_dir(&self.dir)?;
        let _writer = self.lock_writer();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        for delta in &unflushed {
            log.unflushed.remove(delta);
        }
        if log.stale || log.end <= log.capacity / 2 {
            return Ok(()); // a commit checkpointed meanwhile
        }
        let mut manifest = self.current().manifest.clone();
        self.checkpoint(&mut log, &mut manifest)
    }
}

/// Clears the "log upkeep running" flag when an upkeep ends, however it ends.
struct UpkeepRunning<'a>(&'a AtomicBool);

impl Drop for UpkeepRunning<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A record's payload: the manifest, then the delta file's name and bytes (empty: no delta).
fn record_payload(dir: &Path, manifest: &Manifest, delta: Option<&str>) -> Result<Vec<u8>, IndexError> {
    let json = serde_json::to_vec(manifest).expect("manifest serialises");
    let name = delta.unwrap_or("");
    let bytes = match delta {
        Some(delta) => fs::read(dir.join(delta)).map_err(|e| IndexError::io(&dir.join(delta), e))?,
        None => Vec::new(),
    };
    let mut payload = Vec::with_capacity(4 + json.len() + 2 + name.len() + bytes.len());
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    payload.extend_from_slice(&(name.len() as u16).to_le_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(&bytes);
    Ok(payload)
}

/// A commit read back from the log.
struct Record {
    manifest: Manifest,
    /// The delta file the commit wrote, and its bytes.
    delta: Option<(String, Vec<u8>)>,
}

impl CommitLog {
    /// Replays the records since `manifest` (the checkpoint, whose epoch is the log's) into
    /// the files — see the module documentation — and starts the log over.
    fn recover(&mut self, dir: &Path, manifest: &Manifest) -> Result<(), IndexError> {
        let mut records = Vec::new();
        logged(dir, manifest, |at, payload| {
            records.push(parse(&payload, at, &self.path)?);
            Ok(())
        })?;
        let Some(last) = records.last() else {
            self.stale = false;
            return Ok(());
        };
        // The deltas the last commit names, and any other still on disk (a companion keeps
        // replaced files for the generation its parent names); those a compaction deleted stay
        // deleted.
        for record in &records {
            if let Some((name, data)) = &record.delta
                && (last.manifest.deltas.contains(name) || dir.join(name).exists())
            {
                restore_file(&dir.join(name), data)?;
            }
        }
        sync_dir(dir)?;
        let epoch = manifest.log_epoch + 1;
        let mut recovered = last.manifest.clone();
        recovered.log_epoch = epoch;
        recovered.format_version = FORMAT_VERSION;
        recovered.write_atomic(dir)?;
        log::info!(
            "{}: recovered {} commit(s) from {LOG_FILE} (generation {} to {})",
            dir.display(),
            records.len(),
            manifest.generation,
            recovered.generation
        );
        // The records are in the files now: start the log over in the new epoch.
        self.restart(epoch).map_err(|e| IndexError::io(&self.path, e))
    }
}

impl Manifest {
    /// The manifest of the last commit in `dir`, as opening the index would find it:
    /// `manifest.json` (the last checkpoint), or the last of the commits the commit log holds
    /// since. Reads only (the log's records, not its zeros; one record's manifest is parsed);
    /// `Ok(None)` when the directory holds no index.
    pub fn read_latest(dir: &Path) -> Result<Option<Manifest>, IndexError> {
        let Some(manifest) = Manifest::read(dir)? else {
            return Ok(None);
        };
        let mut last = None;
        logged(dir, &manifest, |at, payload| {
            last = Some((at, payload));
            Ok(())
        })?;
        match last {
            Some((at, payload)) => Ok(Some(parse(&payload, at, &dir.join(LOG_FILE))?.manifest)),
            None => Ok(Some(manifest)),
        }
    }
}

/// Hands `each` the payload of every commit the log of `dir` holds since `manifest` (its
/// checkpoint), oldest first, with its offset in the log: none when there is no log or it
/// continues another checkpoint. Reading stops at the first record cut short, damaged (its
/// checksum fails), or of another epoch: the zeros after the last record are never read.
fn logged(
    dir: &Path,
    manifest: &Manifest,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), IndexError>,
) -> Result<(), IndexError> {
    let path = dir.join(LOG_FILE);
    let file = match fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IndexError::io(&path, e)),
    };
    let io = |e| IndexError::io(&path, e);
    let size = file.metadata().map_err(io)?.len();
    let mut log = std::io::BufReader::new(file);
    let mut header = [0u8; HEADER as usize];
    let epoch = match read_fully(&mut log, &mut header).map_err(io)? {
        true => epoch_of(&header),
        false => None,
    };
    let epoch = match epoch {
        Some(epoch) if epoch == manifest.log_epoch => epoch,
        Some(_) => return Ok(()), // superseded by the manifest's checkpoint
        None => {
            log::warn!(
                "{}: not a commit log (its header is damaged); starting a new one",
                path.display()
            );
            return Ok(());
        }
    };
    let mut at = HEADER;
    loop {
        let mut head = [0u8; RECORD_HEADER];
        if !read_fully(&mut log, &mut head).map_err(io)? {
            return Ok(());
        }
        let length = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let record_epoch = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let payload_at = at + RECORD_HEADER as u64;
        if length == 0 || record_epoch != epoch || payload_at + length > size {
            return Ok(());
        }
        let mut payload = vec![0u8; length as usize];
        if !read_fully(&mut log, &mut payload).map_err(io)? || checksum(epoch, &payload) != crc {
            return Ok(());
        }
        each(at, payload)?;
        at = payload_at + length;
    }
}

/// Fills `buf` from `reader`: `Ok(false)` when the file ends first.
fn read_fully(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The record whose payload passed its checksum at byte `at` of the log at `path`.
fn parse(payload: &[u8], at: u64, path: &Path) -> Result<Record, IndexError> {
    parse_payload(payload).ok_or_else(|| {
        IndexError::Invalid(format!(
            "{}: the record at byte {at} passes its checksum but does not parse (hint: restore the index directory from a backup)",
            path.display()
        ))
    })
}

/// Splits a record's payload (see [`record_payload`]).
fn parse_payload(payload: &[u8]) -> Option<Record> {
    let json_length = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let manifest = serde_json::from_slice(payload.get(4..4 + json_length)?).ok()?;
    let at = 4 + json_length;
    let name_length = u16::from_le_bytes(payload.get(at..at + 2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(payload.get(at + 2..at + 2 + name_length)?).ok()?;
    let data = payload.get(at + 2 + name_length..)?;
    // A delta's name is a plain file name: a record never writes outside its directory.
    let plain = !name.contains('/') && !name.starts_with('.');
    Some(Record {
        manifest,
        delta: (!name.is_empty() && plain).then(|| (name.to_string(), data.to_vec())),
    })
}

/// Makes `path` hold `data` on disk: flushed as it is when it already does, else rewritten.
fn restore_file(path: &Path, data: &[u8]) -> Result<(), IndexError> {
    let intact = fs::read(path).is_ok_and(|on_disk| on_disk == data);
    if !intact {
        log::warn!(
            "{}: not as committed (cut short or lost in a crash); rewritten from {LOG_FILE}",
            path.display()
        );
        fs::write(path, data).map_err(|e| IndexError::io(path, e))?;
    }
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(path, e))
}

/// The epoch a log header names; `None` when it is not a commit log's header.
fn epoch_of(header: &[u8]) -> Option<u64> {
    (header.get(..8)? == MAGIC).then(|| u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")))
}

/// A record's checksum: CRC-32 of its epoch and payload.
fn checksum(epoch: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}
