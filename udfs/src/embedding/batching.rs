//! Grouping texts into model calls.
//!
//! A transformer call costs roughly `batch size × padded length`. Sorting texts by length and
//! filling each call up to a token budget (as text-embeddings-inference does) keeps padding
//! small and the work per call even, where fixed-size batches of mixed lengths waste most of
//! their compute on padding.

use serde::{Deserialize, Serialize};

/// How texts are grouped into model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BatchingStrategy {
    /// Sort by length; each call holds at most `max_batch_tokens` padded tokens and at most
    /// `max_batch_size` texts.
    TokenBudget {
        /// Cap on `texts in the call × longest text in the call`.
        max_batch_tokens: usize,
        /// Cap on texts in one call.
        max_batch_size: usize,
    },
    /// Texts in input order, `size` per call (the naive baseline).
    FixedSize {
        /// Texts per call.
        size: usize,
    },
}

impl Default for BatchingStrategy {
    fn default() -> Self {
        BatchingStrategy::TokenBudget {
            max_batch_tokens: 8192,
            max_batch_size: 256,
        }
    }
}

impl BatchingStrategy {
    /// Splits texts of the given token lengths into calls; each call lists indexes into
    /// `lengths`. Every index appears exactly once.
    pub fn plan(&self, lengths: &[usize]) -> Vec<Vec<usize>> {
        match *self {
            BatchingStrategy::FixedSize { size } => {
                let size = size.max(1);
                (0..lengths.len())
                    .collect::<Vec<_>>()
                    .chunks(size)
                    .map(<[usize]>::to_vec)
                    .collect()
            }
            BatchingStrategy::TokenBudget {
                max_batch_tokens,
                max_batch_size,
            } => token_budget_plan(lengths, max_batch_tokens, max_batch_size.max(1)),
        }
    }
}

fn token_budget_plan(lengths: &[usize], budget: usize, max_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Longest first: the first text of a call fixes its padded length.
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    let mut plan = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut padded_len = 0;
    for index in order {
        let len = lengths[index].max(1);
        if current.is_empty() {
            padded_len = len;
        }
        let fits = (current.len() + 1) * padded_len <= budget && current.len() < max_size;
        if !current.is_empty() && !fits {
            plan.push(std::mem::take(&mut current));
            padded_len = len;
        }
        current.push(index);
    }
    if !current.is_empty() {
        plan.push(current);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten_sorted(plan: &[Vec<usize>]) -> Vec<usize> {
        let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
        all.sort_unstable();
        all
    }

    #[test]
    fn token_budget_covers_every_text_once_and_respects_budget() {
        let lengths = [5, 300, 12, 7, 256, 40, 1, 128, 128, 64];
        let strategy = BatchingStrategy::TokenBudget {
            max_batch_tokens: 512,
            max_batch_size: 4,
        };
        let plan = strategy.plan(&lengths);
        assert_eq!(flatten_sorted(&plan), (0..lengths.len()).collect::<Vec<_>>());
        for call in &plan {
            let longest = call.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(call.len() <= 4);
            // A single over-budget text still gets its own call.
            assert!(call.len() == 1 || call.len() * longest <= 512, "{call:?}");
        }
        // Sorted by length: the 300-token text is alone, short texts share calls.
        assert_eq!(plan[0], vec![1]);
        assert!(plan.len() < lengths.len());
    }

    #[test]
    fn fixed_size_keeps_input_order() {
        let plan = BatchingStrategy::FixedSize { size: 3 }.plan(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(plan, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    }

    #[test]
    fn empty_input_gives_no_calls() {
        assert!(BatchingStrategy::default().plan(&[]).is_empty());
    }
}
