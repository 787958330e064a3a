//! Knowledge-index behaviour on synthetic vectors (no model needed).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};

use super::*;

const DIMS: usize = 16;

pub(super) fn settings() -> IndexSettings {
    IndexSettings {
        model: "synthetic".into(),
        dimensions: DIMS,
        quantization: Quantization::F32,
        key_column: "doc_id".into(),
        vector_column: "embedding".into(),
        text_columns: None,
    }
}

pub(super) fn columns() -> Schema {
    Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("category", DataType::Int64, true),
    ])
}

/// A deterministic pseudo-random unit vector for `seed`.
pub(super) fn vector(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut v: Vec<f32> = (0..DIMS)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

pub(super) fn batch(
    index: &KnowledgeIndex,
    ids: std::ops::Range<u64>,
    category: impl Fn(u64) -> i64,
    seed_offset: u64,
) -> RecordBatch {
    let doc_ids: StringArray = ids.clone().map(|i| Some(format!("doc-{i}"))).collect();
    let categories: Int64Array = ids.clone().map(|i| Some(category(i))).collect();
    let flat: Vec<f32> = ids.clone().flat_map(|i| vector(i + seed_offset)).collect();
    let vectors = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        DIMS as i32,
        Arc::new(Float32Array::from(flat)),
        None,
    )
    .unwrap();
    let columns: Vec<ArrayRef> = vec![Arc::new(doc_ids), Arc::new(categories), Arc::new(vectors)];
    RecordBatch::try_new(index.schema(), columns).unwrap()
}

/// One row (`x`, category 1) whose vector is `values` in a variable-length list column.
fn list_vector_row(values: &[f32]) -> RecordBatch {
    let list = arrow::array::ListArray::from_iter_primitive::<Float32Type, _, _>(vec![Some(
        values.iter().map(|v| Some(*v)).collect::<Vec<_>>(),
    )]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("category", DataType::Int64, true),
        Field::new("embedding", list.data_type().clone(), true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["x"])),
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(list),
        ],
    )
    .unwrap()
}

pub(super) fn ids_of(batch: &RecordBatch) -> Vec<String> {
    let ids = batch.column(0).as_string::<i32>();
    (0..ids.len()).map(|i| ids.value(i).to_string()).collect()
}

fn scores_of(batch: &RecordBatch) -> Vec<f32> {
    batch
        .column(batch.num_columns() - 1)
        .as_primitive::<Float32Type>()
        .values()
        .to_vec()
}

pub(super) fn category_filter(wanted: i64) -> impl Fn(&RecordBatch) -> Result<BooleanArray, IndexError> {
    move |b: &RecordBatch| {
        Ok(b.column(1)
            .as_primitive::<Int64Type>()
            .iter()
            .map(|c| Some(c == Some(wanted)))
            .collect())
    }
}

#[test]
fn reopened_index_answers_identically() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..2000, |i| (i % 10) as i64, 0)]).unwrap();
    let queries: Vec<Vec<f32>> = (0..20).map(|i| vector(10_000 + i)).collect();
    let before: Vec<RecordBatch> = queries.iter().map(|q| index.search(q, 10, None).unwrap()).collect();
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 2000);
    for (q, expected) in queries.iter().zip(&before) {
        let after = reopened.search(q, 10, None).unwrap();
        assert_eq!(ids_of(&after), ids_of(expected));
        assert_eq!(scores_of(&after), scores_of(expected));
    }
}

#[test]
fn upsert_replaces_row_and_vector_and_delete_removes() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..100, |_| 1, 0)]).unwrap();
    // doc-5 gets a new category and the vector of seed 777.
    let stats = index.upsert(&[batch(&index, 5..6, |_| 2, 772)]).unwrap();
    assert_eq!(stats, UpsertStats { rows: 1, replaced: 1 });
    assert_eq!(index.len(), 100);
    let hit = index.search(&vector(777), 1, None).unwrap();
    assert_eq!(ids_of(&hit), vec!["doc-5"]);
    assert_eq!(hit.column(1).as_primitive::<Int64Type>().value(0), 2);
    // The old vector no longer finds doc-5 first.
    let old = index.search(&vector(5), 1, None).unwrap();
    assert_ne!(ids_of(&old), vec!["doc-5"]);

    let deleted = index
        .delete(&|b: &RecordBatch| {
            Ok(b.column(0)
                .as_string::<i32>()
                .iter()
                .map(|id| Some(id == Some("doc-5")))
                .collect())
        })
        .unwrap();
    assert_eq!(deleted, vec!["doc-5"]);
    assert_eq!(index.len(), 99);
    let after = index.search(&vector(777), 5, None).unwrap();
    assert!(!ids_of(&after).contains(&"doc-5".to_string()));
    // Durable: a reopened index agrees.
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 99);
    let rows: usize = reopened.snapshot().unwrap().iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 99);
}

