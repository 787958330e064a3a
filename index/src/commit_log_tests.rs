//! The commit log (see [`crate::commit_log`]): small commits are durable in it alone, opening
//! replays it, and a damaged or superseded log loses nothing that was committed.

use super::tests::{batch, category_filter, columns, ids_of, settings, vector};

use super::*;

/// An index of 400 rows (a full commit, a checkpoint) plus five 10-row deltas.
fn index_with_deltas(dir: &Path) -> KnowledgeIndex {
    let index = KnowledgeIndex::open_or_create(dir, &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..400, |i| (i % 4) as i64, 0)]).unwrap();
    for start in (400..450).step_by(10) {
        index.upsert(&[batch(&index, start..start + 10, |_| 9, 0)]).unwrap();
    }
    index
}

/// The index holds the documents `0..count`: as many rows, and a sample of them (the last
/// one among them) found by exact search for their own vectors.
fn assert_all_found(index: &KnowledgeIndex, count: u64) {
    assert_eq!(index.len(), count as usize);
    let step = (count as usize / 60).max(1);
    for i in (0..count).step_by(step).chain([count - 1]) {
        let hits = index.exact_search(&vector(i), 1).unwrap();
        assert_eq!(ids_of(&hits), [format!("doc-{i}")]);
    }
}

/// The index takes the next commit (documents `count..count + 10`) and reopens with all of them.
fn assert_goes_on(index: KnowledgeIndex, dir: &Path, count: u64) {
    index.upsert(&[batch(&index, count..count + 10, |_| 9, 0)]).unwrap();
    drop(index);
    assert_all_found(&KnowledgeIndex::open(dir).unwrap(), count + 10);
}

/// The offsets of the records in the log file's bytes (for tests that damage one).
fn record_offsets(log: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 16;
    loop {
        let length = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        if length == 0 {
            return offsets;
        }
        offsets.push(at);
        at += 16 + length;
    }
}

/// Makes [`index_with_deltas`] in `dir`, closes it, and lets `damage` change its log's last
/// record (its bytes from its header on); returns the generation of that record's commit.
fn damage_last_record(dir: &Path, damage: impl FnOnce(&mut [u8])) -> u64 {
    let generation = index_with_deltas(dir).manifest().generation;
    let path = dir.join(LOG_FILE);
    let mut log = std::fs::read(&path).unwrap();
    let last = *record_offsets(&log).last().unwrap();
    damage(&mut log[last..]);
    std::fs::write(&path, &log).unwrap();
    generation
}

/// A delta commit writes neither `manifest.json` nor a flushed delta file: its manifest and
/// rows are in the log. A crash that loses the unflushed delta files (here: deleted, cut short,
/// overwritten) loses nothing: opening rewrites them from the log, and `manifest.json` then
/// names the last commit.
#[test]
fn small_commits_live_in_the_log_and_opening_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let index = index_with_deltas(dir.path());
    let latest = index.manifest();
    let checkpoint = Manifest::read(dir.path()).unwrap().unwrap();
    assert_eq!(latest.deltas.len(), 5);
    assert!(checkpoint.deltas.is_empty(), "manifest.json is the full commit's");
    assert_eq!(checkpoint.generation + 5, latest.generation);
    assert_eq!(Manifest::read_latest(dir.path()).unwrap().unwrap(), latest);
    drop(index);

    let deltas = &latest.deltas;
    std::fs::remove_file(dir.path().join(&deltas[0])).unwrap();
    let cut = std::fs::read(dir.path().join(&deltas[2])).unwrap();
    std::fs::write(dir.path().join(&deltas[2]), &cut[..cut.len() / 3]).unwrap();
    std::fs::write(dir.path().join(&deltas[4]), vec![0u8; cut.len()]).unwrap();

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reopened, 450);
    assert_eq!(reopened.manifest().generation, latest.generation);
    let on_disk = Manifest::read(dir.path()).unwrap().unwrap();
    assert_eq!(
        on_disk.generation, latest.generation,
        "the log was replayed into the manifest"
    );
    assert_eq!(&on_disk.deltas, deltas);
    // The replayed log starts over: the next small commit is logged again, and replays too.
    reopened.upsert(&[batch(&reopened, 450..460, |_| 9, 0)]).unwrap();
    assert_eq!(
        Manifest::read(dir.path()).unwrap().unwrap().generation,
        latest.generation
    );
    drop(reopened);
    assert_all_found(&KnowledgeIndex::open(dir.path()).unwrap(), 460);
}

