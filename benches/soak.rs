//! The soak (`benches/soak.sh`; not run by CI): a Kafka topic ingested into a Meta-Knowledge
//! index with full text by the real `mkflow` binary, against librdkafka's mock cluster with an
//! ordinary batching producer.
//!
//! 1. **Kills.** `mkflow run --until-caught-up` is SIGKILLed `MKFLOW_SOAK_KILLS` times (default
//!    20): at random moments, and every other time while a background compaction has files on
//!    disk it has not swapped in yet, when one comes within a few seconds. A last run drains the
//!    topic. Then: documents lost and duplicated (rows, and row keys handed out: a re-delivered
//!    record would take a second key), dead letters recorded once each.
//! 2. **Mixed load.** `mkflow serve` streams new documents produced at `MKFLOW_SOAK_RATE` docs/s
//!    (default 5) for `MKFLOW_SOAK_SECONDS` (default 600) while `MKFLOW_SOAK_CLIENTS` (default 8)
//!    clients send searches (`vector_search`, `text_search`, `hybrid_search`, `mk_search`) one
//!    after another. Reports the server's RSS over time (anonymous and file-backed; every
//!    second to `target/soak/rss.csv`), query p50/p99 while a compaction runs and while none
//!    does, and again lost/duplicated documents at the end.
//!
//! `MKFLOW_SOAK_DOCS` (default 2000) documents are produced in phase 1 (SciFact from
//! `../shared` when present, else the bundled sample, repeated with new ids). Before it,
//! `MKFLOW_SOAK_BASE_DOCS` (default 50000) documents of random words (~3 KB, no vectors, no
//! questions) are loaded from a JSON Lines file, so that a compaction rewrites enough rows to
//! take seconds, and kills can land inside one.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/kafka.rs"]
mod kafka;
#[path = "../tests/common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka::Broker;
use mkflow_index::Manifest;
use server::{Server, mkflow};

const TOPIC: &str = "papers";
const PARTITIONS: i32 = 3;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// `(doc_id, title, body)` documents, `count` of them, ids prefixed with `prefix`.
fn documents(count: usize, prefix: &str) -> Vec<(String, String, String)> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/beir/scifact/corpus.jsonl");
    let (path, body_key) = match shared.is_file() {
        true => (shared, "text"),
        false => (common::sample_corpus(), "body"),
    };
    let corpus: Vec<(String, String)> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["title"].as_str().unwrap_or_default().to_string(),
                v[body_key].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    (0..count)
        .map(|i| {
            let (title, body) = &corpus[i % corpus.len()];
            (format!("{prefix}{i}"), title.clone(), body.clone())
        })
        .collect()
}

/// The documents as records round-robin over the partitions, a malformed record after every
/// 50th; and the bad records' count.
fn records(docs: &[(String, String, String)]) -> (Vec<(i32, String, Vec<u8>)>, usize) {
    let mut records = Vec::new();
    let mut bad = 0;
    for (i, (id, title, body)) in docs.iter().enumerate() {
        let partition = i as i32 % PARTITIONS;
        let value = serde_json::json!({"doc_id": id, "title": title, "body": body}).to_string();
        records.push((partition, id.clone(), value.into_bytes()));
        if i % 50 == 49 {
            records.push((
                partition,
                format!("bad-{i}"),
                format!("{{\"doc_id\": \"{id}-bad\", ").into_bytes(),
            ));
            bad += 1;
        }
    }
    (records, bad)
}

fn pipeline(dir: &Path, servers: &str) -> PathBuf {
    let path = dir.join("soak.sql");
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE {TOPIC} (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KAFKA LOCATION 'kafka://{servers}/{TOPIC}' OPTIONS ('max_batch_rows' '8', 'linger_ms' '50');
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION 'kb' OPTIONS ('meta_knowledge' 'true');
             INSERT INTO kb SELECT doc_id, title, body, metadata, qa, mk_cluster(metadata), embedding FROM (
               SELECT doc_id, title, body, mk_metadata(title, body) AS metadata, mk_qa(title, body) AS qa,
                      embed(concat_ws('. ', title, body)) AS embedding
               FROM {TOPIC});"
        ),
    )
    .unwrap();
    path
}

