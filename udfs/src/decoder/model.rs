//! One exported decoder graph on ONNX Runtime, run step by step over a batch of left-padded
//! sequences with its KV cache kept where the model runs (GPU memory under CUDA).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType};

use super::config::{DecoderConfig, GENERATION_GRAPH, LATENT_GRAPH};
use crate::runtime::{Device, RuntimeError, build_session, init_onnx_runtime};

/// Errors raised while loading or running a decoder.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The model's files are missing or do not follow the contract.
    #[error("decoder '{model}': {message}")]
    Model {
        /// The model directory.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// A graph lacks an input or output of the export contract.
    #[error("decoder '{model}': graph has no {port} '{name}' (not an mkflow decoder export?)")]
    Contract {
        /// The model directory.
        model: String,
        /// `input` or `output`.
        port: &'static str,
        /// The missing input's or output's name.
        name: String,
    },
    /// A run failed or was asked something the model cannot do.
    #[error("running decoder '{model}': {message}")]
    Inference {
        /// The model directory.
        model: String,
        /// What went wrong.
        message: String,
    },
}

/// Which of the exporter's two graphs a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    /// `model.onnx`: the last position's logits (generation).
    Generation,
    /// `latent.onnx`: the last position's soft token (latent-reasoning embeddings).
    Latent,
}

impl Graph {
    /// The graph's file in an export directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Graph::Generation => GENERATION_GRAPH,
            Graph::Latent => LATENT_GRAPH,
        }
    }

    fn head(self) -> &'static str {
        match self {
            Graph::Generation => "logits",
            Graph::Latent => "soft_embeds",
        }
    }
}

/// A loaded decoder graph (one ONNX Runtime session, shared; runs are serialised).
pub struct DecoderModel {
    dir: PathBuf,
    config: DecoderConfig,
    graph: Graph,
    session: Mutex<Session>,
    device: Device,
    cache_type: TensorElementType,
    cache_memory: MemoryInfo<'static>,
    past_names: Vec<String>,
    present_names: Vec<String>,
}

impl std::fmt::Debug for DecoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderModel")
            .field("dir", &self.dir)
            .field("graph", &self.graph)
            .field("device", &self.device)
            .finish()
    }
}

/// The state of a batch of sequences between steps.
pub(crate) struct Sequences {
    /// Attention mask, one row per sequence, as wide as the cache plus the next step.
    mask: Vec<Vec<i64>>,
    /// Position the next entry of each row takes.
    next_position: Vec<i64>,
    /// `past.{i}.key` / `past.{i}.value` for the next step, on the model's device.
    cache: Vec<DynValue>,
}

/// What one step yields per row: the head output (logits or soft token) and the last hidden state.
pub(crate) struct StepOutput {
    /// `rows × head_width` values.
    pub head: Vec<f32>,
    /// `rows × hidden_size` values.
    pub hidden: Vec<f32>,
}

