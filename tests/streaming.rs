//! Streaming ingestion against a real Kafka-compatible broker (tansu) and the real `mkflow`
//! binary: exactly-once under SIGKILL, dead letters, and `mkflow serve` (HTTP SQL, auth,
//! errors, Prometheus metrics, graceful shutdown).

mod common;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datafusion::arrow::ipc::reader::StreamReader;
use kafka::Broker;
use mkflow_index::{KnowledgeIndex, Manifest};
use serde_json::Value;
use server::{Server, mkflow};

/// Records that must not become rows, each for a different reason.
const MALFORMED: [&str; 4] = [
    "{this is not json",
    r#"{"title": "a record without its doc_id"}"#,
    r#"{"doc_id": 42.5, "title": ["wrong", "type"]}"#,
    "[1, 2, 3]",
];

/// `(doc_id, title)` of the first `n` sample documents.
fn sample_docs(n: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::sample_corpus()).unwrap();
    text.lines()
        .take(n)
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            (
                v["doc_id"].as_str().unwrap().to_string(),
                v["title"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Produces the documents round-robin over `partitions`, with the malformed records (and one
/// oversized record) spread among them; returns how many records were bad.
async fn produce_docs(broker: &Broker, topic: &str, partitions: i32, docs: &[(String, String)]) -> usize {
    let producer = broker.producer();
    let mut bad = 0;
    for (i, (id, title)) in docs.iter().enumerate() {
        let value = serde_json::json!({ "doc_id": id, "title": title, "body": "" }).to_string();
        Broker::send(&producer, topic, i as i32 % partitions, id, value.as_bytes()).await;
        if i % 37 == 5 {
            let record = MALFORMED[bad % MALFORMED.len()];
            Broker::send(&producer, topic, i as i32 % partitions, "bad", record.as_bytes()).await;
            bad += 1;
        }
    }
    let oversized = format!(r#"{{"doc_id": "huge", "title": "{}"}}"#, "x".repeat(10_000));
    Broker::send(&producer, topic, 0, "huge", oversized.as_bytes()).await;
    bad + 1
}

fn pipeline(dir: &Path, servers: &str, topic: &str) -> PathBuf {
    let path = dir.join(format!("{topic}.sql"));
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE {topic} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
             STORED AS KAFKA LOCATION 'kafka://{servers}/{topic}'
             OPTIONS ('max_batch_rows' '16', 'linger_ms' '20', 'max_record_bytes' '4096');
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR,
               kafka_partition INT, kafka_offset BIGINT) STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, kafka_partition, kafka_offset, embed(title) FROM {topic};"
        ),
    )
    .unwrap();
    path
}

/// Rows committed to the index in `dir`, as its manifest says (0 before the first commit).
fn committed_rows(dir: &Path) -> usize {
    Manifest::read(dir).ok().flatten().map(|m| m.rows).unwrap_or(0)
}

/// Waits until `ready` or the child exits; then SIGKILLs it. Returns whether it was killed.
fn kill_when(mut child: Child, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        assert!(Instant::now() < deadline, "ingestion made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ingestion_is_exactly_once_across_sigkill_restarts() {
    let broker = Broker::start();
    broker.create_topic("papers", 3).await;
    let docs = sample_docs(240);
    let bad = produce_docs(&broker, "papers", 3, &docs).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let pipeline = pipeline(work.path(), &broker.servers, "papers");
    let kb = data.join("kb");
    let run = || {
        mkflow(&data)
            .args(["run", "--until-caught-up"])
            .arg(&pipeline)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // Kill the ingesting process at several points: right after start (maybe before any
    // commit), and twice mid-stream, as soon as the index reaches a row count.
    let started = Instant::now();
    kill_when(run(), || started.elapsed() > Duration::from_millis(1500));
    let mut kills = 0;
    for threshold in [40, 130] {
        let before = committed_rows(&kb);
        if kill_when(run(), || committed_rows(&kb) >= threshold.max(before + 1)) {
            kills += 1;
        }
    }
    assert_eq!(kills, 2, "both mid-stream kills happened before the topic was drained");
    let status = run().wait().unwrap();
    assert!(status.success(), "the final run drains the topic: {status}");

    // Exactly the N documents, once each.
    let index = KnowledgeIndex::open(&kb).unwrap();
    assert_eq!(index.len(), docs.len());
    let manifest = index.manifest();
    // Keys are never reused and every written row takes a new one: a record written twice
    // (re-consumed after a crash) would push next_key past N.
    assert_eq!(manifest.next_key as usize, docs.len(), "no record was written twice");
    let high = broker.high_watermarks("papers", 3);
    let stored: Vec<i64> = (0..3)
        .map(|p| manifest.source_offsets[&format!("kafka:papers:{p}")])
        .collect();
    assert_eq!(stored, high, "the index resumes exactly at the end of every partition");
    assert_eq!(high.iter().sum::<i64>() as usize, docs.len() + bad);
    // The consumer group sees the same offsets (for lag monitoring).
    assert_eq!(broker.group_offsets("mkflow", "papers", 3), high);

    // Query everything back through SQL, and find a document by its title.
    let engine = common::engine(&data).await;
    let ids: BTreeSet<String> = common::strings(&engine.sql("SELECT doc_id FROM kb").await.unwrap(), "doc_id")
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = docs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected);
    let (id, title) = &docs[123];
    let hits = engine
        .sql(&format!(
            "SELECT doc_id FROM vector_search(kb, '{}', 1)",
            title.replace('\'', "''")
        ))
        .await
        .unwrap();
    assert_eq!(&common::strings(&hits, "doc_id")[0], id);

    // Every bad record is in the dead-letter table once, with its coordinates and reason.
    let letters = engine
        .sql("SELECT source, position, payload, error FROM dead_letters WHERE source LIKE 'kafka:papers/%'")
        .await
        .unwrap();
    assert_eq!(common::row_count(&letters), bad);
    let payloads = common::strings(&letters, "payload");
    assert!(payloads.iter().any(|p| p == MALFORMED[0]));
    let errors = common::strings(&letters, "error");
    assert!(errors.iter().any(|e| e.contains("doc_id")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("max_record_bytes")), "{errors:?}");
    let positions: BTreeSet<(String, String)> = common::strings(&letters, "source")
        .into_iter()
        .zip(common::strings(&letters, "position"))
        .collect();
    assert_eq!(positions.len(), bad, "each dead letter recorded once");
}

const TOKEN: &str = "test-token-123";

/// The value of a metric sample line `name{labels} value`.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse::<f64>().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_streams_kafka_and_answers_sql_with_metrics() {
    let broker = Broker::start();
    broker.create_topic("live", 2).await;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let pipeline = pipeline(work.path(), &broker.servers, "live");
    let mut command = mkflow(&data);
    command
        .env("MKFLOW_AUTH_TOKEN", TOKEN)
        .env("MKFLOW_MAX_REQUEST_BYTES", "4096");
    let server = Server::start(command, &["--pipeline", pipeline.to_str().unwrap()]).await;
    server.wait_for("/readyz", Duration::from_secs(60)).await;

    // Documents produced while the service runs become queryable.
    let docs = sample_docs(50);
    let bad = produce_docs(&broker, "live", 2, &docs).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let response = server.sql(Some(TOKEN), "SELECT count(*) AS n FROM kb").await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        if body["rows"][0]["n"] == docs.len() {
            break;
        }
        assert!(Instant::now() < deadline, "not all documents arrived: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // JSON body, vector search, Arrow IPC.
    let (id, title) = &docs[7];
    let search = format!(
        "SELECT doc_id, score FROM vector_search(kb, '{}', 3)",
        title.replace('\'', "''")
    );
    let response = server
        .client
        .post(format!("{}/v1/sql", server.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "sql": search }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["rows"][0]["doc_id"], id.as_str());
    assert_eq!(body["columns"][1]["name"], "score");
    let response = server
        .client
        .post(format!("{}/v1/sql", server.base))
        .bearer_auth(TOKEN)
        .header("Accept", "application/vnd.apache.arrow.stream")
        .body("SELECT doc_id FROM kb ORDER BY doc_id")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = response.bytes().await.unwrap();
    let batches: Vec<_> = StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(common::row_count(&batches), docs.len());

    // Errors: auth, bad SQL, unknown table, oversized body — each JSON with a fitting status.
    for token in [None, Some("wrong")] {
        let response = server.sql(token, "SELECT 1").await;
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let response = server.sql(Some(TOKEN), "SELEC doc_id FROM kb").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("SELEC"), "{body}");
    let response = server.sql(Some(TOKEN), "SELECT * FROM no_such_table").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("no_such_table"),
        "{body}"
    );
    let huge = format!("SELECT '{}'", "x".repeat(5000));
    let response = server.sql(Some(TOKEN), &huge).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("max_request_bytes"),
        "{body}"
    );

    // Metrics: valid Prometheus text whose counters match what was ingested (once the last,
    // refused, records are committed too).
    let offsets = |text: &str| -> f64 {
        (0..2)
            .filter_map(|p| {
                metric(
                    text,
                    &format!(r#"mkflow_kafka_committed_offset{{pipeline="live",topic="live",partition="{p}"}}"#),
                )
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let response = server.get("/metrics").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], mkflow::metrics::CONTENT_TYPE);
        let text = response.text().await.unwrap();
        if offsets(&text) as usize == docs.len() + bad {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "offsets never reached the end of the topic:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let pipeline_label = r#"{pipeline="live"}"#;
    assert_eq!(
        metric(&text, &format!("mkflow_pipeline_records_out_total{pipeline_label}")),
        Some(docs.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("mkflow_pipeline_records_failed_total{pipeline_label}")),
        Some(bad as f64)
    );
    assert_eq!(
        metric(&text, &format!("mkflow_pipeline_records_in_total{pipeline_label}")),
        Some((docs.len() + bad) as f64)
    );
    assert_eq!(
        metric(&text, r#"mkflow_index_rows{index="kb"}"#),
        Some(docs.len() as f64)
    );
    assert!(
        metric(&text, r#"mkflow_embedding_documents_total{model="all-MiniLM-L6-v2"}"#).unwrap() >= docs.len() as f64
    );
    assert!(metric(&text, r#"mkflow_queries_total{function="vector_search",outcome="ok"}"#).unwrap() >= 1.0);
    assert!(metric(&text, r#"mkflow_udf_rows_total{udf="embed"}"#).unwrap() >= docs.len() as f64);
    assert!(text.contains("mkflow_index_commit_duration_seconds_bucket"));
    check_with_promtool(&text);

    // SIGTERM: finish, commit, exit 0; the index holds everything.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "mkflow serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    let index = KnowledgeIndex::open(data.join("kb")).unwrap();
    assert_eq!(index.len(), docs.len());
}

/// Runs `promtool check metrics` on the text. A missing promtool is installed first when the
/// tests run as root (`scripts/install-promtool.sh`, Debian's `prometheus` package), else the
/// test fails with the command that installs it.
fn check_with_promtool(text: &str) {
    use std::io::Write;
    ensure_promtool();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check metrics failed:\n{report}");
}

/// Makes sure `promtool` is on PATH, installing it when running as root.
fn ensure_promtool() {
    let on_path = || {
        Command::new("promtool")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if on_path() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-promtool.sh");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let status = Command::new("bash").arg(&script).status().unwrap();
        assert!(status.success(), "{} failed: {status}", script.display());
    }
    assert!(
        on_path(),
        "promtool is not on PATH: the /metrics lint needs it; install it with `sudo bash {}` \
         (Debian's prometheus package)",
        script.display()
    );
}

/// The shipped `pipelines/kafka_to_kb.sql`, pointed at the test broker, in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_kafka_pipeline_runs_until_caught_up() {
    let broker = Broker::start();
    broker.create_topic("papers", 2).await;
    let docs = sample_docs(30);
    let producer = broker.producer();
    for (i, (id, title)) in docs.iter().enumerate() {
        let value = serde_json::json!({ "doc_id": id, "title": title, "body": "" }).to_string();
        Broker::send(&producer, "papers", i as i32 % 2, id, value.as_bytes()).await;
    }
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/kafka_to_kb.sql")).unwrap();
    assert!(shipped.contains("'127.0.0.1:9092'"));
    let script = shipped.replace("'127.0.0.1:9092'", &format!("'{}'", broker.servers));
    let data = tempfile::tempdir().unwrap();
    let engine = mkflow::Engine::new(mkflow::EngineConfig {
        until_caught_up: true,
        home: common::assets_home(),
        ..mkflow::EngineConfig::new(data.path())
    })
    .await
    .unwrap();
    let results = engine.run_script("kafka_to_kb", &script, |_| {}).await.unwrap();
    assert_eq!(common::single_int(&results[2].batches), docs.len() as i64);
    assert_eq!(engine.index("papers_kb").unwrap().len(), docs.len());
    // An ad-hoc SELECT reads the topic up to its end, with the record coordinates.
    let rows = engine
        .sql("SELECT doc_id, kafka_partition, kafka_offset FROM papers ORDER BY kafka_partition, kafka_offset")
        .await
        .unwrap();
    assert_eq!(common::row_count(&rows), docs.len());
    assert_eq!(common::strings(&rows, "doc_id")[0], docs[0].0);
}