#[test]
fn take_where_in_returns_the_live_rows_it_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..10, |_| 1, 0)]).unwrap();
    // doc-3 replaced: only its live version (category 2, seed 103) comes back.
    index.upsert(&[batch(&index, 3..4, |_| 2, 100)]).unwrap();
    let wanted: std::collections::HashSet<String> = ["doc-3", "doc-7", "doc-missing"].map(String::from).into();
    let taken = index.take_where_in("doc_id", &wanted).unwrap();
    let mut ids = ids_of(&taken);
    ids.sort();
    assert_eq!(ids, vec!["doc-3", "doc-7"]);
    let row3 = ids_of(&taken).iter().position(|id| id == "doc-3").unwrap();
    assert_eq!(taken.column(1).as_primitive::<Int64Type>().value(row3), 2);
    let vectors = crate::vector_values(taken.column(2));
    assert_eq!(&vectors[row3 * DIMS..(row3 + 1) * DIMS], vector(103).as_slice());
    assert_eq!(index.len(), 8);
    // Nothing left to take: an empty batch with the index's schema.
    let again = index.take_where_in("doc_id", &wanted).unwrap();
    assert_eq!((again.num_rows(), again.schema()), (0, index.schema()));
}

/// `replace_where_in` replaces a group of rows in one commit: a delta when every old row is
/// upserted again, a full rewrite when some are left out (deleted); it returns the old rows.
#[test]
fn replace_where_in_replaces_a_group_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..3000, |i| (i % 30) as i64, 0)]).unwrap();
    let group = |c: &str| -> std::collections::HashSet<String> { [c.to_string()].into() };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };

    // Group 2, every row upserted again with new vectors (seeds no other row has; at offset 500
    // doc-2's new vector was doc-502's, a tie for the first place): one delta commit.
    let generation = index.manifest().generation;
    let again = batch(&index, 0..3000, |i| (i % 30) as i64, 100_000);
    let again = arrow::compute::filter_record_batch(&again, &category_filter(2)(&again).unwrap()).unwrap();
    let taken = index.replace_where_in("category", &group("2"), &[again]).unwrap();
    assert_eq!(taken.num_rows(), 100);
    let manifest = index.manifest();
    assert_eq!((manifest.generation, manifest.deltas.len()), (generation + 1, 1));
    assert_eq!(ids_of(&index.search(&vector(2 + 100_000), 1, None).unwrap()), ["doc-2"]);

    // Group 1 replaced by two rows: the other 98 are deleted, in the same (full) commit.
    let taken = index
        .replace_where_in(
            "category",
            &group("1"),
            &[batch(&index, 1..2, |_| 1, 900), batch(&index, 31..32, |_| 1, 900)],
        )
        .unwrap();
    assert_eq!(
        sorted(ids_of(&taken)),
        sorted((1..3000).step_by(30).map(|i| format!("doc-{i}")).collect())
    );
    let manifest = index.manifest();
    assert_eq!((manifest.generation, manifest.deltas.len()), (generation + 2, 0));
    assert_eq!(index.len(), 2902);
    let filter = category_filter(1);
    let left = index.search(&vector(901), 10, Some(&filter)).unwrap();
    assert_eq!(sorted(ids_of(&left)), ["doc-1", "doc-31"]);
    drop(index);
    assert_eq!(KnowledgeIndex::open(dir.path()).unwrap().len(), 2902);
}

#[test]
fn filtered_search_returns_k_rows_at_one_percent_selectivity() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index
        .upsert(&[batch(&index, 0..20_000, |i| (i % 100) as i64, 0)])
        .unwrap();
    // Both paths: exact over the 200 passing rows, and the filtered HNSW walk.
    for threshold in [DEFAULT_EXACT_SEARCH_MAX_ROWS, 0] {
        index.set_exact_search_max_rows(threshold);
        for q in 0..10 {
            let query = vector(50_000 + q);
            let result = index.search(&query, 10, Some(&category_filter(7))).unwrap();
            assert_eq!(result.num_rows(), 10, "threshold {threshold}");
            let categories = result.column(1).as_primitive::<Int64Type>();
            assert!(categories.iter().all(|c| c == Some(7)));
            let scores = scores_of(&result);
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
        }
    }
    // Fewer matches than k: all of them.
    let result = index
        .search(
            &vector(1),
            10,
            Some(&|b: &RecordBatch| {
                Ok(b.column(0)
                    .as_string::<i32>()
                    .iter()
                    .map(|id| Some(id == Some("doc-3") || id == Some("doc-4")))
                    .collect())
            }),
        )
        .unwrap();
    assert_eq!(result.num_rows(), 2);
}

