//! Full-text search behaviour: BM25 scores, upserts and deletes, filters inside the search,
//! commits and crashes between the text index and the rows.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};

use super::*;

const DIMS: usize = 4;

fn settings(text_columns: Option<Vec<TextColumn>>) -> IndexSettings {
    IndexSettings {
        model: "synthetic".into(),
        dimensions: DIMS,
        quantization: Quantization::F32,
        key_column: "doc_id".into(),
        vector_column: "embedding".into(),
        text_columns,
    }
}

fn columns() -> Schema {
    Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
        Field::new("body", DataType::Utf8, true),
        Field::new("category", DataType::Int64, true),
    ])
}

fn create(dir: &std::path::Path) -> KnowledgeIndex {
    KnowledgeIndex::open_or_create(dir, &columns(), &settings(None)).unwrap()
}

/// Rows (id, title, body, category) with unit vectors.
fn rows(index: &KnowledgeIndex, rows: &[(&str, &str, &str, i64)]) -> RecordBatch {
    let text = |column: usize| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(|r| Some([r.0, r.1, r.2][column]))
                .collect::<StringArray>(),
        )
    };
    let flat: Vec<f32> = rows.iter().flat_map(|_| [1.0, 0.0, 0.0, 0.0]).collect();
    let vectors = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        DIMS as i32,
        Arc::new(Float32Array::from(flat)),
        None,
    )
    .unwrap();
    RecordBatch::try_new(
        index.schema(),
        vec![
            text(0),
            text(1),
            text(2),
            Arc::new(rows.iter().map(|r| Some(r.3)).collect::<Int64Array>()),
            Arc::new(vectors),
        ],
    )
    .unwrap()
}

fn ids(batch: &RecordBatch) -> Vec<String> {
    let ids = batch.column(0).as_string::<i32>();
    (0..ids.len()).map(|i| ids.value(i).to_string()).collect()
}

fn scores(batch: &RecordBatch) -> Vec<f32> {
    batch
        .column(batch.num_columns() - 1)
        .as_primitive::<Float32Type>()
        .values()
        .to_vec()
}

fn search(index: &KnowledgeIndex, text: &str, k: usize) -> Vec<String> {
    ids(&index.text_search(&TextQuery::terms(text), k, None).unwrap())
}

#[test]
fn scores_are_bm25_with_lucene_idf_k1_1_2_and_b_0_75() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    let docs = [
        ("a", "Cells", "Stem cells divide; the cells grow.", 1),
        ("b", "Proteins", "Proteins fold into shapes.", 1),
        ("c", "Cell walls", "Plant cells have walls and a cell membrane too.", 2),
        ("d", "Weather", "Rain falls on plains in the spring.", 2),
    ];
    index.upsert(&[rows(&index, &docs)]).unwrap();
    let query = "dividing cells";
    let result = index.text_search(&TextQuery::terms(query), 10, None).unwrap();

    // The reference: BM25 over each row's title and body as one text, terms as the English
    // analyzer makes them.
    let analyzer = Analyzer::default();
    let texts: Vec<Vec<String>> = docs
        .iter()
        .map(|d| analyzer.terms(&format!("{}\n{}", d.1, d.2)))
        .collect();
    let n = texts.len() as f32;
    let average = texts.iter().map(Vec::len).sum::<usize>() as f32 / n;
    let bm25 = |doc: &[String]| -> f32 {
        analyzer
            .terms(query)
            .iter()
            .map(|term| {
                let containing = texts.iter().filter(|t| t.contains(term)).count() as f32;
                let frequency = doc.iter().filter(|t| *t == term).count() as f32;
                if frequency == 0.0 {
                    return 0.0;
                }
                let idf = (1.0 + (n - containing + 0.5) / (containing + 0.5)).ln();
                idf * frequency * 2.2 / (frequency + 1.2 * (0.25 + 0.75 * doc.len() as f32 / average))
            })
            .sum()
    };
    let mut expected: Vec<(String, f32)> = docs
        .iter()
        .zip(&texts)
        .map(|(d, t)| (d.0.to_string(), bm25(t)))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(ids(&result), expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>());
    for (got, (id, want)) in scores(&result).iter().zip(&expected) {
        assert!((got - want).abs() <= want * 1e-3, "{id}: BM25 {got}, expected {want}");
    }
}

