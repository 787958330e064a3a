//! The decoder runtime against an independent reference: tiny randomly initialised Qwen3, Qwen2
//! and Llama checkpoints (`tests/reference/tiny_decoder.py`) are exported by the repo's exporter
//! (`scripts/export_decoder.py`), and mkflow's LaSER embeddings and greedy tokens are compared
//! with a numpy float64 implementation written from the published description
//! (`tests/reference/laser_reference.py`: one unpadded sequence at a time, no KV cache).
//! `MKFLOW_TEST_DEVICE=cuda` runs the comparisons on a GPU.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use datafusion::arrow::array::AsArray;
use mkflow::{Engine, EngineConfig, assets};
use mkflow_udfs::Device;
use mkflow_udfs::decoder::constrain::{JsonConstraint, JsonShape, TokenBytes, TokenConstraint};
use mkflow_udfs::decoder::{DecoderModel, Generated, Graph, RowConstraint, Sampling};
use serde_json::Value;
use tokenizers::Tokenizer;

/// Texts of different lengths, so the batch is left-padded.
const TEXTS: [&str; 6] = [
    "Vitamin D and bones",
    "Latent reasoning lets a retriever think in embedding space before it encodes a passage.",
    "Kafka",
    "Gene expression in the liver changes after a high fat diet in mice, 2024.",
    "The knowledge base answers SQL queries over documents, questions and clusters.",
    "antibiotic resistance (bacteria)",
];

const PROMPTS: [&str; 3] = [
    "The knowledge base",
    "Antibiotic resistance spreads through",
    "0123 numbers",
];

