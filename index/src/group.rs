//! Indexes that commit as one: a parent index (the documents) and its companions (the
//! documents' synthetic questions, their chunks), each a knowledge index in a subdirectory of
//! the parent, committed together so that one manifest generation names everything an insert
//! touched.
//!
//! - The parent's manifest carries a copy of each companion's manifest
//!   ([`Manifest::companions`]): the parent's generation names the companions' generations.
//! - A write to the group takes the parent's writer lock ([`KnowledgeIndex::lock_group`]),
//!   commits the companions (each its own manifest, as usual), then commits the parent, whose
//!   manifest names the companions' new generations: that rename is the group's commit point.
//! - A companion keeps the files its commits replace (a full rewrite's old rows and graph)
//!   until the parent names a generation past them ([`Retained`]), so the generation the
//!   parent names is always whole on disk.
//! - Opening a companion ([`KnowledgeIndex::open_companion`]) pins it to the generation the
//!   parent names: a crash after a companion committed but before the parent did leaves the
//!   companion one or more generations ahead, and opening rolls it back (its text index is
//!   then rebuilt from the rows, with a warning).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;

use crate::commit_log::{self, Durability};
use crate::files::remove_files_of;
use crate::search::RowPredicate;
use crate::{IndexError, IndexSettings, KnowledgeIndex, MANIFEST_FILE, Manifest, SourceOffsets, UpsertStats};

/// The files of replaced generations of a companion, kept until its parent names a later
/// generation (`None`: not a companion, files go as soon as they are replaced).
#[derive(Debug, Default)]
pub(crate) struct Retained(Mutex<Option<Vec<(u64, Manifest)>>>);

impl Retained {
    /// Starts keeping replaced files.
    fn keep(&self) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.get_or_insert_with(Vec::new);
    }

    /// Deletes the files of `replaced` (replaced by generation `by`), or keeps them until the
    /// parent names `by` or later. Deleted, those in `shrink` are shrunk first (see
    /// [`remove_files_of`]), without holding the lock a commit's [`Retained::release`] takes.
    pub(crate) fn discard(&self, dir: &Path, replaced: Manifest, by: u64, shrink: &HashSet<String>) {
        if let Some(kept) = &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            kept.push((by, replaced));
            return;
        }
        remove_files_of(dir, &replaced, shrink);
    }

    /// Deletes the kept files replaced by generation `named` or earlier.
    fn release(&self, dir: &Path, named: u64) {
        if let Some(kept) = &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            kept.retain(|(by, replaced)| {
                let done = *by <= named;
                if done {
                    remove_files_of(dir, replaced, &HashSet::new());
                }
                !done
            });
        }
    }

    /// Names of the kept files.
    pub(crate) fn files(&self) -> HashSet<String> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(kept) => kept
                .iter()
                .flat_map(|(_, m)| m.files().map(str::to_string).collect::<Vec<_>>())
                .collect(),
            None => HashSet::new(),
        }
    }
}

/// The companions of a parent index, by name (the subdirectory each lives in).
#[derive(Debug, Default)]
pub(crate) struct Companions(Mutex<Vec<(String, Arc<KnowledgeIndex>)>>);

impl Companions {
    fn add(&self, name: &str, index: Arc<KnowledgeIndex>) {
        let mut members = self.0.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|(n, _)| n != name);
        members.push((name.to_string(), index));
    }

    fn members(&self) -> Vec<(String, Arc<KnowledgeIndex>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl KnowledgeIndex {
    /// Opens (or creates) the companion `name` of this index: the index in the subdirectory
    /// `name`, rolled back to the generation this index's manifest names for it when it is
    /// ahead (a group commit interrupted before this index committed), committed together
    /// with this index from now on (see the module docs).
    pub fn open_companion(
        &self,
        name: &str,
        columns: &Schema,
        settings: &IndexSettings,
    ) -> Result<Arc<KnowledgeIndex>, IndexError> {
        let dir = self.dir.join(name);
        if let Some(pinned) = self.current().manifest.companions.get(name) {
            restore(&dir, pinned)?;
        }
        let companion = Arc::new(KnowledgeIndex::open_or_create(&dir, columns, settings)?);
        companion.retained.keep();
        self.companions.add(name, companion.clone());
        Ok(companion)
    }

    /// Takes this index's writer lock for a group commit: commit the companions, then commit
    /// this index through the returned guard, which names their new generations.
    pub fn lock_group(&self) -> GroupCommit<'_> {
        GroupCommit {
            index: self,
            _writer: self.lock_writer(),
        }
    }

    /// Commits `manifest` as this index's manifest (made durable as `durability` says), naming
    /// the companions' current generations, then lets the companions delete the files only
    /// older generations named.
    pub(crate) fn write_manifest(&self, manifest: &mut Manifest, durability: Durability<'_>) -> Result<(), IndexError> {
        let members = self.companions.members();
        for (name, companion) in &members {
            manifest.companions.insert(name.clone(), companion.manifest());
        }
        self.make_durable(manifest, durability)?;
        for (name, companion) in &members {
            companion
                .retained
                .release(&companion.dir, manifest.companions[name].generation);
        }
        Ok(())
    }
}

