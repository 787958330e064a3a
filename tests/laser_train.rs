//! `mkflow train laser` end to end: a tiny random Qwen3 exported as a LaSER model (with an
//! instruction template and the chat wrapping), a Meta-Knowledge index built by the shipped
//! pipeline, a real run of the binary and of the JAX trainer. Training must lower the loss, the
//! installed model must reproduce the trainer's own encoder through `embed()` in SQL, and it keeps
//! the backbone's prompts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mkflow::{Engine, EngineConfig};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn mkflow(home: &Path, data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("MKFLOW_HOME", home)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A home with the real runtime and default model, and a tiny random Qwen3 exported as the
/// LaSER model `tiny-laser`.
fn home_with_backbone(dir: &Path) -> PathBuf {
    let real = common::assets_home();
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("models")).unwrap();
    std::os::unix::fs::symlink(real.join("runtime"), home.join("runtime")).unwrap();
    std::os::unix::fs::symlink(
        real.join("models/all-MiniLM-L6-v2"),
        home.join("models/all-MiniLM-L6-v2"),
    )
    .unwrap();
    let checkpoint = dir.join("checkpoint");
    let made = Command::new("python3")
        .arg(repo().join("tests/reference/tiny_decoder.py"))
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(made.status.success(), "tiny_decoder.py: {}", stderr(&made));
    let export_dir = home.join("models/tiny-laser");
    let exported = mkflow(
        &home,
        &dir.join("unused"),
        &[
            "models",
            "export",
            "--hf",
            checkpoint.to_str().unwrap(),
            "--embedding-name",
            "tiny-laser",
            "--query-template",
            "Instruct: {instruction}\\nQuery: {text}",
            "--instruction",
            "Given a claim, find the abstract that supports or refutes it",
            "--chat-template",
            "--out",
            export_dir.to_str().unwrap(),
        ],
    );
    assert!(exported.status.success(), "export: {}", stderr(&exported));
    home
}

/// The shipped Meta-Knowledge pipeline over the first 40 sample documents.
async fn build_index(home: &Path, data: &Path, dir: &Path) {
    let text = std::fs::read_to_string(common::sample_corpus()).unwrap();
    let corpus = dir.join("docs.jsonl");
    std::fs::write(&corpus, text.lines().take(40).collect::<Vec<_>>().join("\n")).unwrap();
    let pipeline = std::fs::read_to_string(repo().join("pipelines/scifact_mk.sql"))
        .unwrap()
        .replace(
            "LOCATION 'data/sample/scifact-sample.jsonl'",
            &format!("LOCATION '{}'", corpus.display()),
        );
    let engine = open_engine(home, data, None).await;
    engine
        .run_script("test", &pipeline, |_| {})
        .await
        .expect("MK pipeline runs");
}

async fn open_engine(home: &Path, data: &Path, model: Option<&str>) -> Engine {
    Engine::new(EngineConfig {
        home: home.to_path_buf(),
        default_model: model.map(str::to_string),
        embed_threads: Some(2),
        until_caught_up: false,
        ..EngineConfig::new(data)
    })
    .await
    .unwrap()
}

fn mean(values: &[Value]) -> f64 {
    values.iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / values.len() as f64
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test]
async fn train_laser_lowers_the_loss_and_installs_a_model_that_reproduces_the_trainer() {
    common::python_packages();
    let dir = tempfile::tempdir().unwrap();
    let home = home_with_backbone(dir.path());
    let data = dir.path().join("data");
    build_index(&home, &data, dir.path()).await;

    let train = [
        "train",
        "laser",
        "--kb",
        "scifact_mk",
        "--backbone",
        "tiny-laser",
        "--name",
        "tiny-trained",
        "--max-steps",
        "40",
        "--batch-size",
        "4",
        "--learning-rate",
        "2e-3",
        "--lora-rank",
        "8",
    ];
    let trained = mkflow(&home, &data, &train);
    let log = stderr(&trained);
    assert!(trained.status.success(), "mkflow train laser failed: {log}");
    assert!(log.contains("the export reproduces the trained encoder"), "{log}");
    assert!(log.contains("held-out questions"), "{log}");
    let installed = home.join("models/tiny-trained");
    assert!(
        !home.join("training").read_dir().unwrap().any(|_| true),
        "the work files stay behind after a success"
    );

    // Training lowered the loss: on a fixed batch, and from the first steps to the last.
    let report: Value =
        serde_json::from_slice(&std::fs::read(installed.join("training-report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], 40);
    let fixed = &report["fixed_batch_loss"];
    assert!(
        fixed["after"].as_f64().unwrap() < fixed["before"].as_f64().unwrap(),
        "fixed-batch loss did not fall: {fixed}"
    );
    let losses = report["losses"].as_array().unwrap();
    let (first, last) = (mean(&losses[..8]), mean(&losses[losses.len() - 8..]));
    assert!(last < first, "mean loss of the last 8 steps {last} ≥ first 8 {first}");

    // The installed model keeps the backbone's prompts and K.
    let spec: Value = serde_json::from_slice(&std::fs::read(installed.join("mkflow-model.json")).unwrap()).unwrap();
    assert_eq!(spec["name"], "tiny-trained");
    assert_eq!(spec["latent_steps"], 3);
    assert_eq!(spec["chat_template"], true);
    assert_eq!(spec["query_template"], "Instruct: {instruction}\nQuery: {text}");

    // embed() in SQL, through the engine, gives the trainer's own vectors (prompts applied by
    // mkflow from the raw texts), and differs from the untrained backbone's.
    let probes = report["probe_texts"].as_array().unwrap();
    assert!(probes.len() >= 2);
    assert!(probes.iter().any(|p| p["role"] == "query") && probes.iter().any(|p| p["role"] == "document"));
    let queries: Vec<String> = probes
        .iter()
        .map(|p| {
            let text = p["text"].as_str().unwrap().replace('\'', "''");
            format!("SELECT embed('{text}', '{}') AS v", p["role"].as_str().unwrap())
        })
        .collect();
    let vectors_of = |model: &'static str| {
        let (home, data, queries) = (&home, &data, &queries);
        async move {
            let engine = open_engine(home, data, Some(model)).await;
            let mut out = Vec::new();
            for sql in queries {
                out.push(vector(&engine.sql(sql).await.unwrap()));
            }
            out
        }
    };
    let (trained_vectors, backbone_vectors) = (vectors_of("tiny-trained").await, vectors_of("tiny-laser").await);
    for (i, want) in report["probe"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let similarity = cosine(&trained_vectors[i], &want);
        assert!(similarity >= 0.9999, "{}: cosine {similarity}", queries[i]);
        assert!(
            cosine(&backbone_vectors[i], &want) < 0.9999,
            "training left the encoder as it was"
        );
    }

    // A second model of the same name is refused; so is an unknown backbone.
    let again = mkflow(&home, &data, &train);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already installed"), "{}", stderr(&again));
    let unknown = mkflow(
        &home,
        &data,
        &["train", "laser", "--kb", "scifact_mk", "--backbone", "no-such-model"],
    );
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("mkflow models export"),
        "{}",
        stderr(&unknown)
    );
}

fn vector(batches: &[datafusion::arrow::array::RecordBatch]) -> Vec<f32> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Float32Type;
    let list = batches[0].column_by_name("v").unwrap().as_fixed_size_list();
    list.value(0).as_primitive::<Float32Type>().values().to_vec()
}
