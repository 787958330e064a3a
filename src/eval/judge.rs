//! `mkflow eval --judge`: the seed paper's evaluation of retrieval-augmented answers. For the
//! first N judged queries, three retrievals each give their 5 best pieces of evidence — doc-RAG
//! (`vector_search`: the documents' text), `qa` (`qa_search`: QA pairs) and `mk` (`mk_search`)
//! — the session's generator answers from each, and the same generator judges every answer on
//! the six criteria ([`CRITERIA`]):
//! - absolute: a score from 1 to 5 per criterion;
//! - pairwise: `mk`'s answer against each other one, asked in both orders, so an answer's
//!   position cannot decide (a criterion is won only when both orders agree).
//!
//! Calibrated against the qrels where a criterion allows: the judge's precision score is set
//! beside the share of each answer's evidence the qrels call relevant (Spearman's ρ over all
//! answers). Answers and judgements go through the generator's cache, so a rerun is free.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use futures::StreamExt;
use futures::future::join_all;
use mkflow_udfs::mk::{CRITERIA, Evidence, Generator, Judged, Judging};
use serde::Serialize;

use super::metrics::Judgements;
use super::{bar, sql_string};
use crate::Engine;

/// Pieces of evidence each answer is written from.
pub const JUDGE_EVIDENCE: usize = 5;

/// Characters of a document's text a doc-RAG piece of evidence quotes.
const PASSAGE_CHARS: usize = 700;

/// The retrievals answers are built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Documents by vector (`vector_search`), their text as evidence.
    Doc,
    /// Synthetic QA pairs (`qa_search`).
    Qa,
    /// Meta-Knowledge retrieval (`mk_search`).
    Mk,
}

impl Source {
    /// Every source, in report order.
    pub const ALL: [Source; 3] = [Source::Doc, Source::Qa, Source::Mk];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Source::Doc => "doc",
            Source::Qa => "qa",
            Source::Mk => "mk",
        }
    }

    /// The SQL giving the evidence for `query` from index `kb`.
    fn sql(self, kb: &str, query: &str) -> String {
        let q = sql_string(query);
        match self {
            Source::Doc => format!("SELECT doc_id, title, body FROM vector_search({kb}, {q}, {JUDGE_EVIDENCE})"),
            Source::Qa => format!("SELECT doc_id, question, answer FROM qa_search({kb}, {q}, {JUDGE_EVIDENCE})"),
            Source::Mk => format!("SELECT doc_id, question, answer, title FROM mk_search({kb}, {q}, {JUDGE_EVIDENCE})"),
        }
    }
}

/// One source's answers, judged.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// The source.
    pub source: Source,
    /// Answers written and judged.
    pub answers: usize,
    /// Mean score per criterion ([`CRITERIA`] order), 1 to 5.
    pub means: Vec<f64>,
    /// Mean share of the evidence the qrels call relevant.
    pub qrels_precision: f64,
}

/// `mk` against another source, per criterion.
#[derive(Debug, Clone, Serialize)]
pub struct PairwiseReport {
    /// The other source.
    pub against: Source,
    /// Queries where both orders preferred `mk`, per criterion.
    pub wins: Vec<usize>,
    /// Queries where they did not agree, or said tie.
    pub ties: Vec<usize>,
    /// Queries where both orders preferred the other.
    pub losses: Vec<usize>,
}

/// What `eval --judge` measured.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeReport {
    /// The generator that answered and judged.
    pub generator: String,
    /// Queries judged.
    pub queries: usize,
    /// Absolute judgements per source.
    pub sources: Vec<SourceReport>,
    /// Pairwise judgements of `mk` against the others.
    pub pairwise: Vec<PairwiseReport>,
    /// Spearman's ρ between the judge's precision and the qrels precision of the evidence.
    pub precision_vs_qrels: Option<f64>,
    /// Answers or judgements that failed (left out of the means).
    pub failures: usize,
}

/// Queries answered and judged at the same time: their calls reach the generator together, so a
/// local LLM answers them in batches and an OpenAI-compatible server in parallel.
const QUERIES_IN_FLIGHT: usize = 4;