#[test]
fn upserts_replace_and_deletes_remove_text() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    index
        .upsert(&[rows(
            &index,
            &[
                ("a", "zebra", "stripes", 1),
                ("b", "lion", "mane", 1),
                ("c", "zebra", "herd", 1),
            ],
        )])
        .unwrap();
    assert_eq!(search(&index, "zebra", 10).len(), 2);
    index.upsert(&[rows(&index, &[("a", "giraffe", "neck", 1)])]).unwrap();
    assert_eq!(search(&index, "zebra", 10), vec!["c"]);
    assert_eq!(search(&index, "giraffe", 10), vec!["a"]);
    index
        .delete(&|b: &RecordBatch| {
            Ok(b.column(0)
                .as_string::<i32>()
                .iter()
                .map(|id| Some(id == Some("c")))
                .collect::<BooleanArray>())
        })
        .unwrap();
    assert!(search(&index, "zebra", 10).is_empty());
    // Two versions of one document in one upsert: the last one is the document.
    index
        .upsert(&[rows(&index, &[("d", "okapi", "first", 1), ("d", "okapi", "second", 1)])])
        .unwrap();
    assert!(search(&index, "first", 10).is_empty());
    assert_eq!(search(&index, "okapi second", 10), vec!["d"]);
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(search(&reopened, "giraffe okapi zebra lion", 10).len(), 3);
}

#[test]
fn filters_run_inside_the_search() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    // Category 3 rows mention the term once in a long text, the others often in a short one:
    // the unfiltered top 10 holds no category 3 row.
    let long = "filler words ".repeat(30);
    let docs: Vec<(String, String, i64)> = (0..100)
        .map(|i| {
            let category = i % 5;
            let body = if category == 3 {
                format!("quasar {long}")
            } else {
                "quasar quasar quasar".to_string()
            };
            (format!("doc-{i}"), body, category)
        })
        .collect();
    let batch_rows: Vec<(&str, &str, &str, i64)> = docs.iter().map(|d| (d.0.as_str(), "", d.1.as_str(), d.2)).collect();
    index.upsert(&[rows(&index, &batch_rows)]).unwrap();
    let unfiltered = index.text_search(&TextQuery::terms("quasar"), 10, None).unwrap();
    assert!(
        unfiltered
            .column(3)
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .all(|c| *c != 3)
    );
    let wanted = |b: &RecordBatch| -> Result<BooleanArray, IndexError> {
        Ok(b.column(3)
            .as_primitive::<Int64Type>()
            .iter()
            .map(|c| Some(c == Some(3)))
            .collect())
    };
    let filtered = index
        .text_search(&TextQuery::terms("quasar"), 10, Some(&wanted))
        .unwrap();
    assert_eq!(filtered.num_rows(), 10, "k rows whenever k rows match");
    assert!(
        filtered
            .column(3)
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .all(|c| *c == 3)
    );
}

#[test]
fn columns_and_query_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    index
        .upsert(&[rows(
            &index,
            &[("a", "nebula", "dust", 1), ("b", "dust storm", "nebula nearby", 1)],
        )])
        .unwrap();
    let in_title = |text: &str| TextQuery {
        text: text.into(),
        column: Some("title".into()),
        syntax: QuerySyntax::Terms,
    };
    assert_eq!(
        ids(&index.text_search(&in_title("nebula"), 10, None).unwrap()),
        vec!["a"]
    );
    let tantivy = |text: &str| TextQuery {
        text: text.into(),
        column: None,
        syntax: QuerySyntax::Tantivy,
    };
    assert_eq!(
        ids(&index.text_search(&tantivy("+nebula -storm"), 10, None).unwrap()),
        vec!["a"]
    );
    assert_eq!(
        ids(&index.text_search(&tantivy("title:storm"), 10, None).unwrap()),
        vec!["b"]
    );
    // Operators mean nothing in plain terms: any text is a query.
    assert_eq!(search(&index, "+nebula -storm (\"", 10).len(), 2);
    let error = index.text_search(&tantivy("nebula AND (dust"), 10, None).unwrap_err();
    assert!(matches!(error, IndexError::QuerySyntax(_)), "{error}");
    assert!(error.to_string().contains("position"), "{error}");
    index.check_text_query(&in_title("x")).unwrap();
    let message = index
        .check_text_query(&TextQuery {
            column: Some("category".into()),
            ..TextQuery::terms("x")
        })
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("category") && message.contains("title, body"),
        "{message}"
    );
}

