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
    let results = engine.run_script("test", &script, |_| {}).await.unwrap();
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
    engine.run_script("test", &script, |_| {}).await.unwrap();
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
    let results = engine.run_script("test", &script, |_| {}).await.unwrap();
    assert_eq!(single_int(&results.last().unwrap().batches), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jsonl_records_go_to_dead_letters_and_the_rest_is_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.jsonl");
    std::fs::write(
        &file,
        "{\"doc_id\": \"p1\", \"title\": \"Penguins\", \"body\": \"Penguins huddle in the cold.\"}\n\
         {\"doc_id\": \"p2\", \"title\": \"Broken\", \"body\": \n\
         {\"title\": \"No id\", \"body\": \"A record without its key.\"}\n\
         {\"doc_id\": \"p3\", \"title\": \"Bread\", \"body\": \"Sourdough needs a starter.\"}\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let engine = engine(&data).await;
    let script = format!(
        "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS JSONL LOCATION '{}';
         CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, title, body, embed(body) FROM docs;",
        file.display()
    );
    engine.run_script("test", &script, |_| {}).await.unwrap();
    let ids = engine.sql("SELECT doc_id FROM kb ORDER BY doc_id").await.unwrap();
    assert_eq!(strings(&ids, "doc_id"), vec!["p1".to_string(), "p3".to_string()]);
    let dead = engine
        .sql("SELECT position, payload, error FROM dead_letters ORDER BY position")
        .await
        .unwrap();
    assert_eq!(strings(&dead, "position"), vec!["2".to_string(), "3".to_string()]);
    assert!(strings(&dead, "payload")[1].contains("No id"));
    assert!(
        strings(&dead, "error")[1].contains("doc_id"),
        "{:?}",
        strings(&dead, "error")
    );
    // They persist for later sessions.
    drop(engine);
    let engine = common::engine(&data).await;
    assert_eq!(row_count(&engine.sql("SELECT * FROM dead_letters").await.unwrap()), 2);
}

/// `LOCATION '-'` reads JSON Lines from standard input (`cat docs.jsonl | mkflow run p.sql`).
#[test]
fn jsonl_from_stdin_through_the_binary() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("stdin.sql");
    std::fs::write(
        &pipeline,
        "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '-';
         CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, title, embed(title) FROM docs;",
    )
    .unwrap();
    let corpus = std::fs::read_to_string(common::sample_corpus()).unwrap();
    let mut input: Vec<&str> = corpus.lines().take(20).collect();
    input.insert(7, "{\"title\": \"no id\"}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("run")
        .arg(&pipeline)
        .env("MKFLOW_HOME", common::assets_home())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.join("\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let index = mkflow_index::KnowledgeIndex::open(dir.path().join("data/kb")).unwrap();
    assert_eq!(index.len(), 20);
    let letters = std::fs::read_to_string(dir.path().join("data/dead_letters.jsonl")).unwrap();
    assert!(letters.contains("\"source\":\"stdin\""), "{letters}");
    assert!(letters.contains("doc_id"), "{letters}");
}
