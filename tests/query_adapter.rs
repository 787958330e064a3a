//! Query adapters end to end: `mkflow train queries` learns one from a Meta-Knowledge index's
//! synthetic questions, and every search of the documents maps its query through it — a real
//! run of the binary, the real model, scores checked against the adapter's own arithmetic.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::{engine, floats, strings};
use mkflow::Engine;
use mkflow::adapter::{ADAPTER_FILE, QueryAdapter};

const QUERY: &str = "vitamin D deficiency and bone mineral density";

/// The shipped Meta-Knowledge pipeline over the first `take` sample documents.
async fn build_index(engine: &Engine, dir: &Path, take: usize) {
    let text = std::fs::read_to_string(common::sample_corpus()).unwrap();
    let corpus = dir.join("docs.jsonl");
    std::fs::write(&corpus, text.lines().take(take).collect::<Vec<_>>().join("\n")).unwrap();
    let pipeline =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/scifact_mk.sql")).unwrap();
    let pipeline = pipeline.replace(
        "LOCATION 'data/sample/scifact-sample.jsonl'",
        &format!("LOCATION '{}'", corpus.display()),
    );
    engine
        .run_script("test", &pipeline, |_| {})
        .await
        .expect("MK pipeline runs");
}

/// `mkflow train queries` on the data directory; returns its stderr.
fn train(data: &Path, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .arg("--data-dir")
        .arg(data)
        .args(["train", "queries", "--kb", "scifact_mk"])
        .args(extra)
        .env("MKFLOW_HOME", common::assets_home())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "mkflow train queries failed: {stderr}");
    stderr
}

/// A search's scores by document.
async fn scores(engine: &Engine, sql: &str) -> HashMap<String, f32> {
    let batches = engine.sql(sql).await.unwrap();
    strings(&batches, "doc_id")
        .into_iter()
        .zip(floats(&batches, "score"))
        .collect()
}

/// The one vector a query returns (column `v`).
async fn vector(engine: &Engine, sql: &str) -> Vec<f32> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Float32Type;
    let batches = engine.sql(sql).await.unwrap();
    let list = batches[0].column_by_name("v").unwrap().as_fixed_size_list();
    list.value(0).as_primitive::<Float32Type>().values().to_vec()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn train_queries_learns_an_adapter_that_document_searches_apply() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let search = format!("SELECT doc_id, score FROM vector_search(scifact_mk, '{QUERY}', 5)");
    let qa = format!("SELECT doc_id, score FROM qa_search(scifact_mk, '{QUERY}', 5)");
    let (plain, plain_qa) = {
        let engine = engine(&data).await;
        build_index(&engine, dir.path(), 120).await;
        (scores(&engine, &search).await, scores(&engine, &qa).await)
    };

    // A plain index has nothing to learn from; an unknown one is named.
    let refused = Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .arg("--data-dir")
        .arg(&data)
        .args(["train", "queries", "--kb", "nope"])
        .env("MKFLOW_HOME", common::assets_home())
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && message.contains("no knowledge index 'nope'"),
        "{message}"
    );

    // Training on the index's own questions: the report gives the held-out scores, and an
    // adapter is written only when a pass beat the model alone on them.
    let report = train(&data, &[]);
    assert!(report.contains("held-out MRR@10"), "{report}");
    let index_dir = data.join("scifact_mk");
    match QueryAdapter::load(&index_dir).unwrap() {
        Some(trained) => {
            assert!(report.contains("written to"), "{report}");
            assert_eq!(trained.info.model, "all-MiniLM-L6-v2");
            assert!(
                trained.info.after.mrr_at_10 > trained.info.before.mrr_at_10,
                "{:?}",
                trained.info
            );
        }
        None => assert!(report.contains("no adapter written"), "{report}"),
    }
    // Whatever it learnt, a known map shows what searches do with one: each pair of
    // coordinates turned a quarter turn.
    let d = 384;
    let mut matrix = vec![0.0f32; d * d];
    for i in (0..d).step_by(2) {
        matrix[i * d + i + 1] = -1.0;
        matrix[(i + 1) * d + i] = 1.0;
    }
    let info = mkflow::adapter::AdapterInfo {
        model: "all-MiniLM-L6-v2".into(),
        dimensions: d,
        trained_questions: 0,
        held_out_questions: 0,
        before: mkflow::adapter::HeldOutScores {
            mrr_at_10: 0.0,
            recall_at_10: 0.0,
        },
        after: mkflow::adapter::HeldOutScores {
            mrr_at_10: 0.0,
            recall_at_10: 0.0,
        },
        epochs: 0,
        best_epoch: 0,
        trained_at_ms: 0,
    };
    let adapter = QueryAdapter::new(info, matrix);
    adapter.save(&index_dir).unwrap();

    // The next engine maps every document search's query through it: the scores are the
    // adapted query's cosines with the stored vectors, and they moved.
    let engine = engine(&data).await;
    let adapted = adapter.apply(&vector(&engine, &format!("SELECT embed('{QUERY}', 'query') AS v")).await);
    let found = scores(&engine, &search).await;
    assert_eq!(found.len(), 5);
    for (doc, score) in &found {
        let stored = vector(
            &engine,
            &format!("SELECT embedding AS v FROM scifact_mk WHERE doc_id = '{doc}'"),
        )
        .await;
        assert!((dot(&adapted, &stored) - score).abs() < 1e-4, "{doc}: {score}");
    }
    assert_ne!(found, plain);
    let hybrid = engine
        .sql(&format!("SELECT doc_id FROM hybrid_search(scifact_mk, '{QUERY}', 5)"))
        .await
        .unwrap();
    assert_eq!(strings(&hybrid, "doc_id").len(), 5);
    // qa_search compares queries with questions, both as the model writes them: untouched.
    assert_eq!(scores(&engine, &qa).await, plain_qa);

    // A running engine sees a new adapter file at its next search: the identity gives back the
    // model's own scores.
    let d = adapter.info.dimensions;
    let identity: Vec<f32> = (0..d * d).map(|i| if i % (d + 1) == 0 { 1.0 } else { 0.0 }).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    QueryAdapter::new(adapter.info.clone(), identity)
        .save(&index_dir)
        .unwrap();
    let unchanged = scores(&engine, &search).await;
    for (doc, score) in &plain {
        assert!(
            (unchanged[doc] - score).abs() < 1e-5,
            "{doc}: {} vs {score}",
            unchanged[doc]
        );
    }
    drop(engine);

    let removed = train(&data, &["--remove"]);
    assert!(removed.contains("removed"), "{removed}");
    assert!(!index_dir.join(ADAPTER_FILE).exists());
}