#[test]
fn hnsw_agrees_with_exact_search() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..5000, |_| 0, 0)]).unwrap();
    // The graph's own answer, not `search` (which would top a short HNSW answer up exactly).
    let state = index.current();
    let mut found = 0;
    for q in 0..50 {
        let query = vector(90_000 + q);
        let ann: Vec<u64> = state
            .ann
            .search(&query, 10, None)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(ann.len(), 10, "the graph answered {} of 10", ann.len());
        let exact = index.exact_hits(&state, &query, 10, None).unwrap();
        found += exact.iter().filter(|hit| ann.contains(&hit.key)).count();
    }
    let recall = found as f64 / 500.0;
    assert!(recall >= 0.95, "recall@10 {recall}");
}

#[test]
fn wrong_dimension_is_refused_and_index_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..10, |_| 0, 0)]).unwrap();
    let short = vec![0.5f32; DIMS - 1];
    assert!(matches!(
        index.search(&short, 3, None),
        Err(IndexError::DimensionMismatch { expected: DIMS, found }) if found == DIMS - 1
    ));
    // A batch with 4-float vectors in a variable-length list column.
    let bad = list_vector_row(&[1.0, 2.0, 3.0, 4.0]);
    let err = index.upsert(&[bad]).unwrap_err();
    assert!(err.to_string().contains("dimension mismatch"), "{err}");
    assert_eq!(index.len(), 10);
}

#[test]
fn existing_index_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    let other = IndexSettings {
        dimensions: 8,
        ..settings()
    };
    let err = KnowledgeIndex::open_or_create(dir.path(), &columns(), &other).unwrap_err();
    assert!(err.to_string().contains("dimension"), "{err}");
}

#[test]
fn interrupted_commit_leaves_last_generation_readable() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..50, |_| 0, 0)]).unwrap();
    let generation = index.manifest().generation;
    drop(index);
    // Simulate a crash after the next generation's files were written but before the rename
    // of the manifest: stray files must be ignored and cleaned up.
    std::fs::write(dir.path().join(format!("rows-{}.arrow", generation + 1)), b"partial").unwrap();
    std::fs::write(dir.path().join("manifest.json.tmp"), b"{").unwrap();
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 50);
    assert!(!dir.path().join(format!("rows-{}.arrow", generation + 1)).exists());
}

#[test]
fn null_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    let good = batch(&index, 0..1, |_| 0, 0);
    let mut columns = good.columns().to_vec();
    columns[0] = Arc::new(StringArray::from(vec![None::<&str>]));
    let nullable = Arc::new(Schema::new(
        index
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let bad = RecordBatch::try_new(nullable, columns).unwrap();
    let err = index.upsert(&[bad]).unwrap_err();
    assert!(err.to_string().contains("is null"), "{err}");
    assert!(index.is_empty());
}

#[test]
fn quantized_indexes_search_and_reopen() {
    for quantization in [Quantization::F16, Quantization::I8] {
        let dir = tempfile::tempdir().unwrap();
        let settings = IndexSettings {
            quantization,
            ..settings()
        };
        let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings).unwrap();
        index.upsert(&[batch(&index, 0..3000, |_| 0, 0)]).unwrap();
        // A stored vector finds itself first; scores stay close to exact cosine.
        let hit = index.search(&vector(123), 1, None).unwrap();
        assert_eq!(ids_of(&hit), vec!["doc-123"], "{quantization:?}");
        assert!(
            (scores_of(&hit)[0] - 1.0).abs() < 0.02,
            "{quantization:?}: {}",
            scores_of(&hit)[0]
        );
        drop(index);
        let reopened = KnowledgeIndex::open(dir.path()).unwrap();
        assert_eq!(reopened.manifest().quantization, quantization);
        assert_eq!(
            ids_of(&reopened.search(&vector(123), 1, None).unwrap()),
            vec!["doc-123"]
        );
    }
}

#[test]
fn duplicate_keys_within_one_upsert_keep_the_last_row() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    let first = batch(&index, 0..400, |_| 1, 0);
    // The same 400 doc ids again with other vectors and category 2, in the same upsert.
    let second = batch(&index, 0..400, |_| 2, 10_000);
    let stats = index.upsert(&[first, second]).unwrap();
    assert_eq!(stats.rows, 800);
    assert_eq!(stats.replaced, 0);
    assert_eq!(index.len(), 400);
    assert_eq!(index.ann_stats().0, 400);
    let hits = index.search(&vector(10_007), 10, None).unwrap();
    assert_eq!(hits.num_rows(), 10);
    assert_eq!(ids_of(&hits)[0], "doc-7");
    assert!(hits.column(1).as_primitive::<Int64Type>().iter().all(|c| c == Some(2)));
}

