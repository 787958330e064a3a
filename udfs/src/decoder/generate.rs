//! Token generation on the decoder runtime: batched, greedy or temperature sampling, stop tokens.

use std::collections::HashSet;

use super::model::{DecoderError, DecoderModel, Graph};

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Most tokens generated per sequence.
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy, deterministic); above 0 samples from the softmax
    /// of the logits divided by it.
    pub temperature: f32,
    /// Seed of the sampler (same seed, same prompts: same tokens).
    pub seed: u64,
    /// Tokens that end a sequence (not included in its output); the model's own end-of-sequence
    /// tokens are always added.
    pub stop_tokens: Vec<u32>,
    /// When above 0, no run of this many tokens appears twice in a generated sequence (the token
    /// that would repeat one is never chosen): it breaks the loops small models fall into.
    pub no_repeat_ngram: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: 256,
            temperature: 0.0,
            seed: 0,
            stop_tokens: Vec::new(),
            no_repeat_ngram: 0,
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The new tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (false: it ran out of `max_new_tokens`).
    pub stopped: bool,
}

impl DecoderModel {
    /// Continues each prompt (token ids; left-padded together into one batch).
    pub fn generate(&self, prompts: &[&[u32]], sampling: &Sampling) -> Result<Vec<Generated>, DecoderError> {
        if self.graph() != Graph::Generation {
            return Err(self.inference_error("generation needs the generation graph (model.onnx)"));
        }
        // Refused before any work rather than after the context fills up mid-answer.
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let limit = self.config().max_position;
        if longest + sampling.max_new_tokens > limit {
            return Err(self.inference_error(format!(
                "a prompt of {longest} tokens plus {} new ones exceeds the model's context of {limit}",
                sampling.max_new_tokens
            )));
        }
        let stop: HashSet<u32> = sampling
            .stop_tokens
            .iter()
            .chain(&self.config().eos_token_ids)
            .copied()
            .collect();
        let vocab = self.config().vocab_size;
        let mut rng = SplitMix64(sampling.seed);
        let mut session = self.lock();
        let (mut batch, first) = self.prefill(&mut session, prompts)?;
        let mut logits = first.head;
        let mut out: Vec<Generated> = vec![
            Generated {
                tokens: Vec::new(),
                stopped: false
            };
            prompts.len()
        ];
        for step in 0..sampling.max_new_tokens {
            let next: Vec<u32> = logits
                .chunks(vocab)
                .zip(&out)
                .map(|(row, g)| match g.stopped {
                    true => 0,
                    false => {
                        let banned = repeating_tokens(&g.tokens, sampling.no_repeat_ngram);
                        choose(row, &banned, sampling.temperature, &mut rng)
                    }
                })
                .collect();
            for (g, &token) in out.iter_mut().zip(&next) {
                if g.stopped {
                    continue;
                }
                if stop.contains(&token) {
                    g.stopped = true;
                } else {
                    g.tokens.push(token);
                }
            }
            if out.iter().all(|g| g.stopped) || step + 1 == sampling.max_new_tokens {
                break;
            }
            logits = self.step_ids(&mut session, &mut batch, &next)?.head;
        }
        Ok(out)
    }
}

/// Tokens that would complete an `n`-token run already present in `tokens`.
fn repeating_tokens(tokens: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || tokens.len() < n {
        return Vec::new();
    }
    let prefix = &tokens[tokens.len() - (n - 1)..];
    tokens
        .windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect()
}

/// The token for one row of logits, never one of `banned`: the most likely one at temperature
/// 0, else a sample.
fn choose(logits: &[f32], banned: &[u32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let allowed = |i: usize| !banned.contains(&(i as u32));
    let best = logits
        .iter()
        .enumerate()
        .filter(|(i, _)| allowed(*i))
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc },
        );
    if temperature <= 0.0 {
        return best.0 as u32;
    }
    let weights: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| match allowed(i) {
            true => (((l - best.1) / temperature) as f64).exp(),
            false => 0.0,
        })
        .collect();
    let mut target = rng.next_f64() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target <= 0.0 {
            return i as u32;
        }
    }
    best.0 as u32
}

/// A small, seedable pseudo-random generator (SplitMix64), enough for sampling tokens.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit_and_sampling_follows_the_distribution() {
        let logits = [0.0, 3.0, 1.0];
        let mut rng = SplitMix64(1);
        assert_eq!(choose(&logits, &[], 0.0, &mut rng), 1);
        assert_eq!(choose(&logits, &[1], 0.0, &mut rng), 2);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[choose(&logits, &[], 1.0, &mut rng) as usize] += 1;
        }
        // softmax([0, 3, 1]) = [0.042, 0.844, 0.114]
        assert!((3200..3550).contains(&counts[1]), "{counts:?}");
        assert!((300..620).contains(&counts[2]), "{counts:?}");
        assert!((90..260).contains(&counts[0]), "{counts:?}");
        // A high temperature flattens it.
        let mut hot = [0usize; 3];
        for _ in 0..3000 {
            hot[choose(&logits, &[], 100.0, &mut rng) as usize] += 1;
        }
        assert!(hot.iter().all(|&c| c > 850), "{hot:?}");
        // A banned token is never sampled.
        assert!((0..500).all(|_| choose(&logits, &[1], 1.0, &mut rng) != 1));
    }

    #[test]
    fn repeated_runs_are_banned() {
        // "a b c a b" → choosing c would repeat the run "a b c".
        assert_eq!(repeating_tokens(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert_eq!(repeating_tokens(&[1, 2, 3, 1, 2], 0), Vec::<u32>::new());
        assert_eq!(repeating_tokens(&[1, 2], 3), Vec::<u32>::new());
        assert_eq!(repeating_tokens(&[5, 5, 5], 2), vec![5, 5]);
    }

    #[test]
    fn the_sampler_is_reproducible() {
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