/// A record cut short or damaged is a commit that never returned (the crash came while it was
/// written): opening keeps every commit before it and drops it, and the index goes on.
#[test]
fn a_damaged_last_record_drops_only_that_commit() {
    let dir = tempfile::tempdir().unwrap();
    let generation = damage_last_record(dir.path(), |record| record[100] ^= 0xff);

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reopened, 440);
    assert_eq!(reopened.manifest().generation, generation - 1);
    assert_goes_on(reopened, dir.path(), 440);
}

/// A record whose header was torn into a length past the log's end is cut short: reading the
/// log from outside and opening it both stop before it (and nothing that size is allocated).
#[test]
fn a_record_claiming_more_bytes_than_the_log_holds_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let generation = damage_last_record(dir.path(), |record| {
        record[..4].copy_from_slice(&u32::MAX.to_le_bytes())
    });

    let latest = Manifest::read_latest(dir.path()).unwrap().unwrap();
    assert_eq!(latest.generation, generation - 1);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reopened, 440);
    assert_goes_on(reopened, dir.path(), 440);
}

/// A crash after a full commit wrote `manifest.json` but before it started the log over leaves
/// the log of the epoch before: its records are older than the manifest, and are ignored (were
/// they replayed, the deleted rows would come back).
#[test]
fn a_log_superseded_by_a_full_commit_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let index = index_with_deltas(dir.path());
    let old_log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    index.delete(&category_filter(9)).unwrap(); // a full commit: a checkpoint
    assert!(Manifest::read(dir.path()).unwrap().unwrap().deltas.is_empty());
    drop(index);
    std::fs::write(dir.path().join(LOG_FILE), &old_log).unwrap();

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reopened, 400);
    assert_eq!(
        reopened
            .search(&vector(405), 1, Some(&category_filter(9)))
            .unwrap()
            .num_rows(),
        0
    );
    // The log and the manifest agree again after the next commit.
    assert_goes_on(reopened, dir.path(), 400);
}

/// A log too full for the next record makes that commit a checkpoint (flushing the delta files
/// the manifest names, starting the log over); nothing is lost across it.
#[test]
fn a_full_log_makes_the_commit_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index
        .upsert(&[batch(&index, 0..16_000, |i| (i % 4) as i64, 0)])
        .unwrap();
    // Deltas pile up (for a compaction that is never started here) instead of a full commit.
    index.set_background_compaction(true);
    let on_disk = || Manifest::read(dir.path()).unwrap().unwrap();
    let first = on_disk().generation;
    // 2,000-row deltas (~170 KB each): a handful fill the log.
    let mut start = 16_000;
    while on_disk().generation == first {
        index.upsert(&[batch(&index, start..start + 2000, |_| 9, 0)]).unwrap();
        start += 2000;
        assert!(start < 40_000, "the log never filled");
    }
    let checkpoint = on_disk();
    assert_eq!(
        checkpoint.generation,
        index.manifest().generation,
        "the filling commit checkpointed"
    );
    assert!(checkpoint.deltas.len() > 2);
    assert_eq!(
        std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
        index.log.lock().unwrap().capacity(),
        "the log's size never changes"
    );
    index.upsert(&[batch(&index, start..start + 10, |_| 9, 0)]).unwrap();
    assert_eq!(
        on_disk().generation,
        checkpoint.generation,
        "the next commit is logged again"
    );
    drop(index);
    assert_all_found(&KnowledgeIndex::open(dir.path()).unwrap(), start + 10);
}

