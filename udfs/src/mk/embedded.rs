//! The embedded generator: Meta-Knowledge preparation without an LLM, fast enough for tens of
//! thousands of documents on a laptop (it costs about one embedding per document).
//!
//! - Metadata: `labels`/`choice` fields by zero-shot classification — the document's embedding
//!   against the embeddings of each label's name and description; key phrases by RAKE; links
//!   and lexicon terms by scanning the text.
//! - Questions: the title becomes a question ("Is it true that …?" when it states a finding,
//!   "What is known about …?" when it names a topic); the most salient sentences (findings and
//!   conclusions over background and methods, key-phrase and title coverage, finding verbs)
//!   become "Is it true that …?" questions with the reporting frame removed ("we found that").
//!   Each answer is the sentence the question came from.
//! - Summaries: the cluster's key concepts (RAKE over its questions) and its most
//!   representative questions (maximal marginal relevance around the questions' centroid).
//! - Query rewriting: the query phrased as the synthetic questions are, and the query expanded
//!   with the routed cluster's key concepts nearest to it.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::generator::{
    ClusterBrief, ClusterDigest, Document, Evidence, GenerationError, GenerationStats, Generator, Judging, Prepared,
    QaPair, REASONING_NEEDS_AN_LLM, Verdict,
};
use super::schema::{FieldKind, MetadataField, MetadataSchema};
use super::text::{self, Sentence};
use crate::embedding::{EmbedQueue, Embeddings, LazyEmbedder, TextRole};

/// Marker of the key-concepts line of summaries (also read back by query rewriting).
const KEY_CONCEPTS: &str = "Key concepts:";

/// Most distinct answers an extractive answer quotes.
const EXTRACTIVE_ANSWERS: usize = 3;

/// Representative questions quoted in a summary.
const SUMMARY_QUESTIONS: usize = 5;

/// Key concepts listed in a summary.
const SUMMARY_CONCEPTS: usize = 12;

/// Concepts of the cluster summary added to a query by rewriting.
const EXPANSION_CONCEPTS: usize = 3;

/// Key phrases of a document weighed in sentence salience.
const SALIENCE_KEYPHRASES: usize = 10;

/// Extra labels are kept when they score within this much of the best label.
const LABEL_MARGIN: f32 = 0.03;

/// Finding verbs and phrases that make a sentence worth a question.
const FINDING_CUES: &[&str] = &[
    "associated with",
    "increase",
    "decrease",
    "reduce",
    "reduction",
    "improve",
    "inhibit",
    "induce",
    "promote",
    "require",
    "correlat",
    "predict",
    "higher",
    "lower",
    "risk",
    "effect",
    "demonstrat",
    "reveal",
    "identif",
    "suggest",
    "indicat",
    "show",
    "found",
    "conclude",
    "essential",
    "necessary",
    "sufficient",
    "cause",
    "lead to",
    "leads to",
    "regulat",
    "activat",
    "suppress",
    "enhanc",
    "protect",
    "impair",
    "block",
    "mediat",
    "contribut",
    "depend",
    "linked",
    "no difference",
    "did not",
    "does not",
    "not associated",
    "significant",
];

/// Method phrases that make a sentence about procedure, not knowledge.
const METHOD_CUES: &[&str] = &[
    "we enrolled",
    "were enrolled",
    "were randomly",
    "were randomized",
    "were randomised",
    "were recruited",
    "we recruited",
    "we used",
    "we performed",
    "we conducted",
    "we analyzed",
    "we analysed",
    "participants were",
    "we measured",
    "was conducted",
    "were assigned",
    "we searched",
    "were included",
    "we included",
    "we collected",
    "were collected",
    "we examined",
    "we investigated",
    "we evaluated",
    "we assessed",
    "we studied",
    "we sought",
    "we aimed",
    "we tested",
    "to determine",
    "to investigate",
    "to examine",
    "to assess",
    "to evaluate",
];

