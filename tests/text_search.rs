//! Full-text search, fusion and hybrid search through SQL with the real embedding model, and
//! the text index's crash safety with the real binary.

mod common;
#[path = "common/server.rs"]
mod server;

use std::time::{Duration, Instant};

use common::*;
use server::mkflow;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_search_finds_documents_by_their_words() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    ingest(&engine, &sample_corpus()).await;
    let docs = engine
        .sql("SELECT doc_id, title FROM kb ORDER BY doc_id")
        .await
        .unwrap();
    let (ids, titles) = (strings(&docs, "doc_id"), strings(&docs, "title"));
    let mut first = 0;
    for (id, title) in ids.iter().zip(&titles) {
        let hits = engine
            .sql(&format!(
                "SELECT doc_id, score FROM text_search(kb, {}, 3)",
                quoted(title)
            ))
            .await
            .unwrap();
        let scores = floats(&hits, "score");
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
        if strings(&hits, "doc_id").first() == Some(id) {
            first += 1;
        }
    }
    let rate = first as f64 / ids.len() as f64;
    eprintln!(
        "known-item retrieval by title with BM25: {first}/{} first ({rate:.3})",
        ids.len()
    );
    assert!(rate >= 0.9, "only {rate:.3} of titles find their document first");

    // Filters run inside the search: k rows, all passing.
    let filtered = engine
        .sql("SELECT doc_id FROM text_search(kb, 'cells', 7) WHERE doc_id LIKE '1%'")
        .await
        .unwrap();
    let filtered = strings(&filtered, "doc_id");
    assert_eq!(filtered.len(), 7, "{filtered:?}");
    assert!(filtered.iter().all(|id| id.starts_with('1')));
    // A column, the query's LIMIT, tantivy's syntax when asked for.
    let in_title = engine
        .sql("SELECT title FROM text_search(kb, 'cancer', title) LIMIT 4")
        .await
        .unwrap();
    let in_title = strings(&in_title, "title");
    assert_eq!(in_title.len(), 4);
    assert!(
        in_title.iter().all(|t| t.to_lowercase().contains("cancer")),
        "{in_title:?}"
    );
    let required = engine
        .sql("SELECT body FROM text_search(kb, '+vitamin +deficiency', 20, syntax => 'tantivy')")
        .await
        .unwrap();
    for body in strings(&required, "body") {
        let body = body.to_lowercase();
        assert!(body.contains("vitamin") && body.contains("deficien"), "{body}");
    }
    let error = sql_error(
        &engine,
        "SELECT * FROM text_search(kb, 'title:\"unclosed', syntax => 'tantivy')",
    )
    .await;
    assert!(error.contains("position"), "{error}");
    let error = sql_error(&engine, "SELECT * FROM text_search(kb, 'x', doc_id)").await;
    assert!(
        error.contains("not indexed for full-text search") && error.contains("title, body"),
        "{error}"
    );
    let error = sql_error(&engine, "SELECT * FROM text_search(kb, 'x', syntax => 'lucene')").await;
    assert!(error.contains("'terms' or 'tantivy'"), "{error}");
    let error = sql_error(&engine, "SELECT * FROM text_search(kb, 'x', 5, limit => 3)").await;
    assert!(error.contains("no argument named 'limit'"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rrf_fuses_searches_and_hybrid_search_is_its_shorthand() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    ingest(&engine, &sample_corpus()).await;
    let query = "vitamin D and bone fractures in older adults";
    let hybrid = engine
        .sql(&format!(
            "SELECT doc_id, fused_score FROM hybrid_search(kb, {}, 20)",
            quoted(query)
        ))
        .await
        .unwrap();
    let explicit = engine
        .sql(&format!(
            "SELECT doc_id, fused_score FROM rrf(vector_search(kb, {q}), text_search(kb, {q}), join_key => 'doc_id', k => 60.0) LIMIT 20",
            q = quoted(query)
        ))
        .await
        .unwrap();
    assert_eq!(strings(&hybrid, "doc_id"), strings(&explicit, "doc_id"));
    let fused = floats(&hybrid, "fused_score");
    assert_eq!(fused.len(), 20);
    assert!(fused.windows(2).all(|w| w[0] >= w[1]), "{fused:?}");
    // The top document is in both lists, near the top of each: at most 2/61.
    assert!(fused[0] <= 2.0 / 61.0 + 1e-6 && fused[0] > 1.0 / 61.0, "{}", fused[0]);

    // Fusion is by rank: the same search given twice the weight decides the order alone.
    let dense = engine
        .sql(&format!("SELECT doc_id FROM vector_search(kb, {}, 10)", quoted(query)))
        .await
        .unwrap();
    let weighted = engine
        .sql(&format!(
            "SELECT doc_id FROM rrf(vector_search(kb, {q}, rank_weight => 100), text_search(kb, {q})) LIMIT 10",
            q = quoted(query)
        ))
        .await
        .unwrap();
    assert_eq!(strings(&weighted, "doc_id"), strings(&dense, "doc_id"));
    // Filters reach every fused search.
    let filtered = engine
        .sql(&format!(
            "SELECT doc_id FROM hybrid_search(kb, {}, 5) WHERE doc_id LIKE '2%'",
            quoted(query)
        ))
        .await
        .unwrap();
    let filtered = strings(&filtered, "doc_id");
    assert_eq!(filtered.len(), 5);
    assert!(filtered.iter().all(|id| id.starts_with('2')), "{filtered:?}");

    for (sql, expected) in [
        (
            "SELECT * FROM rrf('x', text_search(kb, 'x'))",
            "calls of search functions",
        ),
        (
            "SELECT * FROM rrf(vector_search(kb, 'x'), join_key => 'nope')",
            "no column 'nope'",
        ),
        (
            "SELECT * FROM rrf(text_search(kb, 'x'), k => -1)",
            "k must be a positive number",
        ),
        (
            "SELECT * FROM rrf(vector_search(kb, 'x', syntax => 'tantivy'))",
            "vector_search takes no argument named 'syntax'",
        ),
        (
            "SELECT * FROM vector_search(kb, 'x', k => 3)",
            "vector_search takes no argument named 'k'",
        ),
        (
            "SELECT * FROM rrf(text_search(kb, 'x', rank_weight => 0))",
            "rank_weight must be a positive number",
        ),
        ("SELECT vector_search(kb, 'x')", "No field named kb"),
        ("SELECT vector_search('kb', 'x')", "is a table function"),
    ] {
        let error = sql_error(&engine, sql).await;
        assert!(error.contains(expected), "{sql}: {error}");
    }
}

/// The index directory's text-index generation (its last commit's payload).
fn text_generation(kb: &std::path::Path) -> Option<u64> {
    let meta = std::fs::read_to_string(kb.join("fulltext/meta.json")).ok()?;
    let meta: serde_json::Value = serde_json::from_str(&meta).ok()?;
    meta["payload"].as_str()?.parse().ok()
}

fn manifest_generation(kb: &std::path::Path) -> u64 {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kb.join("manifest.json")).unwrap()).unwrap();
    manifest["generation"].as_u64().unwrap()
}