/// What one query's answers and judgements gave.
struct QueryOutcome {
    /// Per source: the qrels precision of its evidence, and the absolute scores of its answer
    /// (None when answering or judging failed).
    absolute: Vec<(Source, f64, Option<Vec<f32>>)>,
    /// Per source `mk` was compared with: the verdicts with `mk` first and with `mk` second.
    pairwise: Vec<(Source, Vec<f32>, Vec<f32>)>,
    /// Answers or judgements that failed.
    failures: usize,
}

/// Answers one query from each source and judges the answers: absolutely, and `mk`'s against
/// each other one in both orders. The calls of a step go out together.
async fn judge_query(
    engine: &Engine,
    generator: &dyn Generator,
    kb: &str,
    text: &str,
    relevant: Option<&Judgements>,
) -> Result<QueryOutcome> {
    let mut evidence = Vec::new();
    for source in Source::ALL {
        evidence.push(self::evidence(&engine.sql(&source.sql(kb, text)).await?));
    }
    let answers = join_all(evidence.iter().map(|e| generator.answer(text, e))).await;
    let mut failures = answers.iter().filter(|a| a.is_err()).count();
    let answered: Vec<(Source, &String, &Vec<Evidence>)> = Source::ALL
        .into_iter()
        .zip(&answers)
        .zip(&evidence)
        .filter_map(|((source, answer), evidence)| answer.as_ref().ok().map(|a| (source, a, evidence)))
        .collect();
    let verdicts = join_all(answered.iter().map(|&(_, answer, evidence)| async move {
        let judging = Judging::Absolute {
            query: text,
            answer: Judged { answer, evidence },
        };
        generator.judge(&judging).await
    }))
    .await;
    let mut absolute: Vec<(Source, f64, Option<Vec<f32>>)> = Source::ALL
        .into_iter()
        .zip(&evidence)
        .map(|(source, evidence)| (source, qrels_precision(evidence, relevant), None))
        .collect();
    for (&(source, _, _), verdict) in answered.iter().zip(verdicts) {
        match (verdict, absolute.iter_mut().find(|(s, _, _)| *s == source)) {
            (Ok(verdict), Some(slot)) => slot.2 = Some(verdict.scores),
            _ => failures += 1,
        }
    }
    let judged = |source: Source| {
        answered
            .iter()
            .find(|(s, _, _)| *s == source)
            .map(|&(_, answer, evidence)| Judged { answer, evidence })
    };
    let mut pairwise = Vec::new();
    if let Some(mk) = judged(Source::Mk) {
        let others: Vec<(Source, Judged)> = [Source::Doc, Source::Qa]
            .into_iter()
            .filter_map(|s| judged(s).map(|j| (s, j)))
            .collect();
        let orders = join_all(others.iter().map(|&(_, other)| async move {
            let mk_first = Judging::Pairwise {
                query: text,
                first: mk,
                second: other,
            };
            let other_first = Judging::Pairwise {
                query: text,
                first: other,
                second: mk,
            };
            futures::join!(generator.judge(&mk_first), generator.judge(&other_first))
        }))
        .await;
        for ((against, _), (first, second)) in others.iter().zip(orders) {
            match (first, second) {
                (Ok(first), Ok(second)) => pairwise.push((*against, first.scores, second.scores)),
                _ => failures += 1,
            }
        }
    }
    Ok(QueryOutcome {
        absolute,
        pairwise,
        failures,
    })
}

