//! Streaming ingestion against real Kafka-protocol brokers and the real `mkflow` binary:
//! exactly-once under repeated SIGKILL with a batching producer (librdkafka's mock cluster),
//! dead letters, a partition that stops delivering (tansu, which cannot serve a fetch from inside
//! a producer batch), and `mkflow serve` (HTTP SQL, auth, errors, Prometheus metrics, graceful
//! shutdown).
//!
//! The kill soak's size comes from `MKFLOW_SOAK_KILLS` (default 6) and `MKFLOW_SOAK_DOCS`
//! (default 300); `benches/soak.sh` is the large soak.

mod common;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datafusion::arrow::ipc::reader::StreamReader;
use kafka::Broker;
use mkflow_index::{KnowledgeIndex, Manifest};
use serde_json::Value;
use server::{Server, kill_when, mkflow};

/// Records that must not become rows, each for a different reason.
const MALFORMED: [&str; 4] = [
    "{this is not json",
    r#"{"title": "a record without its doc_id"}"#,
    r#"{"doc_id": 42.5, "title": ["wrong", "type"]}"#,
    "[1, 2, 3]",
];

/// The documents as `(partition, key, value)` records round-robin over `partitions`, with the
/// malformed records (and one oversized record) spread among them; and how many were bad.
fn doc_records(partitions: i32, docs: &[(String, String)]) -> (Vec<(i32, String, Vec<u8>)>, usize) {
    let mut records = Vec::new();
    let mut bad = 0;
    for (i, (id, title)) in docs.iter().enumerate() {
        let partition = i as i32 % partitions;
        let value = serde_json::json!({ "doc_id": id, "title": title, "body": "" }).to_string();
        records.push((partition, id.clone(), value.into_bytes()));
        if i % 37 == 5 {
            let record = MALFORMED[bad % MALFORMED.len()];
            records.push((partition, "bad".to_string(), record.as_bytes().to_vec()));
            bad += 1;
        }
    }
    let oversized = format!(r#"{{"doc_id": "huge", "title": "{}"}}"#, "x".repeat(10_000));
    records.push((0, "huge".to_string(), oversized.into_bytes()));
    (records, bad + 1)
}

/// Produces [`doc_records`] one record per batch (what tansu serves faithfully); returns how
/// many records were bad.
async fn produce_docs(broker: &Broker, topic: &str, partitions: i32, docs: &[(String, String)]) -> usize {
    let producer = broker.producer();
    let (records, bad) = doc_records(partitions, docs);
    for (partition, key, value) in &records {
        Broker::send(&producer, topic, *partition, key, value).await;
    }
    bad
}

/// A pipeline file `<topic>.sql` streaming `topic` into index `kb`; `options` are extra
/// `STORED AS KAFKA` options (`, 'key' 'value'` pairs).
fn pipeline_with(dir: &Path, servers: &str, topic: &str, options: &str) -> PathBuf {
    let path = dir.join(format!("{topic}.sql"));
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE {topic} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
             STORED AS KAFKA LOCATION 'kafka://{servers}/{topic}'
             OPTIONS ('max_batch_rows' '16', 'linger_ms' '20', 'max_record_bytes' '4096'{options});
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR,
               kafka_partition INT, kafka_offset BIGINT) STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, kafka_partition, kafka_offset, embed(title) FROM {topic};"
        ),
    )
    .unwrap();
    path
}

fn pipeline(dir: &Path, servers: &str, topic: &str) -> PathBuf {
    pipeline_with(dir, servers, topic, "")
}

/// Rows committed to the index in `dir`, as its manifest says (0 before the first commit).
fn committed_rows(dir: &Path) -> usize {
    Manifest::read_latest(dir).ok().flatten().map(|m| m.rows).unwrap_or(0)
}

