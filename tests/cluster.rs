//! Cluster mode: three `mkflow serve --worker` processes, each holding a third of the sample
//! documents as its shard of `kb`, and a `mkflow serve --coordinator` over them, answer as one
//! server holding every document does (the same rows and scores for an exact vector search,
//! scans, filters and aggregates), refuse a coordinator without the workers' token, and answer
//! 503 naming the worker that is gone.

mod common;
#[path = "common/server.rs"]
mod server;

use std::path::Path;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use futures::TryStreamExt;
use server::{Server, free_port, mkflow, write_title_pipeline};

const TOKEN: &str = "cluster-token";

/// Writes the sample documents whose line number `i` satisfies `keep(i)` to `path`.
fn write_part(path: &Path, keep: impl Fn(usize) -> bool) -> usize {
    let text = std::fs::read_to_string(common::sample_corpus()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, l)| l)
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    lines.len()
}

/// `mkflow serve` over an index `kb` of the documents in `docs`, with `args`; waits until the
/// index is loaded.
async fn node(work: &Path, name: &str, docs: Option<&Path>, args: &[&str]) -> Server {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut serve_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(docs) = docs {
        let pipeline = dir.join("load.sql");
        write_title_pipeline(&pipeline, docs);
        serve_args.extend(["--pipeline".to_string(), pipeline.display().to_string()]);
    }
    let mut command = mkflow(&dir.join("data"));
    command
        .env("MKFLOW_AUTH_TOKEN", TOKEN)
        .env("MKFLOW_CLUSTER_TOKEN", TOKEN);
    let refs: Vec<&str> = serve_args.iter().map(String::as_str).collect();
    let server = Server::start(command, &refs).await;
    server.wait_for("/readyz", Duration::from_secs(120)).await;
    server
}

