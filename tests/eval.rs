//! `mkflow eval` end to end on a tiny BEIR dataset made from the sample corpus.

mod common;

use common::*;
use mkflow::eval::{EvalOptions, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_on_a_tiny_dataset_writes_reports_and_scores_title_queries_high() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_beir(dir.path(), 60);

    let engine = engine(&dir.path().join("data")).await;
    let out = dir.path().join("reports");
    let options = EvalOptions {
        dataset: dataset.clone(),
        split: "test".into(),
        modes: vec![Mode::Doc, Mode::Exact],
        out_dir: out.clone(),
        max_queries: None,
        judge_queries: None,
        latent_model: None,
    };
    let report = mkflow::eval::run(&engine, &options).await.unwrap();
    assert_eq!(report.documents, 60);
    assert_eq!(report.queries, 20);
    assert!(report.build_seconds > 0.0);
    assert!(report.ann_recall_at_10.unwrap() >= 0.99);
    let doc = &report.modes[0];
    assert_eq!(doc.mode, "doc");
    assert!(doc.ndcg_at_10 > 0.8, "nDCG@10 {}", doc.ndcg_at_10);
    assert!(doc.recall_at_100 > 0.95);
    assert!((doc.ndcg_at_10 - report.modes[1].ndcg_at_10).abs() < 0.02);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["modes"][0]["mode"], "doc");
    let trec = std::fs::read_to_string(out.join("run-doc.trec")).unwrap();
    let first = trec.lines().next().unwrap();
    assert_eq!(first.split(' ').count(), 6, "{first}");
    assert!(
        std::fs::read_to_string(out.join("chart.svg"))
            .unwrap()
            .starts_with("<svg")
    );

    // A second run reuses the index.
    let again = mkflow::eval::run(&engine, &options).await.unwrap();
    assert_eq!(again.build_seconds, 0.0);
    assert_eq!(again.modes[0].ndcg_at_10, doc.ndcg_at_10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judging_with_the_embedded_generator_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_beir(dir.path(), 9);
    let engine = engine(&dir.path().join("data")).await;
    let options = EvalOptions {
        dataset,
        split: "test".into(),
        modes: vec![Mode::Doc],
        out_dir: dir.path().join("reports"),
        max_queries: None,
        judge_queries: Some(2),
        latent_model: None,
    };
    let error = mkflow::eval::run(&engine, &options).await.unwrap_err().to_string();
    assert!(error.contains("MKFLOW_GENERATOR=local"), "{error}");
    assert!(engine.index("eval_tiny_mk").is_none(), "nothing was built");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latent_mode_searches_a_second_index_embedded_by_the_named_model() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = tiny_beir(dir.path(), 30);
    let engine = engine(&dir.path().join("data")).await;
    let model = engine.models().default_model().spec().name.clone();
    let options = |modes: Vec<Mode>, latent_model: Option<&str>| EvalOptions {
        dataset: dataset.clone(),
        split: "test".into(),
        modes,
        out_dir: dir.path().join("reports"),
        max_queries: None,
        judge_queries: None,
        latent_model: latent_model.map(str::to_string),
    };

    // Refused before any work: no model named, or one that is not installed.
    let error = mkflow::eval::run(&engine, &options(vec![Mode::Latent], None))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--latent-model"), "{error}");
    let error = mkflow::eval::run(&engine, &options(vec![Mode::Latent], Some("no-such-model")))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("'no-such-model'") && error.contains(&model), "{error}");
    // The explicit mode needs an LLM; the engine's generator is the embedded one.
    let error = mkflow::eval::run(&engine, &options(vec![Mode::Explicit], None))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("MKFLOW_GENERATOR=local"), "{error}");
    assert!(
        engine.index_names().is_empty(),
        "nothing was built: {:?}",
        engine.index_names()
    );

    // With the session's own model as the latent one, both indexes rank alike.
    let report = mkflow::eval::run(&engine, &options(vec![Mode::Doc, Mode::Latent], Some(&model)))
        .await
        .unwrap();
    let latent_kb = format!("eval_tiny_latent_{}", model.to_lowercase().replace(['-', '.'], "_"));
    let latent = engine
        .index(&latent_kb)
        .unwrap_or_else(|| panic!("{latent_kb} in {:?}", engine.index_names()));
    assert_eq!((latent.len(), latent.manifest().model), (30, model.clone()));
    let (doc, latent) = (&report.modes[0], &report.modes[1]);
    assert_eq!((doc.mode.as_str(), latent.mode.as_str()), ("doc", "latent"));
    assert!(latent.ndcg_at_10 > 0.8, "{latent:?}");
    assert!((doc.ndcg_at_10 - latent.ndcg_at_10).abs() < 0.02, "{doc:?} {latent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_reasoning_is_refused_with_the_embedded_generator_and_for_a_vector() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(&dir.path().join("data")).await;
    engine
        .run_script(
            "setup",
            &format!(
                "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
                   STORED AS JSONL LOCATION '{}';
                 CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'kb';
                 INSERT INTO kb SELECT doc_id, title, body, embed(body) FROM docs LIMIT 5;",
                sample_corpus().display()
            ),
            |_| {},
        )
        .await
        .unwrap();
    let error = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'vitamin D', 3, reasoning => 'explicit')")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("mkflow.generator = 'local'"), "{error}");
    let error = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'vitamin D', 3, reasoning => 'deep')")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("'none' or 'explicit'"), "{error}");
    let error = engine
        .sql("SELECT doc_id FROM vector_search(kb, [0.1, 0.2], 3, reasoning => 'explicit')")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("needs a query text"), "{error}");
    // 'none' is the plain search, without a rationale column.
    let plain = engine
        .sql("SELECT * FROM vector_search(kb, 'vitamin D', 3, reasoning => 'none')")
        .await
        .unwrap();
    assert_eq!(row_count(&plain), 3);
    assert!(plain[0].schema().field_with_name("rationale").is_err());
}