/// Answers the first `count` of `queries` from each source of index `kb` and judges them.
pub async fn judge(
    engine: &Engine,
    generator: &dyn Generator,
    kb: &str,
    queries: &[(String, String)],
    qrels: &HashMap<String, Judgements>,
    count: usize,
) -> Result<JudgeReport> {
    let queries: Vec<&(String, String)> = queries.iter().take(count).collect();
    let progress = bar(queries.len() as u64, "judging");
    let mut scores: HashMap<Source, Vec<Vec<f32>>> = HashMap::new();
    let mut precision: HashMap<Source, Vec<f64>> = HashMap::new();
    let mut calibration: Vec<(f64, f64)> = Vec::new();
    let mut pairwise: HashMap<Source, PairwiseReport> = HashMap::new();
    let mut failures = 0;
    let mut outcomes = futures::stream::iter(queries.iter().map(|(id, text)| {
        let progress = &progress;
        async move {
            let outcome = judge_query(engine, generator, kb, text, qrels.get(id)).await;
            progress.inc(1);
            outcome
        }
    }))
    .buffered(QUERIES_IN_FLIGHT);
    while let Some(outcome) = outcomes.next().await {
        let outcome = outcome?;
        failures += outcome.failures;
        for (source, share, verdict) in outcome.absolute {
            precision.entry(source).or_default().push(share);
            if let Some(verdict) = verdict {
                calibration.push((f64::from(verdict[1]), share));
                scores.entry(source).or_default().push(verdict);
            }
        }
        for (against, first, second) in outcome.pairwise {
            let entry = pairwise.entry(against).or_insert_with(|| PairwiseReport {
                against,
                wins: vec![0; CRITERIA.len()],
                ties: vec![0; CRITERIA.len()],
                losses: vec![0; CRITERIA.len()],
            });
            for criterion in 0..CRITERIA.len() {
                // mk first: −1 prefers it; mk second: +1 does.
                let (a, b) = (-first[criterion], second[criterion]);
                match (a, b) {
                    (a, b) if a > 0.0 && b > 0.0 => entry.wins[criterion] += 1,
                    (a, b) if a < 0.0 && b < 0.0 => entry.losses[criterion] += 1,
                    _ => entry.ties[criterion] += 1,
                }
            }
        }
    }
    drop(outcomes);
    progress.finish_and_clear();
    let sources = Source::ALL
        .into_iter()
        .map(|source| {
            let judged = scores.remove(&source).unwrap_or_default();
            let means = (0..CRITERIA.len())
                .map(|c| judged.iter().map(|s| f64::from(s[c])).sum::<f64>() / judged.len().max(1) as f64)
                .collect();
            let shares = precision.remove(&source).unwrap_or_default();
            SourceReport {
                source,
                answers: judged.len(),
                means,
                qrels_precision: shares.iter().sum::<f64>() / shares.len().max(1) as f64,
            }
        })
        .collect();
    let mut pairwise: Vec<PairwiseReport> = pairwise.into_values().collect();
    pairwise.sort_by_key(|p| p.against.name());
    Ok(JudgeReport {
        generator: generator.name(),
        queries: queries.len(),
        sources,
        pairwise,
        precision_vs_qrels: spearman(&calibration),
        failures,
    })
}

/// The evidence in a search's rows: QA pairs (`question`, `answer`) or documents (`body`,
/// quoted up to [`PASSAGE_CHARS`]).
fn evidence(batches: &[RecordBatch]) -> Vec<Evidence> {
    let mut out = Vec::new();
    for batch in batches {
        let text = |name: &str| batch.column_by_name(name).and_then(|c| cast(c, &DataType::Utf8).ok());
        let (ids, titles) = (text("doc_id"), text("title"));
        let (questions, answers, bodies) = (text("question"), text("answer"), text("body"));
        let value = |column: &Option<std::sync::Arc<dyn Array>>, row: usize| {
            column
                .as_ref()
                .map(|c| c.as_string::<i32>())
                .filter(|c| c.is_valid(row))
                .map(|c| c.value(row).to_string())
        };
        for row in 0..batch.num_rows() {
            let passage = value(&bodies, row).map(|b| b.chars().take(PASSAGE_CHARS).collect::<String>());
            out.push(Evidence {
                question: value(&questions, row).unwrap_or_default(),
                answer: value(&answers, row).or(passage).unwrap_or_default(),
                doc_id: value(&ids, row).unwrap_or_default(),
                title: value(&titles, row),
            });
        }
    }
    out
}

