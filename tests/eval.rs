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
    };
    let error = mkflow::eval::run(&engine, &options).await.unwrap_err().to_string();
    assert!(error.contains("MKFLOW_GENERATOR=local"), "{error}");
    assert!(engine.index("eval_tiny_mk").is_none(), "nothing was built");
}
