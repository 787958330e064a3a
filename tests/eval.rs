//! `mkflow eval` end to end on a tiny BEIR dataset made from the sample corpus.

mod common;

use std::io::Write;

use common::*;
use mkflow::eval::{EvalOptions, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_on_a_tiny_dataset_writes_reports_and_scores_title_queries_high() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("tiny");
    std::fs::create_dir_all(dataset.join("qrels")).unwrap();
    let sample = std::fs::read_to_string(sample_corpus()).unwrap();
    let docs: Vec<serde_json::Value> = sample
        .lines()
        .take(60)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut corpus = std::fs::File::create(dataset.join("corpus.jsonl")).unwrap();
    let mut queries = std::fs::File::create(dataset.join("queries.jsonl")).unwrap();
    let mut qrels = std::fs::File::create(dataset.join("qrels/test.tsv")).unwrap();
    writeln!(qrels, "query-id\tcorpus-id\tscore").unwrap();
    for (i, doc) in docs.iter().enumerate() {
        let record = serde_json::json!({"_id": doc["doc_id"], "title": "", "text": doc["body"]});
        writeln!(corpus, "{record}").unwrap();
        if i % 3 == 0 {
            // The title as a query; its abstract is the one relevant document.
            writeln!(
                queries,
                "{}",
                serde_json::json!({"_id": format!("q{i}"), "text": doc["title"]})
            )
            .unwrap();
            writeln!(qrels, "q{i}\t{}\t1", doc["doc_id"].as_str().unwrap()).unwrap();
        }
    }
    // A judged query id with no query text and an unjudged query are tolerated.
    writeln!(queries, "{}", serde_json::json!({"_id": "unjudged", "text": "nothing"})).unwrap();
    drop((corpus, queries, qrels));

    let engine = engine(&dir.path().join("data")).await;
    let out = dir.path().join("reports");
    let options = EvalOptions {
        dataset: dataset.clone(),
        split: "test".into(),
        modes: vec![Mode::Doc, Mode::Exact],
        out_dir: out.clone(),
        max_queries: None,
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
