//! Chunked ingest of long documents (run: `cargo bench --profile dev --bench chunking`;
//! `MKFLOW_BENCH_DOCS` sets how many sample abstracts are read, 400 by default).
//!
//! The bundled sample abstracts are joined ten at a time into long Markdown documents (each
//! abstract a `##` section, ~2,500 tokens a document). The same documents are ingested through
//! SQL twice, with the real model:
//! 1. unchunked: `embed(concat_ws('. ', title, body))`, which reads each document's first 256
//!    tokens only;
//! 2. chunked: `OPTIONS ('chunk_tokens' '200')`, every token of every document in a chunk.
//!
//! Reported: documents/s, model tokens/s (the tokens the model read, from its own counters) and
//! the share of the documents' tokens each one embeds. The ratio of tokens/s says what chunking
//! costs per token beyond the embedding itself (cutting, per-chunk rows, the chunks' BM25 index).

use std::time::Instant;

use datafusion::arrow::array::AsArray;
use mkflow::{Engine, EngineConfig, assets};

/// Abstracts per long document.
const SECTIONS: usize = 10;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let abstracts: usize = std::env::var("MKFLOW_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&sample)
        .unwrap()
        .lines()
        .take(abstracts)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("long.jsonl");
    let mut lines = Vec::new();
    for (n, group) in records.chunks(SECTIONS).enumerate() {
        let mut body = String::new();
        for record in group {
            body.push_str(&format!(
                "## {}\n\n{}\n\n",
                record["title"].as_str().unwrap_or(""),
                record["body"].as_str().unwrap_or("")
            ));
        }
        lines.push(
            serde_json::json!({"doc_id": format!("long-{n}"), "title": format!("Collection {n}"), "body": body})
                .to_string(),
        );
    }
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let documents = lines.len();

    let mut results = Vec::new();
    for (name, options, vector) in [
        ("unchunked", "", "embed(concat_ws('. ', title, body))"),
        ("chunked", "OPTIONS ('chunk_tokens' '200')", "NULL"),
    ] {
        let engine = Engine::new(EngineConfig {
            home: assets::home_dir(),
            default_model: None,
            embed_threads: None,
            until_caught_up: false,
            ..EngineConfig::new(dir.path().join(name))
        })
        .await
        .unwrap();
        // Load the model before timing.
        engine.sql("SELECT embed('warm up')").await.unwrap();
        let stats = engine.models().default_model().loaded().unwrap().model().clone();
        stats.forget_recent();
        let before = stats.stats().tokens.load(std::sync::atomic::Ordering::Relaxed);
        let script = format!(
            "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS JSONL LOCATION '{}';
             CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'kb' {options};
             INSERT INTO kb SELECT doc_id, title, body, {vector} FROM docs;",
            corpus.display()
        );
        let started = Instant::now();
        engine.run_script("bench", &script, |_| {}).await.unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let tokens = stats.stats().tokens.load(std::sync::atomic::Ordering::Relaxed) - before;
        // The documents' own tokens, counted with the model's tokenizer (chunk() with no limit
        // past the model's: the sum of its chunks' tokens).
        let counted = engine
            .sql("SELECT sum(c['tokens']) FROM (SELECT unnest(chunk(body)) AS c FROM docs)")
            .await
            .unwrap();
        let text_tokens =
            datafusion::arrow::compute::cast(counted[0].column(0), &datafusion::arrow::datatypes::DataType::Int64)
                .unwrap()
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0) as f64;
        println!(
            "{name:>9}: {documents} documents in {seconds:.1}s ({:.2} docs/s), model read {tokens} tokens ({:.0} tokens/s), {:.0}% of the documents' {text_tokens:.0} tokens embedded",
            documents as f64 / seconds,
            tokens as f64 / seconds,
            100.0 * (tokens as f64 / text_tokens).min(1.0)
        );
        results.push(tokens as f64 / seconds);
    }
    println!(
        "chunked / unchunked model tokens/s: {:.2} (the cost of cutting and of the chunk rows per token embedded)",
        results[1] / results[0]
    );
}
