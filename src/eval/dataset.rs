//! BEIR-format datasets: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`,
//! `text`) and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header line).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::metrics::Judgements;

/// A BEIR dataset's queries and judgements; the corpus is read by the ingestion pipeline.
#[derive(Debug, Clone)]
pub struct BeirDataset {
    /// Dataset name (its directory's name).
    pub name: String,
    /// `corpus.jsonl`.
    pub corpus: PathBuf,
    /// Judged queries of the split, in file order: (id, text).
    pub queries: Vec<(String, String)>,
    /// Judgements by query id.
    pub qrels: HashMap<String, Judgements>,
}

impl BeirDataset {
    /// Loads `dir` with the judgements of `split` (e.g. `test`). Only judged queries are kept.
    pub fn load(dir: &Path, split: &str) -> Result<Self, String> {
        let corpus = dir.join("corpus.jsonl");
        if !corpus.is_file() {
            return Err(format!("{} is not a BEIR dataset: corpus.jsonl missing", dir.display()));
        }
        let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
        let qrels_text = fs::read_to_string(&qrels_path).map_err(|e| format!("{}: {e}", qrels_path.display()))?;
        let mut qrels: HashMap<String, Judgements> = HashMap::new();
        for (n, line) in qrels_text.lines().enumerate() {
            let fields: Vec<&str> = line.split('\t').collect();
            if n == 0 && fields.first().is_some_and(|f| f.starts_with("query")) {
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let [query, doc, grade] = fields[..] else {
                return Err(format!(
                    "{} line {}: expected 3 tab-separated fields",
                    qrels_path.display(),
                    n + 1
                ));
            };
            let grade: i32 = grade
                .trim()
                .parse()
                .map_err(|_| format!("{} line {}: bad score '{grade}'", qrels_path.display(), n + 1))?;
            qrels
                .entry(query.to_string())
                .or_default()
                .insert(doc.to_string(), grade);
        }
        let queries_path = dir.join("queries.jsonl");
        let queries_text = fs::read_to_string(&queries_path).map_err(|e| format!("{}: {e}", queries_path.display()))?;
        let mut queries = Vec::new();
        for (n, line) in queries_text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", queries_path.display(), n + 1))?;
            let id =
                json_id(&value["_id"]).ok_or_else(|| format!("{} line {}: no _id", queries_path.display(), n + 1))?;
            if qrels.contains_key(&id) {
                queries.push((id, value["text"].as_str().unwrap_or_default().to_string()));
            }
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "dataset".into());
        Ok(BeirDataset {
            name,
            corpus,
            queries,
            qrels,
        })
    }
}

/// An id that may be written as a JSON string or number.
fn json_id(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
