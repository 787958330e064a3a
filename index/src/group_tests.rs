//! Group commits: a parent index and its companions commit as one (see [`crate::group`]).

use std::collections::HashSet;
use std::path::Path;

use super::tests::{batch, category_filter, columns, settings};
use super::*;
use crate::faults::{Stage, armed};

/// The data files (rows, deltas, graphs) in `dir`.
fn data_files(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".arrow") || n.ends_with(".usearch"))
        .collect()
}

fn sorted_ids(index: &KnowledgeIndex) -> Vec<String> {
    let mut ids: Vec<String> = index
        .snapshot()
        .unwrap()
        .iter()
        .flat_map(super::tests::ids_of)
        .collect();
    ids.sort();
    ids
}

/// A parent with one companion (`questions`), both holding docs 0..100, committed as a group.
fn group(dir: &Path) -> (KnowledgeIndex, Arc<KnowledgeIndex>) {
    let parent = KnowledgeIndex::open_or_create(dir, &columns(), &settings()).unwrap();
    let companion = parent.open_companion("questions", &columns(), &settings()).unwrap();
    let group = parent.lock_group();
    companion
        .upsert(&[batch(&companion, 0..100, |i| (i % 4) as i64, 7)])
        .unwrap();
    group
        .upsert_from_source(&[batch(&parent, 0..100, |i| (i % 4) as i64, 0)], &SourceOffsets::new())
        .unwrap();
    drop(group);
    (parent, companion)
}

/// The parent's manifest names the companion's generation; a crash after the companion
/// committed (a full rewrite, then a delta) but before the parent did leaves the companion's
/// older files on disk, and reopening rolls the companion back to the generation the parent
/// names, deleting the newer files.
#[test]
fn reopening_rolls_a_companion_back_to_the_generation_its_parent_names() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, companion) = group(dir.path());
    let named = parent.manifest().companions["questions"].clone();
    assert_eq!(named, companion.manifest());
    let committed_files = data_files(&dir.path().join("questions"));
    let before = sorted_ids(&companion);

    // The "crash": the companion commits twice (a delete rewrites it in full, then a delta),
    // the parent never does.
    let group = parent.lock_group();
    companion.delete(&category_filter(1)).unwrap();
    companion.upsert(&[batch(&companion, 100..110, |_| 0, 7)]).unwrap();
    drop(group);
    assert_eq!(companion.len(), 85);
    let on_disk = data_files(&dir.path().join("questions"));
    assert!(
        committed_files.is_subset(&on_disk),
        "files the parent names were deleted: {committed_files:?} vs {on_disk:?}"
    );
    drop((parent, companion));

    let parent = KnowledgeIndex::open(dir.path()).unwrap();
    let companion = parent.open_companion("questions", &columns(), &settings()).unwrap();
    assert_eq!(companion.manifest().generation, named.generation);
    assert_eq!(sorted_ids(&companion), before);
    assert_eq!(data_files(&dir.path().join("questions")), committed_files);
    assert_eq!(
        super::tests::ids_of(&companion.search(&super::tests::vector(7), 1, None).unwrap()),
        ["doc-0"]
    );
}

/// A group whose parent commit fails (a full disk on its commit log) returns the error; the
/// companion keeps the files the parent's last generation names until a parent commit names a
/// later one, which then deletes them; a restart before that rolls the companion back.
#[test]
fn a_failed_parent_commit_keeps_the_generation_it_names_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, companion) = group(dir.path());
    let named = parent.manifest().companions["questions"].generation;
    let old_files = data_files(&dir.path().join("questions"));

    let group = parent.lock_group();
    companion.delete(&category_filter(2)).unwrap(); // a full rewrite: new rows and graph files
    armed::arm(Stage::Write, crate::LOG_FILE);
    let err = group
        .upsert_from_source(&[batch(&parent, 100..101, |_| 0, 0)], &SourceOffsets::new())
        .expect_err("the parent's commit cannot be logged")
        .to_string();
    drop(group);
    assert!(err.contains(crate::LOG_FILE) && err.contains("No space left"), "{err}");
    assert_eq!(parent.manifest().companions["questions"].generation, named);
    assert!(old_files.is_subset(&data_files(&dir.path().join("questions"))));

    // A later group commit names the companion's generation and lets the old files go.
    parent.lock_group().commit().unwrap();
    assert_eq!(
        parent.manifest().companions["questions"].generation,
        companion.manifest().generation
    );
    let now = data_files(&dir.path().join("questions"));
    assert!(old_files.is_disjoint(&now), "{old_files:?} still in {now:?}");
    drop((parent, companion));
    let parent = KnowledgeIndex::open(dir.path()).unwrap();
    let companion = parent.open_companion("questions", &columns(), &settings()).unwrap();
    assert_eq!(companion.len(), 75);
}

/// A companion's own failed commit reloads its last generation without deleting the files it
/// keeps for its parent, so a crash afterwards still rolls back to the parent's generation.
#[test]
fn a_companions_failed_commit_keeps_the_files_its_parent_names() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, companion) = group(dir.path());
    let before = sorted_ids(&companion);
    let named_files = data_files(&dir.path().join("questions"));

    companion.delete(&category_filter(0)).unwrap();
    armed::arm(Stage::Sync, "rows-");
    assert!(companion.delete(&category_filter(3)).is_err());
    assert_eq!(companion.len(), 75);
    assert!(named_files.is_subset(&data_files(&dir.path().join("questions"))));
    drop((parent, companion));

    let parent = KnowledgeIndex::open(dir.path()).unwrap();
    let companion = parent.open_companion("questions", &columns(), &settings()).unwrap();
    assert_eq!(sorted_ids(&companion), before);
}

/// A companion missing a file its parent names is refused by name.
#[test]
fn a_missing_file_of_the_named_generation_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, companion) = group(dir.path());
    let group = parent.lock_group();
    companion.delete(&category_filter(1)).unwrap();
    drop(group);
    let named = parent.manifest().companions["questions"].clone();
    drop((parent, companion));
    std::fs::remove_file(dir.path().join("questions").join(&named.rows_file)).unwrap();
    let parent = KnowledgeIndex::open(dir.path()).unwrap();
    let err = parent
        .open_companion("questions", &columns(), &settings())
        .expect_err("a named file is missing")
        .to_string();
    assert!(err.contains(&named.rows_file) && err.contains("names it"), "{err}");
}
