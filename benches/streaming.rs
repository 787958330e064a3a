//! Streaming benchmarks against a real Kafka-compatible broker (tansu, see
//! `scripts/install-tansu.sh`). Run: `cargo bench --profile dev --bench streaming`.
//!
//! 1. Throughput: the same documents ingested (embedded and committed) from a JSON Lines file
//!    and from a Kafka topic, with the same SQL; reports docs/s of each and Kafka ÷ file
//!    (target ≥ 0.9).
//! 2. Freshness: documents produced at a steady rate while a continuous pipeline runs; for each,
//!    the time from produce to visible in the index that `vector_search` reads; p50 and p99.
//!
//! `MKFLOW_BENCH_DOCS` (default 600) documents for 1; `MKFLOW_BENCH_RATE` docs/s (default 4) for
//! `MKFLOW_BENCH_SECONDS` (default 30) for 2.

#[path = "../tests/common/kafka.rs"]
mod kafka;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka::Broker;
use mkflow::{Engine, EngineConfig, assets};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `(doc_id, title, body)` documents: SciFact from ../shared when present, else the sample.
fn load_docs(limit: usize) -> Vec<(String, String, String)> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/beir/scifact/corpus.jsonl");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    let (path, id_key, body_key) = if shared.is_file() {
        (shared, "_id", "text")
    } else {
        (sample, "doc_id", "body")
    };
    let text = std::fs::read_to_string(&path).expect("corpus readable");
    text.lines()
        .take(limit)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            (s(id_key), s("title"), s(body_key))
        })
        .collect()
}

fn json(doc: &(String, String, String)) -> String {
    serde_json::json!({ "doc_id": doc.0, "title": doc.1, "body": doc.2 }).to_string()
}

async fn engine(data: &Path, until_caught_up: bool) -> Engine {
    let home = assets::home_dir();
    if !assets::missing_files(&home).is_empty() {
        assets::pull(&home, &mut |l| eprintln!("{l}")).expect("assets");
    }
    Engine::new(EngineConfig {
        home,
        default_model: None,
        embed_threads: None,
        until_caught_up,
        ..EngineConfig::new(data)
    })
    .await
    .expect("engine")
}

/// Runs `script` and returns the seconds it took, with the embedding cache cleared first.
async fn timed(engine: &Engine, script: &str) -> f64 {
    engine.models().default_model().get().unwrap().model().forget_recent();
    let started = Instant::now();
    engine.run_script("bench", script, |_| {}).await.expect("pipeline runs");
    started.elapsed().as_secs_f64()
}

const INDEX_COLUMNS: &str = "(doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)";
const SELECT: &str = "SELECT doc_id, title, body, embed(concat_ws('. ', title, body))";

async fn throughput(broker: &Broker, docs: &[(String, String, String)]) {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("docs.jsonl");
    let lines: Vec<String> = docs.iter().map(json).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    broker.create_topic("bench", 2).await;
    let producer = broker.producer();
    for (i, line) in lines.iter().enumerate() {
        Broker::send(&producer, "bench", i as i32 % 2, &docs[i].0, line.as_bytes()).await;
    }
    let engine = engine(&work.path().join("data"), true).await;
    // Warm-up: load the model once outside the timings.
    engine.sql("SELECT embed('warm up')").await.unwrap();
    let file_script = format!(
        "CREATE EXTERNAL TABLE docs {INDEX_COLUMNS} STORED AS JSONL LOCATION '{}';
         CREATE EXTERNAL TABLE kb_file {INDEX_COLUMNS} STORED AS KB LOCATION 'kb_file';
         INSERT INTO kb_file {SELECT} FROM docs;",
        file.display()
    );
    let kafka_script = format!(
        "CREATE EXTERNAL TABLE topic {INDEX_COLUMNS} STORED AS KAFKA LOCATION 'kafka://{}/bench'
           OPTIONS ('max_batch_rows' '500', 'linger_ms' '200');
         CREATE EXTERNAL TABLE kb_kafka {INDEX_COLUMNS} STORED AS KB LOCATION 'kb_kafka';
         INSERT INTO kb_kafka {SELECT} FROM topic;",
        broker.servers
    );
    let file_secs = timed(&engine, &file_script).await;
    let kafka_secs = timed(&engine, &kafka_script).await;
    for name in ["kb_file", "kb_kafka"] {
        assert_eq!(
            engine.index(name).unwrap().len(),
            docs.len(),
            "{name} holds every document"
        );
    }
    let n = docs.len() as f64;
    println!(
        "ingest {} docs: file {:.1} docs/s ({file_secs:.1} s), kafka {:.1} docs/s ({kafka_secs:.1} s), kafka/file = {:.3}",
        docs.len(),
        n / file_secs,
        n / kafka_secs,
        file_secs / kafka_secs
    );
}

