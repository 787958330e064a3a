//! Latent-reasoning embeddings as LaSER publishes them (Jin et al., 2026; the official encoder in
//! `ignorejjj/LaSER`, `quick_start.py` and `laser.py`): the decoder "thinks" in soft tokens
//! before its hidden states are pooled, instead of writing out a chain of thought.
//!
//! For a batch of token sequences (left-padded together) and `K ≥ 1` pooled states:
//! - the prefill's last-layer hidden state at the last input token is the first state `h₀`;
//! - then `K − 1` latent steps: the softmax of the last position's logits weights the input
//!   embedding table into a soft token (`probs @ E`, in float32), which is appended as the next
//!   input through the KV cache; its last-layer hidden state is the next state;
//! - the embedding is the mean of `h₀ … h_{K−1}` (the caller L2-normalises it).
//!
//! `K = 1` is plain last-token pooling of the same weights; LaSER's default is `K = 3`. The
//! graph computes the soft token itself (`latent.onnx`'s `soft_embeds`), so on a GPU nothing but
//! one `hidden_size` vector per row crosses to the host per step.

use super::model::{DecoderError, DecoderModel, Graph};

impl DecoderModel {
    /// The un-normalised latent embedding of each sequence (`hidden_size` floats per sequence,
    /// row-major): the mean of the prefill's last hidden state and the hidden states of
    /// `states − 1` soft tokens. `states` must be at least 1.
    pub fn latent_embeddings(&self, sequences: &[&[u32]], states: usize) -> Result<Vec<f32>, DecoderError> {
        if self.graph() != Graph::Latent {
            return Err(self.inference_error("latent embeddings need the latent graph (latent.onnx)"));
        }
        if states == 0 {
            return Err(self.inference_error(
                "latent steps K must be at least 1 (K = 1 is plain last-token pooling; LaSER's default is 3)",
            ));
        }
        let mut session = self.lock();
        let (mut batch, first) = self.prefill(&mut session, sequences)?;
        let mut sum = first.hidden;
        let mut soft = first.head;
        for _ in 1..states {
            let step = self.step_embeds(&mut session, &mut batch, &soft)?;
            sum.iter_mut().zip(&step.hidden).for_each(|(s, h)| *s += h);
            soft = step.head;
        }
        let scale = 1.0 / states as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
        debug_assert_eq!(sum.len(), batch.rows() * self.config().hidden_size);
        Ok(sum)
    }
}
