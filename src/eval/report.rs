//! Evaluation reports: a terminal table, `eval.json`, TREC run files and an SVG chart.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::Mode;
use super::judge::JudgeReport;
use super::metrics::{Judgements, Scores, score};

/// Results of one retrieval mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// Mode name.
    pub mode: String,
    /// Mean nDCG@10.
    pub ndcg_at_10: f64,
    /// Mean Recall@100.
    pub recall_at_100: f64,
    /// Mean MRR@10.
    pub mrr_at_10: f64,
    /// Median query latency through SQL, milliseconds (embedding the query included).
    pub latency_p50_ms: f64,
    /// 99th-percentile query latency, milliseconds.
    pub latency_p99_ms: f64,
    /// Rankings by query id: (doc id, score), best first.
    #[serde(skip)]
    pub runs: HashMap<String, Vec<(String, f32)>>,
}

impl ModeReport {
    /// Scores `runs` against `qrels` and summarises `latencies_ms`.
    pub fn new(
        mode: Mode,
        runs: HashMap<String, Vec<(String, f32)>>,
        mut latencies_ms: Vec<f64>,
        qrels: &HashMap<String, Judgements>,
    ) -> Self {
        let rankings: HashMap<String, Vec<String>> = runs
            .iter()
            .map(|(q, r)| (q.clone(), r.iter().map(|(d, _)| d.clone()).collect()))
            .collect();
        let Scores {
            ndcg_at_10,
            recall_at_100,
            mrr_at_10,
            ..
        } = score(&rankings, qrels);
        latencies_ms.sort_by(f64::total_cmp);
        let pick = |p: f64| {
            latencies_ms
                .get(((latencies_ms.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        ModeReport {
            mode: mode.name().to_string(),
            ndcg_at_10,
            recall_at_100,
            mrr_at_10,
            latency_p50_ms: pick(0.5),
            latency_p99_ms: pick(0.99),
            runs,
        }
    }

    /// The run in TREC format: `qid Q0 docid rank score run-name`, one line per result.
    pub fn trec(&self) -> String {
        let mut queries: Vec<&String> = self.runs.keys().collect();
        queries.sort();
        let mut out = String::new();
        for query in queries {
            for (rank, (doc, score)) in self.runs[query].iter().enumerate() {
                let _ = writeln!(out, "{query} Q0 {doc} {} {score:.6} mkflow-{}", rank + 1, self.mode);
            }
        }
        out
    }
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Dataset name.
    pub dataset: String,
    /// Embedding model of the index.
    pub model: String,
    /// Documents in the index.
    pub documents: usize,
    /// Queries evaluated.
    pub queries: usize,
    /// Seconds the ingestion pipeline took (0 when the index was reused).
    pub build_seconds: f64,
    /// Seconds the chunked index took to build (when a chunked mode was measured; 0 when it
    /// was reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunked_build_seconds: Option<f64>,
    /// Top-10 overlap of the HNSW search with the exact search (when `doc` was measured).
    pub ann_recall_at_10: Option<f64>,
    /// One entry per mode.
    pub modes: Vec<ModeReport>,
    /// The judged answers (with `--judge`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeReport>,
}

impl EvalReport {
    /// Index build throughput, documents per second (None when the index was reused).
    pub fn build_docs_per_second(&self) -> Option<f64> {
        (self.build_seconds > 0.0).then(|| self.documents as f64 / self.build_seconds)
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "dataset {} — {} documents, {} queries, model {}",
            self.dataset, self.documents, self.queries, self.model
        );
        match self.build_docs_per_second() {
            Some(rate) => {
                let _ = writeln!(out, "index build: {:.1}s ({rate:.1} docs/s)", self.build_seconds);
            }
            None => {
                let _ = writeln!(out, "index build: reused existing index");
            }
        }
        match self.chunked_build_seconds {
            Some(seconds) if seconds > 0.0 => {
                let _ = writeln!(
                    out,
                    "chunked index build: {seconds:.1}s ({:.1} docs/s)",
                    self.documents as f64 / seconds
                );
            }
            Some(_) => {
                let _ = writeln!(out, "chunked index build: reused existing index");
            }
            None => {}
        }
        if let Some(recall) = self.ann_recall_at_10 {
            let _ = writeln!(out, "ANN vs exact recall@10: {recall:.4}");
        }
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>11} {:>8} {:>12} {:>12}",
            "mode", "nDCG@10", "Recall@100", "MRR@10", "p50 ms", "p99 ms"
        );
        for m in &self.modes {
            let _ = writeln!(
                out,
                "{:<12} {:>9.4} {:>11.4} {:>8.4} {:>12.2} {:>12.2}",
                m.mode, m.ndcg_at_10, m.recall_at_100, m.mrr_at_10, m.latency_p50_ms, m.latency_p99_ms
            );
        }
        if let Some(judge) = &self.judge {
            out.push_str(&judge.table());
        }
        out
    }

    /// Writes `eval.json`, `run-<mode>.trec` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut json = serde_json::to_value(self).expect("report serialises");
        json["build_docs_per_second"] = serde_json::json!(self.build_docs_per_second());
        std::fs::write(
            dir.join("eval.json"),
            serde_json::to_string_pretty(&json).expect("json"),
        )?;
        for mode in &self.modes {
            std::fs::write(dir.join(format!("run-{}.trec", mode.mode)), mode.trec())?;
        }
        std::fs::write(dir.join("chart.svg"), self.svg_chart())
    }

    /// A grouped bar chart of the three metrics per mode.
    pub fn svg_chart(&self) -> String {
        const METRICS: [&str; 3] = ["nDCG@10", "Recall@100", "MRR@10"];
        const COLOURS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];
        let (width, height, left, top, plot_h) = (640.0, 360.0, 50.0, 40.0, 260.0);
        let group_w = (width - left - 20.0) / METRICS.len() as f64;
        let bar_w = (group_w - 30.0) / self.modes.len().max(1) as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"22\" font-size=\"15\">{} — retrieval quality by mode ({})</text>\n",
            self.dataset, self.model
        );
        for tick in 0..=5 {
            let value = tick as f64 / 5.0;
            let y = top + plot_h * (1.0 - value);
            let _ = writeln!(
                svg,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{value:.1}</text>",
                width - 20.0,
                left - 6.0,
                y + 4.0
            );
        }
        for (g, metric) in METRICS.iter().enumerate() {
            let x0 = left + g as f64 * group_w + 15.0;
            for (i, mode) in self.modes.iter().enumerate() {
                let value = [mode.ndcg_at_10, mode.recall_at_100, mode.mrr_at_10][g];
                let h = plot_h * value.clamp(0.0, 1.0);
                let x = x0 + i as f64 * bar_w;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{value:.3}</text>",
                    top + plot_h - h,
                    bar_w - 4.0,
                    COLOURS[i % COLOURS.len()],
                    x + (bar_w - 4.0) / 2.0,
                    top + plot_h - h - 4.0
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{metric}</text>",
                x0 + (group_w - 30.0) / 2.0,
                top + plot_h + 18.0
            );
        }
        for (i, mode) in self.modes.iter().enumerate() {
            let x = left + i as f64 * 110.0;
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
                height - 30.0,
                COLOURS[i % COLOURS.len()],
                x + 16.0,
                height - 20.0,
                mode.mode
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}