#[test]
fn a_text_index_ahead_of_the_rows_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    let base: Vec<(String, i64)> = (0..40).map(|i| (format!("doc-{i}"), i)).collect();
    let base_rows: Vec<(&str, &str, &str, i64)> =
        base.iter().map(|(id, i)| (id.as_str(), "comet", "tail", *i)).collect();
    index.upsert(&[rows(&index, &base_rows)]).unwrap();
    // A crash after the text index committed a generation and before the manifest named it
    // (in the commit log): the manifest and log of the generation before, the text index one
    // ahead.
    let committed_before = [MANIFEST_FILE, LOG_FILE].map(|f| std::fs::read(dir.path().join(f)).unwrap());
    index
        .upsert(&[rows(&index, &[("doc-99", "asteroid", "belt", 1)])])
        .unwrap();
    assert_eq!(search(&index, "asteroid", 10), vec!["doc-99"]);
    drop(index);
    for (file, bytes) in [MANIFEST_FILE, LOG_FILE].iter().zip(&committed_before) {
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert!(
        search(&reopened, "asteroid", 10).is_empty(),
        "rows and text of the same generation"
    );
    assert_eq!(search(&reopened, "comet", 100).len(), 40);
    drop(reopened);

    // A missing text index, then a corrupt one, are rebuilt from the rows.
    std::fs::remove_dir_all(dir.path().join(fulltext::FULLTEXT_DIR)).unwrap();
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(search(&reopened, "comet", 100).len(), 40);
    drop(reopened);
    std::fs::write(dir.path().join(fulltext::FULLTEXT_DIR).join("meta.json"), b"{ not json").unwrap();
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(search(&reopened, "comet", 100).len(), 40);
    reopened
        .upsert(&[rows(&reopened, &[("doc-100", "comet", "again", 1)])])
        .unwrap();
    assert_eq!(search(&reopened, "comet", 100).len(), 41);
}

#[test]
fn delta_commits_and_compaction_keep_the_text_index_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    let names: Vec<String> = (0..400).map(|i| format!("doc-{i}")).collect();
    let first: Vec<(&str, &str, &str, i64)> = names[..200]
        .iter()
        .map(|n| (n.as_str(), "meteor", "shower", 0))
        .collect();
    index.upsert(&[rows(&index, &first)]).unwrap();
    // Small upserts commit as deltas, then a full rewrite once they add up.
    for chunk in names[200..].chunks(10) {
        let more: Vec<(&str, &str, &str, i64)> = chunk.iter().map(|n| (n.as_str(), "meteor", "crater", 0)).collect();
        index.upsert(&[rows(&index, &more)]).unwrap();
    }
    assert_eq!(search(&index, "crater", 1000).len(), 200);
    let generation = index.manifest().generation;
    drop(index);
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(reopened.manifest().generation, generation);
    assert_eq!(search(&reopened, "meteor", 1000).len(), 400);
    assert_eq!(search(&reopened, "crater", 1000).len(), 200);
}

#[test]
fn text_columns_are_chosen_and_can_change() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    assert_eq!(
        index.text_columns().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        vec!["title", "body"],
        "by default every text column but the key"
    );
    index
        .upsert(&[rows(&index, &[("a", "pulsar", "neutron star", 1)])])
        .unwrap();
    drop(index);
    let only_title = Some(TextColumn::parse_list("title:simple", Analyzer::default()).unwrap());
    let index = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings(only_title.clone())).unwrap();
    assert!(
        search(&index, "neutron", 10).is_empty(),
        "the body is no longer indexed"
    );
    assert_eq!(search(&index, "pulsar", 10), vec!["a"]);
    drop(index);
    let index = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(index.manifest().text_columns, only_title, "the change is kept");
    let none = KnowledgeIndex::open_or_create(dir.path(), &columns(), &settings(Some(Vec::new()))).unwrap();
    drop(index);
    assert!(none.text_search(&TextQuery::terms("pulsar"), 10, None).is_err());
    assert!(!dir.path().join(fulltext::FULLTEXT_DIR).exists());
    let wrong = KnowledgeIndex::open_or_create(
        tempfile::tempdir().unwrap().path(),
        &columns(),
        &settings(Some(TextColumn::parse_list("category", Analyzer::default()).unwrap())),
    );
    assert!(wrong.unwrap_err().to_string().contains("only text columns"));
}

#[test]
fn two_handles_on_one_index_share_its_text_writer() {
    let dir = tempfile::tempdir().unwrap();
    let first = create(dir.path());
    first.upsert(&[rows(&first, &[("a", "quokka", "smile", 1)])]).unwrap();
    // A second engine over the same data directory opens the index again; tantivy allows one
    // writer per directory, so both handles share it.
    let second = KnowledgeIndex::open(dir.path()).unwrap();
    second
        .upsert(&[rows(&second, &[("b", "wombat", "burrow", 1)])])
        .unwrap();
    assert_eq!(search(&second, "quokka wombat", 10).len(), 2);
    drop((first, second));
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(search(&reopened, "quokka wombat", 10).len(), 2);
}

