//! Decoder runtime benchmarks (run: `cargo bench --profile dev --bench decoder`).
//!
//! 1. Latent-reasoning (LaSER, K = 3) ÷ plain last-token (K = 0) encode time on the same
//!    backbone, at batch 1, 8 and 32 (SciFact abstracts cut to `MKFLOW_BENCH_TOKENS` tokens,
//!    default 64).
//! 2. Generation throughput (greedy tokens per second) at batch 1 and 8.
//!
//! Backbone: the default local LLM (SmolLM2-135M-Instruct, installed by `mkflow models pull
//! --llm` and pulled here when missing), or the export in `MKFLOW_BENCH_DECODER`.
//! `MKFLOW_BENCH_DEVICE=cuda` runs on the GPU (with `ORT_DYLIB_PATH` pointing at onnxruntime-gpu's
//! library).

use std::path::{Path, PathBuf};
use std::time::Instant;

use mkflow::{assets, llm_assets};
use mkflow_udfs::Device;
use mkflow_udfs::decoder::{DecoderModel, Graph, Sampling};
use tokenizers::{Tokenizer, TruncationParams};

fn texts(limit: usize) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    std::fs::read_to_string(path)
        .expect("sample corpus")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}. {}",
                v["title"].as_str().unwrap_or(""),
                v["body"].as_str().unwrap_or("")
            )
        })
        .take(limit)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let home = assets::home_dir();
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        assets::pull(&home, &mut |l| eprintln!("{l}")).expect("assets");
    }
    let dir: PathBuf = match std::env::var_os("MKFLOW_BENCH_DECODER") {
        Some(d) => d.into(),
        None => llm_assets::pull_llm(&home, "smollm2-135m", &mut |l| eprintln!("{l}")).expect("local LLM"),
    };
    let device: Device = std::env::var("MKFLOW_BENCH_DEVICE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or_default();
    let max_tokens: usize = std::env::var("MKFLOW_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ort = assets::onnx_runtime_path(&home);
    let latent = DecoderModel::load(&dir, Graph::Latent, threads, device, Some(&ort)).expect("latent graph");
    let config = latent.config().clone();
    println!(
        "decoder bench: {} ({} layers, hidden {}, {}), device {}, {threads} threads, texts cut to {max_tokens} tokens",
        dir.display(),
        config.num_layers,
        config.hidden_size,
        config.dtype,
        latent.device()
    );

    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .unwrap();
    let corpus = texts(32);
    let ids: Vec<Vec<u32>> = corpus
        .iter()
        .map(|t| tokenizer.encode(t.as_str(), true).unwrap().get_ids().to_vec())
        .collect();

    println!("\n1. latent (K=3) vs plain (K=1, last-token) encode, same weights");
    println!("{:>6} {:>12} {:>12} {:>8}", "batch", "K=1 ms", "K=3 ms", "ratio");
    for batch_size in [1usize, 8, 32] {
        let batch: Vec<&[u32]> = ids.iter().take(batch_size).map(Vec::as_slice).collect();
        let reps = if batch_size == 32 { 3 } else { 5 };
        let time = |steps: usize| {
            latent.latent_embeddings(&batch, steps).unwrap(); // warm-up
            median(
                (0..reps)
                    .map(|_| {
                        let started = Instant::now();
                        latent.latent_embeddings(&batch, steps).unwrap();
                        started.elapsed().as_secs_f64() * 1000.0
                    })
                    .collect(),
            )
        };
        let plain = time(1);
        let thinking = time(3);
        println!(
            "{batch_size:>6} {plain:>12.1} {thinking:>12.1} {:>8.2}",
            thinking / plain
        );
    }
    drop(latent);

    println!("\n2. generation (greedy), prompt = a sample abstract");
    let generator = DecoderModel::load(&dir, Graph::Generation, threads, device, Some(&ort)).expect("generation graph");
    let new_tokens = 64;
    println!(
        "{:>6} {:>10} {:>12} {:>10}",
        "batch", "prefill ms", "new tokens", "tok/s"
    );
    for batch_size in [1usize, 8] {
        let batch: Vec<&[u32]> = ids.iter().take(batch_size).map(Vec::as_slice).collect();
        let sampling = Sampling {
            max_new_tokens: new_tokens,
            // Rows may end early at the model's end-of-sequence token; rates count what was produced.
            stop_tokens: Vec::new(),
            ..Sampling::default()
        };
        let prefill_only = Sampling {
            max_new_tokens: 1,
            ..sampling.clone()
        };
        generator.generate(&batch, &prefill_only).unwrap(); // warm-up
        let started = Instant::now();
        generator.generate(&batch, &prefill_only).unwrap();
        let prefill = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let out = generator.generate(&batch, &sampling).unwrap();
        let total = started.elapsed().as_secs_f64();
        let produced: usize = out.iter().map(|g| g.tokens.len()).sum();
        // Decode throughput: tokens after the first, over the time after the prefill.
        let decode_rate = (produced - batch_size) as f64 / (total - prefill).max(1e-9);
        println!(
            "{batch_size:>6} {:>10.1} {produced:>12} {decode_rate:>10.1}",
            prefill * 1000.0
        );
    }
}