/// The share of `evidence` whose document the qrels call relevant.
fn qrels_precision(evidence: &[Evidence], relevant: Option<&Judgements>) -> f64 {
    if evidence.is_empty() {
        return 0.0;
    }
    let hits = evidence
        .iter()
        .filter(|e| relevant.is_some_and(|r| r.get(&e.doc_id).is_some_and(|g| *g > 0)))
        .count();
    hits as f64 / evidence.len() as f64
}

/// Spearman's rank correlation of the pairs (average ranks for ties); `None` under 3 pairs or
/// when either side is constant.
pub fn spearman(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let ranks = |values: Vec<f64>| -> Vec<f64> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        let mut ranks = vec![0.0; values.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
                j += 1;
            }
            let average = (i + j) as f64 / 2.0 + 1.0;
            order[i..=j].iter().for_each(|&k| ranks[k] = average);
            i = j + 1;
        }
        ranks
    };
    let x = ranks(pairs.iter().map(|p| p.0).collect());
    let y = ranks(pairs.iter().map(|p| p.1).collect());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&x), mean(&y));
    let covariance: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let spread = |v: &[f64], m: f64| v.iter().map(|a| (a - m).powi(2)).sum::<f64>().sqrt();
    let denominator = spread(&x, mx) * spread(&y, my);
    (denominator > 0.0).then(|| covariance / denominator)
}

impl JudgeReport {
    /// The report as text tables.
    pub fn table(&self) -> String {
        let mut out = format!(
            "judged by {} on {} queries ({} failures)\n{:<8}{:>8}",
            self.generator, self.queries, self.failures, "answers", "n"
        );
        for (name, _) in CRITERIA {
            out.push_str(&format!("{name:>12}"));
        }
        out.push_str(&format!("{:>16}\n", "qrels precision"));
        for source in &self.sources {
            out.push_str(&format!("{:<8}{:>8}", source.source.name(), source.answers));
            for mean in &source.means {
                out.push_str(&format!("{mean:>12.2}"));
            }
            out.push_str(&format!("{:>16.3}\n", source.qrels_precision));
        }
        for pair in &self.pairwise {
            out.push_str(&format!("mk vs {:<10}", pair.against.name()));
            for c in 0..CRITERIA.len() {
                out.push_str(&format!(
                    "{:>12}",
                    format!("{}/{}/{}", pair.wins[c], pair.ties[c], pair.losses[c])
                ));
            }
            out.push_str("   (wins/ties/losses)\n");
        }
        match self.precision_vs_qrels {
            Some(rho) => out.push_str(&format!("judge precision vs qrels precision: Spearman ρ = {rho:.3}\n")),
            None => out.push_str("judge precision vs qrels precision: not enough variation to correlate\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_ranks_with_ties() {
        let close = |rho: Option<f64>, expected: f64| rho.is_some_and(|r| (r - expected).abs() < 1e-9);
        assert!(close(spearman(&[(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]), 1.0));
        assert!(close(spearman(&[(1.0, 30.0), (2.0, 20.0), (3.0, 10.0)]), -1.0));
        assert!(close(spearman(&[(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)]), 0.5));
        let tied = spearman(&[(1.0, 0.0), (1.0, 0.0), (5.0, 1.0), (5.0, 1.0)]).unwrap();
        assert!((tied - 1.0).abs() < 1e-9, "{tied}");
        assert_eq!(spearman(&[(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]), None, "constant side");
        assert_eq!(spearman(&[(1.0, 1.0), (2.0, 2.0)]), None, "too few");
    }

    #[test]
    fn qrels_precision_counts_relevant_documents() {
        let piece = |doc: &str| Evidence {
            question: String::new(),
            answer: "text".into(),
            doc_id: doc.into(),
            title: None,
        };
        let judgements: Judgements = [("d1".to_string(), 1), ("d2".to_string(), 0)].into_iter().collect();
        let evidence = [piece("d1"), piece("d2"), piece("d3"), piece("d1")];
        assert_eq!(qrels_precision(&evidence, Some(&judgements)), 0.5);
        assert_eq!(qrels_precision(&evidence, None), 0.0);
        assert_eq!(qrels_precision(&[], Some(&judgements)), 0.0);
    }
}
