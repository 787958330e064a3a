//! Cluster mode fed by Kafka: a topic of 6 partitions on librdkafka's mock broker (it serves
//! fetches from inside a producer batch), written by a batching producer; three
//! `mkflow serve --worker` processes each stream two partitions into their shard of `kb`; a
//! single node streams all six; a coordinator serves the shards. Workers are SIGKILLed while
//! they ingest and while queries run, and restarted: the cluster ends holding every document
//! exactly once, answering as the single node does. While a worker is down, a query fails with
//! a 503 naming its shard, or, when the request allows it, is answered by the other shards and
//! flagged partial.

mod common;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use kafka::Broker;
use mkflow_index::Manifest;
use server::{Server, free_port, mkflow};

const TOKEN: &str = "cluster-token";
const TOPIC: &str = "papers";
const PARTITIONS: i32 = 6;

/// `(partition, key, value)` records of `docs`, round-robin over the partitions.
fn records(docs: &[(String, String)]) -> Vec<(i32, String, Vec<u8>)> {
    docs.iter()
        .enumerate()
        .map(|(i, (id, title))| {
            let value = serde_json::json!({ "doc_id": id, "title": title }).to_string();
            (i as i32 % PARTITIONS, id.clone(), value.into_bytes())
        })
        .collect()
}

/// A pipeline streaming `partitions` of the topic (all when `None`) into index `kb`.
fn pipeline(dir: &Path, servers: &str, partitions: Option<&str>) -> PathBuf {
    let path = dir.join("stream.sql");
    let only = partitions.map_or(String::new(), |p| format!(", 'partitions' '{p}'"));
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE {TOPIC} (doc_id VARCHAR NOT NULL, title VARCHAR)
             STORED AS KAFKA LOCATION 'kafka://{servers}/{TOPIC}'
             OPTIONS ('max_batch_rows' '16', 'linger_ms' '20'{only});
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR)
               STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, embed(title) FROM {TOPIC};"
        ),
    )
    .unwrap();
    path
}

/// One `mkflow serve` streaming with the pipeline in `dir` (its data in `dir/data`), with
/// `args`; waits until it is consuming.
async fn node(dir: &Path, args: &[&str]) -> Server {
    let mut command = mkflow(&dir.join("data"));
    command
        .env("MKFLOW_AUTH_TOKEN", TOKEN)
        .env("MKFLOW_CLUSTER_TOKEN", TOKEN);
    let pipeline = dir.join("stream.sql");
    let mut all: Vec<&str> = args.to_vec();
    if pipeline.exists() {
        all.extend(["--pipeline", pipeline.to_str().unwrap()]);
    }
    let server = Server::start(command, &all).await;
    server.wait_for("/readyz", Duration::from_secs(120)).await;
    server
}

/// A worker serving its shard over Flight at `address`.
async fn worker(dir: &Path, address: &str) -> Server {
    node(dir, &["--flight-listen", address, "--worker"]).await
}

/// Rows committed to the index in `dir` (0 before the first commit).
fn committed(dir: &Path) -> usize {
    Manifest::read_latest(&dir.join("data/kb"))
        .ok()
        .flatten()
        .map_or(0, |m| m.rows)
}

/// Runs `sql` (JSON body, `allow_partial` when given): the status and the parsed answer.
async fn ask(server: &Server, sql: &str, allow_partial: Option<bool>) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({ "sql": sql });
    if let Some(allowed) = allow_partial {
        body["allow_partial"] = allowed.into();
    }
    let response = server
        .client
        .post(format!("{}/v1/sql", server.base))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// `SELECT count(*)` through `server`, when it answers 200.
async fn count(server: &Server, table: &str) -> Option<i64> {
    let (status, body) = ask(server, &format!("SELECT count(*) AS n FROM {table}"), None).await;
    (status == 200).then(|| body["rows"][0]["n"].as_i64().unwrap())
}