#[test]
fn a_background_compaction_leaves_the_text_index_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let index = create(dir.path());
    index.set_background_compaction(true);
    let names: Vec<String> = (0..240).map(|i| format!("doc-{i}")).collect();
    let first: Vec<(&str, &str, &str, i64)> = names[..200]
        .iter()
        .map(|n| (n.as_str(), "meteor", "shower", 0))
        .collect();
    index.upsert(&[rows(&index, &first)]).unwrap();
    for name in &names[200..] {
        index
            .upsert(&[rows(&index, &[(name.as_str(), "meteor", "crater", 0)])])
            .unwrap();
    }
    assert!(index.compaction_due());
    let text_commit = |dir: &std::path::Path| -> Option<String> {
        tantivy::Index::open_in_dir(dir.join(fulltext::FULLTEXT_DIR))
            .unwrap()
            .load_metas()
            .unwrap()
            .payload
    };
    let before = index.manifest().generation;
    assert_eq!(text_commit(dir.path()), Some(before.to_string()));
    assert!(index.compact().unwrap());
    let manifest = index.manifest();
    assert_eq!(
        (manifest.generation, manifest.text_generation),
        (before + 1, Some(before))
    );
    assert_eq!(text_commit(dir.path()), Some(before.to_string()), "no text commit");
    assert_eq!(search(&index, "crater", 1000).len(), 40);
    drop(index);
    // Reopening finds the text index at the generation the manifest names: nothing to rebuild.
    let reopened = KnowledgeIndex::open(dir.path()).unwrap();
    assert_eq!(text_commit(dir.path()), Some(before.to_string()), "not rebuilt");
    assert_eq!(search(&reopened, "meteor", 1000).len(), 240);
    // The next commit commits the text index with its own generation again.
    reopened
        .upsert(&[rows(&reopened, &[("doc-0", "comet", "tail", 0)])])
        .unwrap();
    let manifest = reopened.manifest();
    assert_eq!(manifest.text_generation, None);
    assert_eq!(text_commit(dir.path()), Some(manifest.generation.to_string()));
    assert_eq!(search(&reopened, "comet", 10), vec!["doc-0"]);
}

#[test]
fn shards_scored_with_summed_statistics_score_as_one_index() {
    let dir = tempfile::tempdir().unwrap();
    let docs = [
        ("a", "Cells", "Stem cells divide; the cells grow.", 1),
        ("b", "Proteins", "Proteins fold into shapes.", 1),
        ("c", "Cell walls", "Plant cells have walls and a cell membrane too.", 2),
        ("d", "Weather", "Rain falls on plains in the spring.", 2),
        ("e", "Dividing", "Cells dividing quickly under the microscope.", 1),
    ];
    let whole = create(&dir.path().join("whole"));
    whole.upsert(&[rows(&whole, &docs)]).unwrap();
    let shards = [create(&dir.path().join("s0")), create(&dir.path().join("s1"))];
    shards[0].upsert(&[rows(&shards[0], &docs[..2])]).unwrap();
    shards[1].upsert(&[rows(&shards[1], &docs[2..])]).unwrap();
    let query = TextQuery::terms("dividing cells");
    let mut summed = shards[0].text_statistics(&query).unwrap();
    summed.add(&shards[1].text_statistics(&query).unwrap());
    let sorted = |mut s: TextStatistics| {
        s.tokens.sort();
        s.term_documents.sort();
        s
    };
    assert_eq!(summed.documents, 5);
    assert_eq!(sorted(summed.clone()), sorted(whole.text_statistics(&query).unwrap()));

    let expected = whole.text_search(&query, 10, None).unwrap();
    let mut merged: Vec<(String, f32)> = shards
        .iter()
        .flat_map(|shard| {
            let found = shard.text_search_with(&query, 10, None, Some(&summed)).unwrap();
            ids(&found).into_iter().zip(scores(&found)).collect::<Vec<_>>()
        })
        .collect();
    merged.sort_by(|a, b| b.1.total_cmp(&a.1));
    let merged_ids: Vec<String> = merged.iter().map(|(id, _)| id.clone()).collect();
    let merged_scores: Vec<f32> = merged.iter().map(|(_, s)| *s).collect();
    assert_eq!(merged_ids, ids(&expected));
    assert_eq!(merged_scores, scores(&expected), "the same scores as one index");
    // Each shard's own statistics score differently (the reason for summing them).
    let local = shards[1].text_search(&query, 10, None).unwrap();
    let global = shards[1].text_search_with(&query, 10, None, Some(&summed)).unwrap();
    assert_ne!(scores(&local), scores(&global));
}