/// Loads `count` documents of random words into the index `kb` from a JSON Lines file (without
/// vectors or questions: only their rows and text are indexed).
fn load_base(work: &Path, data: &Path, count: usize, rng: &mut Rng) {
    let file = work.join("base.jsonl");
    let mut text = String::new();
    for i in 0..count {
        let words = |n: usize, rng: &mut Rng| -> String {
            (0..n)
                .map(|_| format!("w{}", rng.below(50_000)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let record =
            serde_json::json!({"doc_id": format!("base-{i}"), "title": words(8, rng), "body": words(450, rng)});
        text.push_str(&format!("{record}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let pipeline = work.join("base.sql");
    std::fs::write(
        &pipeline,
        format!(
            "CREATE EXTERNAL TABLE base (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS JSONL LOCATION '{}';
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION 'kb' OPTIONS ('meta_knowledge' 'true');
             INSERT INTO kb SELECT doc_id, title, body, NULL AS m, NULL AS qa, NULL AS c, NULL AS e FROM base;",
            file.display()
        ),
    )
    .unwrap();
    let status = mkflow(data)
        .arg("run")
        .arg(&pipeline)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "loading the base documents: {status}");
}

/// Whether a background compaction has written files it has not swapped in yet, in the index
/// at `dir` or the indexes inside it (its questions).
fn compacting(dir: &Path) -> bool {
    let in_one = |dir: &Path| -> bool {
        let Ok(Some(manifest)) = Manifest::read_latest(dir) else {
            return false;
        };
        std::fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            name.starts_with("rows-") && name.contains("-compacted") && name != manifest.rows_file
        })
    };
    in_one(dir)
        || std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().is_dir() && in_one(&e.path()))
}

/// Documents in the index at `dir`, and row keys it has handed out.
fn committed(dir: &Path) -> (usize, u64) {
    Manifest::read_latest(dir)
        .ok()
        .flatten()
        .map_or((0, 0), |m| (m.rows, m.next_key))
}

/// Dead letters recorded, and how many distinct records they are.
fn dead_letters(data: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(data.join("dead_letters.jsonl")).unwrap_or_default();
    let all: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}|{}", v["source"], v["position"])
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
    (all.len(), distinct.len())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Phase 1: kills during ingestion, then a run to the end.
fn kill_phase(data: &Path, pipeline: &Path, kills_wanted: usize, rng: &mut Rng) -> (usize, usize) {
    let kb = data.join("kb");
    let run = || -> Child {
        mkflow(data)
            .args(["run", "--until-caught-up"])
            .arg(pipeline)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut kills, mut during_compaction) = (0, 0);
    while kills < kills_wanted {
        let mut child = run();
        let started = Instant::now();
        let wait_for_compaction = kills % 2 == 1;
        let delay = Duration::from_millis(500 + rng.below(4000));
        let outcome = loop {
            if child.try_wait().unwrap().is_some() {
                break None;
            }
            let compaction = compacting(&kb);
            if (wait_for_compaction && compaction) || (!wait_for_compaction && started.elapsed() >= delay) {
                break Some(compaction);
            }
            if wait_for_compaction && started.elapsed() > Duration::from_secs(60) {
                break Some(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let Some(compaction) = outcome else {
            eprintln!("soak: the topic was drained after {kills} kills");
            break;
        };
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        during_compaction += usize::from(compaction);
        eprintln!(
            "soak: kill {kills} after {:.1} s{} — {} documents committed",
            started.elapsed().as_secs_f64(),
            if compaction { ", during a compaction" } else { "" },
            committed(&kb).0
        );
    }
    let status = run().wait().unwrap();
    assert!(status.success(), "the last run drains the topic: {status}");
    (kills, during_compaction)
}

/// One query: when it started and ended (seconds since the load began).
struct Sample {
    /// The search function the query called.
    function: &'static str,
    start: f64,
    end: f64,
}

impl Sample {
    fn latency_ms(&self) -> f64 {
        (self.end - self.start) * 1e3
    }

    /// Whether the query overlaps a compaction (`spans`: sorted, from [`compaction_spans`]).
    fn during_compaction(&self, spans: &[(f64, f64)]) -> bool {
        let first = spans.partition_point(|&(_, last)| last < self.start);
        spans.get(first).is_some_and(|&(first_seen, _)| first_seen <= self.end)
    }
}

/// The search functions the query clients call, in turn.
const SEARCHES: [&str; 4] = ["vector_search", "text_search", "hybrid_search", "mk_search"];

/// How often the monitor looks for a running compaction.
const COMPACTION_SAMPLING: Duration = Duration::from_millis(50);

/// The compactions seen, as (first seen, last seen) spans, from the sorted times one was seen
/// running: samples less than two sampling periods apart belong to one compaction. A query is
/// "during a compaction" when it overlaps a span — not when a sample happens to fall inside it,
/// which would count slow queries far more often than fast ones.
fn compaction_spans(seen: &[f64]) -> Vec<(f64, f64)> {
    let gap = 2.0 * COMPACTION_SAMPLING.as_secs_f64();
    let mut spans: Vec<(f64, f64)> = Vec::new();
    for &t in seen {
        match spans.last_mut() {
            Some((_, last)) if t - *last <= gap => *last = t,
            _ => spans.push((t, t)),
        }
    }
    spans
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(soak());
}

async fn soak() {
    let docs_wanted = env_number("MKFLOW_SOAK_DOCS", 2000) as usize;
    let base_docs = env_number("MKFLOW_SOAK_BASE_DOCS", 50_000) as usize;
    let kills_wanted = env_number("MKFLOW_SOAK_KILLS", 20) as usize;
    let seconds = env_number("MKFLOW_SOAK_SECONDS", 600);
    let rate = env_number("MKFLOW_SOAK_RATE", 5).max(1);
    let clients = env_number("MKFLOW_SOAK_CLIENTS", 8) as usize;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    std::fs::create_dir_all(&out).unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let kb = data.join("kb");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Phase 1.
    let loading = Instant::now();
    load_base(work.path(), &data, base_docs, &mut rng);
    eprintln!(
        "soak: {base_docs} base documents loaded in {:.0} s",
        loading.elapsed().as_secs_f64()
    );
    let broker = Broker::mock();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let docs = documents(docs_wanted, "d");
    let (initial, bad) = records(&docs);
    Broker::send_all(&broker.batching_producer(), TOPIC, &initial).await;
    let pipeline = pipeline(work.path(), &broker.servers);
    let started = Instant::now();
    let (kills, during_compaction) = {
        let (data, pipeline) = (data.clone(), pipeline.clone());
        tokio::task::spawn_blocking(move || kill_phase(&data, &pipeline, kills_wanted, &mut rng))
            .await
            .unwrap()
    };
    let (rows, keys) = committed(&kb);
    let (letters, distinct_letters) = dead_letters(&data);
    let expected = base_docs + docs.len();
    println!(
        "soak phase 1: {base_docs} base documents, then {} documents + {bad} bad records, {kills} SIGKILLs ({during_compaction} during a compaction), {:.0} s: \
         {rows} rows ({} lost), {keys} row keys ({} duplicated), {letters} dead letters ({distinct_letters} distinct, {bad} expected)",
        docs.len(),
        started.elapsed().as_secs_f64(),
        expected as i64 - rows as i64,
        keys as i64 - rows as i64,
    );

    // Phase 2.
    let server = Arc::new(Server::start(mkflow(&data), &["--pipeline", pipeline.to_str().unwrap()]).await);
    let pid = server.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let monitor = {
        let (stop, kb) = (monitor_stop.clone(), kb.clone());
        let csv = out.join("rss.csv");
        std::thread::spawn(move || {
            let mut lines = vec!["seconds,rss_kib,anon_kib,file_kib,rows".to_string()];
            let mut compaction_times = Vec::new();
            let mut last = Instant::now() - Duration::from_secs(1);
            while !stop.load(Ordering::SeqCst) {
                if compacting(&kb) {
                    compaction_times.push(load_started.elapsed().as_secs_f64());
                }
                if last.elapsed() >= Duration::from_secs(1) {
                    last = Instant::now();
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let field = |name: &str| -> u64 {
                        status
                            .lines()
                            .find(|l| l.starts_with(name))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                            .unwrap_or(0)
                    };
                    lines.push(format!(
                        "{},{},{},{},{}",
                        load_started.elapsed().as_secs(),
                        field("VmRSS:"),
                        field("RssAnon:"),
                        field("RssFile:"),
                        committed(&kb).0
                    ));
                }
                std::thread::sleep(COMPACTION_SAMPLING);
            }
            std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
            (lines, compaction_times)
        })
    };
    let producer = {
        let (stop, producer) = (stop.clone(), broker.batching_producer());
        let load = documents((rate * (seconds + 1)) as usize, "load-");
        tokio::spawn(async move {
            let mut produced = 0usize;
            for second in load.chunks(rate as usize) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (records, _) = records(second);
                let records: Vec<_> = records.into_iter().filter(|(_, k, _)| !k.starts_with("bad-")).collect();
                Broker::send_all(&producer, TOPIC, &records).await;
                produced += second.len();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            produced
        })
    };
    let titles: Vec<String> = docs.iter().map(|d| d.1.replace('\'', "''")).collect();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut client_tasks = Vec::new();
    for client in 0..clients {
        let (server, stop, samples, failures) = (server.clone(), stop.clone(), samples.clone(), failures.clone());
        let titles = titles.clone();
        client_tasks.push(tokio::spawn(async move {
            let mut i = client;
            while !stop.load(Ordering::SeqCst) {
                let query = &titles[(i * 7919) % titles.len()];
                // Each client calls every function in turn (with 8 clients stepping by 8, `i`
                // alone would pin each client to one function, and the fast ones would then
                // make most of the samples).
                let function = SEARCHES[(i / clients) % SEARCHES.len()];
                let sql = format!("SELECT doc_id FROM {function}(kb, '{query}', 10)");
                let start = load_started.elapsed().as_secs_f64();
                let response = server.sql(None, &sql).await;
                let end = load_started.elapsed().as_secs_f64();
                if !response.status().is_success() {
                    let message = response.text().await.unwrap_or_default();
                    failures.lock().unwrap().push(message);
                }
                samples.lock().unwrap().push(Sample { function, start, end });
                i += clients;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::SeqCst);
    for task in client_tasks {
        task.await.unwrap();
    }
    let produced = producer.await.unwrap();
    let expected = expected + produced;
    let deadline = Instant::now() + Duration::from_secs(300);
    while committed(&kb).0 < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    monitor_stop.store(true, Ordering::SeqCst);
    let (rss, compaction_times) = monitor.join().unwrap();
    let (rows, keys) = committed(&kb);
    let server = Arc::into_inner(server).expect("clients are done");
    drop(server); // SIGKILL; everything above was committed

    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let spans = compaction_spans(&compaction_times);
    let (during, idle): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.during_compaction(&spans));
    let p99_of = |samples: &[&Sample], function: &str| {
        let mut ms: Vec<f64> = samples
            .iter()
            .filter(|s| s.function == function)
            .map(|s| s.latency_ms())
            .collect();
        ms.sort_by(f64::total_cmp);
        percentile(&ms, 0.99)
    };
    let by_function: Vec<String> = SEARCHES
        .iter()
        .map(|f| format!("{f} {:.1}/{:.1}", p99_of(&idle, f), p99_of(&during, f)))
        .collect();
    println!(
        "soak phase 2: {} compactions ({:.1} s in all); query p99 idle/during compactions (ms): {}",
        spans.len(),
        spans.iter().map(|(first, last)| last - first).sum::<f64>(),
        by_function.join(", ")
    );
    let mut during: Vec<f64> = during.iter().map(|s| s.latency_ms()).collect();
    let mut idle: Vec<f64> = idle.iter().map(|s| s.latency_ms()).collect();
    during.sort_by(f64::total_cmp);
    idle.sort_by(f64::total_cmp);
    let rss_kib: Vec<(u64, u64, u64)> = rss
        .iter()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<u64> = l.split(',').filter_map(|x| x.parse().ok()).collect();
            (f.len() == 5).then(|| (f[1], f[2], f[3]))
        })
        .collect();
    let max = |i: usize| rss_kib.iter().map(|r| [r.0, r.1, r.2][i]).max().unwrap_or(0) / 1024;
    let first = rss_kib.first().map_or(0, |r| r.0 / 1024);
    let last = rss_kib.last().map_or(0, |r| r.0 / 1024);
    let failures = failures.lock().unwrap();
    println!(
        "soak phase 2: {seconds} s, {clients} clients, {produced} documents streamed at {rate}/s: {} queries ({} failed{}); \
         p50/p99 {:.1}/{:.1} ms with no compaction running ({} queries) vs {:.1}/{:.1} ms during compactions ({} queries); \
         RSS {first} MiB at start, {last} MiB at end, peak {} MiB (anonymous {} MiB, file-backed {} MiB; every second in {}); \
         {rows} rows of {expected} ({} lost), {keys} row keys ({} duplicated)",
        samples.len(),
        failures.len(),
        failures.first().map_or(String::new(), |f| format!(", e.g. {f}")),
        percentile(&idle, 0.5),
        percentile(&idle, 0.99),
        idle.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len(),
        max(0),
        max(1),
        max(2),
        out.join("rss.csv").display(),
        expected as i64 - rows as i64,
        keys as i64 - rows as i64,
    );
}
