//! Search latency: `vector_search` through SQL against a bare usearch index on the same
//! 100k vectors (run: `cargo bench --bench search`; `MKFLOW_BENCH_VECTORS` changes the count),
//! and through Flight SQL (a prepared statement with the query vector bound, and the statement
//! with a vector literal) and HTTP (the vector bound by the request's `params`, and as a
//! literal), one search at a time, and through Flight SQL with every core busy (QPS);
//! commit cost (delta vs full); micro-batch commit latency with inline vs background
//! compaction; and search latency while full commits run vs idle (searches
//! read the published state, so a commit must not make them wait).
//!
//! Both hold the same 384-dimensional unit vectors with the same HNSW settings; both answer the
//! same 500 queries for k = 10. The SQL path includes parsing, planning, the search, gathering
//! rows and collecting the result.

/// The allocator of the mkflow binary, so the SQL path is measured as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Int64Array, ListArray, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema};
use mkflow::{Engine, EngineConfig, assets};
use mkflow_index::{IndexSettings, KnowledgeIndex, Quantization};
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

const DIMS: usize = 384;
/// The search every client runs, its query vector bound to `$1`.
const SEARCH_BOUND: &str = "SELECT doc_id, score FROM vector_search(bench, $1, 10)";

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// A unit vector near one of `centroids` (real embeddings cluster by topic; uniformly
    /// random 384-d vectors have no near neighbours worth finding).
    fn clustered_vector(&mut self, centroids: &[Vec<f32>]) -> Vec<f32> {
        let pick = ((self.uniform() + 0.5) * centroids.len() as f32) as usize;
        let centroid = &centroids[pick.min(centroids.len() - 1)];
        let mut v: Vec<f32> = centroid.iter().map(|x| x + 0.6 * self.uniform()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }
}

/// Rows of the bench index: ids, categories and row-major vectors.
fn index_rows(index: &KnowledgeIndex, ids: Vec<String>, categories: Vec<i64>, flat: Vec<f32>) -> RecordBatch {
    let vectors = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        DIMS as i32,
        Arc::new(Float32Array::from(flat)),
        None,
    )
    .unwrap();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(Int64Array::from(categories)),
        Arc::new(vectors),
    ];
    RecordBatch::try_new(index.schema(), columns).unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&micros, 0.5), percentile(&micros, 0.99));
    println!("{name:<38} p50 {p50:>8.0} µs   p99 {p99:>8.0} µs");
    (p50, p99)
}