#[test]
fn source_offsets_commit_with_the_rows_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    let offsets = |pairs: &[(&str, i64)]| -> SourceOffsets { pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect() };
    let rows = batch(&index, 0..10, |i| i as i64, 0);
    index
        .upsert_from_source(
            std::slice::from_ref(&rows),
            &offsets(&[("kafka:t:0", 6), ("kafka:t:1", 4)]),
        )
        .unwrap();
    // A batch of refused records still moves its partition forward, without a data commit.
    let generation = index.manifest().generation;
    index.upsert_from_source(&[], &offsets(&[("kafka:t:1", 9)])).unwrap();
    assert_eq!(index.manifest().generation, generation);
    assert_eq!(index.source_offsets(), offsets(&[("kafka:t:0", 6), ("kafka:t:1", 9)]));
    // A refused commit (wrong dimension) stores neither rows nor offsets.
    let bad = list_vector_row(&[1.0, 2.0]);
    assert!(index.upsert_from_source(&[bad], &offsets(&[("kafka:t:0", 8)])).is_err());
    assert_eq!(index.source_offsets()["kafka:t:0"], 6);
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 10);
    assert_eq!(
        reopened.source_offsets(),
        offsets(&[("kafka:t:0", 6), ("kafka:t:1", 9)])
    );
}

#[test]
fn small_upserts_commit_as_deltas_that_replay_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    // A bulk load is a full commit; small upserts next to it are deltas.
    index.upsert(&[batch(&index, 0..400, |i| (i % 4) as i64, 0)]).unwrap();
    assert!(index.manifest().deltas.is_empty());
    for start in (400..440).step_by(10) {
        index.upsert(&[batch(&index, start..start + 10, |_| 9, 0)]).unwrap();
    }
    // Replacing documents through a delta (new vectors for 100..110).
    index.upsert(&[batch(&index, 100..110, |_| 7, 5000)]).unwrap();
    let manifest = index.manifest();
    assert_eq!(manifest.deltas.len(), 5);
    assert_eq!(manifest.delta_rows, 50);
    let full_files = (manifest.rows_file.clone(), manifest.ann_file.clone());
    drop(index);

    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 440);
    assert_eq!(reopened.manifest().next_key, 450);
    // Every document is found by its own (latest) vector, with its latest row.
    for (doc, seed) in [(5u64, 5u64), (105, 5105), (425, 425)] {
        let hits = reopened.search(&vector(seed), 1, None).unwrap();
        assert_eq!(ids_of(&hits), vec![format!("doc-{doc}")]);
        assert!(scores_of(&hits)[0] > 0.999);
    }
    let sevens = reopened.search(&vector(5100), 20, Some(&category_filter(7))).unwrap();
    assert_eq!(sevens.num_rows(), 10);
    // The replaced rows' old vectors are gone from the graph.
    let old = reopened.search(&vector(100), 1, None).unwrap();
    assert!(scores_of(&old)[0] < 0.999);

    // Enough deltas make the next commit a full one, which drops them.
    for i in 0..MAX_DELTA_FILES as u64 {
        reopened
            .upsert(&[batch(&reopened, 1000 + i..1001 + i, |_| 1, 0)])
            .unwrap();
    }
    let manifest = reopened.manifest();
    assert!(manifest.deltas.len() < MAX_DELTA_FILES);
    assert_ne!((manifest.rows_file.clone(), manifest.ann_file.clone()), full_files);
    // Deletes always commit in full.
    reopened.delete(&category_filter(9)).unwrap();
    assert!(reopened.manifest().deltas.is_empty());
    drop(reopened);
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("delta-"))
        .collect();
    assert!(files.is_empty(), "dropped deltas are deleted: {files:?}");
    assert_eq!(
        KnowledgeIndex::open(dir.path()).unwrap().len(),
        440 + MAX_DELTA_FILES - 40
    );
}

#[test]
fn a_huge_k_is_capped_at_the_rows_that_can_answer() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    assert_eq!(index.search(&vector(1), usize::MAX, None).unwrap().num_rows(), 0);
    index.upsert(&[batch(&index, 0..300, |i| (i % 3) as i64, 0)]).unwrap();
    for k in [1_000_000_000_000usize, usize::MAX] {
        assert_eq!(index.search(&vector(7), k, None).unwrap().num_rows(), 300);
        let filtered = index.search(&vector(7), k, Some(&category_filter(1))).unwrap();
        assert_eq!(filtered.num_rows(), 100);
        assert_eq!(index.exact_search(&vector(7), k).unwrap().num_rows(), 300);
    }
}

