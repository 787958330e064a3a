//! Fuzzing the request → SQL surface of the real `mkflow serve`: statements drawn from a
//! grammar of mkflow's functions and tables with wrong argument counts and types, huge
//! literals, deep nesting, random bytes and bad UTF-8, sent by a reader and an admin for a
//! bounded time. Every answer must be a 200, or a 4xx with a JSON message; never a 5xx, a
//! dropped connection, a panic or an abort — the server must be running at the end.
//!
//! `MKFLOW_FUZZ_SECONDS` sets the time (default 45 s); `MKFLOW_FUZZ_SEED` replays a run.

mod common;
#[path = "common/server.rs"]
mod server;

use std::time::{Duration, Instant};

use serde_json::Value;
use server::{Server, mkflow};

const READER: &str = "fuzz-reader";
const ADMIN: &str = "fuzz-admin";

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const TABLES: &[&str] = &[
    "kb",
    "kb_questions",
    "ckb",
    "ckb_chunks",
    "no_such_kb",
    "dead_letters",
    "information_schema.tables",
    "datafusion.public.kb",
    "\"kb\"",
];
const SEARCHES: &[&str] = &[
    "vector_search",
    "qa_search",
    "mk_search",
    "mk_answer",
    "text_search",
    "qa_text_search",
    "hybrid_search",
    "qa_hybrid_search",
    "chunk_search",
    "chunk_text_search",
    "chunk_hybrid_search",
    "rrf",
    "generate_series",
    "range",
];
const FUNCTIONS: &[&str] = &[
    "embed",
    "mk_cluster",
    "mk_metadata",
    "mk_qa",
    "repeat",
    "lpad",
    "rpad",
    "replace",
    "concat",
    "array_repeat",
    "range",
    "length",
    "upper",
    "cosine_distance",
    "array_resize",
    "regexp_replace",
    "to_hex",
    "chunk",
    "rerank",
    "vector_search",
    "named_arg",
];

/// One argument of any kind.
fn argument(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth > 3 { 16 } else { 20 }) {
        0 => rng.pick(TABLES).to_string(),
        1 => "'gene therapy'".into(),
        2 => "''".into(),
        3 => rng
            .pick(&[
                "0",
                "1",
                "3",
                "-1",
                "10000",
                "10001",
                "1000000000000",
                "9223372036854775807",
            ])
            .into(),
        4 => rng.pick(&["1.5", "-0.0", "1e308", "'NaN'", "NULL", "TRUE"]).into(),
        5 => vector(rng),
        6 => format!("'{}'", "x".repeat(rng.below(70_000))),
        7 => rng.pick(&["doc_id", "title", "embedding", "score", "nope"]).into(),
        8 => "'it''s -- not /* a comment */'".into(),
        9 => "'[1,2,3]'".into(),
        10 => "ARRAY[]".into(),
        11 => "CAST(NULL AS VARCHAR)".into(),
        12 => "'😀 ünïcödé'".into(),
        13 => format!("{}", rng.next() as i64),
        14 => rng
            .pick(&[
                "k => 60.0",
                "k => 0",
                "join_key => 'doc_id'",
                "join_key => 'nope'",
                "syntax => 'tantivy'",
                "syntax => 1",
                "rank_weight => 2",
                "questions => false",
                "rerank => 5",
                "rerank => 0",
                "reranker => 'x'",
                "nope => 1",
            ])
            .into(),
        15 => rng
            .pick(&[
                "'+gene -therapy \"a phrase'",
                "'title:(gene OR'",
                "'gene^2 body:therapy'",
                "'*'",
            ])
            .into(),
        16 => format!("{}(kb, {})", rng.pick(SEARCHES), argument(rng, depth + 1)),
        17 => format!("({})", select(rng, depth + 1)),
        18 => call(rng, depth + 1),
        _ => format!("{}({})", rng.pick(FUNCTIONS), argument(rng, depth + 1)),
    }
}

/// A vector literal: the index's dimension or not.
fn vector(rng: &mut Rng) -> String {
    let dims = *[0usize, 1, 2, 383, 384, 385, 5000].get(rng.below(7)).unwrap();
    let value = rng.pick(&["0.1", "-1", "1e39", "0"]);
    format!("[{}]", vec![value; dims].join(","))
}

/// A function call with 0 to 5 arguments of any kind.
fn call(rng: &mut Rng, depth: usize) -> String {
    let args: Vec<String> = (0..rng.below(6)).map(|_| argument(rng, depth)).collect();
    format!("{}({})", rng.pick(FUNCTIONS), args.join(", "))
}

/// A `SELECT` over a table or a table function.
fn select(rng: &mut Rng, depth: usize) -> String {
    let source = if rng.chance(60) {
        let args: Vec<String> = (0..rng.below(6)).map(|_| argument(rng, depth)).collect();
        format!("{}({})", rng.pick(SEARCHES), args.join(", "))
    } else {
        rng.pick(TABLES).to_string()
    };
    let projection = if rng.chance(50) {
        "*".to_string()
    } else {
        call(rng, depth)
    };
    let mut sql = format!("SELECT {projection} FROM {source}");
    if rng.chance(30) {
        sql.push_str(&format!(" WHERE {} = {}", argument(rng, depth), argument(rng, depth)));
    }
    if rng.chance(20) {
        sql.push_str(&format!(" ORDER BY {}", argument(rng, depth)));
    }
    if rng.chance(30) {
        sql.push_str(&format!(
            " LIMIT {}",
            rng.pick(&["0", "5", "10000", "1000000000000", "-1"])
        ));
    }
    sql
}

