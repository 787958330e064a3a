//! Cluster ingest: the same documents in a 6-partition Kafka topic (librdkafka's mock broker,
//! in this process) ingested by 1, 2 and 3 workers, each a `mkflow run --until-caught-up`
//! process of its own with its share of the partitions and its own index shard: docs/s of the
//! whole, and the scaling efficiency (docs/s with w workers ÷ w × docs/s with one).
//!
//! This machine may have fewer cores than workers, so every worker runs its model on
//! `MKFLOW_BENCH_THREADS` threads (default 1): a worker then stands for one core's worth of a
//! machine, and the efficiency up to the core count is the cost of sharding itself (separate
//! consumers, commits and indexes); past it the workers share cores and it falls as it must.
//! Run: `cargo bench --profile dev --bench cluster_ingest` (`MKFLOW_BENCH_DOCS`, default 2,000).

#[path = "../tests/common/kafka.rs"]
mod kafka;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kafka::Broker;
use mkflow::assets;
use mkflow_index::Manifest;

const TOPIC: &str = "papers";
const PARTITIONS: i32 = 6;

/// `(doc_id, title)` of SciFact's corpus from `../shared` when present, else the sample's.
fn corpus(n: usize) -> Vec<(String, String)> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/beir/scifact/corpus.jsonl");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    let (path, id) = match shared.is_file() {
        true => (shared, "_id"),
        false => (sample, "doc_id"),
    };
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(n)
        .map(|line| {
            let doc: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                doc[id].as_str().unwrap().to_string(),
                doc["title"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A pipeline streaming `partitions` of the topic into index `kb` under `dir`.
fn pipeline(dir: &Path, servers: &str, partitions: &[i32]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
    let path = dir.join("ingest.sql");
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE {TOPIC} (doc_id VARCHAR NOT NULL, title VARCHAR)
             STORED AS KAFKA LOCATION 'kafka://{servers}/{TOPIC}'
             OPTIONS ('partitions' '{}', 'max_batch_rows' '256');
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR)
               STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, embed(title) FROM {TOPIC};",
            list.join(",")
        ),
    )
    .unwrap();
    path
}

/// Seconds for `workers` processes to ingest the whole topic, and the rows they hold.
fn ingest(work: &Path, servers: &str, workers: usize, threads: &str) -> (f64, usize) {
    let started = Instant::now();
    let mut children = Vec::new();
    let mut dirs = Vec::new();
    for w in 0..workers {
        let partitions: Vec<i32> = (0..PARTITIONS).filter(|p| *p as usize % workers == w).collect();
        let dir = work.join(format!("{workers}-workers/worker-{w}"));
        let file = pipeline(&dir, servers, &partitions);
        let child = Command::new(env!("CARGO_BIN_EXE_mkflow"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--threads", threads, "run", "--until-caught-up"])
            .arg(&file)
            .env("MKFLOW_HOME", assets::home_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
        dirs.push(dir);
    }
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a worker failed");
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows = dirs
        .iter()
        .map(|dir| {
            Manifest::read_latest(&dir.join("data/kb"))
                .unwrap()
                .map_or(0, |m| m.rows)
        })
        .sum();
    (seconds, rows)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("MKFLOW_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let threads = std::env::var("MKFLOW_BENCH_THREADS").unwrap_or_else(|_| "1".into());
    let docs = corpus(n);
    let broker = Broker::mock();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let records: Vec<(i32, String, Vec<u8>)> = docs
        .iter()
        .enumerate()
        .map(|(i, (id, title))| {
            let value = serde_json::json!({ "doc_id": id, "title": title }).to_string();
            (i as i32 % PARTITIONS, id.clone(), value.into_bytes())
        })
        .collect();
    Broker::send_all(&broker.batching_producer(), TOPIC, &records).await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cluster ingest: {} documents (titles) in {PARTITIONS} partitions, {threads} model thread(s) per worker, {cores} cores",
        docs.len()
    );
    let work = tempfile::tempdir().unwrap();
    let mut one = 0.0;
    for workers in 1..=3 {
        let (seconds, rows) = ingest(work.path(), &broker.servers, workers, &threads);
        assert_eq!(rows, docs.len(), "{workers} workers hold every document once");
        let rate = rows as f64 / seconds;
        if workers == 1 {
            one = rate;
        }
        println!(
            "{workers} worker(s): {seconds:>6.1} s  {rate:>7.1} docs/s  {:.2}x of one worker  efficiency {:.2}",
            rate / one,
            rate / (one * workers as f64)
        );
    }
}