/// A search runs while a commit is stuck writing its files, and answers from the last
/// generation; the stuck commit then fails, and the index goes on from that generation.
#[test]
fn searches_never_wait_for_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap());
    index.upsert(&[batch(&index, 0..400, |_| 0, 0)]).unwrap();
    // The next small upsert is a delta: its file is written through `<name>.tmp`, which the
    // test makes a FIFO, so the commit blocks opening it until the test reads the other end.
    let generation = index.manifest().generation + 1;
    let fifo = dir.path().join(format!("delta-{generation}.arrow.tmp"));
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let writer = {
        let index = index.clone();
        std::thread::spawn(move || index.upsert(&[batch(&index, 400..410, |_| 1, 0)]))
    };
    // Until the test opens the FIFO for reading, the commit cannot get past it: every search
    // below runs while it is in progress, and sees the 400 committed rows only.
    let (done, finished) = std::sync::mpsc::channel();
    let searcher = {
        let index = index.clone();
        std::thread::spawn(move || {
            for q in 0..20 {
                let hits = index.search(&vector(q), 500, None).unwrap();
                assert_eq!(hits.num_rows(), 400);
                let near = index.search(&vector(405), 1, None).unwrap();
                assert_ne!(ids_of(&near), vec!["doc-405".to_string()]);
                assert_eq!(index.len(), 400);
            }
            done.send(()).unwrap();
        })
    };
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("searches finished while the commit was blocked");
    searcher.join().unwrap();
    assert!(!writer.is_finished(), "the commit is still blocked on its file");
    // Read the FIFO's other end: the commit writes into it, then fails to flush it to disk.
    let mut reader = std::fs::File::open(&fifo).unwrap();
    std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    let outcome = writer.join().unwrap();
    assert!(outcome.is_err(), "a FIFO cannot be flushed as a file: {outcome:?}");
    // The failed commit left the last generation, in memory and on disk.
    assert_eq!(index.len(), 400);
    assert_eq!(index.manifest().generation, generation - 1);
    assert_eq!(index.search(&vector(3), 1, None).unwrap().num_rows(), 1);
    drop(reader);
    // The recovery cleared the stray file (the FIFO) with the failed generation.
    assert!(!fifo.exists());
    index.upsert(&[batch(&index, 400..410, |_| 1, 0)]).unwrap();
    assert_eq!(index.len(), 410);
    let near = index.search(&vector(405), 1, None).unwrap();
    assert_eq!(ids_of(&near), vec!["doc-405".to_string()]);
    drop(index);
    assert_eq!(KnowledgeIndex::open(dir.path()).unwrap().len(), 410);
}

/// Threads search while documents are upserted, replaced and deleted: every answer has the
/// rows it asks for, each a live document of one committed generation.
#[test]
fn concurrent_searches_see_whole_generations() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap());
    index.upsert(&[batch(&index, 0..2000, |i| (i % 2) as i64, 0)]).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let searchers: Vec<_> = (0..4)
        .map(|t| {
            let (index, stop) = (index.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut searches = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || searches < 50 {
                    let query = vector(10_000 + t * 1000 + searches);
                    let hits = index.search(&query, 10, None).unwrap();
                    assert_eq!(hits.num_rows(), 10);
                    let odd = index.search(&query, 10, Some(&category_filter(1))).unwrap();
                    assert_eq!(odd.num_rows(), 10);
                    let categories = odd.column(1).as_primitive::<Int64Type>();
                    assert!(categories.iter().all(|c| c == Some(1)));
                    let mut ids = ids_of(&hits);
                    ids.dedup();
                    assert_eq!(ids.len(), 10, "no document twice");
                    searches += 1;
                }
                searches
            })
        })
        .collect();
    for round in 0..40u64 {
        // Replace 20 documents, add 20, delete some now and then (full commits).
        let start = (round * 37) % 1900;
        index
            .upsert(&[batch(&index, start..start + 20, |i| (i % 2) as i64, round + 1)])
            .unwrap();
        index
            .upsert(&[batch(&index, 5000 + round * 20..5020 + round * 20, |_| 1, 0)])
            .unwrap();
        if round % 10 == 9 {
            let victim = format!("doc-{}", 5000 + round * 20);
            index
                .delete(&|b: &RecordBatch| {
                    Ok(b.column(0)
                        .as_string::<i32>()
                        .iter()
                        .map(|id| Some(id == Some(victim.as_str())))
                        .collect())
                })
                .unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let searches: usize = searchers.into_iter().map(|s| s.join().unwrap() as usize).sum();
    assert!(searches >= 200);
    assert_eq!(index.len(), 2000 + 40 * 20 - 4);
}

#[test]
fn a_corrupt_graph_is_rebuilt_from_the_rows_and_a_corrupt_row_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..500, |i| (i % 10) as i64, 0)]).unwrap();
    index.upsert(&[batch(&index, 500..510, |_| 0, 0)]).unwrap();
    let manifest = index.manifest();
    assert_eq!(manifest.deltas.len(), 1, "the second upsert is a delta");
    let queries: Vec<Vec<f32>> = (0..10).map(|i| vector(20_000 + i)).collect();
    drop(index);

    // A torn or overwritten graph: the index opens, rebuilt from its rows (the delta's too), and
    // its graph finds what exact search finds (two HNSW builds need not agree row for row).
    std::fs::write(dir.path().join(&manifest.ann_file), b"not a usearch graph").unwrap();
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.len(), 510);
    assert_eq!(
        reopened.ann_stats().0,
        510,
        "every row's vector is in the rebuilt graph"
    );
    let mut found = 0;
    for q in &queries {
        let exact = ids_of(&reopened.exact_search(q, 10).unwrap());
        let approximate = ids_of(&reopened.search(q, 10, None).unwrap());
        found += approximate.iter().filter(|id| exact.contains(id)).count();
    }
    assert!(found >= 95, "recall@10 {}%", found);
    drop(reopened);

    // A corrupt delta or rows file cannot be repaired: the error names it.
    for file in [&manifest.deltas[0], &manifest.rows_file] {
        let path = dir.path().join(file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = KnowledgeIndex::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(file.as_str()) && err.contains("not a readable Arrow row file"),
            "{err}"
        );
        std::fs::write(&path, &bytes).unwrap();
    }
    assert_eq!(KnowledgeIndex::open(dir.path()).unwrap().len(), 510);

    // A damaged manifest is named too.
    std::fs::write(dir.path().join(MANIFEST_FILE), b"{\"generation\": 3, \"mod").unwrap();
    let err = KnowledgeIndex::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(MANIFEST_FILE) && err.contains("not a valid manifest"),
        "{err}"
    );
}