/// A statement a client might send, well-formed or not.
fn statement(rng: &mut Rng) -> Vec<u8> {
    let sql = match rng.below(14) {
        0..=5 => select(rng, 0),
        6 => format!("SELECT {}", call(rng, 0)),
        7 => {
            let depth = rng.below(5000);
            format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth))
        }
        8 => format!("SELECT 1{}", "+1".repeat(rng.below(200_000))),
        9 => rng
            .pick(&[
                "DELETE FROM kb WHERE doc_id = 'nope'",
                "DROP TABLE no_such_kb",
                "SET mkflow.route_clusters = 2",
                "SET mkflow.llm_base_url = 'http://127.0.0.1:9/v1'",
                "CREATE EXTERNAL TABLE x (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION '/etc/hostname'",
                "CREATE EXTERNAL TABLE y STORED AS KB LOCATION '../y'",
                "INSERT INTO kb SELECT * FROM kb WHERE false",
                "COPY (SELECT 1) TO '/tmp/fuzz.csv'",
                "EXPLAIN ANALYZE SELECT * FROM vector_search(kb, 'x', 3)",
                "SHOW TABLES",
                "BEGIN",
                "PREPARE p AS SELECT $1",
            ])
            .to_string(),
        10 => {
            // Random bytes, often not UTF-8.
            return (0..rng.below(2000)).map(|_| rng.next() as u8).collect();
        }
        11 => {
            let mut sql = select(rng, 0).into_bytes();
            let at = rng.below(sql.len() + 1);
            sql.insert(at, 0xff);
            return sql;
        }
        12 => format!("{}; {}", select(rng, 0), select(rng, 0)),
        _ => {
            let sql = select(rng, 0);
            let cut = rng.below(sql.len() + 1);
            sql.chars().take(cut).collect()
        }
    };
    sql.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_get_an_answer_and_never_bring_the_server_down() {
    let seconds: u64 = std::env::var("MKFLOW_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed: u64 = std::env::var("MKFLOW_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_f00d_d00d);
    eprintln!("fuzzing for {seconds} s with MKFLOW_FUZZ_SEED={seed}");
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    {
        let lines: Vec<&str> = include_str!("../data/sample/scifact-sample.jsonl")
            .lines()
            .take(20)
            .collect();
        let corpus = work.path().join("corpus.jsonl");
        std::fs::write(&corpus, lines.join("\n")).unwrap();
        let engine = common::engine(&data).await;
        common::ingest(&engine, &corpus).await;
        engine
            .run_script(
                "chunked",
                "CREATE EXTERNAL TABLE ckb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
                   STORED AS KB LOCATION 'ckb' OPTIONS ('chunk_tokens' '64');
                 INSERT INTO ckb SELECT doc_id, title, body, NULL FROM kb;",
                |_| {},
            )
            .await
            .unwrap();
    }
    let config = work.path().join("mkflow.toml");
    std::fs::write(
        &config,
        "[server]\nquery_timeout_secs = 5\nmax_query_memory = 100000000\nmax_value_bytes = 50000000\n",
    )
    .unwrap();
    let mut command = mkflow(&data);
    command
        .env("MKFLOW_AUTH_TOKEN", READER)
        .env("MKFLOW_ADMIN_TOKEN", ADMIN);
    let mut server = Server::start(command, &["--config", config.to_str().unwrap()]).await;

    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut sent, mut answered, mut refused) = (0usize, 0usize, 0usize);
    while Instant::now() < deadline {
        let body = statement(&mut rng);
        let token = if rng.chance(50) { READER } else { ADMIN };
        let mut request = server
            .client
            .post(format!("{}/v1/sql", server.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(60));
        request = if rng.chance(10) {
            // The same statement as JSON, sometimes broken.
            let text = String::from_utf8_lossy(&body).to_string();
            let json = if rng.chance(30) {
                format!("{{\"sql\": {}", serde_json::to_string(&text).unwrap())
            } else {
                serde_json::json!({ "sql": text }).to_string()
            };
            request.header("content-type", "application/json").body(json)
        } else {
            request.body(body.clone())
        };
        sent += 1;
        let shown = String::from_utf8_lossy(&body).chars().take(300).collect::<String>();
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {sent} got no answer ({e}): {shown}"));
        let status = response.status().as_u16();
        let answer: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("request {sent}: status {status} without a JSON body ({e}): {shown}"));
        match status {
            200 => answered += 1,
            400 | 403 | 408 | 413 => {
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    !message.is_empty(),
                    "request {sent}: {status} without a message: {shown}"
                );
                refused += 1;
            }
            _ => panic!("request {sent}: status {status} ({answer}) for: {shown}"),
        }
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server exited after request {sent}: {shown}"
        );
    }
    eprintln!("{sent} requests: {answered} answered, {refused} refused with a 4xx");
    assert!(sent >= 50, "only {sent} requests in {seconds} s");
    assert!(answered > 0 && refused > 0);
    assert_eq!(server.get("/healthz").await.status(), 200);
}
