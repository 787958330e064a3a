//! Training LaSER embedding models on a knowledge index's own Meta-Knowledge (`mkflow train
//! laser`).
//!
//! The engine side of the trainer: it resolves the backbone (an mkflow export of a decoder),
//! works out the trained model's description and prompts, reads the training set from the index
//! ([`data`]), and checks that the exported ONNX reproduces the trainer's own encoder. The
//! training itself is the bundled `scripts/train_laser.py` (JAX, LoRA, the paper's losses), which
//! reports progress as JSON lines ([`Progress`]) and its result as a [`Report`].

pub mod data;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use mkflow_udfs::decoder::{ChatTemplate, DECODER_CONFIG_FILE, DecoderConfig};
use mkflow_udfs::{EmbeddingModelSpec, Pooling, Prompts, TextRole};

use crate::assets::MODEL_SPEC_FILE;
use crate::models::read_spec;

/// Cosine an exported model must reach against the trainer's own encoder on every probe text.
pub const PARITY: f64 = 0.9999;

/// The decoder a LaSER model is trained from: an mkflow export (`mkflow models export`), with
/// its `mkflow-model.json` when it was exported as an embedding model.
#[derive(Debug, Clone)]
pub struct Backbone {
    /// The export's directory.
    pub dir: PathBuf,
    /// Its `mkflow-decoder.json`.
    pub decoder: DecoderConfig,
    /// Its embedding description, when it has one (templates, K).
    pub spec: Option<EmbeddingModelSpec>,
}

impl Backbone {
    /// The backbone `name_or_path` names: an embedding model installed under `home/models`, or
    /// the directory of an export.
    pub fn resolve(home: &Path, name_or_path: &str) -> Result<Backbone, String> {
        let path = PathBuf::from(name_or_path);
        let dir = if path.join(DECODER_CONFIG_FILE).is_file() {
            path
        } else {
            installed_model_dir(home, name_or_path).ok_or_else(|| {
                format!(
                    "'{name_or_path}' is neither an installed LaSER/decoder model nor an export directory \
                     (hint: export a Llama/Qwen2/Qwen3 checkpoint first: mkflow models export --hf DIR \
                     --embedding-name NAME --out DIR)"
                )
            })?
        };
        let decoder = DecoderConfig::read(&dir).map_err(|e| e.to_string())?;
        source_checkpoint(&dir)?;
        let spec_path = dir.join(MODEL_SPEC_FILE);
        let spec = if spec_path.is_file() {
            Some(read_spec(&spec_path).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Backbone { dir, decoder, spec })
    }
}

/// The checkpoint an export was made from (its weights are read from there), which must still
/// exist.
fn source_checkpoint(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(DECODER_CONFIG_FILE);
    let described: serde_json::Value = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let source = described["source"].as_str().unwrap_or_default();
    if source.starts_with(TRAINED_SOURCE) {
        return Err(format!(
            "{} was trained by mkflow train laser; its weights live only in the ONNX export, so it cannot be a backbone \
             (hint: train from the checkpoint it came from)",
            dir.display()
        ));
    }
    let source = PathBuf::from(source);
    if !source.exists() {
        return Err(format!(
            "the checkpoint {} was exported from ('{}') is gone, and training reads the weights from it \
             (hint: export the Hugging Face directory or GGUF file again: mkflow models export --hf DIR --out DIR)",
            dir.display(),
            source.display()
        ));
    }
    Ok(source)
}

/// What a trained model's `mkflow-decoder.json` names as its source, before the backbone's.
const TRAINED_SOURCE: &str = "laser-trained:";

/// The directory under `home/models` of the decoder export whose embedding name is `name`.
fn installed_model_dir(home: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(home.join("models"))
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|dir| {
            dir.join(DECODER_CONFIG_FILE).is_file()
                && read_spec(&dir.join(MODEL_SPEC_FILE)).is_ok_and(|spec| spec.name == name)
        })
}

