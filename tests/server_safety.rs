//! `mkflow serve` is safe to expose: the probes of a client holding a token, against the real
//! binary over HTTP — reading the server's files, sending its secrets elsewhere, changing other
//! clients' results, destroying the index, aborting the process, exhausting its memory — each
//! refused with a status and a message naming the role or the limit, the server running on.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use server::{Server, mkflow};

const READER: &str = "reader-token-1";
const ADMIN: &str = "admin-token-2";

/// Builds index `kb` from the first `n` sample documents in `data`.
async fn build_index(data: &Path, n: usize) -> Vec<String> {
    let lines: Vec<String> = std::fs::read_to_string(common::sample_corpus())
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_string)
        .collect();
    let corpus = data.parent().unwrap().join("corpus.jsonl");
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let engine = common::engine(data).await;
    common::ingest(&engine, &corpus).await;
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["doc_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Status and JSON body of a request.
async fn ask(server: &Server, token: Option<&str>, sql: &str) -> (u16, Value) {
    let response = server.sql(token, sql).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Asserts a refusal: `status`, and an error message containing every one of `words`.
async fn refused(server: &Server, token: Option<&str>, sql: &str, status: u16, words: &[&str]) {
    let (got, body) = ask(server, token, sql).await;
    let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(got, status, "{sql}: {body}");
    for word in words {
        assert!(message.contains(word), "{sql}: '{word}' not in '{message}'");
    }
}

/// The single value of a one-row answer.
async fn value(server: &Server, token: Option<&str>, sql: &str) -> Value {
    let (status, body) = ask(server, token, sql).await;
    assert_eq!(status, 200, "{sql}: {body}");
    let row = body["rows"][0].as_object().cloned().unwrap_or_default();
    row.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null)
}

/// A listener that counts the connections it receives.
fn listener() -> (u16, Arc<AtomicUsize>) {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in socket.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buffer = [0u8; 4096];
            let _ = (&stream).read(&mut buffer);
        }
    });
    (port, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_cannot_read_files_steal_secrets_cross_talk_destroy_or_crash() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let ids = build_index(&data, 40).await;
    std::fs::write(
        data.join("docs.jsonl"),
        "{\"doc_id\": \"n1\", \"title\": \"Penguins\"}\n{\"doc_id\": \"n2\", \"title\": \"Bread\"}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", data.join("etc")).unwrap();
    // A pipeline with settings and a source of its own, run by the server.
    let pipeline = work.path().join("own.sql");
    std::fs::write(
        &pipeline,
        format!(
            "SET mkflow.route_clusters = 5;
             SET datafusion.explain.format = 'pgjson';
             CREATE EXTERNAL TABLE pipe_docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}';
             CREATE EXTERNAL TABLE IF NOT EXISTS kb2 (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb2';
             INSERT INTO kb2 SELECT doc_id, title, embed(title) FROM pipe_docs;",
            data.join("docs.jsonl").display()
        ),
    )
    .unwrap();
    let config = work.path().join("mkflow.toml");
    std::fs::write(
        &config,
        "[server]\nmax_result_rows = 5000\nmax_query_memory = 20000000\nmax_value_bytes = 1000000\n",
    )
    .unwrap();
    let mut command = mkflow(&data);
    command
        .env("MKFLOW_AUTH_TOKEN", READER)
        .env("MKFLOW_ADMIN_TOKEN", ADMIN);
    let server = Server::start(
        command,
        &[
            "--config",
            config.to_str().unwrap(),
            "--pipeline",
            pipeline.to_str().unwrap(),
        ],
    )
    .await;
    server.wait_for("/readyz", Duration::from_secs(120)).await;
    let count = |token| value(&server, token, "SELECT count(*) AS n FROM kb");
    assert_eq!(count(Some(READER)).await, 40);

    // No token, or a wrong one: 401.
    refused(&server, None, "SELECT 1", 401, &["bearer token"]).await;
    refused(&server, Some("guess"), "SELECT 1", 401, &["bearer token"]).await;

    // File read: no LOCATION outside the data directory, for any role.
    let passwd = "CREATE EXTERNAL TABLE pw (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION '/etc/passwd'";
    refused(
        &server,
        Some(READER),
        passwd,
        403,
        &["CREATE EXTERNAL TABLE", "admin role", "read role"],
    )
    .await;
    refused(&server, Some(ADMIN), passwd, 403, &["LOCATION '/etc/passwd'"]).await;
    let through_link = "CREATE EXTERNAL TABLE pw (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION 'etc/passwd'";
    refused(
        &server,
        Some(ADMIN),
        through_link,
        403,
        &["outside the allowed directories"],
    )
    .await;
    let csv = "CREATE EXTERNAL TABLE c STORED AS CSV LOCATION '../corpus.jsonl'";
    refused(&server, Some(ADMIN), csv, 403, &["'..'"]).await;
    refused(
        &server,
        Some(ADMIN),
        "COPY (SELECT 1) TO '/tmp/mkflow-probe.csv'",
        403,
        &["LOCATION"],
    )
    .await;
    let letters = value(
        &server,
        Some(READER),
        "SELECT count(*) FROM dead_letters WHERE payload LIKE 'root:%'",
    )
    .await;
    assert_eq!(letters, 0, "nothing of /etc/passwd was read");
    // The admin reads files under the data directory, in its own request's session.
    let own = "CREATE EXTERNAL TABLE d (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION 'docs.jsonl'; \
               SELECT count(*) FROM d";
    assert_eq!(value(&server, Some(ADMIN), own).await, 2);

    // Secrets: settings naming variables, URLs or files are the server's alone.
    let (port, connections) = listener();
    for sql in [
        "SET mkflow.llm_api_key_env = 'MKFLOW_ADMIN_TOKEN'".to_string(),
        format!("SET mkflow.llm_base_url = 'http://127.0.0.1:{port}/v1'"),
        "SET mkflow.local_model = '/etc'".to_string(),
        "SET mkflow.metadata_schema = '/etc/passwd'".to_string(),
        format!(
            "SET mkflow.llm_base_url = 'http://127.0.0.1:{port}/v1'; SET mkflow.generator = 'openai'; \
             SELECT mk_metadata('a title', 'a body')"
        ),
    ] {
        refused(&server, Some(ADMIN), &sql, 403, &["server's configuration"]).await;
    }
    // The generators a client may pick still use the server's settings.
    let metadata = "SELECT mk_metadata('Gene therapy', 'A trial of gene therapy in mice.') IS NOT NULL AS ok";
    assert_eq!(value(&server, Some(ADMIN), metadata).await, true);
    refused(&server, Some(READER), metadata, 403, &["mk_metadata", "admin role"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no request reached the client's listener"
    );

    // Cross-talk: a SET lasts for its request; a session's tables are its own; the pipeline's
    // settings and source stay the pipeline's.
    let setting = "SELECT value FROM information_schema.df_settings WHERE name = 'datafusion.explain.format'";
    let set_and_read = format!("SET datafusion.explain.format = 'tree'; {setting}");
    assert_eq!(value(&server, Some(ADMIN), &set_and_read).await, "tree");
    assert_eq!(value(&server, Some(ADMIN), setting).await, "indent");
    assert_eq!(
        value(&server, Some(READER), setting).await,
        "indent",
        "not the pipeline's either"
    );
    refused(&server, Some(ADMIN), "SELECT count(*) FROM d", 400, &["not found"]).await;
    refused(
        &server,
        Some(READER),
        "SELECT * FROM pipe_docs",
        400,
        &["pipe_docs", "not found"],
    )
    .await;
    assert_eq!(value(&server, Some(READER), "SELECT count(*) FROM kb2").await, 2);

    // Destruction: readers read.
    let delete = "DELETE FROM kb WHERE doc_id <> ''";
    refused(
        &server,
        Some(READER),
        delete,
        403,
        &["DELETE", "admin role", "read role"],
    )
    .await;
    refused(&server, Some(READER), "DROP TABLE kb", 403, &["DDL", "admin role"]).await;
    refused(
        &server,
        Some(READER),
        "SET mkflow.route_clusters = 3",
        403,
        &["SET", "admin role"],
    )
    .await;
    assert_eq!(count(Some(READER)).await, 40);
    let one = format!("DELETE FROM kb WHERE doc_id = '{}'", ids[0]);
    assert_eq!(value(&server, Some(ADMIN), &one).await, 1);
    assert_eq!(count(Some(READER)).await, 39);

    // Abort: a huge k is refused before anything is reserved; the server lives on.
    for sql in [
        "SELECT count(*) FROM vector_search(kb, 'x', 1000000000000)",
        "SELECT * FROM vector_search(kb, 'x') LIMIT 1000000000000",
        "SELECT * FROM qa_search(kb, 'x', 9223372036854775807)",
    ] {
        let (status, body) = ask(&server, Some(READER), sql).await;
        assert!(status == 400, "{sql}: {status} {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("max_k") || message.contains("synthetic questions"),
            "{message}"
        );
    }
    let all = "SELECT count(*) FROM vector_search(kb, 'gene therapy', 10000)";
    assert_eq!(value(&server, Some(READER), all).await, 39, "k is capped at the rows");
    let long_query = format!("SELECT * FROM vector_search(kb, '{}', 3)", "q".repeat(70_000));
    refused(&server, Some(READER), &long_query, 400, &["max_literal_bytes"]).await;
    let chain = format!("SELECT 1{}", "+1".repeat(100_000));
    refused(&server, Some(READER), &chain, 400, &["max_expression_depth (1000)"]).await;
    let short_vector = "SELECT * FROM vector_search(kb, [0.1, 0.2], 3)";
    refused(&server, Some(READER), short_vector, 400, &["dimension"]).await;

    // Memory: growing functions, results and operators are bounded, each naming its limit.
    refused(
        &server,
        Some(READER),
        "SELECT length(repeat('a', 2000000000))",
        413,
        &["max_value_bytes"],
    )
    .await;
    refused(
        &server,
        Some(READER),
        "SELECT lpad('x', 1000000000000)",
        413,
        &["max_value_bytes"],
    )
    .await;
    let rows = "SELECT * FROM generate_series(1, 100000)";
    refused(&server, Some(READER), rows, 413, &["max_result_rows (5000)"]).await;
    let gather = "SELECT array_length(array_agg(v)) FROM generate_series(1, 10000000) AS t(v)";
    refused(&server, Some(READER), gather, 413, &["max_query_memory (20000000"]).await;

    let health = server.get("/healthz").await;
    assert_eq!(health.status(), 200, "the server survived every probe");
    let mut server = server;
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_endpoint_is_read_only() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    build_index(&data, 5).await;
    let mut command = mkflow(&data);
    command.env_remove("MKFLOW_AUTH_TOKEN").env_remove("MKFLOW_ADMIN_TOKEN");
    let server = Server::start(command, &[]).await;
    assert_eq!(value(&server, None, "SELECT count(*) FROM kb").await, 5);
    let hits = "SELECT count(*) FROM vector_search(kb, 'gene therapy', 3)";
    assert_eq!(value(&server, None, hits).await, 3);
    refused(&server, None, "DELETE FROM kb", 403, &["DELETE", "read role"]).await;
    refused(&server, None, "INSERT INTO kb SELECT * FROM kb", 403, &["INSERT"]).await;
    assert_eq!(value(&server, None, "SELECT count(*) FROM kb").await, 5);
}