/// The generator that needs no LLM (see the module documentation).
#[derive(Debug)]
pub struct EmbeddedGenerator {
    embedder: Arc<LazyEmbedder>,
    schema: Arc<MetadataSchema>,
    max_questions: usize,
    /// Label vectors per schema field (empty for fields without labels), computed on first use.
    label_vectors: OnceLock<Vec<Vec<Vec<f32>>>>,
    stats: GenerationStats,
}

impl EmbeddedGenerator {
    /// A generator classifying with `embedder`'s model into `schema`'s fields and writing at
    /// most `max_questions` questions per document.
    pub fn new(embedder: Arc<LazyEmbedder>, schema: Arc<MetadataSchema>, max_questions: usize) -> Self {
        EmbeddedGenerator {
            embedder,
            schema,
            max_questions: max_questions.max(1),
            label_vectors: OnceLock::new(),
            stats: GenerationStats::default(),
        }
    }

    fn model(&self) -> Result<Arc<EmbedQueue>, GenerationError> {
        self.embedder.get().map_err(|e| GenerationError::Model(e.to_string()))
    }

    /// Embeds texts, blocking the thread (for work already off the async runtime).
    fn embed(&self, texts: &[&str]) -> Result<Embeddings, GenerationError> {
        let inputs: Vec<Option<&str>> = texts.iter().map(|t| Some(*t)).collect();
        self.model()?
            .embed_blocking(&inputs, TextRole::Document)
            .map_err(|e| GenerationError::Model(e.to_string()))
    }

    /// Embeds texts through the model's queue without blocking the async runtime.
    async fn embed_async(&self, texts: &[&str]) -> Result<Embeddings, GenerationError> {
        let inputs: Vec<Option<&str>> = texts.iter().map(|t| Some(*t)).collect();
        let model_error = |e: crate::embedding::EmbedError| GenerationError::Model(e.to_string());
        let queue = self.embedder.get_async().await.map_err(model_error)?;
        queue.embed(&inputs).await.map_err(model_error)
    }

    fn labels(&self) -> Result<&Vec<Vec<Vec<f32>>>, GenerationError> {
        if let Some(v) = self.label_vectors.get() {
            return Ok(v);
        }
        let mut per_field = Vec::with_capacity(self.schema.fields.len());
        for field in &self.schema.fields {
            let texts: Vec<String> = field
                .labels
                .iter()
                .map(|l| {
                    if l.description.is_empty() {
                        l.name.clone()
                    } else {
                        format!("{}: {}", l.name, l.description)
                    }
                })
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let embeddings = self.embed(&refs)?;
            per_field.push(
                (0..refs.len())
                    .map(|i| embeddings.get(i).unwrap_or(&[]).to_vec())
                    .collect(),
            );
        }
        Ok(self.label_vectors.get_or_init(|| per_field))
    }

    /// Metadata and questions of `document`, whose full text is `full_text` and embedding
    /// `vector`.
    fn prepare_one(
        &self,
        document: &Document<'_>,
        full_text: &str,
        vector: Option<&[f32]>,
    ) -> Result<Prepared, GenerationError> {
        // One RAKE pass serves the key-phrase fields and question salience (a longer ranking's
        // head is the shorter ranking).
        let wanted = self
            .schema
            .fields
            .iter()
            .filter(|f| f.kind == FieldKind::Keyphrases)
            .map(|f| f.max)
            .fold(SALIENCE_KEYPHRASES, usize::max);
        let keyphrases = text::keyphrases(full_text, wanted);
        let labels = self.labels()?;
        let mut metadata = Map::new();
        for (field, label_vectors) in self.schema.fields.iter().zip(labels) {
            let value = match field.kind {
                FieldKind::Labels | FieldKind::Choice => {
                    let Some(vector) = vector else {
                        return Err(GenerationError::Model("the document has no text to classify".into()));
                    };
                    let chosen = classify(field, label_vectors, vector);
                    if field.kind == FieldKind::Choice {
                        Value::String(chosen[0].clone())
                    } else {
                        strings(chosen)
                    }
                }
                FieldKind::Keyphrases => strings(keyphrases.iter().take(field.max).map(|k| k.phrase.clone()).collect()),
                FieldKind::Urls => strings(text::urls(full_text).into_iter().take(field.max).collect()),
                FieldKind::Terms => strings(
                    text::mentioned_terms(full_text, &field.terms)
                        .into_iter()
                        .take(field.max)
                        .collect(),
                ),
            };
            metadata.insert(field.name.clone(), value);
        }
        Ok(Prepared {
            metadata,
            qa: self.questions(document, &keyphrases[..keyphrases.len().min(SALIENCE_KEYPHRASES)]),
        })
    }

