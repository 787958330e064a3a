//! Cluster fan-out: the same searches through a coordinator over three workers (each holding a
//! third of the documents, in processes of their own on loopback) and through one server
//! holding every document: per-query latency p50/p99 of each, their ratio, and the cluster's
//! recall@10 against the single node's answer (run: `cargo bench --bench cluster`).
//!
//! Documents: SciFact's titles from `../shared/data/beir/scifact` when present, else the bundled
//! sample; queries: SciFact's queries, or the sample's titles. All processes share this
//! machine's cores, so the cluster pays for three embeddings of each query on them; on separate
//! machines the workers' share runs in parallel.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mkflow::assets;

const TOKEN: &str = "bench-cluster-token";
const QUERIES: usize = 200;

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
}

/// `(doc_id, title)` of the corpus, and the query texts.
fn corpus() -> (Vec<(String, String)>, Vec<String>) {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/beir/scifact");
    let read = |path: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    if shared.join("corpus.jsonl").is_file() {
        let docs = read(shared.join("corpus.jsonl"))
            .iter()
            .map(|d| {
                (
                    d["_id"].as_str().unwrap().to_string(),
                    d["title"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let queries = read(shared.join("queries.jsonl"))
            .iter()
            .map(|q| q["text"].as_str().unwrap().to_string())
            .take(QUERIES)
            .collect();
        return (docs, queries);
    }
    let sample = read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl"));
    let docs: Vec<(String, String)> = sample
        .iter()
        .map(|d| {
            (
                d["doc_id"].as_str().unwrap().to_string(),
                d["title"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let queries = docs.iter().map(|(_, t)| t.clone()).take(QUERIES).collect();
    (docs, queries)
}

/// `mkflow serve` in `dir` with `args`, over the documents in `docs` (as index `kb`) if given.
fn serve(dir: &Path, docs: Option<&[(String, String)]>, args: &[&str]) -> (Killed, String) {
    std::fs::create_dir_all(dir).unwrap();
    let listen = free_address();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mkflow"));
    command
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["serve", "--listen", &listen])
        .args(args)
        .env("MKFLOW_HOME", assets::home_dir())
        .env("MKFLOW_AUTH_TOKEN", TOKEN)
        .env("MKFLOW_CLUSTER_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(docs) = docs {
        let lines: Vec<String> = docs
            .iter()
            .map(|(id, title)| serde_json::json!({"doc_id": id, "title": title}).to_string())
            .collect();
        std::fs::write(dir.join("docs.jsonl"), lines.join("\n") + "\n").unwrap();
        std::fs::write(
            dir.join("load.sql"),
            format!(
                "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}';
                 CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
                 INSERT INTO kb SELECT doc_id, title, embed(title) FROM docs;",
                dir.join("docs.jsonl").display()
            ),
        )
        .unwrap();
        command.arg("--pipeline").arg(dir.join("load.sql"));
    }
    (Killed(command.spawn().unwrap()), format!("http://{listen}"))
}

/// Waits until `/readyz` at `base` answers 200.
async fn ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The doc_ids `sql` returns from `base`, and the time it took.
async fn search(client: &reqwest::Client, base: &str, sql: &str) -> (Vec<String>, f64) {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/sql"))
        .bearer_auth(TOKEN)
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{sql}: {}",
        response.text().await.unwrap()
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let ids = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["doc_id"].as_str().unwrap().to_string())
        .collect();
    (ids, ms)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let (docs, queries) = corpus();
    let work = tempfile::tempdir().unwrap();
    let mut processes = Vec::new();
    let mut shards = String::from("token_env = \"MKFLOW_CLUSTER_TOKEN\"\n");
    for shard in 0..3 {
        let part: Vec<(String, String)> = docs.iter().skip(shard).step_by(3).cloned().collect();
        let flight = free_address();
        processes.push(serve(
            &work.path().join(format!("worker-{shard}")),
            Some(&part),
            &["--flight-listen", &flight, "--worker"],
        ));
        shards.push_str(&format!("[[shards]]\ntable = \"kb\"\nworker = \"{flight}\"\n"));
    }
    let single = serve(&work.path().join("single"), Some(&docs), &[]);
    let map = work.path().join("cluster.toml");
    std::fs::write(&map, shards).unwrap();
    let coordinator = serve(
        &work.path().join("coordinator"),
        None,
        &["--coordinator", map.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let started = Instant::now();
    for (_, base) in processes.iter().chain([&single, &coordinator]) {
        ready(&client, base).await;
    }
    println!(
        "cluster fan-out: {} documents (3 shards of ~{}), {} queries, k = 10; ingest + start {:.0} s",
        docs.len(),
        docs.len() / 3,
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    let (mut single_ms, mut cluster_ms, mut recall) = (Vec::new(), Vec::new(), 0.0);
    for text in &queries {
        let sql = format!(
            "SELECT doc_id FROM vector_search(kb, '{}', 10)",
            text.replace('\'', "''")
        );
        let (one, one_ms) = search(&client, &single.1, &sql).await;
        let (merged, merged_ms) = search(&client, &coordinator.1, &sql).await;
        let expected: HashSet<&String> = one.iter().collect();
        recall += merged.iter().filter(|id| expected.contains(id)).count() as f64 / one.len().max(1) as f64;
        single_ms.push(one_ms);
        cluster_ms.push(merged_ms);
    }
    single_ms.sort_by(f64::total_cmp);
    cluster_ms.sort_by(f64::total_cmp);
    let (s50, s99) = (percentile(&single_ms, 0.5), percentile(&single_ms, 0.99));
    let (c50, c99) = (percentile(&cluster_ms, 0.5), percentile(&cluster_ms, 0.99));
    println!("one node:               p50 {s50:>7.1} ms   p99 {s99:>7.1} ms");
    println!("coordinator, 3 workers: p50 {c50:>7.1} ms   p99 {c99:>7.1} ms");
    println!(
        "fan-out cost: p50 {:.2}x, p99 {:.2}x of one node; recall@10 against one node {:.3}",
        c50 / s50,
        c99 / s99,
        recall / queries.len() as f64
    );
}