#[test]
fn rows_live_in_their_files_pages_and_small_segments_merge_on_a_full_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.upsert(&[batch(&index, 0..300, |i| (i % 3) as i64, 0)]).unwrap();
    for start in (300..330).step_by(3) {
        index.upsert(&[batch(&index, start..start + 3, |_| 5, 0)]).unwrap();
    }
    let mapped = |index: &KnowledgeIndex| {
        let state = index.current();
        (state.segments.len(), state.segments.iter().all(|s| s.file.is_some()))
    };
    // A full commit, then ten deltas: eleven segments, each read back from its file.
    assert_eq!(mapped(&index), (11, true));
    let rows_before = index.snapshot().unwrap();
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(mapped(&reopened), (11, true), "opening maps the files too");
    assert_eq!(reopened.snapshot().unwrap(), rows_before);
    // A delete rewrites in full: the small segments merge into one, in their order.
    reopened.delete(&category_filter(1)).unwrap();
    assert_eq!(mapped(&reopened), (1, true));
    let ids = ids_of(&arrow::compute::concat_batches(&reopened.schema(), &reopened.snapshot().unwrap()).unwrap());
    let expected: Vec<String> = (0..330)
        .filter(|i| i >= &300 || i % 3 != 1)
        .map(|i| format!("doc-{i}"))
        .collect();
    assert_eq!(ids, expected);
    for doc in [0u64, 2, 329] {
        let hits = reopened.search(&vector(doc), 1, None).unwrap();
        assert_eq!(ids_of(&hits), vec![format!("doc-{doc}")]);
    }
    drop(reopened);

    // Bytes damaged inside a row file (not just cut short) are found on open and named.
    let manifest = Manifest::read(dir.path()).unwrap().unwrap();
    let path = dir.path().join(&manifest.rows_file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"doc-20")
        .expect("a key in the file");
    bytes[at] = 0xff; // no longer UTF-8
    std::fs::write(&path, &bytes).unwrap();
    let err = KnowledgeIndex::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(manifest.rows_file.as_str()) && err.contains("not a readable Arrow row file"),
        "{err}"
    );
}