/// A positive integer from the environment, else `default`.
fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a count")),
        Err(_) => default,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ingestion_is_exactly_once_across_sigkill_restarts() {
    let kills_wanted = env_count("MKFLOW_SOAK_KILLS", 6);
    let docs = common::sample_docs(env_count("MKFLOW_SOAK_DOCS", 300));
    let broker = Broker::mock();
    broker.create_topic("papers", 3).await;
    // An ordinary batching producer: a restart resumes inside a producer batch.
    let (records, bad) = doc_records(3, &docs);
    Broker::send_all(&broker.batching_producer(), "papers", &records).await;
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

    // Kill the ingesting process right after start (maybe before any commit), then each time
    // the index reaches the next of evenly spaced row counts, a varying moment after that
    // commit (so kills land in decoding, embedding and committing alike).
    let started = Instant::now();
    kill_when(run(), Duration::ZERO, || {
        started.elapsed() > Duration::from_millis(1500)
    });
    let mut kills = 1;
    for k in 1..kills_wanted {
        let threshold = docs.len() * 4 * k / (5 * kills_wanted);
        let before = committed_rows(&kb);
        let delay = Duration::from_millis((k as u64 * 37) % 120);
        if kill_when(run(), delay, || committed_rows(&kb) >= threshold.max(before + 1)) {
            kills += 1;
        }
    }
    assert_eq!(
        kills, kills_wanted,
        "every mid-stream kill happened before the topic was drained"
    );
    let status = run().wait().unwrap();
    assert!(status.success(), "the final run drains the topic: {status}");
    eprintln!(
        "kill soak: {} documents and {bad} bad records in 3 partitions, {kills} SIGKILLs, {:.1} s",
        docs.len(),
        started.elapsed().as_secs_f64()
    );

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

/// Produces `docs` to partition 0 of `topic` with a batching producer.
async fn produce_to_one_partition(broker: &Broker, topic: &str, docs: &[(String, String)]) {
    let records: Vec<(i32, String, Vec<u8>)> = docs
        .iter()
        .map(|(id, title)| {
            let value = serde_json::json!({ "doc_id": id, "title": title }).to_string();
            (0, id.clone(), value.into_bytes())
        })
        .collect();
    Broker::send_all(&broker.batching_producer(), topic, &records).await;
}

/// `GET /readyz` until pipeline `name`'s state starts with `prefix`; returns the status and
/// the state.
async fn wait_for_state(server: &Server, name: &str, prefix: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = server.get("/readyz").await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if let Some(state) = body["pipelines"][name].as_str()
            && state.starts_with(prefix)
        {
            return (status, state.to_string());
        }
        assert!(
            Instant::now() < deadline,
            "pipeline {name} never became {prefix}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A broker that keeps records and reports their high watermark but serves none (every fetch
/// answered with a storage error): `mkflow serve` reports the stalled partition in `/readyz`
/// and `/metrics` and recovers when the broker does; `mkflow run --until-caught-up` exits with
/// an error naming the partition instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_stops_delivering_is_reported_not_waited_on() {
    let broker = Broker::mock();
    broker.create_topic("stuck", 1).await;
    let docs = common::sample_docs(30);
    produce_to_one_partition(&broker, "stuck", &docs[..20]).await;
    broker.fail_fetches();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let pipeline = pipeline_with(work.path(), &broker.servers, "stuck", ", 'stall_timeout_ms' '1500'");
    let stalled_gauge = r#"mkflow_kafka_partition_stalled{pipeline="stuck",topic="stuck",partition="0"}"#;

    let server = Server::start(mkflow(&data), &["--pipeline", pipeline.to_str().unwrap()]).await;
    let (status, state) = wait_for_state(&server, "stuck", "stalled").await;
    assert_eq!(status, 503, "{state}");
    assert!(
        state.contains("partition 0 is stalled: position 0, high watermark 20"),
        "{state}"
    );
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, stalled_gauge), Some(1.0), "{text}");

    // The broker recovers: the pipeline ingests everything and is ready again.
    broker.heal_fetches();
    let (status, _) = wait_for_state(&server, "stuck", "streaming").await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_rows(&data.join("kb")) < 20 {
        assert!(Instant::now() < deadline, "the recovered partition was not ingested");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = server.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, stalled_gauge), Some(0.0), "{text}");
    drop(server);

    produce_to_one_partition(&broker, "stuck", &docs[20..]).await;
    broker.fail_fetches();
    let mut child = mkflow(&data)
        .args(["run", "--until-caught-up"])
        .arg(&pipeline)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "mkflow run --until-caught-up waits forever on a stalled partition"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a run that cannot catch up fails: {stderr}");
    assert!(
        stderr.contains("cannot catch up") && stderr.contains("partition 0 is stalled: position 20, high watermark 30"),
        "{stderr}"
    );
    assert_eq!(committed_rows(&data.join("kb")), 20);
    broker.heal_fetches();
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
    let docs = common::sample_docs(50);
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
    let docs = common::sample_docs(30);
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
