//! Cross-encoder reranking against an independent reference: tiny randomly initialised BERT
//! cross-encoders (one logit, and two classes) are built as ONNX by
//! `tests/reference/tiny_cross_encoder.py`, which also scores the test pairs with numpy; they
//! are registered with the real `mkflow models add --kind reranker`, then `rerank()` and
//! `hybrid_search(…, rerank => N)` must agree with numpy.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mkflow::{Engine, EngineConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model's tokenizer (the cross-encoders share its vocabulary).
fn tokenizer() -> PathBuf {
    assets_home().join("models/all-MiniLM-L6-v2/tokenizer.json")
}

/// A mkflow home of its own (rerankers added here stay out of the shared one), sharing the
/// runtime and the default model with the test assets' home.
fn private_home(dir: &Path) -> PathBuf {
    let shared = assets_home();
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("models")).unwrap();
    std::os::unix::fs::symlink(shared.join("runtime"), home.join("runtime")).unwrap();
    std::os::unix::fs::symlink(
        shared.join("models/all-MiniLM-L6-v2"),
        home.join("models/all-MiniLM-L6-v2"),
    )
    .unwrap();
    home
}

/// Builds a tiny cross-encoder in `out` and returns numpy's scores of `pairs`.
fn tiny_cross_encoder(out: &Path, pairs: &[(&str, &str)], two_classes: bool) -> Vec<f64> {
    python_packages();
    let pairs_file = out.with_extension("pairs.json");
    std::fs::write(&pairs_file, serde_json::to_string(pairs).unwrap()).unwrap();
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    command
        .arg(repo().join("tests/reference/tiny_cross_encoder.py"))
        .arg(out)
        .arg(tokenizer())
        .arg("128")
        .arg(&pairs_file);
    if two_classes {
        command.arg("--two-classes");
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `mkflow models add --kind reranker` with `home`; returns (success, stderr).
fn models_add(home: &Path, name: &str, model: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .args([
            "models",
            "add",
            "--kind",
            "reranker",
            "--name",
            name,
            "--max-tokens",
            "128",
        ])
        .arg("--onnx")
        .arg(model)
        .arg("--tokenizer")
        .arg(tokenizer())
        .env("MKFLOW_HOME", home)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// Pairs of different lengths (a batch is padded), one over the 128-token limit (truncated
/// longest first), and an empty text.
fn pairs() -> Vec<(&'static str, String)> {
    let long: String = (0..120).map(|i| format!("word{i} ")).collect();
    vec![
        (
            "what is a lighthouse lamp",
            "A xenon bulb of 1000 watts lights the lantern room.".into(),
        ),
        (
            "what is a lighthouse lamp",
            "Feed the sourdough starter every morning.".into(),
        ),
        (
            "vitamin d and bone density",
            "Vitamin D deficiency lowers bone mineral density in older adults.".into(),
        ),
        ("vitamin d and bone density", long),
        ("short", "x".into()),
    ]
}

async fn engine_with(home: &Path, data: &Path) -> Engine {
    Engine::new(EngineConfig {
        home: home.to_path_buf(),
        default_model: None,
        embed_threads: None,
        until_caught_up: false,
        ..EngineConfig::new(data)
    })
    .await
    .unwrap()
}

/// `rerank(query, text [, model])` over the pairs, in order.
async fn sql_scores(engine: &Engine, pairs: &[(&str, String)], model: Option<&str>) -> Vec<f32> {
    let rows: Vec<String> = pairs
        .iter()
        .enumerate()
        .map(|(i, (q, t))| format!("({i}, {}, {})", quoted(q), quoted(t)))
        .collect();
    let model = model.map(|m| format!(", {}", quoted(m))).unwrap_or_default();
    let batches = engine
        .sql(&format!(
            "SELECT i, rerank(q, t{model}) AS s FROM (VALUES {}) AS p(i, q, t) ORDER BY i",
            rows.join(", ")
        ))
        .await
        .unwrap();
    floats(&batches, "s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_matches_numpy_and_reorders_the_top_of_a_hybrid_search() {
    let dir = tempfile::tempdir().unwrap();
    let home = private_home(dir.path());
    let pairs = pairs();
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(q, t)| (*q, t.as_str())).collect();
    let one_logit = tiny_cross_encoder(&dir.path().join("ce1"), &borrowed, false);
    let two_classes = tiny_cross_encoder(&dir.path().join("ce2"), &borrowed, true);

    let (ok, said) = models_add(&home, "tiny-ce", &dir.path().join("ce1/model.onnx"));
    assert!(ok, "{said}");
    assert!(said.contains("registered"), "{said}");
    let (ok, said) = models_add(&home, "tiny-ce", &dir.path().join("ce1/model.onnx"));
    assert!(!ok && said.contains("already registered"), "{said}");
    // A file that is no model is refused and leaves nothing behind.
    let (ok, said) = models_add(&home, "broken", &tokenizer());
    assert!(!ok && said.contains("does not work"), "{said}");
    assert!(!home.join("models/broken").exists());

    let engine = engine_with(&home, &dir.path().join("data")).await;
    let got = sql_scores(&engine, &pairs, None).await;
    for (i, (sql, numpy)) in got.iter().zip(&one_logit).enumerate() {
        assert!(
            (*sql as f64 - numpy).abs() < 1e-3,
            "pair {i}: rerank {sql}, numpy {numpy}"
        );
    }
    // The scores differ from pair to pair: the comparison is not vacuous.
    assert!((one_logit[0] - one_logit[1]).abs() > 1e-3);

    let (ok, said) = models_add(&home, "tiny-ce2", &dir.path().join("ce2/model.onnx"));
    assert!(ok, "{said}");
    let engine = engine_with(&home, &dir.path().join("data")).await;
    let got = sql_scores(&engine, &pairs, Some("tiny-ce2")).await;
    for (i, (sql, numpy)) in got.iter().zip(&two_classes).enumerate() {
        assert!(
            (*sql as f64 - numpy).abs() < 1e-3,
            "pair {i} (two classes): {sql} vs {numpy}"
        );
    }
    let error = sql_error(&engine, "SELECT rerank('q', 'text')").await;
    assert!(
        error.contains("several rerankers") && error.contains("tiny-ce2"),
        "{error}"
    );
    let error = sql_error(&engine, "SELECT rerank('q', 'text', 'nope')").await;
    assert!(error.contains("no reranker called 'nope'"), "{error}");

    // hybrid_search(…, rerank => N): the fused top N, reordered by the cross-encoder.
    ingest(&engine, &sample_corpus()).await;
    let query = "vitamin D deficiency and bone density";
    let fused = engine
        .sql(&format!("SELECT doc_id FROM hybrid_search(kb, {}, 5)", quoted(query)))
        .await
        .unwrap();
    let reranked = engine
        .sql(&format!(
            "SELECT doc_id, rerank_score, concat_ws('. ', trim(title), trim(body)) AS text \
             FROM hybrid_search(kb, {}, 5, rerank => 5, reranker => 'tiny-ce')",
            quoted(query)
        ))
        .await
        .unwrap();
    let mut fused_ids = strings(&fused, "doc_id");
    let mut reranked_ids = strings(&reranked, "doc_id");
    let scores = floats(&reranked, "rerank_score");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    // Each score is the cross-encoder's on the row's text columns.
    let texts = strings(&reranked, "text");
    let direct: Vec<(&str, String)> = texts.iter().map(|t| (query, t.clone())).collect();
    let expected = sql_scores(&engine, &direct, Some("tiny-ce")).await;
    for (got, want) in scores.iter().zip(&expected) {
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
    fused_ids.sort();
    reranked_ids.sort();
    assert_eq!(fused_ids, reranked_ids, "the same five documents, reordered");

    for (sql, expected) in [
        (
            "SELECT * FROM hybrid_search(kb, 'q', 5, rerank => 0, reranker => 'tiny-ce')",
            "rerank must be a positive integer",
        ),
        (
            "SELECT * FROM hybrid_search(kb, 'q', 5, reranker => 'tiny-ce')",
            "needs rerank => N",
        ),
        (
            "SELECT * FROM hybrid_search(kb, 'q', 5, rerank => 3)",
            "several rerankers",
        ),
    ] {
        let error = sql_error(&engine, sql).await;
        assert!(error.contains(expected), "{sql}: {error}");
    }
}