    /// Synthetic questions: the title's, then the salient sentences' in document order
    /// (`keyphrases`: the document's best key phrases, for salience).
    fn questions(&self, document: &Document<'_>, keyphrases: &[text::Keyphrase]) -> Vec<QaPair> {
        let sentences = text::sentences(document.body);
        let title_words: HashSet<String> = document
            .title
            .map(|t| text::words(t).into_iter().map(str::to_lowercase).collect())
            .unwrap_or_default();
        let scores: Vec<f32> = sentences
            .iter()
            .enumerate()
            .map(|(i, s)| salience(s, i, sentences.len(), keyphrases, &title_words))
            .collect();
        let best = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let title = document.title.map(str::trim).filter(|t| !t.is_empty());
        let budget = self.max_questions - usize::from(title.is_some());
        let mut ranked: Vec<usize> = (0..sentences.len())
            .filter(|&i| scores[i].is_finite() && (scores[i] >= 0.5 * best || scores[i] == best))
            .collect();
        ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        ranked.truncate(budget);
        let top_sentence = ranked.first().map(|&i| sentences[i].text.clone());
        ranked.sort_unstable();

        let mut out: Vec<QaPair> = Vec::new();
        if let Some(title) = title {
            let question = if text::is_statement(title) {
                text::statement_question(title)
            } else {
                text::topic_question(title)
            };
            let answer = top_sentence.unwrap_or_else(|| title.to_string());
            out.push(QaPair { question, answer });
        }
        for i in ranked {
            let question = text::statement_question(&sentences[i].text);
            if !out.iter().any(|q| q.question.eq_ignore_ascii_case(&question)) {
                out.push(QaPair {
                    question,
                    answer: sentences[i].text.clone(),
                });
            }
        }
        out
    }
}