impl DecoderModel {
    /// Loads `graph` from an export directory, on `device` (CUDA falls back to the CPU with a
    /// warning). `onnx_runtime` names the library when the process has not loaded one yet.
    pub fn load(
        dir: &Path,
        graph: Graph,
        threads: usize,
        device: Device,
        onnx_runtime: Option<&Path>,
    ) -> Result<Self, DecoderError> {
        let model_error = |message: String| DecoderError::Model {
            model: dir.display().to_string(),
            message,
        };
        let config = DecoderConfig::read(dir).map_err(|e| model_error(e.to_string()))?;
        let path = dir.join(graph.file_name());
        if !path.is_file() {
            return Err(model_error(format!("{} not found", path.display())));
        }
        let environment = init_onnx_runtime(onnx_runtime)?;
        let loaded =
            build_session(environment, &path, threads.max(1), device).map_err(|e| model_error(e.to_string()))?;
        let cache_type = if config.half_precision() {
            TensorElementType::Float16
        } else {
            TensorElementType::Float32
        };
        let cache_memory = match loaded.device {
            Device::Cpu => MemoryInfo::default(),
            Device::Cuda => MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| model_error(e.to_string()))?,
        };
        let names = |prefix: &str| -> Vec<String> {
            (0..config.num_layers)
                .flat_map(|i| [format!("{prefix}.{i}.key"), format!("{prefix}.{i}.value")])
                .collect()
        };
        let model = DecoderModel {
            dir: dir.to_path_buf(),
            past_names: names("past"),
            present_names: names("present"),
            config,
            graph,
            session: Mutex::new(loaded.session),
            device: loaded.device,
            cache_type,
            cache_memory,
        };
        model.check_contract()?;
        Ok(model)
    }

    /// The export's description.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Where the model runs (after any fallback).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The graph this model runs.
    pub fn graph(&self) -> Graph {
        self.graph
    }

    /// Checks that the graph has every input and output of the export contract.
    fn check_contract(&self) -> Result<(), DecoderError> {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let missing = |port: &'static str, name: &str| DecoderError::Contract {
            model: self.dir.display().to_string(),
            port,
            name: name.to_string(),
        };
        let expected_inputs = ["input_ids", "inputs_embeds", "attention_mask", "position_ids"];
        for name in expected_inputs
            .iter()
            .copied()
            .chain(self.past_names.iter().map(String::as_str))
        {
            if !inputs.contains(&name) {
                return Err(missing("input", name));
            }
        }
        for name in [self.graph.head(), "last_hidden_state"]
            .into_iter()
            .chain(self.present_names.iter().map(String::as_str))
        {
            if !outputs.contains(&name) {
                return Err(missing("output", name));
            }
        }
        Ok(())
    }

    pub(super) fn inference_error(&self, message: impl std::fmt::Display) -> DecoderError {
        DecoderError::Inference {
            model: self.dir.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Locks the session for a sequence of steps.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the prompts (left-padded to the longest) and returns the batch state and the last
    /// position's outputs.
    pub(crate) fn prefill(
        &self,
        session: &mut Session,
        prompts: &[&[u32]],
    ) -> Result<(Sequences, StepOutput), DecoderError> {
        let rows = prompts.len();
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if rows == 0 || prompts.iter().any(|p| p.is_empty()) {
            return Err(self.inference_error("every sequence needs at least one token"));
        }
        let mut ids = Vec::with_capacity(rows * width);
        let mut positions = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows);
        for prompt in prompts {
            let padding = width - prompt.len();
            ids.extend(std::iter::repeat_n(0i64, padding).chain(prompt.iter().map(|&t| t as i64)));
            positions.extend(std::iter::repeat_n(0i64, padding).chain(0..prompt.len() as i64));
            mask.push(
                std::iter::repeat_n(0i64, padding)
                    .chain(std::iter::repeat_n(1, prompt.len()))
                    .collect(),
            );
        }
        let cache = (0..self.past_names.len())
            .map(|_| {
                let shape = [rows, self.config.num_kv_heads, 0, self.config.head_dim];
                DynTensor::new(&Allocator::default(), self.cache_type, shape).map(DynTensor::into_dyn)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.inference_error(e))?;
        let mut sequences = Sequences {
            mask,
            next_position: prompts.iter().map(|p| p.len() as i64).collect(),
            cache,
        };
        let output = self.forward(session, &mut sequences, (&ids, width), (&[], 0), &positions)?;
        Ok((sequences, output))
    }

    /// Appends one token per row.
    pub(crate) fn step_ids(
        &self,
        session: &mut Session,
        sequences: &mut Sequences,
        ids: &[u32],
    ) -> Result<StepOutput, DecoderError> {
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let positions = sequences.advance();
        self.forward(session, sequences, (&ids, 1), (&[], 0), &positions)
    }

    /// Appends one embedding per row (`rows × hidden_size` values).
    pub(crate) fn step_embeds(
        &self,
        session: &mut Session,
        sequences: &mut Sequences,
        embeds: &[f32],
    ) -> Result<StepOutput, DecoderError> {
        let positions = sequences.advance();
        self.forward(session, sequences, (&[], 0), (embeds, 1), &positions)
    }

    fn forward(
        &self,
        session: &mut Session,
        sequences: &mut Sequences,
        (ids, ids_width): (&[i64], usize),
        (embeds, embeds_width): (&[f32], usize),
        positions: &[i64],
    ) -> Result<StepOutput, DecoderError> {
        let rows = sequences.rows();
        let hidden_size = self.config.hidden_size;
        let total = sequences.mask[0].len();
        if total > self.config.max_position {
            return Err(self.inference_error(format!(
                "{total} positions exceed the model's context of {}",
                self.config.max_position
            )));
        }
        let error = |e: ort::Error| self.inference_error(e);
        let ids = Tensor::from_array(([rows, ids_width], ids.to_vec())).map_err(error)?;
        let embeds = Tensor::from_array(([rows, embeds_width, hidden_size], embeds.to_vec())).map_err(error)?;
        let mask: Vec<i64> = sequences.mask.concat();
        let mask = Tensor::from_array(([rows, total], mask)).map_err(error)?;
        let positions = Tensor::from_array(([rows, ids_width + embeds_width], positions.to_vec())).map_err(error)?;

        let mut binding = session.create_binding().map_err(error)?;
        binding.bind_input("input_ids", &ids).map_err(error)?;
        binding.bind_input("inputs_embeds", &embeds).map_err(error)?;
        binding.bind_input("attention_mask", &mask).map_err(error)?;
        binding.bind_input("position_ids", &positions).map_err(error)?;
        for (name, value) in self.past_names.iter().zip(&sequences.cache) {
            binding.bind_input(name.as_str(), value).map_err(error)?;
        }
        let host = MemoryInfo::default();
        binding.bind_output_to_device(self.graph.head(), &host).map_err(error)?;
        binding
            .bind_output_to_device("last_hidden_state", &host)
            .map_err(error)?;
        for name in &self.present_names {
            binding
                .bind_output_to_device(name.as_str(), &self.cache_memory)
                .map_err(error)?;
        }
        let mut outputs = session.run_binding(&binding).map_err(error)?;
        let mut extract = |name: &str| -> Result<Vec<f32>, DecoderError> {
            let value = outputs
                .remove(name)
                .ok_or_else(|| self.inference_error(format!("no output {name}")))?;
            let (_, data) = value.try_extract_tensor::<f32>().map_err(error)?;
            Ok(data.to_vec())
        };
        let head = extract(self.graph.head())?;
        let hidden = extract("last_hidden_state")?;
        sequences.cache = self
            .present_names
            .iter()
            .map(|name| {
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| self.inference_error(format!("no output {name}")))
            })
            .collect::<Result<_, _>>()?;
        if hidden.len() != rows * hidden_size {
            return Err(self.inference_error(format!(
                "last_hidden_state has {} values, expected {rows} × {hidden_size}",
                hidden.len()
            )));
        }
        Ok(StepOutput { head, hidden })
    }
}

impl Sequences {
    /// Number of sequences.
    pub(crate) fn rows(&self) -> usize {
        self.mask.len()
    }

    /// Makes room for one more entry per row; returns the entries' positions.
    fn advance(&mut self) -> Vec<i64> {
        self.mask.iter_mut().for_each(|row| row.push(1));
        self.next_position
            .iter_mut()
            .map(|p| {
                *p += 1;
                *p - 1
            })
            .collect()
    }
}
