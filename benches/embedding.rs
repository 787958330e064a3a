//! Embedding throughput benchmarks (run: `cargo bench --bench embedding`).
//!
//! 1. The SQL pipeline (`SELECT embed(text) FROM docs` through DataFusion) against a bare `ort`
//!    loop on the same texts, model and thread count (target: ratio ≥ 0.95).
//! 2. Token-budget batching against fixed-size batches of 32 on mixed-length texts.
//!
//! Texts: SciFact abstracts from `../shared/data/beir/scifact` when present, else the bundled
//! sample. Set `MKFLOW_BENCH_DOCS` to change how many (default 1000).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use mkflow::{Engine, EngineConfig, assets};
use mkflow_udfs::{BatchingStrategy, Embedder};
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use tokenizers::TruncationParams;

fn load_texts(limit: usize) -> Vec<String> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/beir/scifact/corpus.jsonl");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    let (path, title_key, body_key) = if shared.is_file() {
        (shared, "title", "text")
    } else {
        (sample, "title", "body")
    };
    let text = std::fs::read_to_string(&path).expect("corpus readable");
    let docs: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            format!(
                "{}. {}",
                v[title_key].as_str().unwrap_or(""),
                v[body_key].as_str().unwrap_or("")
            )
        })
        .collect();
    docs.iter().cycle().take(limit).cloned().collect()
}

/// The baseline: what a user writes with ort directly — input-order batches of 32, padded to
/// the longest, mean pooling, L2 normalisation.
fn bare_ort_loop(session: &mut Session, tokenizer: &tokenizers::Tokenizer, texts: &[String]) -> usize {
    let mut produced = 0;
    for chunk in texts.chunks(32) {
        let encodings = tokenizer
            .encode_batch_fast(chunk.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .unwrap();
        let width = encodings.iter().map(|e| e.get_ids().len()).max().unwrap();
        let rows = encodings.len();
        let mut ids = vec![0i64; rows * width];
        let mut mask = vec![0i64; rows * width];
        let types = vec![0i64; rows * width];
        for (r, e) in encodings.iter().enumerate() {
            for (c, &id) in e.get_ids().iter().enumerate() {
                ids[r * width + c] = id as i64;
                mask[r * width + c] = 1;
            }
        }
        let shape = [rows, width];
        let inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            (
                "input_ids".into(),
                TensorRef::from_array_view((shape, &ids[..])).unwrap().into(),
            ),
            (
                "attention_mask".into(),
                TensorRef::from_array_view((shape, &mask[..])).unwrap().into(),
            ),
            (
                "token_type_ids".into(),
                TensorRef::from_array_view((shape, &types[..])).unwrap().into(),
            ),
        ];
        let outputs = session.run(inputs).unwrap();
        let (out_shape, hidden) = outputs[0].try_extract_tensor::<f32>().unwrap();
        let dims = out_shape[2] as usize;
        for r in 0..rows {
            let mut pooled = vec![0f32; dims];
            let mut n = 0f32;
            for c in 0..width {
                if mask[r * width + c] == 1 {
                    let t = &hidden[(r * width + c) * dims..(r * width + c + 1) * dims];
                    pooled.iter_mut().zip(t).for_each(|(p, v)| *p += v);
                    n += 1.0;
                }
            }
            let norm = pooled.iter().map(|x| (x / n) * (x / n)).sum::<f32>().sqrt();
            std::hint::black_box(norm);
            produced += 1;
        }
    }
    produced
}

async fn pipeline_docs_per_second(engine: &Engine, texts: &[String]) -> f64 {
    let schema = Arc::new(Schema::new(vec![Field::new("body", DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(texts.to_vec()))]).unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    let ctx = engine.context();
    let _ = ctx.deregister_table("bench_docs");
    ctx.register_table("bench_docs", Arc::new(table)).unwrap();
    // Measure the model, not the recent-texts cache (the corpus repeats, and so do the runs).
    engine.models().default_model().get().unwrap().model().forget_recent();
    let started = Instant::now();
    let batches = engine.sql("SELECT embed(body) AS v FROM bench_docs").await.unwrap();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, texts.len());
    rows as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let home = assets::home_dir();
    assets::pull(&home, &mut |l| eprintln!("{l}")).expect("assets");
    let docs: usize = std::env::var("MKFLOW_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let texts = load_texts(docs);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spec = assets::catalog_spec(&home, &assets::DEFAULT_MODEL);
    println!(
        "embedding benchmark: {} texts, model {}, {threads} intra-op threads",
        texts.len(),
        spec.name
    );

    // Warm both paths once (session creation, allocator warm-up).
    let data = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig {
        home: home.clone(),
        default_model: None,
        embed_threads: None,
        until_caught_up: false,
        ..EngineConfig::new(data.path())
    })
    .await
    .unwrap();
    pipeline_docs_per_second(&engine, &texts[..64.min(texts.len())]).await;
    let environment = mkflow_udfs::runtime::init_onnx_runtime(Some(&assets::onnx_runtime_path(&home))).unwrap();
    let mut session = Session::builder(environment)
        .unwrap()
        .with_intra_threads(threads)
        .unwrap()
        .commit_from_file(&spec.model_path)
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::from_file(&spec.tokenizer_path).unwrap();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: spec.max_tokens,
            ..Default::default()
        }))
        .unwrap();
    bare_ort_loop(&mut session, &tokenizer, &texts[..64.min(texts.len())]);

    // 1. Pipeline vs bare loop, alternating to share machine noise.
    let mut pipeline = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..3 {
        pipeline.push(pipeline_docs_per_second(&engine, &texts).await);
        let started = Instant::now();
        let n = bare_ort_loop(&mut session, &tokenizer, &texts);
        bare.push(n as f64 / started.elapsed().as_secs_f64());
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!(
        "pipeline embed(): {:.1} docs/s | bare ort loop: {:.1} docs/s | ratio {:.3} (target >= 0.95)",
        best(&pipeline),
        best(&bare),
        best(&pipeline) / best(&bare)
    );

    // 2. Batching strategies on mixed lengths: short queries interleaved with long abstracts.
    let mixed: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 2 == 0 {
                t.split('.').next().unwrap_or(t).to_string()
            } else {
                t.clone()
            }
        })
        .collect();
    let mixed_refs: Vec<Option<&str>> = mixed.iter().map(|t| Some(t.as_str())).collect();
    let mut rates = Vec::new();
    for batching in [BatchingStrategy::default(), BatchingStrategy::FixedSize { size: 32 }] {
        let mut spec = spec.clone();
        spec.batching = batching;
        let embedder = Embedder::load(spec, None).unwrap();
        embedder.embed(&mixed_refs[..32]).unwrap();
        embedder.forget_recent();
        let started = Instant::now();
        embedder.embed(&mixed_refs).unwrap();
        let rate = mixed.len() as f64 / started.elapsed().as_secs_f64();
        println!("batching {batching:?}: {rate:.1} docs/s");
        rates.push(rate);
    }
    println!(
        "token-budget / fixed-size(32) speed-up on mixed lengths: {:.2}x",
        rates[0] / rates[1]
    );
}
