//! `mkflow-decoder.json`: what the export tool (`scripts/export_decoder.py`) records beside a
//! decoder's ONNX graphs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The description file's name.
pub const DECODER_CONFIG_FILE: &str = "mkflow-decoder.json";
/// The generation graph (logits of the last position).
pub const GENERATION_GRAPH: &str = "model.onnx";
/// The latent-reasoning graph (the soft token of the last position).
pub const LATENT_GRAPH: &str = "latent.onnx";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Shapes, special tokens and chat template of an exported decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Contract version the exporter wrote (1).
    pub format: u32,
    /// `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
    /// Width of the hidden states (the embedding dimension).
    pub hidden_size: usize,
    /// Transformer layers (each has one key and one value cache entry).
    pub num_layers: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub max_position: usize,
    /// Compute dtype of the layers and the KV cache: `float32` or `float16`.
    pub dtype: String,
    /// How the linear layers' weights are stored: `float32` (the compute dtype), or `int8` /
    /// `int4` blocks run by ONNX Runtime's `MatMulNBits`.
    #[serde(default = "compute_dtype_weights")]
    pub weights: String,
    /// Jinja chat template (Hugging Face conventions), when the model has one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Text of the beginning-of-sequence token, for the template.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// Text of the end-of-sequence token, for the template.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Tokens that end a generation.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
}

fn compute_dtype_weights() -> String {
    "float32".into()
}

/// Why a decoder description cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DecoderConfigError {
    /// The file is missing or unreadable.
    #[error("{}: {source} (hint: export the model with scripts/export_decoder.py)", .path.display())]
    Read {
        /// The description file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not a decoder description.
    #[error("{} is not a decoder description: {source}", .path.display())]
    Parse {
        /// The description file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// The exporter wrote a contract version this mkflow cannot read.
    #[error("{}: contract version {format} is not supported (this mkflow reads version 1)", .path.display())]
    Version {
        /// The description file.
        path: PathBuf,
        /// The version it declares.
        format: u32,
    },
}

impl DecoderConfig {
    /// Reads `dir/mkflow-decoder.json`.
    pub fn read(dir: &Path) -> Result<Self, DecoderConfigError> {
        let path = dir.join(DECODER_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => return Err(DecoderConfigError::Read { path, source }),
        };
        let config: DecoderConfig = match serde_json::from_str(&text) {
            Ok(config) => config,
            Err(source) => return Err(DecoderConfigError::Parse { path, source }),
        };
        if config.format != 1 {
            return Err(DecoderConfigError::Version {
                path,
                format: config.format,
            });
        }
        Ok(config)
    }

    /// Whether the KV cache holds 16-bit floats.
    pub fn half_precision(&self) -> bool {
        self.dtype == "float16"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = DecoderConfig::read(dir.path()).unwrap_err().to_string();
        assert!(missing.contains("export_decoder.py"), "{missing}");
        let path = dir.path().join(DECODER_CONFIG_FILE);
        std::fs::write(
            &path,
            r#"{"format": 1, "architecture": "qwen3", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 24, "vocab_size": 384, "max_position": 512, "dtype": "float16",
                "eos_token_ids": [2]}"#,
        )
        .unwrap();
        let config = DecoderConfig::read(dir.path()).unwrap();
        assert!(config.half_precision());
        assert_eq!(config.chat_template, None);
        let newer = std::fs::read_to_string(&path)
            .unwrap()
            .replace(r#""format": 1"#, r#""format": 2"#);
        std::fs::write(&path, newer).unwrap();
        let err = DecoderConfig::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("contract version 2 is not supported"), "{err}");
        std::fs::write(&path, r#"{"format": 1}"#).unwrap();
        let err = DecoderConfig::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a decoder description"), "{err}");
    }
}
