//! A local chat LLM: an exported decoder's generation graph, its tokenizer and chat template.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::config::TOKENIZER_FILE;
use super::constrain::{JsonConstraint, JsonShape, TokenBytes, TokenConstraint};
use super::generate::{RowConstraint, Sampling};
use super::model::{DecoderError, DecoderModel, Graph};
use crate::runtime::Device;

/// A chat answer with its token counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatAnswer {
    /// The generated text (special tokens removed).
    pub text: String,
    /// Tokens in the rendered prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Whether an end-of-turn token ended it (false: it hit the token limit).
    pub finished: bool,
}

/// One conversation of a batch ([`LocalLlm::chat_batch`]).
#[derive(Debug, Clone)]
pub struct ChatRequest<'a, M> {
    /// The conversation (`{role, content}` messages).
    pub messages: &'a [M],
    /// How the answer starts (e.g. `{` to hold a model to JSON); part of the returned text.
    pub answer_prefix: &'a str,
    /// The JSON shape every answer token must keep to, if any (the prefix included).
    pub shape: Option<&'a JsonShape>,
}

/// A loaded local chat model.
#[derive(Debug)]
pub struct LocalLlm {
    model: DecoderModel,
    tokenizer: Tokenizer,
    token_bytes: TokenBytes,
    template: ChatTemplate,
    stop_tokens: Vec<u32>,
    calls: AtomicU64,
}

impl LocalLlm {
    /// Loads the export in `dir` on `device`.
    pub fn load(dir: &Path, threads: usize, device: Device, onnx_runtime: Option<&Path>) -> Result<Self, DecoderError> {
        let model = DecoderModel::load(dir, Graph::Generation, threads, device, onnx_runtime)?;
        let model_error = |message: String| DecoderError::Model {
            model: dir.display().to_string(),
            message,
        };
        let config = model.config();
        let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))
            .map_err(|e| model_error(format!("cannot read {TOKENIZER_FILE}: {e}")))?;
        let source = config
            .chat_template
            .as_deref()
            .ok_or_else(|| model_error("the model has no chat template (not a chat model?)".into()))?;
        let template = ChatTemplate::new(source, config.bos_token.as_deref(), config.eos_token.as_deref())
            .map_err(|e| model_error(e.to_string()))?;
        // End-of-turn markers of the common chat formats, where the vocabulary has them.
        let stop_tokens = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        Ok(LocalLlm {
            model,
            token_bytes: TokenBytes::from_tokenizer(&tokenizer),
            tokenizer,
            template,
            stop_tokens,
            calls: AtomicU64::new(0),
        })
    }

    /// The generation model.
    pub fn model(&self) -> &DecoderModel {
        &self.model
    }

    /// Token ids of `text` as the model sees it (special-token markup included, nothing added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, DecoderError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.model.inference_error(format!("tokenizer: {e}")))
    }

    /// Answers a conversation (`{role, content}` messages). The answer starts with
    /// `answer_prefix` (e.g. `{` to hold a small model to JSON), which is part of the returned
    /// text. Calls are numbered, so sampling with a temperature does not repeat itself across
    /// calls with the same `sampling.seed`.
    pub fn chat<M: Serialize>(
        &self,
        messages: &[M],
        answer_prefix: &str,
        sampling: &Sampling,
    ) -> Result<ChatAnswer, DecoderError> {
        let request = ChatRequest {
            messages,
            answer_prefix,
            shape: None,
        };
        Ok(self.chat_batch(&[request], sampling)?.remove(0))
    }

    /// Answers several conversations in one batch (their prompts left-padded together), each
    /// held to its JSON shape when it has one: such an answer ends when its JSON value is
    /// complete, and parses unless it ran out of `max_new_tokens`.
    pub fn chat_batch<M: Serialize>(
        &self,
        requests: &[ChatRequest<'_, M>],
        sampling: &Sampling,
    ) -> Result<Vec<ChatAnswer>, DecoderError> {
        let mut prompts = Vec::with_capacity(requests.len());
        let mut constraints: Vec<RowConstraint<'_>> = Vec::with_capacity(requests.len());
        for request in requests {
            let mut prompt = self
                .template
                .render(request.messages)
                .map_err(|message| self.model.inference_error(message))?;
            prompt.push_str(request.answer_prefix);
            prompts.push(self.tokenize(&prompt)?);
            constraints.push(match request.shape {
                None => None,
                Some(shape) => {
                    let mut constraint = JsonConstraint::new(shape, &self.token_bytes);
                    if !constraint.feed_text(request.answer_prefix) {
                        return Err(self.model.inference_error(format!(
                            "the answer prefix {:?} does not fit the answer's JSON schema",
                            request.answer_prefix
                        )));
                    }
                    Some(Box::new(constraint) as Box<dyn TokenConstraint>)
                }
            });
        }
        let mut sampling = sampling.clone();
        sampling.stop_tokens.extend(&self.stop_tokens);
        sampling.seed = sampling
            .seed
            .wrapping_add(self.calls.fetch_add(requests.len() as u64, Ordering::Relaxed));
        let batch: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let generated = self.model.generate_constrained(&batch, &sampling, &mut constraints)?;
        generated
            .into_iter()
            .zip(requests.iter().zip(&prompts))
            .map(|(generated, (request, prompt))| {
                let text = self
                    .tokenizer
                    .decode(&generated.tokens, true)
                    .map_err(|e| self.model.inference_error(format!("tokenizer: {e}")))?;
                Ok(ChatAnswer {
                    text: format!("{}{text}", request.answer_prefix),
                    prompt_tokens: prompt.len(),
                    completion_tokens: generated.tokens.len(),
                    finished: generated.stopped,
                })
            })
            .collect()
    }
}