/// Prompt settings given on the command line; `None` keeps the backbone's.
#[derive(Debug, Clone, Default)]
pub struct PromptChoices {
    /// How a query is written (`{text}`, `{instruction}`).
    pub query_template: Option<String>,
    /// How a document is written (`{text}`).
    pub document_template: Option<String>,
    /// The task instruction.
    pub instruction: Option<String>,
    /// Wrap both roles in the chat template and an empty think block.
    pub chat_template: Option<bool>,
    /// LaSER's K.
    pub latent_steps: Option<usize>,
}

/// The description of the model trained from `backbone` under `name` in `dir`.
pub fn trained_spec(backbone: &Backbone, name: &str, dir: &Path, choices: &PromptChoices) -> EmbeddingModelSpec {
    let base = backbone.spec.clone();
    let inherited = |pick: fn(&EmbeddingModelSpec) -> Option<String>| base.as_ref().and_then(pick);
    EmbeddingModelSpec {
        name: name.to_string(),
        model_path: dir.join("latent.onnx"),
        tokenizer_path: dir.join("tokenizer.json"),
        dimensions: backbone.decoder.hidden_size,
        pooling: Pooling::LastToken,
        normalize: true,
        max_tokens: base.as_ref().map_or(512, |s| s.max_tokens),
        batching: base.as_ref().map(|s| s.batching).unwrap_or_default(),
        intra_threads: 0,
        device: base.as_ref().map(|s| s.device).unwrap_or_default(),
        latent_steps: Some(
            choices
                .latent_steps
                .or(base.as_ref().and_then(|s| s.latent_steps))
                .unwrap_or(3),
        ),
        query_template: choices
            .query_template
            .clone()
            .or(inherited(|s| s.query_template.clone())),
        document_template: choices
            .document_template
            .clone()
            .or(inherited(|s| s.document_template.clone())),
        instruction: choices.instruction.clone().or(inherited(|s| s.instruction.clone())),
        chat_template: choices
            .chat_template
            .unwrap_or(base.as_ref().is_some_and(|s| s.chat_template)),
    }
}

/// How `spec` writes queries and documents, with the backbone's chat template.
pub fn prompts(spec: &EmbeddingModelSpec, decoder: &DecoderConfig) -> Result<Prompts, String> {
    let chat = match (&decoder.chat_template, spec.chat_template) {
        (Some(source), true) => Some(
            ChatTemplate::new(source, decoder.bos_token.as_deref(), decoder.eos_token.as_deref())
                .map_err(|e| e.to_string())?,
        ),
        (None, true) => return Err("--chat-template: the backbone has no chat template".into()),
        _ => None,
    };
    Prompts::new(spec, chat.as_ref())
}

/// The `mkflow-model.json` fields the trainer writes for the result (paths and shapes are the
/// exporter's).
pub fn spec_fields(spec: &EmbeddingModelSpec) -> serde_json::Value {
    serde_json::json!({
        "name": spec.name,
        "max_tokens": spec.max_tokens,
        "device": spec.device,
        "query_template": spec.query_template,
        "document_template": spec.document_template,
        "instruction": spec.instruction,
        "chat_template": spec.chat_template.then_some(true),
    })
}

/// One progress line of the trainer.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// Training starts.
    Start {
        /// Where JAX runs.
        device: String,
        /// Optimiser steps planned.
        steps: usize,
        /// Training questions.
        training: usize,
    },
    /// A step is done.
    Step {
        /// 1-based.
        step: usize,
        /// The step's total loss.
        loss: f64,
        /// InfoNCE of the latent view.
        q_d: f64,
        /// Output alignment (KL to the explicit view).
        kl: f64,
    },
    /// Held-out questions scored.
    HeldOut {
        /// `before` or `after` training.
        stage: String,
        /// MRR@10 among the held-out pool.
        mrr_at_10: f64,
        /// Recall@10 among the pool.
        recall_at_10: f64,
        /// Documents in the pool.
        pool: usize,
    },
    /// Training and export done.
    Done {
        /// Wall time.
        seconds: f64,
    },
}