fn strings(values: Vec<String>) -> Value {
    Value::Array(values.into_iter().map(Value::String).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The labels of `field` nearest to the document vector: the best, then others within
/// [`LABEL_MARGIN`] of it, up to the field's `max` (one for `choice`).
fn classify(field: &MetadataField, label_vectors: &[Vec<f32>], vector: &[f32]) -> Vec<String> {
    let mut scored: Vec<(f32, &str)> = field
        .labels
        .iter()
        .zip(label_vectors)
        .map(|(l, v)| (dot(v, vector), l.name.as_str()))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top = scored[0].0;
    let max = if field.kind == FieldKind::Choice { 1 } else { field.max };
    scored
        .into_iter()
        .take_while(|(s, _)| *s >= top - LABEL_MARGIN)
        .take(max)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// How much a sentence deserves a question; `-inf` for sentences too short to stand alone.
fn salience(
    sentence: &Sentence,
    position: usize,
    count: usize,
    keyphrases: &[text::Keyphrase],
    title_words: &HashSet<String>,
) -> f32 {
    let words = text::words(&sentence.text);
    if words.len() < 6 || sentence.text.ends_with('?') {
        return f32::NEG_INFINITY;
    }
    let lower = sentence.text.to_lowercase();
    let best_keyphrase = keyphrases.first().map_or(1.0, |k| k.score.max(1.0));
    let coverage: f32 = keyphrases
        .iter()
        .filter(|k| lower.contains(&k.phrase.to_lowercase()))
        .map(|k| k.score / best_keyphrase)
        .sum::<f32>()
        .min(1.5);
    let title_overlap = if title_words.is_empty() {
        0.0
    } else {
        let hits = words.iter().filter(|w| title_words.contains(&w.to_lowercase())).count();
        (hits as f32 / title_words.len() as f32).min(1.0)
    };
    let finding = FINDING_CUES.iter().filter(|c| lower.contains(*c)).count().min(3) as f32 * 0.25;
    let method = if METHOD_CUES.iter().any(|c| lower.contains(c)) {
        0.5
    } else {
        0.0
    };
    let position_bonus = match count - position {
        1 => 0.4,
        2 => 0.2,
        _ if position == 0 => 0.1,
        _ => 0.0,
    };
    let length_penalty = if words.len() > 70 { 0.5 } else { 0.0 };
    coverage + 0.5 * title_overlap + finding + sentence.section_weight + position_bonus - method - length_penalty
}

/// Question text without the question templates, for key-concept extraction.
fn question_content(question: &str) -> &str {
    question
        .trim_start_matches("Is it true that ")
        .trim_start_matches("What is known about ")
        .trim_end_matches('?')
}

/// Indices of up to `n` questions by maximal marginal relevance around their centroid.
fn representatives(vectors: &[f32], dims: usize, n: usize) -> Vec<usize> {
    let count = vectors.len() / dims.max(1);
    if count == 0 {
        return Vec::new();
    }
    let mut centroid = vec![0.0f32; dims];
    for row in vectors.chunks(dims) {
        for (c, v) in centroid.iter_mut().zip(row) {
            *c += v;
        }
    }
    let norm = centroid
        .iter()
        .map(|c| c * c)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    centroid.iter_mut().for_each(|c| *c /= norm);
    let row = |i: usize| &vectors[i * dims..(i + 1) * dims];
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < n.min(count) {
        let next = (0..count)
            .filter(|i| !chosen.contains(i))
            .max_by(|&a, &b| {
                let mmr = |i: usize| {
                    let redundancy = chosen.iter().map(|&c| dot(row(i), row(c))).fold(0.0f32, f32::max);
                    0.7 * dot(row(i), &centroid) - 0.3 * redundancy
                };
                mmr(a).total_cmp(&mmr(b)).then(b.cmp(&a))
            })
            .expect("a candidate remains");
        chosen.push(next);
    }
    chosen
}

/// The key concepts of a summary: its "Key concepts:" line, else its RAKE key phrases.
fn summary_concepts(summary: &str) -> Vec<String> {
    if let Some(line) = summary.lines().find_map(|l| l.trim().strip_prefix(KEY_CONCEPTS)) {
        return line
            .split(';')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
    }
    text::keyphrases(summary, SUMMARY_CONCEPTS)
        .into_iter()
        .map(|k| k.phrase)
        .collect()
}

/// Runs blocking model work off the async executor when there is one.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.spawn_blocking(work).await.expect("model work does not panic"),
        Err(_) => work(),
    }
}

#[async_trait]
impl Generator for EmbeddedGenerator {
    fn name(&self) -> String {
        "embedded".into()
    }

    async fn prepare(&self, documents: &[Document<'_>]) -> Vec<Result<Prepared, GenerationError>> {
        self.stats
            .calls
            .fetch_add(documents.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let texts: Vec<String> = documents.iter().map(Document::full_text).collect();
        let embedder = self.embedder.clone();
        let (texts, embedded) = blocking(move || {
            let inputs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
            let embedded = embedder
                .get()
                .and_then(|e| e.embed_blocking(&inputs, TextRole::Document));
            (texts, embedded)
        })
        .await;
        let results: Vec<Result<Prepared, GenerationError>> = match embedded {
            Ok(vectors) => documents
                .iter()
                .zip(&texts)
                .enumerate()
                .map(|(i, (d, text))| self.prepare_one(d, text, vectors.get(i)))
                .collect(),
            Err(e) => documents
                .iter()
                .map(|_| Err(GenerationError::Model(e.to_string())))
                .collect(),
        };
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        self.stats
            .errors
            .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        results
    }

    async fn summarize(&self, cluster: &ClusterDigest) -> Result<String, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let dims = self.embedder.spec().dimensions;
        let vectors = if cluster.vectors.len() == cluster.questions.len() * dims {
            cluster.vectors.clone()
        } else {
            let refs: Vec<&str> = cluster.questions.iter().map(String::as_str).collect();
            self.embed_async(&refs).await?.vectors
        };
        let content: Vec<&str> = cluster.questions.iter().map(|q| question_content(q)).collect();
        let concepts: Vec<String> = text::keyphrases(&content.join(". "), SUMMARY_CONCEPTS)
            .into_iter()
            .map(|k| k.phrase)
            .collect();
        let name = if cluster.cluster.is_empty() {
            "This cluster".to_string()
        } else {
            format!("Cluster \"{}\"", cluster.cluster)
        };
        let size = match cluster.documents {
            0 => format!("{} synthetic questions", cluster.questions.len()),
            n => format!("{n} documents, {} synthetic questions", cluster.questions.len()),
        };
        let mut summary = format!(
            "{name}: {size}.\n{KEY_CONCEPTS} {}\nRepresentative questions:",
            concepts.join("; ")
        );
        for i in representatives(&vectors, dims, SUMMARY_QUESTIONS) {
            summary.push_str("\n- ");
            summary.push_str(&cluster.questions[i]);
        }
        Ok(summary)
    }

    /// Extractive: the best-ranked distinct answers, each with the numbers of every piece of
    /// evidence that gave it.
    async fn answer(&self, _query: &str, evidence: &[Evidence]) -> Result<String, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let mut answers: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, e) in evidence.iter().enumerate() {
            let text = e.answer.trim();
            if text.is_empty() {
                continue;
            }
            match answers.iter().position(|(a, _)| a.eq_ignore_ascii_case(text)) {
                Some(same) => answers[same].1.push(i + 1),
                None if answers.len() < EXTRACTIVE_ANSWERS => answers.push((text, vec![i + 1])),
                None => {}
            }
        }
        if answers.is_empty() {
            return Err(GenerationError::InvalidOutput {
                backend: self.name(),
                message: "no evidence to answer from".into(),
            });
        }
        Ok(answers
            .iter()
            .map(|(text, cited)| {
                let marks: String = cited.iter().map(|n| format!("[{n}]")).collect();
                format!("{text} {marks}")
            })
            .collect::<Vec<_>>()
            .join(" "))
    }

    async fn rewrite(&self, query: &str, clusters: &[ClusterBrief]) -> Result<Vec<String>, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let query = query.trim();
        let mut out = Vec::new();
        if !query.ends_with('?') {
            out.push(text::statement_question(query));
        }
        let query_words: HashSet<String> = text::words(query).into_iter().map(str::to_lowercase).collect();
        let mut concepts: Vec<String> = Vec::new();
        for brief in clusters {
            for concept in summary_concepts(&brief.summary) {
                let new_words = text::words(&concept)
                    .into_iter()
                    .any(|w| !query_words.contains(&w.to_lowercase()));
                if new_words && !concepts.iter().any(|c| c.eq_ignore_ascii_case(&concept)) {
                    concepts.push(concept);
                }
            }
        }
        if !concepts.is_empty() {
            let mut texts: Vec<&str> = vec![query];
            texts.extend(concepts.iter().map(String::as_str));
            let embeddings = self.embed_async(&texts).await?;
            let query_vector = embeddings.get(0).unwrap_or(&[]).to_vec();
            let mut ranked: Vec<(f32, &str)> = concepts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| embeddings.get(i + 1).map(|v| (dot(v, &query_vector), c.as_str())))
                .collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let expansion: Vec<&str> = ranked.iter().take(EXPANSION_CONCEPTS).map(|(_, c)| *c).collect();
            out.push(format!("{query} ({})", expansion.join(", ")));
        }
        Ok(out)
    }

    /// Writing a rationale needs a language model.
    async fn reason(&self, _query: &str) -> Result<String, GenerationError> {
        Err(GenerationError::InvalidOutput {
            backend: self.name(),
            message: REASONING_NEEDS_AN_LLM.into(),
        })
    }

    /// Judging needs a language model.
    async fn judge(&self, _task: &Judging<'_>) -> Result<Verdict, GenerationError> {
        Err(GenerationError::InvalidOutput {
            backend: self.name(),
            message: "judging answers needs an LLM: SET mkflow.generator = 'local' (offline) or 'openai'".into(),
        })
    }

    fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}