/// Fetches the result `info` names; returns its row count.
async fn fetch_rows(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    info: arrow_flight::FlightInfo,
) -> usize {
    use futures::TryStreamExt;
    let mut rows = 0;
    for endpoint in info.endpoint {
        let batches: Vec<RecordBatch> = client
            .do_get(endpoint.ticket.unwrap())
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    rows
}

/// A process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies directory `from` to `to`, recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A free loopback address.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `mkflow serve` with Flight SQL on, in a process of its own (as a client finds it), over a
/// copy of the index at `index_dir` named `bench`; returns the server, its data directory, its
/// Flight SQL address and its HTTP address.
fn serve_copy(index_dir: &std::path::Path) -> (Killed, tempfile::TempDir, String, String) {
    let data = tempfile::tempdir().unwrap();
    copy_dir(index_dir, &data.path().join("bench"));
    let (flight, http) = (free_address(), free_address());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--listen", &http, "--flight-listen", &flight])
        .env("MKFLOW_HOME", assets::home_dir())
        .env_remove("MKFLOW_AUTH_TOKEN")
        .env_remove("MKFLOW_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (Killed(child), data, flight, http)
}

/// Query vector `q` as the one-element list a prepared `vector_search` binds to `$1`.
fn vector_list(q: &[f32]) -> ListArray {
    ListArray::from_iter_primitive::<Float32Type, _, _>([Some(q.iter().map(|x| Some(*x)))])
}

/// Query vector `q` as the parameter batch a Flight SQL client binds to `$1`.
fn vector_parameter(q: &[f32]) -> RecordBatch {
    RecordBatch::try_from_iter([("$1", Arc::new(vector_list(q)) as ArrayRef)]).unwrap()
}

/// Per-search latencies (µs) of a prepared `vector_search` run with each query vector bound in
/// this process (no network), then through Flight SQL against the server at `address` (another
/// process, on loopback), and of the statement with the vector as a `literal` through Flight SQL.
async fn flight_latencies(
    engine: &Engine,
    address: &str,
    queries: &[Vec<f32>],
    literal: &dyn Fn(&[f32]) -> String,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use datafusion::common::ScalarValue;

    let deadline = Instant::now() + Duration::from_secs(120);
    let channel = loop {
        let endpoint = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap();
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(e) => assert!(Instant::now() < deadline, "mkflow serve did not start: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut client = FlightSqlServiceClient::new(channel);
    // Prepared once the server has loaded its index (until then it answers Unavailable).
    let mut statement = loop {
        match client.prepare(SEARCH_BOUND.into(), None).await {
            Ok(statement) => break statement,
            Err(e) => assert!(Instant::now() < deadline, "mkflow serve did not load: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut prepared, mut literal_us) = (Vec::new(), Vec::new());
    // The same prepared statement run in this process: the SQL engine's share of the time.
    let session = engine.network_session(mkflow::access::Role::Read).unwrap();
    let in_process = session.prepare(SEARCH_BOUND).await.unwrap();
    let mut in_process_us = Vec::new();
    for q in queries {
        let started = Instant::now();
        session
            .run_prepared(&in_process, vec![ScalarValue::List(Arc::new(vector_list(q)))])
            .await
            .unwrap();
        in_process_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    // What an HTTP request adds before its statement runs: a session of its own.
    let mut sessions_us = Vec::new();
    for _ in queries {
        let started = Instant::now();
        drop(engine.network_session(mkflow::access::Role::Read).unwrap());
        sessions_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    summary("a new network session (each HTTP request's)", sessions_us);

    for q in queries {
        let started = Instant::now();
        statement.set_parameters(vector_parameter(q)).unwrap();
        let info = statement.execute().await.unwrap();
        let rows = fetch_rows(&mut client, info).await;
        prepared.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(rows, 10);

        let sql = format!("SELECT doc_id, score FROM vector_search(bench, {}, 10)", literal(q));
        let started = Instant::now();
        let info = client.execute(sql, None).await.unwrap();
        let rows = fetch_rows(&mut client, info).await;
        literal_us.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(rows, 10);
    }
    (in_process_us, prepared, literal_us)
}

/// One search over HTTP (`sql`, with `vector` bound to `$1` by the request's `params` when
/// given): its latency in µs, building the request and reading the answer included.
async fn http_search(client: &reqwest::Client, url: &str, sql: &str, vector: Option<&[f32]>) -> f64 {
    let started = Instant::now();
    let body = match vector {
        Some(q) => serde_json::json!({ "sql": sql, "params": [q] }),
        None => serde_json::json!({ "sql": sql }),
    };
    let answer: serde_json::Value = client.post(url).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["row_count"], 10, "{answer}");
    started.elapsed().as_secs_f64() * 1e6
}

/// Per-search latencies (µs) over HTTP (`POST /v1/sql`, JSON in and out) against the server at
/// `address`: the search with the query vector bound by the request's `params`, and with the
/// vector as a `literal` in the SQL.
async fn http_latencies(
    address: &str,
    queries: &[Vec<f32>],
    literal: &dyn Fn(&[f32]) -> String,
) -> (Vec<f64>, Vec<f64>) {
    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/sql");
    let (mut bound, mut inline) = (Vec::new(), Vec::new());
    for q in queries {
        bound.push(http_search(&client, &url, SEARCH_BOUND, Some(q)).await);
        let sql = format!("SELECT doc_id, score FROM vector_search(bench, {}, 10)", literal(q));
        inline.push(http_search(&client, &url, &sql, None).await);
    }
    (bound, inline)
}

/// Searches per second of bare usearch with every core searching (one thread per core, each
/// through the queries from its own place) for `run`.
fn bare_throughput(bare: &usearch::Index, queries: &[Vec<f32>], threads: usize, run: Duration) -> f64 {
    let started = Instant::now();
    let searched: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut done = 0;
                    while started.elapsed() < run {
                        let q = &queries[(t * queries.len() / threads + done) % queries.len()];
                        assert_eq!(bare.search(q, 10).unwrap().keys.len(), 10);
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    searched as f64 / started.elapsed().as_secs_f64()
}

/// Searches per second of `clients` tasks at once: `client(c)` runs client `c`'s searches until
/// `deadline` and returns how many it ran.
async fn searches_per_second<F>(clients: usize, client: impl Fn(usize) -> F) -> f64
where
    F: Future<Output = usize> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(client(c))).collect();
    let mut searched = 0;
    for task in tasks {
        searched += task.await.unwrap();
    }
    searched as f64 / started.elapsed().as_secs_f64()
}

/// The query vector client `c` of `clients` searches for its `done`-th search: each goes through
/// the queries from its own place.
fn query_of(queries: &[Vec<f32>], c: usize, clients: usize, done: usize) -> &[f32] {
    &queries[(c * queries.len() / clients + done) % queries.len()]
}

/// Searches per second through Flight SQL with `clients` connections at once (each its own
/// session and prepared `vector_search`, each binding the query vectors from its own place)
/// against the server at `address` for `run`.
async fn flight_throughput(address: &str, queries: &[Vec<f32>], clients: usize, run: Duration) -> f64 {
    use arrow_flight::sql::client::FlightSqlServiceClient;

    let (queries, deadline) = (Arc::new(queries.to_vec()), Instant::now() + run);
    searches_per_second(clients, |c| {
        let (address, queries) = (address.to_string(), queries.clone());
        async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = FlightSqlServiceClient::new(channel);
            let mut statement = client.prepare(SEARCH_BOUND.into(), None).await.unwrap();
            let mut done = 0;
            while Instant::now() < deadline {
                statement
                    .set_parameters(vector_parameter(query_of(&queries, c, clients, done)))
                    .unwrap();
                let info = statement.execute().await.unwrap();
                assert_eq!(fetch_rows(&mut client, info).await, 10);
                done += 1;
            }
            done
        }
    })
    .await
}

/// Searches per second over HTTP with `clients` connections at once (each its own client),
/// the query vector bound by the request's `params`, for `run`.
async fn http_throughput(address: &str, queries: &[Vec<f32>], clients: usize, run: Duration) -> f64 {
    let (queries, deadline) = (Arc::new(queries.to_vec()), Instant::now() + run);
    let url = format!("http://{address}/v1/sql");
    searches_per_second(clients, |c| {
        let (url, queries) = (url.clone(), queries.clone());
        async move {
            let client = reqwest::Client::new();
            let mut done = 0;
            while Instant::now() < deadline {
                http_search(&client, &url, SEARCH_BOUND, Some(query_of(&queries, c, clients, done))).await;
                done += 1;
            }
            done
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("MKFLOW_BENCH_VECTORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut rng = Rng(42);
    let centroids: Vec<Vec<f32>> = (0..1000).map(|_| (0..DIMS).map(|_| rng.uniform()).collect()).collect();
    let vectors: Vec<Vec<f32>> = (0..count).map(|_| rng.clustered_vector(&centroids)).collect();
    let queries: Vec<Vec<f32>> = (0..500).map(|_| rng.clustered_vector(&centroids)).collect();
    println!("search benchmark: {count} vectors x {DIMS} dims, 500 queries, k = 10");

    // Bare usearch.
    let bare = usearch::Index::new(&IndexOptions {
        dimensions: DIMS,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        connectivity: 0,
        expansion_add: 0,
        expansion_search: 0,
        multi: false,
    })
    .unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    bare.reserve_capacity_and_threads(count, threads).unwrap();
    let started = Instant::now();
    let chunk = count.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, part) in vectors.chunks(chunk).enumerate() {
            let bare = &bare;
            scope.spawn(move || {
                for (i, v) in part.iter().enumerate() {
                    bare.add((t * chunk + i) as u64, v).unwrap();
                }
            });
        }
    });
    let bare_build = started.elapsed().as_secs_f64();

    // mkflow index, built through upsert.
    let data = tempfile::tempdir().unwrap();
    let columns = Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("category", DataType::Int64, false),
    ]);
    let settings = IndexSettings {
        model: "bench".into(),
        dimensions: DIMS,
        quantization: Quantization::F32,
        key_column: "doc_id".into(),
        vector_column: "embedding".into(),
        text_columns: None,
    };
    let index = KnowledgeIndex::open_or_create(data.path().join("bench"), &columns, &settings).unwrap();
    let batch = index_rows(
        &index,
        (0..count).map(|i| format!("doc-{i}")).collect(),
        (0..count as i64).map(|i| i % 100).collect(),
        vectors.iter().flatten().copied().collect(),
    );
    let started = Instant::now();
    index.upsert(&[batch]).unwrap();
    let index_build = started.elapsed().as_secs_f64();
    println!(
        "build ({threads} threads): bare usearch {:.0} vectors/s | mkflow upsert+commit {:.0} vectors/s",
        count as f64 / bare_build,
        count as f64 / index_build
    );
    let index = Arc::new(index);

    let engine = Engine::new(EngineConfig {
        home: assets::home_dir(),
        default_model: None,
        embed_threads: None,
        until_caught_up: false,
        ..EngineConfig::new(tempfile::tempdir().unwrap().keep())
    })
    .await
    .unwrap();
    engine.register_index("bench", index.clone()).await.unwrap();

    let literal = |q: &[f32]| {
        format!(
            "[{}]",
            q.iter().map(|x| format!("{x:.7}")).collect::<Vec<_>>().join(",")
        )
    };
    let mut bare_us = Vec::new();
    let mut sql_us = Vec::new();
    let mut filtered_us = Vec::new();
    let mut floor_us = Vec::new();
    let mut agree = 0;
    let mut exact_found = 0;
    for q in &queries {
        let started = Instant::now();
        let matches = bare.search(q, 10).unwrap();
        bare_us.push(started.elapsed().as_secs_f64() * 1e6);

        let started = Instant::now();
        engine.sql("SELECT 1").await.unwrap();
        floor_us.push(started.elapsed().as_secs_f64() * 1e6);

        let sql = format!("SELECT doc_id, score FROM vector_search(bench, {}, 10)", literal(q));
        let started = Instant::now();
        let rows = engine.sql(&sql).await.unwrap();
        sql_us.push(started.elapsed().as_secs_f64() * 1e6);
        let ids: Vec<String> = rows
            .iter()
            .flat_map(|b| {
                let a = datafusion::arrow::array::AsArray::as_string::<i32>(b.column(0)).clone();
                (0..a.len()).map(move |i| a.value(i).to_string()).collect::<Vec<_>>()
            })
            .collect();
        agree += matches
            .keys
            .iter()
            .filter(|k| ids.contains(&format!("doc-{k}")))
            .count();
        let exact = bare.exact_search(q, 10).unwrap();
        exact_found += exact.keys.iter().filter(|k| ids.contains(&format!("doc-{k}"))).count();

        let sql = format!(
            "SELECT doc_id, score FROM vector_search(bench, {}, 10) WHERE category = 7",
            literal(q)
        );
        let started = Instant::now();
        let rows = engine.sql(&sql).await.unwrap();
        filtered_us.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
    }
    use datafusion::arrow::array::Array;
    let (bare50, bare99) = summary("bare usearch search", bare_us.clone());
    let (sql50, sql99) = summary("SQL vector_search", sql_us);
    summary("SQL floor (SELECT 1)", floor_us);
    summary("SQL vector_search WHERE (1% of rows)", filtered_us);
    println!("SQL / bare: p50 {:.1}x, p99 {:.1}x", sql50 / bare50, sql99 / bare99);
    let per_query = 10.0 * queries.len() as f64;
    println!("top-10 agreement SQL vs bare: {:.3}", agree as f64 / per_query);
    println!(
        "recall@10 of SQL vector_search vs exact search: {:.3}",
        exact_found as f64 / per_query
    );

    // What a Flight SQL client pays per search: a prepared vector_search with the query vector
    // bound (DoPut, GetFlightInfo, DoGet over gRPC on loopback to a server process over a copy
    // of the index), vs the statement with the vector written as a literal. QPS ratios are of mean latencies, one client at a time.
    let (_server, _served, address, http_address) = serve_copy(&data.path().join("bench"));
    let (in_process_us, prepared_us, statement_us) = flight_latencies(&engine, &address, &queries, &literal).await;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (bare_mean, prepared_mean, statement_mean) = (mean(&bare_us), mean(&prepared_us), mean(&statement_us));
    summary("prepared, vector bound, in process", in_process_us);
    let (prepared50, _) = summary("Flight SQL prepared, vector bound", prepared_us);
    let (statement50, _) = summary("Flight SQL statement, vector literal", statement_us);
    println!(
        "Flight SQL QPS / bare usearch QPS: prepared {:.2} (p50 {:.2}), literal statement {:.2} (p50 {:.2}); target >= 0.5",
        bare_mean / prepared_mean,
        bare50 / prepared50,
        bare_mean / statement_mean,
        bare50 / statement50
    );
    // The same over HTTP: one request per search, the vector bound by "params" (JSON).
    let (http_bound_us, http_literal_us) = http_latencies(&http_address, &queries, &literal).await;
    let (http_bound_mean, http_literal_mean) = (mean(&http_bound_us), mean(&http_literal_us));
    let (http_bound50, _) = summary("HTTP, vector bound by params", http_bound_us);
    let (http_literal50, _) = summary("HTTP, vector literal", http_literal_us);
    println!(
        "HTTP SQL QPS / bare usearch QPS: vector bound {:.2} (p50 {:.2}), literal {:.2} (p50 {:.2}); target >= 0.5",
        bare_mean / http_bound_mean,
        bare50 / http_bound50,
        bare_mean / http_literal_mean,
        bare50 / http_literal50
    );
    // The same with every core busy (QPS as a server sees it): one bare search thread per core,
    // against two Flight SQL clients per core (the clients here share the cores with the server).
    let run = Duration::from_secs(10);
    let bare_qps = bare_throughput(&bare, &queries, threads, run);
    let clients = 2 * threads;
    let flight_qps = flight_throughput(&address, &queries, clients, run).await;
    let http_qps = http_throughput(&http_address, &queries, clients, run).await;
    println!(
        "throughput, every core busy: bare usearch {bare_qps:.0} QPS ({threads} threads), Flight SQL prepared \
         {flight_qps:.0} QPS ({clients} clients): {:.2} of bare, HTTP with the vector bound {http_qps:.0} QPS: {:.2}; \
         target >= 0.5",
        flight_qps / bare_qps,
        http_qps / bare_qps
    );

    // Commit cost in the same index: a streaming-sized upsert of 10 rows is committed as a
    // delta (only its rows written) vs a full commit of every row and the graph (what a
    // DELETE does, and what every commit did before deltas).
    let small_batch = |start: usize, rng: &mut Rng| {
        index_rows(
            &index,
            (start..start + 10).map(|i| format!("new-{i}")).collect(),
            vec![0; 10],
            (0..10).flat_map(|_| rng.clustered_vector(&centroids)).collect(),
        )
    };
    let mut delta_ms = Vec::new();
    for round in 0..10 {
        let batch = small_batch(round * 10, &mut rng);
        let started = Instant::now();
        index.upsert(&[batch]).unwrap();
        delta_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    assert_eq!(index.manifest().deltas.len(), 10, "small upserts commit as deltas");
    let started = Instant::now();
    index
        .delete(&|b: &RecordBatch| {
            let ids = datafusion::arrow::array::AsArray::as_string::<i32>(b.column(0));
            Ok(ids.iter().map(|id| Some(id == Some("new-0"))).collect())
        })
        .unwrap();
    let full_ms = started.elapsed().as_secs_f64() * 1e3;
    delta_ms.sort_by(f64::total_cmp);
    let delta50 = percentile(&delta_ms, 0.5);
    println!(
        "commit into {count} rows: 10-row upsert (delta) p50 {delta50:.1} ms vs full commit {full_ms:.1} ms ({:.0}x less)",
        full_ms / delta50
    );

    // A stream of 10-row micro-batch commits, one every 20 ms, across several compactions:
    // inline (the commit that finds the deltas grown rewrites everything) vs in the background
    // (a compactor thread rewrites a snapshot; commits only ever write deltas).
    let stream = |background: bool, first: usize, rng: &mut Rng| {
        index.set_background_compaction(background);
        index.set_background_indexing(background);
        // What the engine does after each commit: insert the vectors it left out of the graph,
        // and make room in the commit log.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let indexer = background.then(|| {
            let (index, stop) = (index.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if index.log_upkeep_due() {
                        index.upkeep_log().unwrap();
                    } else if index.backlog_due() {
                        index.index_backlog().unwrap();
                    } else {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        });
        let mut ms = Vec::new();
        let mut compactor: Option<std::thread::JoinHandle<bool>> = None;
        let mut compactions = 0;
        for round in 0..150 {
            let batch = small_batch(first + round * 10, rng);
            let started = Instant::now();
            index.upsert(&[batch]).unwrap();
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            if compactor.as_ref().is_some_and(|c| c.is_finished()) {
                compactions += usize::from(compactor.take().unwrap().join().unwrap());
            }
            if background && compactor.is_none() && index.compaction_due() {
                let index = index.clone();
                compactor = Some(std::thread::spawn(move || index.compact().unwrap()));
            }
            std::thread::sleep(Duration::from_millis(20).saturating_sub(started.elapsed()));
        }
        if let Some(c) = compactor {
            compactions += usize::from(c.join().unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(indexer) = indexer {
            indexer.join().unwrap();
        }
        ms.sort_by(f64::total_cmp);
        (percentile(&ms, 0.5), percentile(&ms, 0.99), compactions)
    };
    let (inline50, inline99, _) = stream(false, 10_000, &mut rng);
    let (background50, background99, compactions) = stream(true, 20_000, &mut rng);
    index.set_background_compaction(false);
    index.set_background_indexing(false);
    index.index_backlog().unwrap();
    println!(
        "micro-batch commits (10 rows every 20 ms, 150 of them) into {count} rows: inline compaction p50 {inline50:.1} ms, \
         p99 {inline99:.1} ms ({:.1}x p50) vs background compaction ({compactions} ran) p50 {background50:.1} ms, \
         p99 {background99:.1} ms ({:.1}x p50, target <= 2; vectors inserted by a background thread)",
        inline99 / inline50,
        background99 / background50
    );

    // Search latency while full commits of the whole index run back to back, against idle
    // (same queries, same session): a commit must not make searches wait.
    let sql_of = |q: &[f32]| format!("SELECT doc_id, score FROM vector_search(bench, {}, 10)", literal(q));
    let mut idle_us = Vec::new();
    for q in &queries {
        let started = Instant::now();
        engine.sql(&sql_of(q)).await.unwrap();
        idle_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let committer = {
        let (index, stop, done) = (index.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut commits = 0;
            while !stop.load(Ordering::Relaxed) {
                let doomed = format!("doc-{commits}");
                index
                    .delete(&|b: &RecordBatch| {
                        let ids = datafusion::arrow::array::AsArray::as_string::<i32>(b.column(0));
                        Ok(ids.iter().map(|id| Some(id == Some(doomed.as_str()))).collect())
                    })
                    .unwrap();
                commits += 1;
                done.store(commits, Ordering::Relaxed);
            }
            commits
        })
    };
    // At least 500 searches, and until three full commits have run under them.
    let mut busy_us = Vec::new();
    for q in queries.iter().cycle() {
        if busy_us.len() >= queries.len() && done.load(Ordering::Relaxed) >= 3 {
            break;
        }
        let started = Instant::now();
        engine.sql(&sql_of(q)).await.unwrap();
        busy_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    stop.store(true, Ordering::Relaxed);
    let commits = committer.join().unwrap();
    let (_, idle99) = summary("SQL vector_search, idle", idle_us);
    let (_, busy99) = summary("SQL vector_search, during full commits", busy_us);
    println!(
        "search p99 during {commits} full commits of {count} rows / idle: {:.2}x (target <= 2)",
        busy99 / idle99
    );
}
