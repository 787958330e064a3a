//! Latent-reasoning embeddings in the style of LaSER (Jin et al., 2026): the decoder "thinks"
//! `K` soft-token steps before its hidden states are pooled, instead of writing out a chain of
//! thought.
//!
//! For a batch of token sequences (left-padded together):
//! - `K = 0`: the last-layer hidden state of the last input token (a plain last-token
//!   embedding of the same backbone);
//! - `K ≥ 1`: the softmax of the last position's logits weights the input embedding table into
//!   a soft token (`probs @ E`), which is appended as the next input through the KV cache; after
//!   `K` of them, the embedding is the mean of the last-layer hidden states at the `K` soft
//!   tokens. The graph computes the soft token itself (`latent.onnx`'s `soft_embeds`), so on a
//!   GPU nothing but one `hidden_size` vector per row crosses to the host per step.

use super::model::{DecoderError, DecoderModel, Graph};

impl DecoderModel {
    /// The un-normalised latent embedding of each sequence (`hidden_size` floats per sequence,
    /// row-major) after `steps` latent steps.
    pub fn latent_embeddings(&self, sequences: &[&[u32]], steps: usize) -> Result<Vec<f32>, DecoderError> {
        if self.graph() != Graph::Latent {
            return Err(self.inference_error("latent embeddings need the latent graph (latent.onnx)"));
        }
        let mut session = self.lock();
        let (mut batch, first) = self.prefill(&mut session, sequences)?;
        if steps == 0 {
            return Ok(first.hidden);
        }
        let mut sum = vec![0.0f32; first.hidden.len()];
        let mut soft = first.head;
        for _ in 0..steps {
            let step = self.step_embeds(&mut session, &mut batch, &soft)?;
            sum.iter_mut().zip(&step.hidden).for_each(|(s, h)| *s += h);
            soft = step.head;
        }
        let scale = 1.0 / steps as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
        debug_assert_eq!(sum.len(), batch.rows() * self.config().hidden_size);
        Ok(sum)
    }
}
