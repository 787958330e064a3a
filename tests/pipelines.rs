//! The example pipelines in `pipelines/` run as shipped (locations pointed at test data).

mod common;

use std::path::Path;

use common::*;

fn pipeline(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_files_pipeline_indexes_a_directory_and_reports_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(docs.join("guides")).unwrap();
    std::fs::write(
        docs.join("penguins.md"),
        "# Penguins\nEmperor penguins huddle together to survive the Antarctic winter.",
    )
    .unwrap();
    std::fs::write(
        docs.join("guides/rust.md"),
        "# Rust ownership\nEach value has one owner; borrowing lends access.",
    )
    .unwrap();
    std::fs::write(
        docs.join("notes.txt"),
        "Sourdough bread needs a lively starter and a long, cool proof.",
    )
    .unwrap();
    std::fs::write(docs.join("broken.txt"), [0xc3, 0x28, 0xa0]).unwrap();
    let engine = engine(&dir.path().join("data")).await;
    let script =
        pipeline("text_files_to_kb.sql").replace("LOCATION 'docs/'", &format!("LOCATION '{}/'", docs.display()));
    let results = engine.run_script(&script, |_| {}).await.unwrap();
    // The pipeline's error report lists the unreadable file.
    let errors = &results[1].batches;
    assert_eq!(strings(errors, "doc_id"), vec!["broken.txt".to_string()]);
    assert_eq!(single_int(&engine.sql("SELECT count(*) FROM notes").await.unwrap()), 3);
    let hits = engine
        .sql("SELECT doc_id, title FROM vector_search(notes, 'how do birds stay warm in Antarctica', 1)")
        .await
        .unwrap();
    assert_eq!(strings(&hits, "doc_id"), vec!["penguins.md".to_string()]);
    assert_eq!(strings(&hits, "title"), vec!["Penguins".to_string()]);
    // Re-running the pipeline upserts: still 3 rows.
    let engine = common::engine(&dir.path().join("data")).await;
    engine.run_script(&script, |_| {}).await.unwrap();
    assert_eq!(single_int(&engine.sql("SELECT count(*) FROM notes").await.unwrap()), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scifact_sample_pipeline_runs_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir.path().join("data")).await;
    let script = pipeline("scifact_sample.sql").replace(
        "'data/sample/scifact-sample.jsonl'",
        &format!("'{}'", sample_corpus().display()),
    );
    let results = engine.run_script(&script, |_| {}).await.unwrap();
    assert_eq!(single_int(&results.last().unwrap().batches), 400);
}