/// Every disk fault a commit can meet — a full disk or a failed fsync, on a delta or the commit
/// log (a small commit), on a full rows file, the graph or the manifest (a full commit) — fails
/// that commit with an error naming the file, leaves the previous generation published and
/// whole, lets the next commit succeed, and the index reopens cleanly.
#[test]
fn disk_faults_fail_the_commit_naming_the_file_and_keep_the_previous_generation() {
    use crate::faults::{Stage, armed};
    let cases = [
        (Stage::Write, "delta-", false),
        (Stage::Write, LOG_FILE, false),
        (Stage::Sync, LOG_FILE, false),
        (Stage::Write, "rows-", true),
        (Stage::Sync, "rows-", true),
        (Stage::Write, "ann-", true),
        (Stage::Sync, "ann-", true),
        (Stage::Write, "manifest", true),
        (Stage::Sync, "manifest", true),
    ];
    for (stage, prefix, full) in cases {
        let case = format!(
            "{stage:?} fault on {prefix}… ({} commit)",
            if full { "full" } else { "delta" }
        );
        let dir = tempfile::tempdir().unwrap();
        let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
        index.upsert(&[batch(&index, 0..200, |i| (i % 10) as i64, 0)]).unwrap();
        let generation = index.manifest().generation;
        let query = vector(999);
        let before = ids_of(&index.search(&query, 5, None).unwrap());

        armed::arm(stage, prefix);
        // A delete always rewrites in full; 10 new rows commit as a delta.
        let failed = if full {
            index.delete(&category_filter(3)).map(drop)
        } else {
            index.upsert(&[batch(&index, 200..210, |_| 0, 0)]).map(drop)
        };
        assert!(!armed::pending(), "{case}: the fault was never reached");
        let err = failed.expect_err(&case).to_string();
        let errno = match stage {
            Stage::Write => "No space left on device",
            Stage::Sync => "Input/output error",
        };
        assert!(err.contains(prefix) && err.contains(errno), "{case}: {err}");
        assert_eq!(index.manifest().generation, generation, "{case}");
        assert_eq!(index.len(), 200, "{case}");
        assert_eq!(ids_of(&index.search(&query, 5, None).unwrap()), before, "{case}");

        // The next commit goes through, and a restart opens cleanly with no stray files.
        index.upsert(&[batch(&index, 200..210, |_| 0, 0)]).unwrap();
        drop(index);
        let reopened = KnowledgeIndex::open(dir.path()).unwrap();
        assert_eq!(reopened.len(), 210, "{case}");
        let strays: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(strays.is_empty(), "{case}: {strays:?}");
    }
}

/// With background compaction on, small upserts pile up as deltas past the inline limit; a
/// compaction on another thread, while commits go on, rewrites the rows and graph of its snapshot
/// and keeps the deltas committed since: every row (replaced ones in their last version) is
/// found, and a reopened index answers identically.
#[test]
fn background_compaction_runs_beside_commits_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap());
    index.set_background_compaction(true);
    index.upsert(&[batch(&index, 0..2000, |i| (i % 10) as i64, 0)]).unwrap();
    // doc-i's vector is vector(i + offset[i]).
    let mut offset: std::collections::HashMap<u64, u64> = (0..2000).map(|i| (i, 0)).collect();
    let mut commit = |index: &KnowledgeIndex, n: u64| {
        // Even commits replace ten existing documents with new vectors, odd ones add ten.
        let ids = if n.is_multiple_of(2) {
            n * 10..n * 10 + 10
        } else {
            3000 + n * 10..3000 + n * 10 + 10
        };
        index
            .upsert(&[batch(index, ids.clone(), |_| 1, 100_000 + 1000 * n)])
            .unwrap();
        ids.for_each(|i| {
            offset.insert(i, 100_000 + 1000 * n);
        });
    };
    for n in 0..40 {
        commit(&index, n);
    }
    let manifest = index.manifest();
    assert_eq!(
        manifest.deltas.len(),
        40,
        "no inline rewrite past {MAX_DELTA_FILES} deltas"
    );
    assert!(index.compaction_due());

    let compactor = {
        let index = index.clone();
        std::thread::spawn(move || index.compact())
    };
    for n in 40..50 {
        commit(&index, n);
    }
    assert!(compactor.join().unwrap().unwrap(), "the compaction published");
    let manifest = index.manifest();
    assert!(manifest.rows_file.ends_with("-compacted.arrow"), "{manifest:?}");
    assert!(
        manifest.deltas.len() <= 10,
        "only deltas committed since the snapshot remain"
    );
    assert!(!index.compaction_due());
    assert!(!index.compact().unwrap(), "nothing due");

    let expect_all = |index: &KnowledgeIndex| {
        assert_eq!(index.len(), offset.len());
        let state = index.current();
        for (&i, &off) in &offset {
            // Its last version is live, and its vector is in the graph or waits in the backlog
            // (which searches score exactly). Asked of the graph itself, not of an HNSW search:
            // on these 16-d random vectors a freshly built graph (no compaction) misses 1-10 of
            // 2,000 rows queried by their own vectors in most builds.
            let key = *state.doc_keys.get(format!("doc-{i}").as_str()).unwrap();
            assert_eq!(
                state.live_vector(key, index.vector_column),
                Some(vector(i + off).as_slice()),
                "doc-{i}"
            );
            assert!(
                state.ann.contains(key) || state.backlog.unindexed.contains(&key),
                "doc-{i}: its vector is in neither the graph nor the backlog"
            );
        }
        for (&i, &off) in offset.iter().filter(|(i, _)| *i % 37 == 0 || **i >= 3000) {
            let hits = ids_of(&index.exact_search(&vector(i + off), 1).unwrap());
            assert_eq!(hits, [format!("doc-{i}")]);
        }
    };
    expect_all(&index);
    let queries: Vec<Vec<f32>> = (0..10).map(|i| vector(50_000 + i)).collect();
    let before: Vec<Vec<String>> = queries
        .iter()
        .map(|q| ids_of(&index.search(q, 10, None).unwrap()))
        .collect();
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    expect_all(&reopened);
    for (q, expected) in queries.iter().zip(&before) {
        assert_eq!(&ids_of(&reopened.search(q, 10, None).unwrap()), expected);
    }
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".arrow") || n.ends_with(".usearch"))
        .collect();
    assert_eq!(
        files.len(),
        2 + reopened.manifest().deltas.len(),
        "old files removed: {files:?}"
    );
}