/// Waits until `server` counts `n` rows.
async fn wait_for_count(server: &Server, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let found = count(server, "kb").await;
        if found == Some(n as i64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} counted {found:?} of {n} rows",
            server.base
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `sql` asking for Arrow: the rows in one batch.
async fn rows(server: &Server, sql: &str) -> RecordBatch {
    let batches = server
        .sql_arrow(TOKEN, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_fed_cluster_survives_killed_workers_exactly_once() {
    let docs = common::sample_docs(400);
    let all = records(&docs);
    let broker = Broker::mock();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let producer = broker.batching_producer();
    // A third now; the rest while the workers ingest and are killed.
    let (first, rest) = all.split_at(all.len() / 3);
    Broker::send_all(&producer, TOPIC, first).await;

    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let mut dirs = Vec::new();
    let mut addresses = Vec::new();
    let mut workers = Vec::new();
    for shard in 0..3 {
        let dir = work.join(format!("worker-{shard}"));
        std::fs::create_dir_all(&dir).unwrap();
        let partitions = format!("{},{}", 2 * shard, 2 * shard + 1);
        pipeline(&dir, &broker.servers, Some(&partitions));
        let address = format!("127.0.0.1:{}", free_port());
        workers.push(Some(worker(&dir, &address).await));
        dirs.push(dir);
        addresses.push(address);
    }
    let single_dir = work.join("single");
    std::fs::create_dir_all(&single_dir).unwrap();
    pipeline(&single_dir, &broker.servers, None);
    let single = node(&single_dir, &[]).await;
    let coordinator_dir = work.join("coordinator");
    std::fs::create_dir_all(&coordinator_dir).unwrap();
    let map = coordinator_dir.join("cluster.toml");
    let shards: String = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[shards]]\ntable = \"kb\"\nworker = \"{a}\"\nname = \"kb-{i}\"\n"))
        .collect();
    std::fs::write(&map, format!("token_env = \"MKFLOW_CLUSTER_TOKEN\"\n{shards}")).unwrap();
    let coordinator = node(&coordinator_dir, &["--coordinator", map.to_str().unwrap()]).await;

    // Kill worker 1 mid-ingest: once it has committed something, while the rest is produced.
    let producing = {
        let (producer, rest) = (producer.clone(), rest.to_vec());
        tokio::spawn(async move { Broker::send_all(&producer, TOPIC, &rest).await })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while dirs.iter().any(|dir| committed(dir) == 0) {
        assert!(Instant::now() < deadline, "a worker committed nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(workers[1].take());
    let kept_rows = committed(&dirs[1]);

    // While it is down: a 503 naming its shard, or, allowed, the other shards' answer flagged.
    let (status, body) = ask(&coordinator, "SELECT count(*) AS n FROM kb", None).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(
        message.contains("shard kb-1 of kb") && message.contains(&addresses[1]),
        "{message}"
    );
    let (status, body) = ask(&coordinator, "SELECT count(*) AS n FROM kb", Some(true)).await;
    assert_eq!(status, 200, "{body}");
    let missing = &body["partial"]["missing_shards"];
    assert_eq!(missing.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(missing[0]["shard"], "kb-1");
    let others = count(workers[0].as_ref().unwrap(), "kb").await.unwrap()
        + count(workers[2].as_ref().unwrap(), "kb").await.unwrap();
    let partial_count = body["rows"][0]["n"].as_i64().unwrap();
    assert!(
        partial_count <= others && partial_count > 0,
        "the partial count {partial_count} comes from the other shards ({others} rows now)"
    );
    let sql = "SELECT doc_id, score FROM vector_search(kb, 'cell biology', 5)";
    let (status, body) = ask(&coordinator, sql, Some(true)).await;
    assert_eq!((status, body["row_count"].as_i64()), (200, Some(5)), "{body}");
    assert_eq!(body["partial"]["missing_shards"][0]["shard"], "kb-1");
    // A whole answer is not flagged.
    let (status, body) = ask(&single, sql, Some(true)).await;
    assert!(status == 200 && body.get("partial").is_none(), "{body}");

    // Back: it resumes from its stored offsets, and the coordinator answers whole again.
    workers[1] = Some(worker(&dirs[1], &addresses[1]).await);
    assert!(committed(&dirs[1]) >= kept_rows);
    let back = Instant::now();
    while count(&coordinator, "kb").await.is_none() {
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "the coordinator did not use the restarted worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the coordinator answered whole {} ms after the worker was ready again",
        back.elapsed().as_millis()
    );

    // Kill worker 2 while queries run: each one answers, or fails with a 503 (never a 4xx or a
    // 500, never a hang); once it is back, queries answer whole again.
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let querying = {
        let (base, answered, stop) = (coordinator.base.clone(), answered.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let response = client
                    .post(format!("{base}/v1/sql"))
                    .bearer_auth(TOKEN)
                    .body("SELECT doc_id FROM vector_search(kb, 'protein folding', 10)")
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let text = response.text().await.unwrap();
                if status == 200 {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                statuses.push((status, text));
            }
            statuses
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no query answered before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(workers[2].take());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    let statuses = querying.await.unwrap();
    for (status, text) in &statuses {
        assert!(*status == 200 || *status == 503, "{status}: {text}");
        assert!(*status == 200 || text.contains("shard kb-2 of kb"), "{text}");
    }
    let failed = statuses.iter().filter(|(s, _)| *s == 503).count();
    eprintln!(
        "queries while worker 2 was killed: {} answered, {failed} refused with 503",
        statuses.len() - failed
    );
    workers[2] = Some(worker(&dirs[2], &addresses[2]).await);
    producing.await.unwrap();

    // Everything in, once: the cluster and the single node hold every document.
    wait_for_count(&single, docs.len()).await;
    wait_for_count(&coordinator, docs.len()).await;
    let distinct = rows(&coordinator, "SELECT count(DISTINCT doc_id) AS n FROM kb").await;
    let distinct = distinct
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(distinct as usize, docs.len(), "no document twice");
    for (shard, dir) in dirs.iter().enumerate() {
        let manifest = Manifest::read_latest(&dir.join("data/kb")).unwrap().unwrap();
        // Row keys are never reused: a record written twice would push next_key past the rows.
        assert_eq!(
            manifest.next_key as usize, manifest.rows,
            "shard {shard} wrote no row twice"
        );
    }
    for sql in [
        "SELECT doc_id, title, score FROM vector_search(kb, 'protein folding in cells', 8)",
        "SELECT substr(doc_id, 1, 1) AS first, count(*) AS n FROM kb GROUP BY 1 ORDER BY 1",
    ] {
        assert_eq!(
            rows(&coordinator, sql).await.columns(),
            rows(&single, sql).await.columns(),
            "{sql}"
        );
    }
}