/// Freshness of a continuous pipeline on topic `topic` with extra table `options`.
async fn freshness(
    broker: &Broker,
    docs: &[(String, String, String)],
    rate: u64,
    seconds: u64,
    topic: &str,
    options: &str,
) {
    let work = tempfile::tempdir().unwrap();
    broker.create_topic(topic, 1).await;
    let engine = Arc::new(engine(&work.path().join("data"), false).await);
    engine
        .sql(&format!(
            "CREATE EXTERNAL TABLE fresh {INDEX_COLUMNS} STORED AS KAFKA LOCATION 'kafka://{}/{topic}'
               OPTIONS ('max_batch_rows' '500', 'linger_ms' '50'{options});
             CREATE EXTERNAL TABLE kb_{topic} {INDEX_COLUMNS} STORED AS KB LOCATION 'kb_{topic}';",
            broker.servers
        ))
        .await
        .unwrap();
    engine.sql("SELECT embed('warm up')").await.unwrap();
    let index = engine.index(&format!("kb_{topic}")).unwrap();
    let streaming = {
        let engine = engine.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            engine
                .run_script(&topic, &format!("INSERT INTO kb_{topic} {SELECT} FROM fresh"), |_| {})
                .await
        })
    };
    while engine.streams().states().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = (rate * seconds) as usize;
    let producer = broker.producer();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut produced_at = Vec::with_capacity(total);
    let mut visible_at: Vec<Option<Instant>> = vec![None; total];
    let started = Instant::now();
    let mut next_send = started;
    while visible_at.iter().any(Option::is_none) {
        let now = Instant::now();
        if produced_at.len() < total && now >= next_send {
            let doc = &docs[produced_at.len() % docs.len()];
            let id = format!("fresh-{}", produced_at.len());
            let value = json(&(id.clone(), doc.1.clone(), doc.2.clone()));
            produced_at.push(Instant::now());
            Broker::send(&producer, topic, 0, &id, value.as_bytes()).await;
            next_send += interval;
        }
        // One partition: documents become visible in order, so the row count says which.
        let visible = index.len().min(produced_at.len());
        let seen = Instant::now();
        for slot in visible_at.iter_mut().take(visible) {
            slot.get_or_insert(seen);
        }
        assert!(
            started.elapsed() < Duration::from_secs(seconds * 4 + 60),
            "documents stopped arriving"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    engine.streams().stop();
    streaming.await.unwrap().unwrap();
    // Where a micro-batch's time goes: mean seconds per stage and per index commit.
    let text = mkflow::metrics::global().render(engine.as_ref());
    let value = |sample: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let mean = |family: &str, labels: &str| {
        value(&format!("{family}_sum{{{labels}}}")) / value(&format!("{family}_count{{{labels}}}")) * 1e3
    };
    println!(
        "  mean per micro-batch: decode {:.1} ms, execute (embed + commit) {:.1} ms, of which index commit {:.1} ms",
        mean(
            "mkflow_pipeline_stage_duration_seconds",
            &format!(r#"pipeline="{topic}",stage="decode""#)
        ),
        mean(
            "mkflow_pipeline_stage_duration_seconds",
            &format!(r#"pipeline="{topic}",stage="execute""#)
        ),
        mean(
            "mkflow_index_commit_duration_seconds",
            &format!(r#"index="kb_{topic}""#)
        ),
    );
    let mut latencies: Vec<f64> = produced_at
        .iter()
        .zip(&visible_at)
        .map(|(p, v)| v.unwrap().duration_since(*p).as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "freshness at {rate} docs/s for {seconds} s ({total} docs{options}): produce→visible p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let broker = Broker::start();
    let docs = load_docs(env_number("MKFLOW_BENCH_DOCS", 600) as usize);
    throughput(&broker, &docs).await;
    let rate = env_number("MKFLOW_BENCH_RATE", 4);
    let seconds = env_number("MKFLOW_BENCH_SECONDS", 30);
    // mkflow's defaults (fetch.wait.max.ms 100: a broker may hold a fetch request that long
    // before answering), then a shorter fetch wait.
    freshness(&broker, &docs, rate, seconds, "fresh", "").await;
    freshness(
        &broker,
        &docs,
        rate,
        seconds,
        "fresh_tuned",
        ", 'fetch.wait.max.ms' '20'",
    )
    .await;
}