/// A compaction shrinks the files it replaced before deleting them, but never one a reader still
/// maps: rows taken before a compaction read the same afterwards (a shrunk mapped file would end
/// the process with SIGBUS on access).
#[test]
fn rows_held_across_a_background_compaction_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
    index.set_background_compaction(true);
    index.upsert(&[batch(&index, 0..4000, |i| (i % 10) as i64, 0)]).unwrap();
    for n in 0..40 {
        index
            .upsert(&[batch(&index, 10_000 + n * 10..10_010 + n * 10, |_| 1, 0)])
            .unwrap();
    }
    let rows_file = index.manifest().rows_file;
    let size = std::fs::metadata(dir.path().join(&rows_file)).unwrap().len();
    assert!(
        size > 8 * (16 << 10),
        "the rows file shrinks in several pieces: {size} bytes"
    );
    let held = index.snapshot().unwrap();
    let copied: Vec<(Vec<String>, Vec<f32>)> = held.iter().map(|b| (ids_of(b), vectors_of(b))).collect();

    assert!(index.compact().unwrap(), "the compaction published");
    assert_ne!(index.manifest().rows_file, rows_file);
    assert!(
        !dir.path().join(&rows_file).exists(),
        "the replaced rows file is deleted"
    );
    let read: Vec<(Vec<String>, Vec<f32>)> = held.iter().map(|b| (ids_of(b), vectors_of(b))).collect();
    assert_eq!(read, copied);
    assert_eq!(index.len(), 4400);
}

fn vectors_of(batch: &RecordBatch) -> Vec<f32> {
    let vectors = batch.column_by_name("embedding").unwrap().as_fixed_size_list();
    vectors.values().as_primitive::<Float32Type>().values().to_vec()
}

/// A disk fault in a background compaction (its rows file, its graph, or the manifest that
/// would publish them) fails the compaction with an error naming the file, removes what it
/// wrote, leaves the published generation as it was, and the next compaction goes through.
#[test]
fn disk_faults_fail_a_background_compaction_and_keep_the_published_generation() {
    use crate::faults::{Stage, armed};
    for stage in [Stage::Write, Stage::Sync] {
        // The swap is a logged commit: its manifest goes to the commit log.
        for prefix in ["rows-", "ann-", LOG_FILE] {
            let case = format!("{stage:?} fault on {prefix}… in a compaction");
            let dir = tempfile::tempdir().unwrap();
            let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings()).unwrap();
            index.set_background_compaction(true);
            index.upsert(&[batch(&index, 0..300, |i| (i % 10) as i64, 0)]).unwrap();
            for n in 0..40 {
                index
                    .upsert(&[batch(&index, 1000 + n * 5..1005 + n * 5, |_| 1, 0)])
                    .unwrap();
            }
            assert!(index.compaction_due(), "{case}");
            let before = index.manifest();

            armed::arm(stage, prefix);
            let failed = index.compact();
            assert!(!armed::pending(), "{case}: the fault was never reached");
            let err = failed.expect_err(&case).to_string();
            assert!(err.contains(prefix), "{case}: {err}");
            let after = index.manifest();
            assert_eq!(
                (after.generation, &after.rows_file),
                (before.generation, &before.rows_file),
                "{case}"
            );
            assert_eq!(index.len(), 500, "{case}");
            let leftovers: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.contains("-compacted") || n.ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{case}: {leftovers:?}");

            assert!(index.compact().unwrap(), "{case}: the next compaction publishes");
            drop(index);
            let reopened = KnowledgeIndex::open(dir.path()).unwrap();
            assert_eq!(reopened.len(), 500, "{case}");
            assert!(reopened.manifest().rows_file.ends_with("-compacted.arrow"), "{case}");
        }
    }
}
