//! Ranking metrics as BEIR / TREC define them, for one query at a time and averaged.
//!
//! - nDCG@k: graded gains `rel`, discount `1 / log2(rank + 1)`, ideal ranking from the
//!   judgements (only positive grades count); a query without positive judgements is skipped
//!   by the averages (as BEIR/pytrec_eval do).
//! - Recall@k: relevant documents retrieved in the top k ÷ relevant documents.
//! - MRR@k: 1 / rank of the first relevant document in the top k, else 0.
//!
//! Ties in the run are broken by the order given (callers pass runs ranked best first).

use std::collections::HashMap;

/// Relevance judgements of one query: document id → grade (> 0 is relevant).
pub type Judgements = HashMap<String, i32>;

/// nDCG@k of `ranking` (document ids, best first).
pub fn ndcg_at_k(ranking: &[String], judgements: &Judgements, k: usize) -> f64 {
    let gain = |doc: &String| judgements.get(doc).copied().unwrap_or(0).max(0) as f64;
    let dcg: f64 = ranking
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, doc)| gain(doc) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<f64> = judgements.values().filter(|g| **g > 0).map(|g| *g as f64).collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| g / ((i + 2) as f64).log2())
        .sum();
    if idcg == 0.0 { 0.0 } else { dcg / idcg }
}

/// Recall@k of `ranking`.
pub fn recall_at_k(ranking: &[String], judgements: &Judgements, k: usize) -> f64 {
    let relevant = judgements.values().filter(|g| **g > 0).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranking
        .iter()
        .take(k)
        .filter(|doc| judgements.get(*doc).is_some_and(|g| *g > 0))
        .collect::<std::collections::HashSet<_>>()
        .len();
    found as f64 / relevant as f64
}

/// MRR@k of `ranking`.
pub fn mrr_at_k(ranking: &[String], judgements: &Judgements, k: usize) -> f64 {
    ranking
        .iter()
        .take(k)
        .position(|doc| judgements.get(doc).is_some_and(|g| *g > 0))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// Averages of the three metrics over every judged query (queries with no positive
/// judgement are skipped; judged queries missing from `runs` count as empty rankings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Mean nDCG@10.
    pub ndcg_at_10: f64,
    /// Mean Recall@100.
    pub recall_at_100: f64,
    /// Mean MRR@10.
    pub mrr_at_10: f64,
    /// Queries averaged over.
    pub queries: usize,
}

/// Scores `runs` (query id → ranking) against `qrels` (query id → judgements).
pub fn score(runs: &HashMap<String, Vec<String>>, qrels: &HashMap<String, Judgements>) -> Scores {
    let empty = Vec::new();
    let mut totals = (0.0, 0.0, 0.0);
    let mut queries = 0;
    for (query, judgements) in qrels {
        if !judgements.values().any(|g| *g > 0) {
            continue;
        }
        let ranking = runs.get(query).unwrap_or(&empty);
        totals.0 += ndcg_at_k(ranking, judgements, 10);
        totals.1 += recall_at_k(ranking, judgements, 100);
        totals.2 += mrr_at_k(ranking, judgements, 10);
        queries += 1;
    }
    let n = queries.max(1) as f64;
    Scores {
        ndcg_at_10: totals.0 / n,
        recall_at_100: totals.1 / n,
        mrr_at_10: totals.2 / n,
        queries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn judged(pairs: &[(&str, i32)]) -> Judgements {
        pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    #[test]
    fn ndcg_with_graded_relevance_matches_hand_computation() {
        // Ranking: a (grade 2) at 1, x (0) at 2, b (1) at 3.
        // DCG = 2/log2(2) + 1/log2(4) = 2 + 0.5 = 2.5; IDCG = 2 + 1/log2(3) = 2.6309…
        let judgements = judged(&[("a", 2), ("b", 1)]);
        let value = ndcg_at_k(&ids(&["a", "x", "b"]), &judgements, 10);
        let expected = 2.5 / (2.0 + 1.0 / 3f64.log2());
        assert!((value - expected).abs() < 1e-12, "{value} vs {expected}");
        // Perfect ranking gives 1; cut-off k=1 keeps only the first.
        assert!((ndcg_at_k(&ids(&["a", "b"]), &judgements, 10) - 1.0).abs() < 1e-12);
        assert!((ndcg_at_k(&ids(&["b", "a"]), &judgements, 1) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn tied_grades_and_tied_positions() {
        // Two equally relevant documents: either order is ideal.
        let judgements = judged(&[("a", 1), ("b", 1)]);
        assert!((ndcg_at_k(&ids(&["a", "b"]), &judgements, 10) - 1.0).abs() < 1e-12);
        assert!((ndcg_at_k(&ids(&["b", "a"]), &judgements, 10) - 1.0).abs() < 1e-12);
        // Documents the run scored equally keep the order given: the relevant one second.
        let value = ndcg_at_k(&ids(&["x", "a"]), &judged(&[("a", 1)]), 10);
        assert!((value - 1.0 / 3f64.log2()).abs() < 1e-12);
        // A duplicate in the run is not counted as a second relevant hit by recall.
        assert_eq!(recall_at_k(&ids(&["a", "a"]), &judgements, 10), 0.5);
    }

    #[test]
    fn recall_and_mrr() {
        let judgements = judged(&[("a", 1), ("b", 1), ("c", 0)]);
        let ranking = ids(&["c", "x", "b"]);
        assert_eq!(recall_at_k(&ranking, &judgements, 100), 0.5);
        assert_eq!(recall_at_k(&ranking, &judgements, 2), 0.0);
        assert!((mrr_at_k(&ranking, &judgements, 10) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(mrr_at_k(&ranking, &judgements, 2), 0.0);
    }

    #[test]
    fn missing_runs_count_as_zero_and_unjudged_queries_are_skipped() {
        let mut qrels = HashMap::new();
        qrels.insert("q1".to_string(), judged(&[("a", 1)]));
        qrels.insert("q2".to_string(), judged(&[("b", 1)]));
        qrels.insert("q3".to_string(), judged(&[("c", 0)]));
        let mut runs = HashMap::new();
        runs.insert("q1".to_string(), ids(&["a"]));
        let scores = score(&runs, &qrels);
        assert_eq!(scores.queries, 2);
        assert!((scores.ndcg_at_10 - 0.5).abs() < 1e-12);
        assert!((scores.mrr_at_10 - 0.5).abs() < 1e-12);
        assert!((scores.recall_at_100 - 0.5).abs() < 1e-12);
    }
}