/// Loss of the same batch before and after training.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BeforeAfter {
    /// With the backbone's weights.
    pub before: f64,
    /// With the trained weights.
    pub after: f64,
}

/// Held-out ranking quality.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct HeldOut {
    /// MRR@10 of each held-out question among the pool.
    pub mrr_at_10: f64,
    /// Recall@10 among the pool.
    pub recall_at_10: f64,
    /// Held-out questions.
    pub questions: usize,
    /// Documents in the pool (the held-out questions' positives and hard negatives).
    pub pool: usize,
}

/// What the trainer reports (`report.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    /// Optimiser steps run.
    pub steps: usize,
    /// Training questions.
    pub training_questions: usize,
    /// The loss of a fixed training batch before and after.
    pub fixed_batch_loss: BeforeAfter,
    /// Every step's loss.
    pub losses: Vec<f64>,
    /// Held-out scores before and after (none when nothing was held out).
    pub held_out: Option<HeldOutChange>,
    /// The trainer's own vectors of the probe texts.
    pub probe: Vec<Vec<f32>>,
    /// Wall time.
    pub seconds: f64,
}

/// Held-out scores before and after training.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct HeldOutChange {
    /// With the backbone.
    pub before: HeldOut,
    /// With the trained model.
    pub after: HeldOut,
}

/// A text the export is checked on, with the role it is embedded in.
#[derive(Debug, Clone)]
pub struct ProbeText {
    /// The text as a user gives it.
    pub text: String,
    /// Query or document.
    pub role: TextRole,
}

/// The smallest cosine between the exported model's vectors of `probes` (run by mkflow's own
/// runtime, prompts applied) and the trainer's `expected` ones.
pub fn export_parity(
    spec: EmbeddingModelSpec,
    onnx_runtime: &Path,
    probes: &[ProbeText],
    expected: &[Vec<f32>],
) -> Result<f64, String> {
    if probes.len() != expected.len() {
        return Err(format!(
            "the trainer encoded {} probe texts, {} were given",
            expected.len(),
            probes.len()
        ));
    }
    let embedder = mkflow_udfs::Embedder::load(spec, Some(onnx_runtime)).map_err(|e| e.to_string())?;
    let mut worst = f64::INFINITY;
    for (probe, want) in probes.iter().zip(expected) {
        let got = embedder
            .embed_as(&[Some(probe.text.as_str())], probe.role)
            .map_err(|e| e.to_string())?;
        worst = worst.min(cosine(&got.vectors, want));
    }
    Ok(worst)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        let step: Progress =
            serde_json::from_str(r#"{"event": "step", "step": 3, "steps": 9, "loss": 1.5, "q_d": 0.5, "kl": 0.1, "teacher": 0.2, "latent": 2.0, "grad_norm": 4.0}"#)
                .unwrap();
        assert!(matches!(step, Progress::Step { step: 3, .. }));
        let held: Progress = serde_json::from_str(
            r#"{"event": "held_out", "stage": "after", "mrr_at_10": 0.5, "recall_at_10": 0.9, "questions": 8, "pool": 30}"#,
        )
        .unwrap();
        assert!(matches!(held, Progress::HeldOut { pool: 30, .. }));
    }

    #[test]
    fn a_backbone_needs_the_checkpoint_it_was_exported_from() {
        let dir = tempfile::tempdir().unwrap();
        let describe = |source: &str| {
            std::fs::write(
                dir.path().join(DECODER_CONFIG_FILE),
                serde_json::json!({ "source": source }).to_string(),
            )
            .unwrap()
        };
        describe("/no/such/checkpoint");
        let gone = source_checkpoint(dir.path()).unwrap_err();
        assert!(gone.contains("'/no/such/checkpoint') is gone"), "{gone}");
        describe("laser-trained:/somewhere");
        let trained = source_checkpoint(dir.path()).unwrap_err();
        assert!(trained.contains("cannot be a backbone"), "{trained}");
        describe(dir.path().to_str().unwrap());
        assert_eq!(source_checkpoint(dir.path()).unwrap(), dir.path());
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
    }
}