/// Rewrites the manifest in `dir` as `pinned` when it names another generation.
fn restore(dir: &Path, pinned: &Manifest) -> Result<(), IndexError> {
    // The companion's own log is replayed first — or another process writes the companion, and
    // it is left as that process has it.
    let log = match dir.join(MANIFEST_FILE).is_file() {
        true => Some(commit_log::attach(dir)?),
        false => None,
    };
    if log
        .as_ref()
        .is_some_and(|log| !log.lock().unwrap_or_else(|e| e.into_inner()).is_writer())
    {
        return Ok(());
    }
    let on_disk = Manifest::read_latest(dir)?;
    if on_disk.as_ref().map(|m| m.generation) == Some(pinned.generation) {
        return Ok(());
    }
    if let Some(missing) = pinned.files().find(|f| !dir.join(f).is_file()) {
        return Err(IndexError::Invalid(format!(
            "{} is gone, but {} names it (generation {} of {}); hint: restore the index directory from a backup",
            dir.join(missing).display(),
            dir.parent().unwrap_or(dir).join(MANIFEST_FILE).display(),
            pinned.generation,
            dir.display()
        )));
    }
    log::warn!(
        "{}: at generation {}, its parent index committed generation {}: a commit was interrupted; rolling back",
        dir.display(),
        on_disk.map_or("none".into(), |m| m.generation.to_string()),
        pinned.generation
    );
    match &log {
        Some(log) => commit_log::roll_back(log, dir, pinned),
        None => pinned.write_atomic(dir),
    }
}

/// A group commit in progress: holds the parent's writer lock (no other commit of the parent
/// runs meanwhile); commits made through it name the companions' current generations.
#[must_use = "a group commits through its methods"]
pub struct GroupCommit<'a> {
    index: &'a KnowledgeIndex,
    _writer: MutexGuard<'a, ()>,
}

impl GroupCommit<'_> {
    /// [`KnowledgeIndex::upsert_from_source`] as the group's commit.
    pub fn upsert_from_source(
        &self,
        batches: &[RecordBatch],
        offsets: &SourceOffsets,
    ) -> Result<UpsertStats, IndexError> {
        self.index.upsert_locked(batches, offsets)
    }

    /// Deletes the live rows whose key is one of `ids` as the group's commit (the documents
    /// [`GroupCommit::matching`] found, without evaluating its predicate again).
    pub fn delete_keys(&self, ids: &HashSet<String>) -> Result<Vec<String>, IndexError> {
        let keys = crate::where_in(self.index.key_column, ids);
        Ok(self.index.remove_rows_locked(&keys, false)?.0)
    }

    /// The document ids of the live rows `predicate` is true for (what [`GroupCommit::delete_keys`]
    /// deletes next), so the companions' rows of those documents go first.
    pub fn matching(&self, predicate: &RowPredicate<'_>) -> Result<Vec<String>, IndexError> {
        let state = self.index.current();
        let rows = self.index.matching_rows(&state, predicate)?;
        Ok(rows.into_iter().map(|(_, id)| id).collect())
    }

    /// Commits a generation that changes no row, naming the companions' current generations
    /// (after a companion changed on its own: its chunks rebuilt, say).
    pub fn commit(&self) -> Result<(), IndexError> {
        self.index.check_writer()?;
        let mut next = (*self.index.current()).clone();
        let mut manifest = next.manifest.clone();
        manifest.generation += 1;
        manifest.text_generation = Some(next.manifest.text_generation());
        self.index
            .write_manifest(&mut manifest, Durability::Logged { delta: None })?;
        next.manifest = manifest;
        self.index.publish(next);
        Ok(())
    }
}