/// Runs `sql` through `POST /v1/sql`: the rows in one batch, or the status and message.
async fn query(server: &Server, sql: &str) -> Result<RecordBatch, String> {
    let batches = server.sql_arrow(TOKEN, sql).await?;
    Ok(concat_batches(&batches[0].schema(), &batches).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_over_three_workers_answers_as_one_node_holding_every_document() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let all = work.join("all.jsonl");
    let total = write_part(&all, |_| true);
    let mut workers = Vec::new();
    let mut addresses = Vec::new();
    for shard in 0..3 {
        let part = work.join(format!("part-{shard}.jsonl"));
        write_part(&part, |i| i % 3 == shard);
        let address = format!("127.0.0.1:{}", free_port());
        let worker = node(
            work,
            &format!("worker-{shard}"),
            Some(&part),
            &["--flight-listen", &address, "--worker"],
        )
        .await;
        workers.push(worker);
        addresses.push(address);
    }
    let single = node(work, "single", Some(&all), &[]).await;
    let map = work.join("cluster.toml");
    let shards: String = addresses
        .iter()
        .map(|a| format!("[[shards]]\ntable = \"kb\"\nworker = \"{a}\"\n"))
        .collect();
    std::fs::write(&map, format!("token_env = \"MKFLOW_CLUSTER_TOKEN\"\n{shards}")).unwrap();
    let coordinator_flight = format!("127.0.0.1:{}", free_port());
    let coordinator = node(
        work,
        "coordinator",
        None,
        &[
            "--coordinator",
            map.to_str().unwrap(),
            "--flight-listen",
            &coordinator_flight,
        ],
    )
    .await;

    // The same rows, in the same order, with the same scores (each shard searches exactly at
    // this size; the coordinator keeps the best k of the shards' top-k).
    for sql in [
        "SELECT doc_id, title, score FROM vector_search(kb, 'protein folding in cells', 5)",
        "SELECT doc_id, score FROM vector_search(kb, 'stem cell therapy', 12) WHERE doc_id > '3'",
        "SELECT title FROM vector_search(kb, 'cancer immunotherapy') LIMIT 3",
        "SELECT count(*) AS n FROM kb",
        "SELECT doc_id, title FROM kb WHERE title LIKE '%cell%' ORDER BY doc_id",
        "SELECT substr(doc_id, 1, 1) AS first, count(*) AS n FROM kb GROUP BY 1 ORDER BY 1",
    ] {
        let merged = query(&coordinator, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let one = query(&single, sql).await.unwrap();
        assert_eq!(merged.columns(), one.columns(), "{sql}");
    }
    let count = query(&coordinator, "SELECT count(*) AS n FROM kb").await.unwrap();
    assert_eq!(
        count
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap()
            .value(0),
        total as i64
    );
    // The search runs on the workers, one task per worker, merged on the coordinator (which
    // has no shard of its own: a leaf kept there fails).
    let plan = query(
        &coordinator,
        "EXPLAIN ANALYZE SELECT doc_id FROM vector_search(kb, 'protein folding', 5)",
    )
    .await
    .unwrap();
    let text = format!("{plan:?}");
    assert!(text.contains("DistributedExec") && text.contains("ShardExec"), "{text}");
    assert!(text.contains("tasks=3"), "one task per worker: {text}");
    // BM25 scores compare across shards: each shard scores with the statistics of all of them
    // (a first round sums them), so the merged scores are one node's (rows tied on a score may
    // come in another order).
    for sql in [
        "SELECT score FROM text_search(kb, 'cell', 8)",
        "SELECT score FROM text_search(kb, 'protein folding stem cells', 10)",
    ] {
        let merged = query(&coordinator, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(merged.columns(), query(&single, sql).await.unwrap().columns(), "{sql}");
    }
    let sql = "SELECT doc_id, fused_score FROM hybrid_search(kb, 'stem cells', 6)";
    let found = query(&coordinator, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(found.num_rows(), 6, "{sql}");
    // Functions that do not run across shards yet say so.
    let refused = query(&coordinator, "SELECT * FROM mk_search(kb, 'protein', 3)")
        .await
        .unwrap_err();
    assert!(refused.contains("is sharded"), "{refused}");
    let refused = query(
        &coordinator,
        "SELECT * FROM rrf(vector_search(kb, 'protein', 5), text_search(kb, 'protein', 5))",
    )
    .await
    .unwrap_err();
    assert!(
        refused.starts_with("400") && refused.contains("'kb' is sharded") && refused.contains("rrf"),
        "{refused}"
    );

    // A coordinator whose token the workers do not accept is refused, and says why.
    std::fs::write(
        work.join("wrong.toml"),
        std::fs::read_to_string(&map)
            .unwrap()
            .replace("MKFLOW_CLUSTER_TOKEN", "WRONG_TOKEN"),
    )
    .unwrap();
    let mut command = mkflow(&work.join("wrong").join("data"));
    command
        .env("MKFLOW_AUTH_TOKEN", TOKEN)
        .env("WRONG_TOKEN", "not-the-token");
    let wrong = Server::start(command, &["--coordinator", work.join("wrong.toml").to_str().unwrap()]).await;
    let error = query(&wrong, "SELECT doc_id FROM vector_search(kb, 'protein', 3)")
        .await
        .unwrap_err();
    assert!(error.contains("token"), "{error}");

    // A worker gone: 503, naming its shard and address.
    drop(workers.remove(1));
    let error = query(&coordinator, "SELECT count(*) FROM kb").await.unwrap_err();
    assert!(
        error.starts_with("503") && error.contains("shard kb-1 of kb") && error.contains(&addresses[1]),
        "{error}"
    );
    // The coordinator's /readyz tells each shard's state, and stays ready.
    let response = coordinator.get("/readyz").await;
    assert_eq!(response.status().as_u16(), 200);
    let ready: serde_json::Value = response.json().await.unwrap();
    assert_eq!(ready["shards"]["kb-0"], "ready", "{ready}");
    let gone = ready["shards"]["kb-1"].as_str().unwrap_or_default();
    assert!(
        gone.starts_with("unreachable") && gone.contains(&addresses[1]),
        "{ready}"
    );
    // Over Flight SQL, a client that allows a partial answer gets the other shards' rows, and
    // the info's app metadata names the shard left out.
    let channel = tonic::transport::Channel::from_shared(format!("http://{coordinator_flight}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut flight = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    flight.set_token(TOKEN.to_string());
    let refused = flight.execute("SELECT count(*) AS n FROM kb".into(), None).await;
    assert!(
        refused.unwrap_err().to_string().contains("kb-1"),
        "no partial answer unless asked"
    );
    flight.set_header("mkflow-allow-partial", "true");
    let info = flight
        .execute("SELECT count(*) AS n FROM kb".into(), None)
        .await
        .unwrap();
    let metadata: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(metadata["partial"]["missing_shards"][0]["shard"], "kb-1", "{metadata}");
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> = flight.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    let n = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n as usize, total - total / 3, "the rows of the two shards left");

    // No shard left: even a request that allows a partial answer gets a 503 saying so.
    workers.clear();
    let response = coordinator
        .client
        .post(format!("{}/v1/sql", coordinator.base))
        .bearer_auth(TOKEN)
        .header("mkflow-allow-partial", "true")
        .body("SELECT doc_id FROM vector_search(kb, 'protein', 3)")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert!(
        status == 503 && text.contains("no shard of 'kb' is reachable"),
        "{status}: {text}"
    );
}
