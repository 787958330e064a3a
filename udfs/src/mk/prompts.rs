//! Prompts for LLM backends, after the Meta-Knowledge RAG paper (Mombaerts et al., 2024): one
//! call per document yields metadata and self-contained synthetic QA pairs; a cluster's
//! summary is written from its questions; queries are rewritten against that summary; answers
//! are judged on the paper's six criteria.

use serde_json::Value;

use super::generator::{
    CRITERIA, ClusterBrief, ClusterDigest, Document, Evidence, Judged, Judging, Prepared, QaPair, Verdict,
};
use super::schema::{FieldKind, MetadataError, MetadataSchema};
use crate::decoder::constrain::FORBIDDEN_PHRASES;

/// Why a model's answer is not valid; the message is sent back to the model once
/// ([`correction`]).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The answer holds nothing that looks like a JSON object.
    #[error("the answer holds no JSON object")]
    NoJson,
    /// The JSON object in the answer does not parse.
    #[error("invalid JSON: {0}")]
    InvalidJson(serde_json::Error),
    /// The object lacks a key the prompt asked for (e.g. `"qa" list`).
    #[error("the object has no {0}")]
    Missing(&'static str),
    /// The metadata does not fit the schema.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// No QA item has a non-empty, self-contained question and a non-empty answer.
    #[error(
        "no qa item has a non-empty \"answer\" and a self-contained \"question\" (one that names its subject \
         instead of referring to \"the document\" or \"this study\"){}",
        .0.as_ref().map(|q| format!("; e.g. \"{q}\"")).unwrap_or_default()
    )]
    NoUsableQa(Option<String>),
    /// A rewrite answer lists no query.
    #[error("\"queries\" holds no query")]
    NoQueries,
    /// A judge gave a criterion a value it may not have.
    #[error("\"{0}\" is \"{1}\", not one of the allowed values")]
    Judgement(&'static str, String),
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a prepare answer opens (`{"metadata": {…}, "qa": […]}`).
pub const PREPARE_ANSWER_START: &str = "{\"metadata\": {";

/// How a rewrite answer opens (`{"queries": […]}`).
pub const REWRITE_ANSWER_START: &str = "{\"queries\": [\"";

/// How a rationale answer opens (`{"rationale": "…"}`).
pub const REASON_ANSWER_START: &str = "{\"rationale\": \"";

/// Longest rationale (characters): a few sentences, so thinking stays cheap next to searching
/// and the rationale fits the query's token budget beside the query.
pub const MAX_RATIONALE_CHARS: usize = 400;

/// Fewest QA pairs a constrained prepare answer writes (when `max_questions` allows): left to
/// itself a 0.5B model stops after one pair, and every question is a way for a query to find
/// its document.
const MIN_QUESTIONS: usize = 3;

/// Longest synthetic question a constrained answer may write (characters).
const MAX_QUESTION_CHARS: usize = 200;
/// Longest synthetic answer a constrained answer may write (characters).
const MAX_ANSWER_CHARS: usize = 300;
/// Longest key phrase, URL or sub-query a constrained answer may write (characters).
const MAX_PHRASE_CHARS: usize = 80;
/// Longest sub-query a constrained rewrite may write (characters).
const MAX_QUERY_CHARS: usize = 200;

/// Phrases that show a question is not self-contained.
const DOCUMENT_REFERENCES: [&str; 6] = [
    "this text",
    "the document",
    "this document",
    "this paper",
    "this study",
    "the authors",
];

/// Longest document text sent to a model (characters); longer texts are cut.
const MAX_DOCUMENT_CHARS: usize = 12_000;

fn describe_fields(schema: &MetadataSchema) -> String {
    let mut out = String::new();
    for field in &schema.fields {
        let what = match field.kind {
            FieldKind::Labels => {
                let names: Vec<&str> = field.labels.iter().map(|l| l.name.as_str()).collect();
                format!(
                    "a list of up to {} values, each exactly one of: {}",
                    field.max,
                    names.join(" | ")
                )
            }
            FieldKind::Choice => {
                let names: Vec<String> = field
                    .labels
                    .iter()
                    .map(|l| {
                        if l.description.is_empty() {
                            l.name.clone()
                        } else {
                            format!("{} ({})", l.name, l.description)
                        }
                    })
                    .collect();
                format!("exactly one string of: {}", names.join(" | "))
            }
            FieldKind::Keyphrases => format!("a list of up to {} short key phrases from the document", field.max),
            FieldKind::Urls => "a list of the URLs of code or data the document gives (often empty)".into(),
            FieldKind::Terms => format!(
                "a list of the entries of this lexicon that the document reports: {}",
                field.terms.join(" | ")
            ),
        };
        out.push_str(&format!("- \"{}\": {what}", field.name));
        if !field.description.is_empty() {
            out.push_str(&format!(" — {}", field.description));
        }
        out.push('\n');
    }
    out
}

/// The prepare prompt: metadata plus as many QA pairs as the document supports, as JSON.
pub fn prepare(schema: &MetadataSchema, document: &Document<'_>, max_questions: usize) -> Vec<Message> {
    let system = "You are an expert research librarian. You read one document and return JSON only: \
                  metadata that follows the given schema exactly, and synthetic question/answer pairs \
                  for a reader who has never seen the document.";
    let mut body = document.body.to_string();
    if body.chars().count() > MAX_DOCUMENT_CHARS {
        body = body.chars().take(MAX_DOCUMENT_CHARS).collect();
    }
    let user = format!(
        "Metadata schema (key: value):\n{fields}\n\
         Then write as many question/answer pairs as the document supports (at most {max_questions}). \
         Each question must be self-contained: name the subject explicitly and never refer to \"the \
         document\", \"this text\", \"this study\" or \"the authors\" (good: \"Does vitamin D \
         supplementation reduce fractures in older adults?\"; bad: \"What does the study find?\"). \
         Each answer must come from the document.\n\n\
         Reply with one JSON object: {{\"metadata\": {{...}}, \"qa\": [{{\"question\": \"...\", \"answer\": \"...\"}}]}}\n\n\
         Title: {title}\nDocument:\n{body}",
        fields = describe_fields(schema),
        title = document.title.unwrap_or("(none)"),
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The JSON Schema of a prepare answer, for constrained decoding: the metadata fields in schema
/// order (taxonomy fields as enumerations, at least one label in the cluster field), then
/// `min(3, max_questions)` to `max_questions` QA pairs.
pub fn prepare_schema(schema: &MetadataSchema, max_questions: usize) -> Value {
    let strings = |max_items: usize, max_chars: usize| {
        serde_json::json!({"type": "array", "maxItems": max_items.max(1),
            "items": {"type": "string", "minLength": 1, "maxLength": max_chars}})
    };
    let mut properties = serde_json::Map::new();
    for field in &schema.fields {
        let labels = || Value::from(field.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>());
        let value = match field.kind {
            FieldKind::Choice => serde_json::json!({"enum": labels()}),
            FieldKind::Labels => serde_json::json!({"type": "array", "maxItems": field.max,
                "minItems": usize::from(field.name == schema.cluster_field),
                "items": {"enum": labels()}}),
            FieldKind::Terms => serde_json::json!({"type": "array", "maxItems": field.max,
                "items": {"enum": field.terms}}),
            FieldKind::Keyphrases | FieldKind::Urls => strings(field.max, MAX_PHRASE_CHARS),
        };
        properties.insert(field.name.clone(), value);
    }
    let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    serde_json::json!({
        "type": "object", "required": ["metadata", "qa"],
        "properties": {
            "metadata": {"type": "object", "required": names, "properties": properties},
            "qa": {"type": "array", "minItems": MIN_QUESTIONS.min(max_questions.max(1)),
                   "maxItems": max_questions.max(1), "items": {
                "type": "object", "required": ["question", "answer"],
                "properties": {
                    "question": {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS,
                                 FORBIDDEN_PHRASES: DOCUMENT_REFERENCES},
                    "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS}
                }
            }}
        }
    })
}

/// The JSON Schema of a rewrite answer: 1 to `count` sub-queries.
pub fn rewrite_schema(count: usize) -> Value {
    serde_json::json!({
        "type": "object", "required": ["queries"],
        "properties": {"queries": {"type": "array", "minItems": 1, "maxItems": count.max(1),
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS}}}
    })
}

/// The JSON Schema of a rationale answer: one non-empty text of at most
/// [`MAX_RATIONALE_CHARS`].
pub fn reason_schema() -> Value {
    serde_json::json!({
        "type": "object", "required": ["rationale"],
        "properties": {"rationale": {"type": "string", "minLength": 1, "maxLength": MAX_RATIONALE_CHARS}}
    })
}

/// Checks a rationale answer; a longer one (from a backend that does not decode to the
/// schema) is cut at a word boundary within [`MAX_RATIONALE_CHARS`].
pub fn parse_reason(content: &str) -> Result<String, AnswerError> {
    let value = parse_json(content)?;
    let rationale = value
        .get("rationale")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or(AnswerError::Missing("non-empty \"rationale\""))?;
    if rationale.chars().count() <= MAX_RATIONALE_CHARS {
        return Ok(rationale.to_string());
    }
    let cut: String = rationale.chars().take(MAX_RATIONALE_CHARS).collect();
    let end = cut.rfind(char::is_whitespace).unwrap_or(cut.len());
    Ok(cut[..end].trim_end().to_string())
}

/// Checks and normalises a prepare answer.
pub fn parse_prepared(schema: &MetadataSchema, content: &str, max_questions: usize) -> Result<Prepared, AnswerError> {
    let value = parse_json(content)?;
    let metadata = schema.validate(value.get("metadata").ok_or(AnswerError::Missing("\"metadata\""))?)?;
    let items = value
        .get("qa")
        .and_then(Value::as_array)
        .ok_or(AnswerError::Missing("\"qa\" list"))?;
    // Pairs that are empty or refer to "the document" are dropped; the rest are kept.
    let mut qa = Vec::new();
    let mut dropped = None;
    for item in items {
        let text = |key: &str| item.get(key).and_then(Value::as_str).map(str::trim).unwrap_or("");
        let (question, answer) = (text("question"), text("answer"));
        let lower = question.to_lowercase();
        if question.is_empty() || answer.is_empty() || DOCUMENT_REFERENCES.iter().any(|p| lower.contains(p)) {
            dropped.get_or_insert_with(|| question.to_string());
            continue;
        }
        qa.push(QaPair {
            question: question.to_string(),
            answer: answer.to_string(),
        });
    }
    if qa.is_empty() {
        return Err(AnswerError::NoUsableQa(dropped.filter(|q| !q.is_empty())));
    }
    qa.truncate(max_questions);
    Ok(Prepared { metadata, qa })
}

/// The summary prompt: the cluster's key concepts, methods and trends from its questions.
pub fn summarize(cluster: &ClusterDigest) -> Vec<Message> {
    let system = "You write Meta-Knowledge summaries: short, factual overviews of what a collection of \
                  documents covers, used to guide search.";
    let questions: Vec<String> = cluster.questions.iter().map(|q| format!("- {q}")).collect();
    let previous = cluster
        .previous_summary
        .as_ref()
        .map(|s| format!("The previous summary, to update:\n{s}\n\n"))
        .unwrap_or_default();
    let user = format!(
        "The cluster \"{}\" holds {} documents. Here are questions its documents answer:\n{}\n\n{previous}\
         Write a summary of at most 150 words: the key concepts, methods, findings and trends this \
         cluster covers. Plain text, no preamble.",
        cluster.cluster,
        cluster.documents,
        questions.join("\n")
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The rewrite prompt: sub-queries that cover the query's intent in the cluster's terms.
pub fn rewrite(query: &str, clusters: &[ClusterBrief], count: usize) -> Vec<Message> {
    let system = "You rewrite search queries for a question index. Reply with JSON only.";
    let context: Vec<String> = clusters
        .iter()
        .map(|c| format!("Cluster \"{}\":\n{}", c.cluster, c.summary))
        .collect();
    let user = format!(
        "Knowledge available:\n{}\n\nUser query: {query}\n\n\
         Write up to {count} specific, self-contained questions that together cover what the user \
         wants, using the terminology of the knowledge above. \
         Reply as {{\"queries\": [\"...\"]}}.",
        context.join("\n\n")
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The think-then-embed prompt: a short rationale that spells out what a document answering
/// the query would contain, embedded with the query (`vector_search(…, reasoning => 'explicit')`).
pub fn reason(query: &str) -> Vec<Message> {
    let system = "You help a search engine. Before it searches, you think briefly about a query: what \
                  it is really asking, and which concepts, terms, entities and findings a document that \
                  answers it would contain. Reply with JSON only.";
    let user = format!(
        "Query: {query}\n\n\
         In two or three sentences (under 60 words), describe what a relevant document would say, \
         naming its key terms. No preamble, do not restate the query. \
         Reply as {{\"rationale\": \"...\"}}."
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// Checks a rewrite answer.
pub fn parse_rewrite(content: &str, count: usize) -> Result<Vec<String>, AnswerError> {
    let value = parse_json(content)?;
    let queries = value
        .get("queries")
        .and_then(Value::as_array)
        .ok_or(AnswerError::Missing("\"queries\" list"))?;
    let mut out: Vec<String> = queries
        .iter()
        .filter_map(Value::as_str)
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_string)
        .collect();
    if out.is_empty() {
        return Err(AnswerError::NoQueries);
    }
    out.truncate(count);
    Ok(out)
}

/// The evidence as the numbered context an answer cites: `[n] (doc_id: title) Q: … A: …`, or
/// `[n] (doc_id: title) …` for a passage (evidence without a question).
pub fn numbered_context(evidence: &[Evidence]) -> String {
    evidence
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let source = match &e.title {
                Some(title) if !title.is_empty() => format!("{}: {title}", e.doc_id),
                _ => e.doc_id.clone(),
            };
            if e.question.is_empty() {
                // A passage of a document, not a QA pair.
                format!("[{}] ({source}) {}", i + 1, e.answer)
            } else {
                format!("[{}] ({source}) Q: {} A: {}", i + 1, e.question, e.answer)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The read prompt: answer from the numbered context only, citing it.
pub fn answer(query: &str, evidence: &[Evidence]) -> Vec<Message> {
    let system = "You answer questions from a knowledge base. Use only the numbered context; cite every \
                  statement with the numbers of its sources, like [1] or [2][3]. If the context does not \
                  answer the question, say so.";
    let user = format!(
        "Context:\n{}\n\nQuestion: {query}\n\nAnswer in at most 120 words, with citations.",
        numbered_context(evidence)
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The opening of every judge answer (the criteria in order).
pub const JUDGE_ANSWER_START: &str = "{\"recall\": \"";

/// The values a judge may give: scores, or the better answer.
fn judge_values(pairwise: bool) -> &'static [&'static str] {
    if pairwise {
        &["A", "B", "tie"]
    } else {
        &["1", "2", "3", "4", "5"]
    }
}

/// The JSON Schema of a judge answer: every criterion, in order, with one of its values.
pub fn judge_schema(pairwise: bool) -> Value {
    let values = judge_values(pairwise);
    let properties: serde_json::Map<String, Value> = CRITERIA
        .iter()
        .map(|(name, _)| (name.to_string(), serde_json::json!({"type": "string", "enum": values})))
        .collect();
    let required: Vec<&str> = CRITERIA.iter().map(|(name, _)| *name).collect();
    serde_json::json!({"type": "object", "required": required, "properties": properties})
}

/// The judge prompt: the criteria, the query, and the answer(s) with the context each used.
pub fn judge(task: &Judging<'_>) -> Vec<Message> {
    let system = "You are a strict, impartial evaluator of answers written by retrieval-augmented \
                  systems. Judge only what is written; length is not quality. Reply with JSON only.";
    let criteria: Vec<String> = CRITERIA
        .iter()
        .map(|(name, meaning)| format!("- {name}: {meaning}"))
        .collect();
    let shown = |label: &str, judged: &Judged<'_>| {
        format!(
            "{label} context:\n{}\n\n{label}:\n{}",
            numbered_context(judged.evidence),
            judged.answer.trim()
        )
    };
    let (answers, task_text, values) = match task {
        Judging::Absolute { query, answer } => (
            format!("Query: {query}\n\n{}", shown("Answer", answer)),
            "Score the answer on each criterion from 1 (poor) to 5 (excellent).",
            "\"1\" to \"5\"",
        ),
        Judging::Pairwise { query, first, second } => (
            format!(
                "Query: {query}\n\n{}\n\n{}",
                shown("Answer A", first),
                shown("Answer B", second)
            ),
            "For each criterion, say which answer is better, or \"tie\".",
            "\"A\", \"B\" or \"tie\"",
        ),
    };
    let names: Vec<String> = CRITERIA.iter().map(|(name, _)| format!("\"{name}\": …")).collect();
    let user = format!(
        "Criteria:\n{}\n\n{answers}\n\n{task_text} Reply as {{{}}} with {values} for each.",
        criteria.join("\n"),
        names.join(", ")
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// Checks a judge answer: every criterion with an allowed value.
pub fn parse_judgement(content: &str, pairwise: bool) -> Result<Verdict, AnswerError> {
    let value = parse_json(content)?;
    let mut scores = Vec::with_capacity(CRITERIA.len());
    for (name, _) in CRITERIA {
        let given = value.get(name).map(|v| match v {
            Value::String(s) => s.trim().to_string(),
            other => other.to_string(),
        });
        let given = given.ok_or(AnswerError::Missing(name))?;
        let score = match (pairwise, given.to_ascii_lowercase().as_str()) {
            (true, "a") => -1.0,
            (true, "b") => 1.0,
            (true, "tie") => 0.0,
            (false, n) => match n.parse::<u8>() {
                Ok(n @ 1..=5) => f32::from(n),
                _ => return Err(AnswerError::Judgement(name, given)),
            },
            _ => return Err(AnswerError::Judgement(name, given)),
        };
        scores.push(score);
    }
    Ok(Verdict { scores })
}

/// The corrective message sent once after an invalid answer.
pub fn correction(error: &AnswerError) -> Message {
    Message::new(
        "user",
        format!("That answer was not valid: {error}. Reply again with only the corrected JSON object."),
    )
}

/// Parses a JSON object from a model answer, tolerating Markdown code fences and prose around it,
/// and trailing commas (`[1, 2,]`), which small models often write.
pub fn parse_json(content: &str) -> Result<Value, AnswerError> {
    let trimmed = content.trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return Ok(v);
    }
    let start = trimmed.find('{');
    let end = trimmed.rfind('}');
    match (start, end) {
        (Some(s), Some(e)) if e > s => {
            let object = &trimmed[s..=e];
            serde_json::from_str(object)
                .or_else(|first| serde_json::from_str(&without_trailing_commas(object)).map_err(|_| first))
                .map_err(AnswerError::InvalidJson)
        }
        _ => Err(AnswerError::NoJson),
    }
}

/// `text` without the commas that directly precede a closing `]` or `}` (outside strings).
fn without_trailing_commas(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            in_string = c != '"' || escaped;
            escaped = c == '\\' && !escaped;
        } else if c == '"' {
            in_string = true;
        } else if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some(']') | Some('}')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rationale_must_be_there_and_is_cut_at_a_word_within_the_limit() {
        assert_eq!(
            parse_reason("{\"rationale\": \" Bone density rises. \"}").unwrap(),
            "Bone density rises."
        );
        assert!(parse_reason("{\"rationale\": \"  \"}").is_err());
        assert!(parse_reason("{\"why\": \"x\"}").is_err());
        let long = format!("{{\"rationale\": \"{}\"}}", "vitamin ".repeat(100));
        let cut = parse_reason(&long).unwrap();
        assert!(
            cut.chars().count() <= MAX_RATIONALE_CHARS && cut.ends_with("vitamin"),
            "{cut}"
        );
        // The schema a local model decodes under holds it to the same limit.
        assert_eq!(
            reason_schema()["properties"]["rationale"]["maxLength"],
            json!(MAX_RATIONALE_CHARS)
        );
    }

    #[test]
    fn prepare_answers_are_validated() {
        let schema = MetadataSchema::default();
        let example = json!({"metadata": {"research_fields": ["Immunology"], "study_type": "applied"},
            "qa": [{"question": "Does vaccine X protect adults against influenza?", "answer": "Yes, by 60%."}]});
        let fenced = format!("Here you go:\n```json\n{example}\n```");
        let p = parse_prepared(&schema, &fenced, 5).unwrap();
        assert_eq!(p.metadata["research_fields"], json!(["Immunology"]));
        assert_eq!(p.qa.len(), 1);
        // Pairs that refer to "this study" or are empty are dropped; without any left, the answer fails.
        let mixed = r#"{"metadata": {"research_fields": [], "study_type": "review"},
            "qa": [{"question": "What does this study find?", "answer": "x"}, {"question": " ", "answer": "y"},
                   {"question": "Does aspirin prevent stroke?", "answer": "Partly."}]}"#;
        let p = parse_prepared(&schema, mixed, 5).unwrap();
        assert_eq!(p.qa.len(), 1);
        assert_eq!(p.qa[0].question, "Does aspirin prevent stroke?");
        let not_self_contained = r#"{"metadata": {"research_fields": [], "study_type": "review"},
            "qa": [{"question": "What does this study find?", "answer": "x"}]}"#;
        let error = parse_prepared(&schema, not_self_contained, 5).unwrap_err().to_string();
        assert!(
            error.contains("self-contained") && error.contains("e.g. \"What does this study find?\""),
            "{error}"
        );
        assert!(matches!(
            parse_prepared(&schema, "no json here", 5),
            Err(AnswerError::NoJson)
        ));
        let bad_label = r#"{"metadata": {"research_fields": ["Alchemy"], "study_type": "review"},
            "qa": [{"question": "Does aspirin prevent stroke?", "answer": "Partly."}]}"#;
        let error = parse_prepared(&schema, bad_label, 5).unwrap_err().to_string();
        assert!(error.contains("'Alchemy' is not one of"), "{error}");
        let no_qa = r#"{"metadata": {"research_fields": [], "study_type": "review"}}"#;
        assert_eq!(
            parse_prepared(&schema, no_qa, 5).unwrap_err().to_string(),
            "the object has no \"qa\" list"
        );
    }

    #[test]
    fn answer_schemas_hold_answers_to_the_taxonomy_order_and_counts() {
        use crate::decoder::constrain::{JsonMatcher, JsonShape};
        let schema = MetadataSchema::default();
        let shape = JsonShape::from_schema(&prepare_schema(&schema, 6)).unwrap();
        let study_type = &schema.fields[1].labels[0].name;
        let qa = r#"{"question": "Does aspirin prevent stroke?", "answer": "Partly."}"#;
        let answer = |fields: &str, pairs: usize| {
            format!(
                r#"{{"metadata": {{"research_fields": [{fields}], "study_type": "{study_type}", "keyphrases": ["aspirin"], "code_urls": [], "evaluation_metrics": ["odds ratio"]}}, "qa": [{}]}}"#,
                vec![qa; pairs].join(", ")
            )
        };
        let complete = |text: &str| {
            let mut m = JsonMatcher::new(&shape);
            m.feed_all(text.as_bytes()) && m.is_complete()
        };
        let good = answer("\"Oncology\", \"Immunology\"", 3);
        assert!(complete(&good), "{good}");
        assert!(parse_prepared(&schema, &good, 6).is_ok());
        assert!(!complete(&answer("\"Oncology\"", 2)), "at least three pairs");
        assert!(!complete(&answer("\"Oncology\"", 7)), "at most max_questions pairs");
        assert!(!complete(&answer("", 3)), "at least one research field (the cluster)");
        assert!(!complete(&answer("\"Alchemy\"", 3)), "labels come from the taxonomy");
        let this_study = good.replace("Does aspirin", "Does this study show aspirin");
        assert!(!complete(&this_study), "questions may not refer to the study");
        let mut m = JsonMatcher::new(&shape);
        assert!(
            m.feed_all(PREPARE_ANSWER_START.as_bytes()),
            "the prefilled opening fits"
        );
        let rewrite = JsonShape::from_schema(&rewrite_schema(2)).unwrap();
        let mut m = JsonMatcher::new(&rewrite);
        assert!(m.feed_all(REWRITE_ANSWER_START.as_bytes()));
        assert!(m.feed_all(br#"a", "b"]}"#) && m.is_complete());
    }

    #[test]
    fn judge_answers_hold_every_criterion_in_order_with_an_allowed_value() {
        use crate::decoder::constrain::{JsonMatcher, JsonShape};
        let evidence = [Evidence {
            question: "Does aspirin prevent stroke?".into(),
            answer: "Partly, in older adults.".into(),
            doc_id: "d1".into(),
            title: Some("Aspirin".into()),
        }];
        let judged = Judged {
            answer: "Aspirin partly prevents stroke [1].",
            evidence: &evidence,
        };
        let absolute = judge(&Judging::Absolute {
            query: "aspirin and stroke",
            answer: judged,
        });
        let text = &absolute[1].content;
        assert!(
            text.contains("aspirin and stroke") && text.contains("[1] (d1: Aspirin)"),
            "{text}"
        );
        assert!(
            CRITERIA
                .iter()
                .all(|(name, meaning)| text.contains(name) && text.contains(meaning))
        );
        let pairwise = judge(&Judging::Pairwise {
            query: "aspirin and stroke",
            first: judged,
            second: Judged {
                answer: "No idea.",
                evidence: &[],
            },
        });
        assert!(pairwise[1].content.contains("Answer A:") && pairwise[1].content.contains("Answer B:\nNo idea."));
        // A document passage (evidence without a question) is quoted as it is.
        let passage = Evidence {
            question: String::new(),
            answer: "Aspirin lowered stroke risk.".into(),
            doc_id: "d2".into(),
            title: None,
        };
        assert_eq!(numbered_context(&[passage]), "[1] (d2) Aspirin lowered stroke risk.");

        let scores =
            r#"{"recall": "4", "precision": "5", "specificity": "3", "breadth": "2", "depth": "1", "relevancy": "5"}"#;
        let complete = |schema: &Value, text: &str| {
            let shape = JsonShape::from_schema(schema).unwrap();
            let mut m = JsonMatcher::new(&shape);
            m.feed_all(text.as_bytes()) && m.is_complete()
        };
        assert!(complete(&judge_schema(false), scores));
        assert!(scores.starts_with(JUDGE_ANSWER_START));
        assert_eq!(
            parse_judgement(scores, false).unwrap().scores,
            vec![4.0, 5.0, 3.0, 2.0, 1.0, 5.0]
        );
        let six = scores.replace("\"1\"", "\"6\"");
        assert!(!complete(&judge_schema(false), &six), "scores run from 1 to 5");
        assert!(
            parse_judgement(&six, false)
                .unwrap_err()
                .to_string()
                .contains("\"depth\" is \"6\"")
        );
        let missing = r#"{"recall": "4"}"#;
        assert!(
            parse_judgement(missing, false)
                .unwrap_err()
                .to_string()
                .contains("precision")
        );

        let preferences = r#"{"recall": "A", "precision": "B", "specificity": "tie", "breadth": "A", "depth": "A", "relevancy": "B"}"#;
        assert!(complete(&judge_schema(true), preferences));
        assert!(
            !complete(&judge_schema(true), scores),
            "pairwise answers name A, B or tie"
        );
        assert_eq!(
            parse_judgement(preferences, true).unwrap().scores,
            vec![-1.0, 1.0, 0.0, -1.0, -1.0, 1.0]
        );
    }

    #[test]
    fn prompts_carry_the_schema_and_the_document() {
        let schema = MetadataSchema::default();
        let doc = Document {
            title: Some("T cells"),
            body: "Body text.",
        };
        let messages = prepare(&schema, &doc, 4);
        assert!(messages[1].content.contains("Oncology | Immunology"));
        assert!(messages[1].content.contains("Body text."));
        assert!(messages[1].content.contains("at most 4"));
        assert_eq!(
            parse_rewrite(r#"{"queries": ["a", " ", "b", "c"]}"#, 2).unwrap(),
            vec!["a", "b"]
        );
        // Trailing commas are forgiven, commas inside strings kept.
        assert_eq!(
            parse_rewrite(r#"{"queries": ["x, ]", "y",],}"#, 3).unwrap(),
            vec!["x, ]", "y"]
        );
        assert_eq!(
            without_trailing_commas(r#"{"a": "\",}", "b": [1 , ] ,}"#),
            r#"{"a": "\",}", "b": [1  ] }"#
        );
    }
}
