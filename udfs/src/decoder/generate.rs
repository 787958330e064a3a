//! Token generation on the decoder runtime: batched, greedy or temperature sampling, stop tokens,
//! and constrained decoding (a [`TokenConstraint`] per sequence).

use std::collections::HashSet;

use super::constrain::TokenConstraint;
use super::model::{DecoderError, DecoderModel, Graph};

/// How many of the likeliest tokens are tried against a constraint before all its candidates are.
const CONSTRAINED_SHORTLIST: usize = 48;

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
    /// Whether a stop token (or, under a constraint, the end of the answer) ended it (false: it
    /// ran out of `max_new_tokens`).
    pub stopped: bool,
}

/// The constraint of one sequence, if any.
pub type RowConstraint<'a> = Option<Box<dyn TokenConstraint + 'a>>;

impl DecoderModel {
    /// Continues each prompt (token ids; left-padded together into one batch).
    pub fn generate(&self, prompts: &[&[u32]], sampling: &Sampling) -> Result<Vec<Generated>, DecoderError> {
        let mut free: Vec<RowConstraint<'_>> = prompts.iter().map(|_| None).collect();
        self.generate_constrained(prompts, sampling, &mut free)
    }

    /// Continues each prompt, the sequences with a constraint only through tokens it allows; a
    /// constrained sequence ends when its constraint is complete (its stop tokens are never
    /// taken before).
    pub fn generate_constrained(
        &self,
        prompts: &[&[u32]],
        sampling: &Sampling,
        constraints: &mut [RowConstraint<'_>],
    ) -> Result<Vec<Generated>, DecoderError> {
        if constraints.len() != prompts.len() {
            return Err(self.inference_error(format!(
                "{} constraints for {} prompts",
                constraints.len(),
                prompts.len()
            )));
        }
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
        if let Some(need) = constraints.iter().flatten().map(|c| c.tokens_to_complete()).max()
            && need > sampling.max_new_tokens
        {
            return Err(self.inference_error(format!(
                "the answer's shape needs up to {need} tokens but max_new_tokens is {}",
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
            for c in constraints.iter_mut().flatten() {
                c.set_budget(sampling.max_new_tokens - step);
            }
            let next: Vec<u32> = logits
                .chunks(vocab)
                .zip(&out)
                .zip(constraints.iter())
                .map(|((row, g), constraint)| match g.stopped {
                    true => Ok(0),
                    false => {
                        let banned = repeating_tokens(&g.tokens, sampling.no_repeat_ngram);
                        match constraint {
                            None => Ok(choose(row, &banned, sampling.temperature, &mut rng)),
                            Some(c) => choose_constrained(row, &banned, sampling.temperature, &mut rng, c.as_ref())
                                .ok_or_else(|| self.inference_error("the answer's constraint allows no token here")),
                        }
                    }
                })
                .collect::<Result<_, _>>()?;
            for ((g, &token), constraint) in out.iter_mut().zip(&next).zip(constraints.iter_mut()) {
                if g.stopped {
                    continue;
                }
                match constraint {
                    Some(c) => {
                        c.advance(token);
                        g.tokens.push(token);
                        g.stopped = c.is_complete();
                    }
                    None if stop.contains(&token) => g.stopped = true,
                    None => g.tokens.push(token),
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
    let total: f64 = weights.iter().sum();
    match total > 0.0 {
        true => draw(&weights, total, rng),
        false => best.0 as u32,
    }
}

/// The token for one row under `constraint`: at temperature 0 the likeliest allowed token, else
/// a sample from the allowed ones; tokens in `banned` only when nothing else is allowed. `None`
/// when the constraint allows no token at all.
fn choose_constrained(
    logits: &[f32],
    banned: &[u32],
    temperature: f32,
    rng: &mut SplitMix64,
    constraint: &dyn TokenConstraint,
) -> Option<u32> {
    let fits = |t: u32| !banned.contains(&t) && constraint.allows(t);
    if temperature <= 0.0 {
        // The likeliest tokens first: the model's own choice usually fits.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let shortlist = CONSTRAINED_SHORTLIST.min(order.len());
        if shortlist < order.len() {
            order.select_nth_unstable_by(shortlist, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        }
        order.truncate(shortlist);
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        if let Some(&t) = order.iter().find(|&&t| fits(t)) {
            return Some(t);
        }
        let allowed: Vec<u32> = constraint
            .candidates()
            .into_iter()
            .filter(|&t| (t as usize) < logits.len() && constraint.allows(t))
            .collect();
        let best = |tokens: &mut dyn Iterator<Item = u32>| {
            tokens.max_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
        };
        return best(&mut allowed.iter().copied().filter(|t| !banned.contains(t)))
            .or_else(|| best(&mut allowed.iter().copied()));
    }
    // Sampling: draw from the whole distribution and redraw a refused token's mass elsewhere.
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| match banned.contains(&(i as u32)) {
            true => 0.0,
            false => (((l - top) / temperature) as f64).exp(),
        })
        .collect();
    for _ in 0..CONSTRAINED_SHORTLIST {
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            break;
        }
        let t = draw(&weights, total, rng);
        if constraint.allows(t) {
            return Some(t);
        }
        weights[t as usize] = 0.0;
    }
    let allowed: Vec<u32> = constraint
        .candidates()
        .into_iter()
        .filter(|&t| (t as usize) < logits.len() && constraint.allows(t))
        .collect();
    let mass: Vec<f64> = allowed.iter().map(|&t| weights[t as usize]).collect();
    let total: f64 = mass.iter().sum();
    if total > 0.0 {
        return Some(allowed[draw(&mass, total, rng) as usize]);
    }
    // Everything allowed is banned or vanishingly unlikely: the likeliest allowed one.
    allowed
        .into_iter()
        .max_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
}

/// An index drawn with probability proportional to `weights` (summing to `total`).
fn draw(weights: &[f64], total: f64, rng: &mut SplitMix64) -> u32 {
    let mut target = rng.next_f64() * total;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = i;
            target -= w;
            if target <= 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
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