/// An index written before the commit log (format version 1, no `commit.log`) opens; its first
/// commit writes a version-2 manifest, which an older mkflow refuses rather than miss the log.
#[test]
fn an_index_from_before_the_log_opens_and_moves_to_format_version_two() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..400, |i| (i % 4) as i64, 0)]).unwrap();
    drop(index);
    std::fs::remove_file(dir.path().join(LOG_FILE)).unwrap();
    let path = dir.path().join(MANIFEST_FILE);
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    old["format_version"] = 1.into();
    old.as_object_mut().unwrap().remove("log_epoch");
    std::fs::write(&path, serde_json::to_string(&old).unwrap()).unwrap();

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reopened, 400);
    reopened.upsert(&[batch(&reopened, 400..410, |_| 9, 0)]).unwrap();
    let on_disk = Manifest::read(dir.path()).unwrap().unwrap();
    assert_eq!(on_disk.format_version, 2);
    assert_eq!(on_disk.generation, reopened.manifest().generation);
    drop(reopened);
    assert_all_found(&KnowledgeIndex::open(dir.path()).unwrap(), 410);
}

/// While another process writes an index (holds its log's lock), opening it reads the last
/// commit — the checkpoint and the log after it — replays nothing, and refuses to commit,
/// leaving every file as the writer has it.
#[test]
fn a_second_process_reads_the_last_commit_and_refuses_to_commit() {
    let dir = tempfile::tempdir().unwrap();
    drop(index_with_deltas(dir.path()));
    let files = |dir: &Path| [MANIFEST_FILE, LOG_FILE].map(|f| std::fs::read(dir.join(f)).unwrap());
    let before = files(dir.path());
    // The writer process, as far as the lock goes: a lock on another open of the file.
    let writer = std::fs::File::open(dir.path().join(LOG_FILE)).unwrap();
    writer.lock().unwrap();

    let reader = KnowledgeIndex::open(dir.path()).unwrap();
    assert_all_found(&reader, 450);
    let err = reader
        .upsert(&[batch(&reader, 450..460, |_| 9, 0)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another mkflow process writes") && err.contains(LOG_FILE),
        "{err}"
    );
    assert!(reader.delete(&category_filter(9)).is_err());
    assert_eq!(files(dir.path()), before, "a reader writes nothing");
    drop(reader);

    drop(writer);
    let writer = KnowledgeIndex::open(dir.path()).unwrap();
    writer.upsert(&[batch(&writer, 450..460, |_| 9, 0)]).unwrap();
    assert_all_found(&writer, 460);
}

/// Upkeep off the commit path checkpoints a log past half full: the commits themselves stay
/// logged (`manifest.json` never changes inside one) and never find the log full.
#[test]
fn upkeep_checkpoints_a_half_full_log_so_commits_never_find_it_full() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index
        .upsert(&[batch(&index, 0..16_000, |i| (i % 4) as i64, 0)])
        .unwrap();
    index.set_background_compaction(true);
    let on_disk = || Manifest::read(dir.path()).unwrap().unwrap().generation;
    let mut checkpoints = 0;
    let mut start = 16_000;
    while checkpoints < 3 {
        let before = on_disk();
        index.upsert(&[batch(&index, start..start + 500, |_| 9, 0)]).unwrap();
        start += 500;
        assert_eq!(on_disk(), before, "the commit of {start} was logged");
        if index.log_upkeep_due() {
            index.upkeep_log().unwrap();
            assert!(!index.log_upkeep_due());
            assert_eq!(on_disk(), index.manifest().generation, "the upkeep checkpointed");
            checkpoints += 1;
        }
        assert!(start < 100_000, "no checkpoint");
    }
    drop(index);
    assert_all_found(&KnowledgeIndex::open(dir.path()).unwrap(), start);
}
