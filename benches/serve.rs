//! Serving throughput: text-query `vector_search` over HTTP against the real `mkflow serve`,
//! one client against sixteen (run: `cargo bench --profile dev --bench serve`).
//!
//! Every request searches a distinct text, so each costs a query embedding (no cache hit): the
//! measure is how well concurrent requests share the model — the embedding queue batches the
//! texts that wait together — and how little else they contend on. The index holds
//! `MKFLOW_BENCH_VECTORS` (default 10,000) synthetic 384-d rows under the default model's name,
//! so that queries are embedded by the real model. `MKFLOW_BENCH_BINARY` serves with another
//! build of `mkflow` (to compare two versions on the same machine).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use mkflow::assets;
use mkflow_index::{IndexSettings, KnowledgeIndex, Quantization, vectors_to_array};

const DIMS: usize = 384;
const WORDS: [&str; 16] = [
    "gene", "therapy", "protein", "cancer", "immune", "vitamin", "bone", "neuron", "insulin", "virus", "cell", "heart",
    "brain", "liver", "enzyme", "trial",
];

/// A distinct query text for request `n` of client `client`.
fn query(client: usize, n: usize) -> String {
    let word = |i: usize| WORDS[i % WORDS.len()];
    format!(
        "{} {} and {} in {} patients, study {client}-{n}",
        word(n),
        word(n / 3 + client),
        word(n / 7 + 2 * client),
        word(n / 11 + 5)
    )
}

/// The synthetic index, under the default model's name and dimension.
fn build_index(dir: &Path, rows: usize) {
    let columns = Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
    ]);
    let settings = IndexSettings {
        model: assets::DEFAULT_MODEL.name.to_string(),
        dimensions: DIMS,
        quantization: Quantization::F32,
        key_column: "doc_id".into(),
        vector_column: "embedding".into(),
        text_columns: None,
    };
    let index = KnowledgeIndex::open_or_create(dir.join("kb"), &columns, &settings).unwrap();
    let mut state = 7u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let flat: Vec<f32> = (0..rows * DIMS).map(|_| uniform()).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            (0..rows).map(|i| format!("doc-{i}")).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            (0..rows).map(|i| format!("title {i}")).collect::<Vec<_>>(),
        )),
        vectors_to_array(flat, vec![true; rows], DIMS).unwrap(),
    ];
    index
        .upsert(&[RecordBatch::try_new(index.schema(), columns).unwrap()])
        .unwrap();
}

/// Latencies (ms) of requests sent by `clients` concurrent clients for `duration`.
async fn run(base: &str, clients: usize, duration: Duration) -> (usize, Vec<f64>, f64) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url) = (client.clone(), format!("{base}/v1/sql"));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0;
                while started.elapsed() < duration {
                    let sql = format!("SELECT doc_id, score FROM vector_search(kb, '{}', 10)", query(c, n));
                    let sent = Instant::now();
                    let response = client.post(&url).body(sql).send().await.unwrap();
                    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
                    response.bytes().await.unwrap();
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (latencies.len(), latencies, elapsed)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("MKFLOW_BENCH_VECTORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seconds: u64 = std::env::var("MKFLOW_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let home = assets::home_dir();
    if !assets::missing_files(&home).is_empty() {
        assets::pull(&home, &mut |line| eprintln!("{line}")).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    build_index(data.path(), rows);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let binary = std::env::var("MKFLOW_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mkflow").to_string());
    let child = Command::new(&binary)
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("MKFLOW_HOME", &home)
        .env_remove("MKFLOW_AUTH_TOKEN")
        .env_remove("MKFLOW_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _server = Killed(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "mkflow serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Warm up: load the model, fill the caches of the SQL path.
    run(&base, 4, Duration::from_secs(3)).await;
    println!("serve benchmark: text-query vector_search over HTTP, {rows} rows, {seconds} s per run");
    let mut qps = Vec::new();
    for clients in [1, 16] {
        let (count, latencies, elapsed) = run(&base, clients, Duration::from_secs(seconds)).await;
        let rate = count as f64 / elapsed;
        println!(
            "{clients:>2} client(s): {rate:>6.0} QPS  p50 {:>6.1} ms  p99 {:>6.1} ms  ({count} requests)",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
        qps.push(rate);
    }
    println!("16 clients / 1 client: {:.2}x the QPS (target >= 2)", qps[1] / qps[0]);
}