fn run_sql(data: &std::path::Path, sql: &str) -> std::process::Output {
    let output = mkflow(data).args(["sql", sql, "--format", "csv"]).output().unwrap();
    assert!(
        output.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn sigkill_between_the_text_commit_and_the_manifest_leaves_them_in_step() {
    let data = tempfile::tempdir().unwrap();
    let kb = data.path().join("kb");
    let create = "CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, body VARCHAR) \
                  STORED AS KB LOCATION 'kb' OPTIONS ('dimensions' '2', 'model' 'external')";
    run_sql(
        data.path(),
        &format!("{create}; INSERT INTO kb VALUES ('a', 'comet tail', [1.0, 0.0]), ('b', 'comet dust', [0.0, 1.0])"),
    );
    let generation = manifest_generation(&kb);
    assert_eq!(text_generation(&kb), Some(generation));

    // The next commit stops at its manifest (a FIFO nobody reads), after the text index has
    // committed; then the process is killed. Opening the index removes stray temporary files,
    // so the FIFO is made once the process has opened it: when a decoy stray file is gone (the
    // insert then spends a moment counting before it commits).
    let fifo = kb.join("manifest.json.tmp");
    let decoy = kb.join("rows-999999.arrow");
    std::fs::write(&decoy, b"stray").unwrap();
    let mut child = mkflow(data.path())
        .args([
            "sql",
            &format!(
                "{create}; INSERT INTO kb SELECT 'c', 'asteroid belt', [1.0, 1.0] \
                 FROM (SELECT count(*) AS n FROM generate_series(1, 5000000)) WHERE n > 0"
            ),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while decoy.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the index was never opened"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(manifest_generation(&kb), generation, "the FIFO was made in time");
    let started = Instant::now();
    while text_generation(&kb) != Some(generation + 1) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the text index never committed"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the insert ended before its manifest"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&fifo).unwrap();
    assert_eq!(
        manifest_generation(&kb),
        generation,
        "the manifest still names the old generation"
    );

    let output = run_sql(
        data.path(),
        &format!(
            "{create}; SELECT (SELECT count(*) FROM text_search(kb, 'asteroid')) AS asteroid, \
                       (SELECT count(*) FROM text_search(kb, 'comet')) AS comet, \
                       (SELECT count(*) FROM kb) AS all_rows"
        ),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("0,2,2"),
        "rows and text agree on the old generation: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rebuilding the text index"),
        "a warning says so: {stderr}"
    );
    assert_eq!(text_generation(&kb), Some(generation));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_calls_of_one_search_function_are_different_scans() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    engine
        .sql(
            "CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, body VARCHAR) STORED AS KB LOCATION 'kb' \
             OPTIONS ('dimensions' '2', 'model' 'external')",
        )
        .await
        .unwrap();
    engine
        .sql("INSERT INTO kb VALUES ('a', 'comet tail', [1.0, 0.0]), ('b', 'asteroid belt', [0.0, 1.0])")
        .await
        .unwrap();
    // DataFusion compares table-function scans without their arguments; mkflow tags each
    // call, or these subqueries would be merged into one.
    for (sql, expected) in [
        (
            "SELECT (SELECT max(doc_id) FROM text_search(kb, 'comet')) AS x, (SELECT max(doc_id) FROM text_search(kb, 'asteroid')) AS y",
            ["a", "b"],
        ),
        (
            "SELECT (SELECT max(doc_id) FROM vector_search(kb, [1.0, 0.0], 1)) AS x, (SELECT max(doc_id) FROM vector_search(kb, [0.0, 1.0], 1)) AS y",
            ["a", "b"],
        ),
    ] {
        let batches = engine.sql(sql).await.unwrap();
        assert_eq!(strings(&batches, "x"), vec![expected[0]], "{sql}");
        assert_eq!(strings(&batches, "y"), vec![expected[1]], "{sql}");
    }
}