const NEW_TOKENS: usize = 12;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    common::python_packages();
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python).args(args).output().expect("python3 runs");
    assert!(
        output.status.success(),
        "{python} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The tiny checkpoint, its export, and the reference's answers.
struct Fixture {
    _dir: tempfile::TempDir,
    export: PathBuf,
    reference: Value,
}

/// A tiny checkpoint of `arch` (`qwen3`, `qwen2` or `llama`), exported, with the reference's answers.
fn fixture(arch: &str) -> Fixture {
    fixture_with(arch, &[], &[])
}

/// [`fixture`] with extra exporter arguments (e.g. `--weights int8`), and texts the reference
/// embeds after [`TEXTS`] (their vectors follow those of `TEXTS`).
fn fixture_with(arch: &str, export_args: &[&str], more_texts: &[String]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let export = dir.path().join("onnx");
    python(&[
        repo().join("tests/reference/tiny_decoder.py").as_os_str(),
        hf.as_os_str(),
        "--arch".as_ref(),
        arch.as_ref(),
    ]);
    let exporter = repo().join("scripts/export_decoder.py");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        exporter.as_os_str(),
        "--hf".as_ref(),
        hf.as_os_str(),
        "--out".as_ref(),
        export.as_os_str(),
        "--embedding-name".as_ref(),
        "tiny-laser".as_ref(),
        "--latent-steps".as_ref(),
        "3".as_ref(),
    ];
    args.extend(export_args.iter().map(|a| std::ffi::OsStr::new(*a)));
    python(&args);
    let request = dir.path().join("request.json");
    let texts: Vec<String> = TEXTS
        .iter()
        .map(|t| t.to_string())
        .chain(more_texts.iter().cloned())
        .collect();
    let body = serde_json::json!({"texts": texts, "steps": [1, 2, 3], "prompts": PROMPTS, "new_tokens": NEW_TOKENS});
    std::fs::write(&request, body.to_string()).unwrap();
    let reference = python(&[
        repo().join("tests/reference/laser_reference.py").as_os_str(),
        hf.as_os_str(),
        request.as_os_str(),
    ]);
    Fixture {
        _dir: dir,
        export,
        reference: serde_json::from_slice(&reference).unwrap(),
    }
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH` (e.g. onnxruntime-gpu's), else the pulled one.
fn onnx_runtime() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) => path.into(),
        None => assets::onnx_runtime_path(&common::assets_home()),
    }
}

/// Where the parity tests run: `MKFLOW_TEST_DEVICE=cuda` runs them on the GPU, and then a
/// fallback to the CPU fails them.
fn device() -> Device {
    std::env::var("MKFLOW_TEST_DEVICE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or_default()
}

fn load(export: &Path, graph: Graph) -> DecoderModel {
    let model = DecoderModel::load(export, graph, 2, device(), Some(&onnx_runtime())).unwrap();
    assert_eq!(model.device(), device(), "the model fell back to another device");
    model
}

fn token_ids(export: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let tokenizer = Tokenizer::from_file(export.join("tokenizer.json")).unwrap();
    texts
        .iter()
        .map(|t| tokenizer.encode(*t, true).unwrap().get_ids().to_vec())
        .collect()
}

fn normalized(v: &[f32]) -> Vec<f64> {
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| *x as f64 / norm).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn reference_vectors(reference: &Value, steps: usize) -> Vec<Vec<f64>> {
    reference["embeddings"][steps.to_string()]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

#[test]
fn latent_embeddings_match_the_reference_for_1_2_and_3_steps() {
    check_latent_embeddings(&fixture("qwen3"));
}

#[test]
fn greedy_generation_matches_the_reference_token_for_token() {
    check_greedy_generation(&fixture("qwen3"));
}

#[test]
fn qwen2_and_llama_exports_match_the_reference_too() {
    for arch in ["qwen2", "llama"] {
        let fx = fixture(arch);
        check_latent_embeddings(&fx);
        check_greedy_generation(&fx);
    }
}

/// Block-quantised exports (`--weights int8|int4`, ONNX Runtime's MatMulNBits) stay close to the
/// float64 reference, and shrink the weights file.
#[test]
fn quantised_exports_stay_close_to_the_reference() {
    let size = |fx: &Fixture| std::fs::metadata(fx.export.join("model.weights")).unwrap().len();
    let full = size(&fixture("qwen2"));
    let mut previous = full;
    // The thresholds: K = 1, the hidden state through every quantised layer; K = 3, the mean over
    // texts after three soft tokens, which feed the quantised vocabulary head's softmax back in
    // and so amplify its error on a random model's flat distributions — int4 is for generation
    // (its K = 3 cosines here go down to ~0.45), latent embeddings want int8 or float32. int8
    // keeps a Q5/Q8 GGUF's weights almost exactly; MatMulNBits also quantises activations to int8
    // per block (its fast CPU path).
    for (weights, min_hidden, min_latent) in [("int8", 0.999, Some(0.99)), ("int4", 0.95, None)] {
        let fx = fixture_with("qwen2", &["--weights", weights], &[]);
        let model = load(&fx.export, Graph::Latent);
        assert_eq!(model.config().weights, weights);
        let ids = token_ids(&fx.export, &TEXTS);
        let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let hidden = model.config().hidden_size;
        for steps in [1, 3] {
            let vectors = model.latent_embeddings(&batch, steps).unwrap();
            let cosines: Vec<f64> = vectors
                .chunks(hidden)
                .zip(&reference_vectors(&fx.reference, steps))
                .map(|(got, want)| cosine(&normalized(got), want))
                .collect();
            eprintln!("{weights} K={steps}: cosines {cosines:.5?}");
            match (steps, min_latent) {
                (1, _) => assert!(cosines.iter().all(|&c| c >= min_hidden), "{weights}, K=1: {cosines:?}"),
                (_, Some(min_latent)) => {
                    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
                    assert!(mean >= min_latent, "{weights}, K={steps}: mean {mean}, {cosines:?}");
                }
                (_, None) => {}
            }
        }
        // Generation runs on the quantised graph too.
        let generator = load(&fx.export, Graph::Generation);
        let prompts = token_ids(&fx.export, &PROMPTS);
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let sampling = Sampling {
            max_new_tokens: 4,
            ..Sampling::default()
        };
        assert!(
            generator
                .generate(&prompts, &sampling)
                .unwrap()
                .iter()
                .all(|g| !g.tokens.is_empty())
        );
        let bytes = size(&fx);
        assert!(bytes < previous, "{weights}: {bytes} bytes, not below {previous}");
        previous = bytes;
    }
}

/// Under a JSON-schema constraint even a randomly initialised model writes only texts of the
/// schema: every answer parses, every enumerated value is an option, every bound holds —
/// greedy and sampled, batched.
#[test]
fn constrained_generation_keeps_a_random_model_to_the_schema() {
    let fx = fixture("qwen3");
    let model = load(&fx.export, Graph::Generation);
    let tokenizer = Tokenizer::from_file(fx.export.join("tokenizer.json")).unwrap();
    let tokens = TokenBytes::from_tokenizer(&tokenizer);
    let schema = serde_json::json!({
        "type": "object", "required": ["field", "tags"],
        "properties": {
            "field": {"enum": ["Oncology", "Immunology", "Genetics"]},
            "tags": {"type": "array", "minItems": 1, "maxItems": 2,
                     "items": {"type": "string", "minLength": 1, "maxLength": 12}}
        }
    });
    let shape = JsonShape::from_schema(&schema).unwrap();
    let ids = token_ids(&fx.export, &PROMPTS);
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let unconstrained = model
        .generate(
            &batch,
            &Sampling {
                max_new_tokens: 40,
                ..Sampling::default()
            },
        )
        .unwrap();
    let parses = |tokens: &[u32]| serde_json::from_str::<Value>(&tokenizer.decode(tokens, false).unwrap()).is_ok();
    assert!(
        !unconstrained.iter().any(|g| parses(&g.tokens)),
        "the random model writes JSON by itself: the test would prove nothing"
    );
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (3.0, 3)] {
        let sampling = Sampling {
            max_new_tokens: 400,
            temperature,
            seed,
            ..Sampling::default()
        };
        for (g, text) in generate_json(&model, &tokenizer, &tokens, &shape, &batch, &sampling) {
            assert!(g.stopped, "T={temperature}: the answer did not finish: {text:?}");
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let field = value["field"].as_str().unwrap();
            assert!(["Oncology", "Immunology", "Genetics"].contains(&field), "{text}");
            let tags = value["tags"].as_array().unwrap();
            assert!((1..=2).contains(&tags.len()), "{text}");
            for tag in tags {
                let tag = tag.as_str().unwrap();
                assert!((1..=12).contains(&tag.chars().count()), "{text}");
            }
            assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
        }
    }
    // A budget just above the shortest answer: long strings and lists are wrapped up in time.
    let roomy = JsonShape::from_schema(&serde_json::json!({
        "type": "object", "required": ["field", "tags"],
        "properties": {
            "field": {"enum": ["Oncology", "Immunology", "Genetics"]},
            "tags": {"type": "array", "minItems": 2, "maxItems": 8,
                     "items": {"type": "string", "minLength": 3, "maxLength": 300}}
        }
    }))
    .unwrap();
    let tight = roomy.min_bytes() + 6;
    for (temperature, seed) in [(0.0, 0), (3.0, 4), (3.0, 5)] {
        let sampling = Sampling {
            max_new_tokens: tight,
            temperature,
            seed,
            ..Sampling::default()
        };
        for (g, text) in generate_json(&model, &tokenizer, &tokens, &roomy, &batch, &sampling) {
            assert!(
                g.stopped && g.tokens.len() <= tight,
                "T={temperature}: not wrapped up: {text:?}"
            );
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(value["tags"].as_array().unwrap().len() >= 2, "{text}");
        }
    }
    // A budget below the shortest answer is refused before any work.
    let mut constraints: Vec<RowConstraint<'_>> = vec![Some(Box::new(JsonConstraint::new(&roomy, &tokens)))];
    let short = Sampling {
        max_new_tokens: roomy.min_bytes() - 1,
        ..Sampling::default()
    };
    let error = model
        .generate_constrained(&batch[..1], &short, &mut constraints)
        .unwrap_err()
        .to_string();
    assert!(error.contains("max_new_tokens"), "{error}");
}

/// Generates for every prompt of `batch` under a constraint to `shape`; each sequence with its text.
fn generate_json(
    model: &DecoderModel,
    tokenizer: &Tokenizer,
    tokens: &TokenBytes,
    shape: &JsonShape,
    batch: &[&[u32]],
    sampling: &Sampling,
) -> Vec<(Generated, String)> {
    let mut constraints: Vec<RowConstraint<'_>> = batch
        .iter()
        .map(|_| Some(Box::new(JsonConstraint::new(shape, tokens)) as Box<dyn TokenConstraint>))
        .collect();
    let generated = model.generate_constrained(batch, sampling, &mut constraints).unwrap();
    generated
        .into_iter()
        .map(|g| {
            let text = tokenizer.decode(&g.tokens, false).unwrap();
            (g, text)
        })
        .collect()
}

fn check_latent_embeddings(fx: &Fixture) {
    let model = load(&fx.export, Graph::Latent);
    let ids = token_ids(&fx.export, &TEXTS);
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let hidden = model.config().hidden_size;
    let mut by_steps = Vec::new();
    for steps in [1, 2, 3] {
        // The whole batch at once (left-padded) against the reference's one-at-a-time answers.
        let vectors = model.latent_embeddings(&batch, steps).unwrap();
        let expected = reference_vectors(&fx.reference, steps);
        for (i, (got, want)) in vectors.chunks(hidden).zip(&expected).enumerate() {
            let cos = cosine(&normalized(got), want);
            assert!(
                cos >= 0.9999,
                "{}: K={steps}, text {i} ({:?}): cosine {cos}",
                fx.export.display(),
                TEXTS[i]
            );
        }
        by_steps.push(expected);
    }
    // The latent steps change the embedding (else the comparison above would prove little).
    let k1_vs_k3 = cosine(&by_steps[0][0], &by_steps[2][0]);
    assert!(k1_vs_k3 < 0.99, "K=1 and K=3 embeddings coincide (cosine {k1_vs_k3})");
    // K = 0 pools nothing: refused with what K means.
    let refused = model.latent_embeddings(&batch, 0).unwrap_err().to_string();
    assert!(refused.contains("K = 1 is plain last-token pooling"), "{refused}");
    // Padding does not leak into a row: the shortest text alone gives the same vector.
    let alone = model.latent_embeddings(&batch[2..3], 3).unwrap();
    let batched = model.latent_embeddings(&batch, 3).unwrap();
    let cos = cosine(&normalized(&alone), &normalized(&batched[2 * hidden..3 * hidden]));
    assert!(cos >= 0.99999, "alone vs batched: {cos}");
}

fn check_greedy_generation(fx: &Fixture) {
    let model = load(&fx.export, Graph::Generation);
    let ids = token_ids(&fx.export, &PROMPTS);
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let sampling = Sampling {
        max_new_tokens: NEW_TOKENS,
        ..Sampling::default()
    };
    let generated = model.generate(&batch, &sampling).unwrap();
    let wrong_graph = model.latent_embeddings(&batch, 1).unwrap_err().to_string();
    assert!(wrong_graph.contains("need the latent graph"), "{wrong_graph}");
    // An answer that could not fit the context is refused before any work.
    let too_long = Sampling {
        max_new_tokens: model.config().max_position,
        ..Sampling::default()
    };
    let refused = model.generate(&batch, &too_long).unwrap_err().to_string();
    assert!(refused.contains("exceeds the model's context"), "{refused}");
    let eos = &model.config().eos_token_ids;
    for (i, (got, want)) in generated
        .iter()
        .zip(fx.reference["generations"].as_array().unwrap())
        .enumerate()
    {
        let margin = want["min_margin"].as_f64().unwrap();
        assert!(
            margin > 1e-3,
            "prompt {i}: the reference's greedy choice is a near tie ({margin})"
        );
        let want: Vec<u32> = want["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        // mkflow stops at the end-of-sequence token; the reference runs on.
        assert_eq!(got.tokens, want[..got.tokens.len()], "prompt {i}: {:?}", PROMPTS[i]);
        if got.stopped {
            assert!(
                eos.contains(&want[got.tokens.len()]),
                "prompt {i} stopped without an eos"
            );
        } else {
            assert_eq!(got.tokens.len(), NEW_TOKENS);
        }
    }
    // A temperature samples other sequences, reproducibly for a seed.
    let hot = |seed| {
        let sampling = Sampling {
            max_new_tokens: NEW_TOKENS,
            temperature: 5.0,
            seed,
            ..Sampling::default()
        };
        model.generate(&batch, &sampling).unwrap()
    };
    assert_eq!(hot(11), hot(11));
    assert_ne!(hot(11), generated);
    // No run of 2 tokens repeats when that is asked for.
    let varied = model
        .generate(
            &batch,
            &Sampling {
                max_new_tokens: NEW_TOKENS,
                no_repeat_ngram: 2,
                ..Sampling::default()
            },
        )
        .unwrap();
    for g in &varied {
        let pairs: Vec<&[u32]> = g.tokens.windows(2).collect();
        let distinct: std::collections::HashSet<&[u32]> = pairs.iter().copied().collect();
        assert_eq!(distinct.len(), pairs.len(), "{:?}", g.tokens);
    }
}

/// The task instruction of the LaSER model `embed` is tested with.
const INSTRUCTION: &str = "Find the passage that answers the question";

/// `text` inside one user turn of the tiny model's ChatML template, then the assistant's prompt
/// and an empty think block: LaSER's `add_chat_template`, written out by hand.
fn chat_wrapped(text: &str) -> String {
    format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

fn vector_of(batches: &[datafusion::arrow::array::RecordBatch], row: usize) -> Vec<f32> {
    let list = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::FixedSizeListArray>()
        .unwrap_or_else(|| panic!("embed() returned {:?}", batches[0].column(0).data_type()));
    list.value(row)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Float32Array>()
        .unwrap()
        .values()
        .to_vec()
}

/// A LaSER model exported with LaSER's own prompts (a query instruction, both sides wrapped in
/// the chat template): `embed(text)` writes a document, `embed(text, 'query')` and every search
/// write a query, and both match the reference over the texts written out by hand.
#[tokio::test]
async fn embed_and_searches_use_a_laser_model_with_its_prompts() {
    let query = TEXTS[1];
    let documents = [TEXTS[3], TEXTS[4], TEXTS[5]];
    let mut written = vec![chat_wrapped(&format!("Instruct: {INSTRUCTION}\nQuery: {query}"))];
    written.extend(documents.iter().map(|d| chat_wrapped(d)));
    let fx = fixture_with(
        "qwen3",
        &[
            "--query-template",
            "Instruct: {instruction}\\nQuery: {text}",
            "--instruction",
            INSTRUCTION,
            "--chat-template",
        ],
        &written,
    );
    // The reference's vectors for K = 3 (the export's default): the query, then the documents.
    let expected = &reference_vectors(&fx.reference, 3)[TEXTS.len()..];
    // A home with the real runtime and default model, plus the exported LaSER model.
    let real = common::assets_home();
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(real.join("runtime"), home.path().join("runtime")).unwrap();
    std::fs::create_dir_all(home.path().join("models")).unwrap();
    std::os::unix::fs::symlink(
        real.join("models/all-MiniLM-L6-v2"),
        home.path().join("models/all-MiniLM-L6-v2"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&fx.export, home.path().join("models/tiny-laser")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig {
        home: home.path().to_path_buf(),
        default_model: Some("tiny-laser".into()),
        embed_threads: Some(2),
        until_caught_up: false,
        ..EngineConfig::new(data.path())
    })
    .await
    .unwrap();
    // One statement per role: a UNION ALL's branches may come back in any order.
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for call in [
        format!("embed('{query}', 'query')"),
        format!("embed('{query}')"),
        format!("embed('{query}', 'QUERY')"),
    ] {
        rows.push(vector_of(&engine.sql(&format!("SELECT {call} AS v")).await.unwrap(), 0));
    }
    assert_eq!(rows[0].len(), 64);
    let as_query = cosine(&normalized(&rows[0]), &expected[0]);
    assert!(as_query >= 0.9999, "embed(text, 'query') vs reference: {as_query}");
    // The same words as a document are written (and embedded) differently; the cache keeps both.
    let as_document = cosine(&normalized(&rows[1]), &normalized(&rows[0]));
    assert!(
        as_document < 0.999,
        "query and document vectors coincide: {as_document}"
    );
    assert_eq!(rows[2], rows[0]);
    let bad = engine
        .sql(&format!("SELECT embed('{query}', 'question')"))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("unknown role 'question'"), "{bad}");

    // Stored documents are written as documents, searches as queries: the scores are the
    // reference's query · document cosines.
    engine
        .sql("CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, body VARCHAR) STORED AS KB LOCATION 'kb'")
        .await
        .unwrap();
    for (i, d) in documents.iter().enumerate() {
        engine
            .sql(&format!("INSERT INTO kb VALUES ('d{i}', '{d}', embed('{d}'))"))
            .await
            .unwrap();
    }
    let found = engine
        .sql(&format!("SELECT doc_id, score FROM vector_search(kb, '{query}', 3)"))
        .await
        .unwrap();
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Float64Type};
    let ids = cast(found[0].column(0), &DataType::Utf8).unwrap();
    let ids = ids.as_string::<i32>();
    let scores = cast(found[0].column(1), &DataType::Float64).unwrap();
    let scores = scores.as_primitive::<Float64Type>();
    assert_eq!(found[0].num_rows(), 3);
    for row in 0..3 {
        let doc: usize = ids.value(row)[1..].parse().unwrap();
        let want = cosine(&expected[0], &expected[1 + doc]);
        let got = scores.value(row);
        assert!(
            (got - want).abs() < 1e-3,
            "{}: score {got}, reference {want}",
            ids.value(row)
        );
    }
}

/// The device a CUDA request gets from the ONNX Runtime library in use: CUDA from
/// onnxruntime-gpu's (its CUDA execution provider ships beside it), the CPU from the CPU build.
fn device_the_library_supports(library: &Path) -> Device {
    let provider = library.with_file_name("libonnxruntime_providers_cuda.so");
    if provider.is_file() { Device::Cuda } else { Device::Cpu }
}

#[test]
fn a_cuda_request_runs_on_cuda_or_falls_back_to_the_cpu_when_cuda_cannot_start() {
    let fx = fixture("qwen3");
    let library = onnx_runtime();
    // The pulled library is the CPU build: CUDA cannot start, the model still loads on the CPU.
    // With onnxruntime-gpu's (ORT_DYLIB_PATH), a fallback is a failure.
    let expected = device_the_library_supports(&library);
    let model = DecoderModel::load(&fx.export, Graph::Latent, 2, Device::Cuda, Some(&library)).unwrap();
    assert_eq!(
        model.device(),
        expected,
        "a CUDA request with {} ran on the wrong device",
        library.display()
    );
    let ids = token_ids(&fx.export, &TEXTS[..1]);
    let vector = model.latent_embeddings(&[&ids[0]], 3).unwrap();
    let cos = cosine(&normalized(&vector), &reference_vectors(&fx.reference, 3)[0]);
    assert!(cos >= 0.9999, "{cos}");
}
