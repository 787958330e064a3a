//! The graph backlog: vectors left out of the graph by commits (see [`crate::backlog`]).

use super::tests::{batch, category_filter, columns, ids_of, settings, vector};
use arrow::array::AsArray;

use super::*;

/// With background indexing on, a small upsert leaves the graph alone, yet its rows — new
/// ones and new versions of old ones — are found at once, with and without a filter;
/// `index_backlog` then puts them into the graph.
#[test]
fn background_indexing_leaves_vectors_to_the_backlog_and_searches_still_find_them() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..500, |i| (i % 10) as i64, 0)]).unwrap();
    index.set_background_indexing(true);
    index.upsert(&[batch(&index, 1000..1010, |_| 7, 0)]).unwrap();
    index.upsert(&[batch(&index, 0..10, |_| 3, 50_000)]).unwrap();
    assert_eq!(index.ann_stats().0, 500, "no vector went into the graph");
    assert!(index.backlog_due());
    let expect_found = |index: &KnowledgeIndex| {
        for i in 1000..1010 {
            assert_eq!(
                ids_of(&index.search(&vector(i), 1, None).unwrap()),
                [format!("doc-{i}")]
            );
            let filter = category_filter(7);
            let filtered = index.search(&vector(i), 1, Some(&filter)).unwrap();
            assert_eq!(ids_of(&filtered), [format!("doc-{i}")]);
        }
        for i in 0..10 {
            assert_eq!(
                ids_of(&index.search(&vector(i + 50_000), 1, None).unwrap()),
                [format!("doc-{i}")]
            );
            // The old vector would match itself (similarity 1).
            let best = index.search(&vector(i), 1, None).unwrap();
            let score = best
                .column(best.num_columns() - 1)
                .as_primitive::<arrow::datatypes::Float32Type>()
                .value(0);
            assert!(score < 0.99, "doc-{i}'s replaced vector still answers: {score}");
        }
    };
    expect_found(&index);
    assert_eq!(
        index.index_backlog().unwrap(),
        30,
        "20 vectors in, 10 replaced ones out"
    );
    assert!(!index.backlog_due());
    assert_eq!(index.ann_stats().0, 510);
    expect_found(&index);
}

/// A compaction while vectors wait in the backlog writes a graph without them: its manifest
/// lists the keys the graph lacks and the keys it still holds, and reopening the index puts
/// exactly the live rows' vectors into the graph.
#[test]
fn a_compaction_over_a_backlog_records_what_its_graph_lacks_and_opening_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..2000, |i| (i % 10) as i64, 0)]).unwrap();
    index.set_background_compaction(true);
    index.set_background_indexing(true);
    for n in 0..40u64 {
        // Even commits replace ten documents, odd ones add ten.
        let ids = if n.is_multiple_of(2) {
            n * 10..n * 10 + 10
        } else {
            5000 + n * 10..5000 + n * 10 + 10
        };
        index.upsert(&[batch(&index, ids, |_| 1, 100_000)]).unwrap();
    }
    assert!(index.compaction_due() && index.backlog_due());
    assert!(index.compact().unwrap());
    let manifest = index.manifest();
    assert_eq!(manifest.ann_missing.len(), 400, "every vector of the 40 commits");
    assert_eq!(manifest.ann_removed.len(), 200, "the replaced vectors");
    let rows = index.len();
    assert_eq!(rows, 2200);
    drop(index);

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(
        reopened.ann_stats().0,
        rows,
        "the graph holds exactly the live rows' vectors"
    );
    assert!(!reopened.backlog_due());
    let state = reopened.current();
    for i in (0..400u64).step_by(7).chain(5010..5020) {
        let replaced = i >= 5000 || (i / 10).is_multiple_of(2);
        let offset = if replaced { 100_000 } else { 0 };
        // Its last version is live and in the graph: asked of the graph, not of an HNSW search,
        // which on these 16-d random vectors misses a few rows queried by their own vectors in
        // most builds, repaired or not.
        let key = *state.doc_keys.get(format!("doc-{i}").as_str()).unwrap();
        assert_eq!(
            state.live_vector(key, reopened.vector_column),
            Some(vector(i + offset).as_slice()),
            "doc-{i}"
        );
        assert!(state.ann.contains(key), "doc-{i}: its vector is not in the graph");
        let hits = ids_of(&reopened.exact_search(&vector(i + offset), 1).unwrap());
        assert_eq!(hits, [format!("doc-{i}")]);
    }
}
