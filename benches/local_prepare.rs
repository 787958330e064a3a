//! Meta-Knowledge prepare on the local LLM (run: `cargo bench --profile dev --bench local_prepare`).
//!
//! Prepares the first `MKFLOW_BENCH_DOCS` (default 50) SciFact abstracts (`../shared/data/beir/
//! scifact/corpus.jsonl`, else the bundled sample) with the default metadata schema, the way
//! `mk_metadata` / `mk_qa` do, on the local LLM `MKFLOW_BENCH_LLM` (default `qwen2.5-0.5b`,
//! pulled when missing) with constrained decoding, and reports:
//! 1. valid answers (first try, and after the corrective retry), labels in the taxonomy,
//!    questions per document;
//! 2. documents/s, prompt and generated tokens/s, in batches of `MKFLOW_BENCH_BATCH` (default 4);
//! 3. the same first `MKFLOW_BENCH_BASELINE_DOCS` (default 8) documents one at a time (batch 1)
//!    in the same run, so batching is measured as a ratio.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mkflow::{assets, llm_assets};
use mkflow_udfs::Device;
use mkflow_udfs::mk::{Document, FieldKind, Generator, LocalGenerator, LocalSettings, MetadataSchema};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// (title, body) of the first `limit` documents.
fn corpus(limit: usize) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/data/beir/scifact/corpus.jsonl");
    let path = match shared.is_file() {
        true => shared,
        false => root.join("data/sample/scifact-sample.jsonl"),
    };
    eprintln!("documents from {}", path.display());
    std::fs::read_to_string(&path)
        .expect("corpus")
        .lines()
        .take(limit)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = |keys: &[&str]| keys.iter().find_map(|k| v[*k].as_str()).unwrap_or_default().to_string();
            (text(&["title"]), text(&["text", "body"]))
        })
        .collect()
}

/// What one prepare run measured.
struct Run {
    documents: usize,
    valid: usize,
    first_try_invalid: u64,
    questions: usize,
    labels_ok: bool,
    seconds: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    errors: Vec<String>,
}

fn generator(dir: &Path, batch_size: usize) -> LocalGenerator {
    let home = assets::home_dir();
    LocalGenerator::new(
        LocalSettings {
            model_dir: dir.to_path_buf(),
            device: Device::Cpu,
            threads: 0,
            onnx_runtime: Some(assets::onnx_runtime_path(&home)),
            max_new_tokens: 640,
            temperature: 0.0,
            max_questions: 6,
            rewrite_queries: 3,
            batch_size,
            cache_file: None,
        },
        Arc::new(MetadataSchema::default()),
    )
}

async fn prepare(dir: &Path, docs: &[(String, String)], batch_size: usize) -> Run {
    let generator = generator(dir, batch_size);
    let schema = MetadataSchema::default();
    // Load the model before the clock starts.
    let warm = [Document {
        title: Some("Warm-up"),
        body: "Vitamin D.",
    }];
    let _ = generator.prepare(&warm).await;
    let before = generator.stats().counts();
    let documents: Vec<Document<'_>> = docs
        .iter()
        .map(|(title, body)| Document {
            title: Some(title),
            body,
        })
        .collect();
    let start = Instant::now();
    let results = generator.prepare(&documents).await;
    let seconds = start.elapsed().as_secs_f64();
    let after = generator.stats().counts();
    let mut run = Run {
        documents: docs.len(),
        valid: 0,
        first_try_invalid: after.invalid_outputs - before.invalid_outputs,
        questions: 0,
        labels_ok: true,
        seconds,
        prompt_tokens: after.prompt_tokens - before.prompt_tokens,
        completion_tokens: after.completion_tokens - before.completion_tokens,
        errors: Vec::new(),
    };
    for result in results {
        match result {
            Ok(prepared) => {
                run.valid += 1;
                run.questions += prepared.qa.len();
                for field in schema.fields.iter().filter(|f| f.kind == FieldKind::Labels) {
                    let names: Vec<&str> = field.labels.iter().map(|l| l.name.as_str()).collect();
                    let values = prepared.metadata[&field.name].as_array().cloned().unwrap_or_default();
                    run.labels_ok &= values.iter().all(|v| names.contains(&v.as_str().unwrap_or("")));
                }
            }
            Err(e) => run.errors.push(e.to_string()),
        }
    }
    run
}

fn report(label: &str, run: &Run) {
    println!(
        "{label:<22} {:>5} docs  valid {:>3}/{:<3} ({:.0}%)  first-try invalid {:>2}  labels in taxonomy: {}  \
         questions/doc {:.1}  {:.3} docs/s  prompt {:.0} tok/s  generated {:.1} tok/s  ({:.0} s)",
        run.documents,
        run.valid,
        run.documents,
        100.0 * run.valid as f64 / run.documents as f64,
        run.first_try_invalid,
        run.labels_ok,
        run.questions as f64 / run.valid.max(1) as f64,
        run.documents as f64 / run.seconds,
        run.prompt_tokens as f64 / run.seconds,
        run.completion_tokens as f64 / run.seconds,
        run.seconds
    );
    for e in run.errors.iter().take(5) {
        println!("    failed: {e}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let home = assets::home_dir();
    assets::pull(&home, &mut |l| eprintln!("{l}")).expect("assets");
    let name = std::env::var("MKFLOW_BENCH_LLM").unwrap_or_else(|_| "qwen2.5-0.5b".into());
    let dir: PathBuf = llm_assets::pull_llm(&home, &name, &mut |l| eprintln!("{l}")).expect("local LLM");
    let docs = corpus(env_usize("MKFLOW_BENCH_DOCS", 50));
    let batch = env_usize("MKFLOW_BENCH_BATCH", 4);
    let baseline = env_usize("MKFLOW_BENCH_BASELINE_DOCS", 8).min(docs.len());
    println!(
        "local prepare on {} ({} documents, constrained decoding)",
        dir.display(),
        docs.len()
    );
    let batched = prepare(&dir, &docs, batch).await;
    report(&format!("batch {batch}"), &batched);
    if baseline > 0 {
        let one = prepare(&dir, &docs[..baseline], 1).await;
        let same = prepare(&dir, &docs[..baseline], batch).await;
        report("batch 1 (baseline)", &one);
        report(&format!("batch {batch} (same docs)"), &same);
        println!(
            "batching speed-up on the same {baseline} documents: {:.2}x documents/s",
            one.seconds / same.seconds
        );
    }
}
