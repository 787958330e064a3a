//! Prompts for LLM backends, after the Meta-Knowledge RAG paper (Mombaerts et al., 2024): one
//! call per document yields metadata and self-contained synthetic QA pairs; a cluster's
//! summary is written from its questions; queries are rewritten against that summary.

use serde_json::Value;

use super::generator::{ClusterBrief, ClusterDigest, Document, Prepared, QaPair};
use super::schema::{FieldKind, MetadataError, MetadataSchema};

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
    /// A QA item has an empty question or answer.
    #[error("every qa item needs a non-empty \"question\" and \"answer\"")]
    EmptyQa,
    /// A question refers to "the document" instead of naming its subject.
    #[error("question \"{0}\" is not self-contained (it refers to the document)")]
    NotSelfContained(String),
    /// A rewrite answer lists no query.
    #[error("\"queries\" holds no query")]
    NoQueries,
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
         document\", \"this text\", \"this study\" or \"the authors\". Each answer must come from the \
         document.\n\n\
         Reply with one JSON object: {{\"metadata\": {{...}}, \"qa\": [{{\"question\": \"...\", \"answer\": \"...\"}}]}}\n\n\
         Title: {title}\nDocument:\n{body}",
        fields = describe_fields(schema),
        title = document.title.unwrap_or("(none)"),
    );
    vec![Message::new("system", system), Message::new("user", user)]
}

/// Checks and normalises a prepare answer.
pub fn parse_prepared(schema: &MetadataSchema, content: &str, max_questions: usize) -> Result<Prepared, AnswerError> {
    let value = parse_json(content)?;
    let metadata = schema.validate(value.get("metadata").ok_or(AnswerError::Missing("\"metadata\""))?)?;
    let items = value
        .get("qa")
        .and_then(Value::as_array)
        .ok_or(AnswerError::Missing("\"qa\" list"))?;
    let mut qa = Vec::new();
    for item in items {
        let question = item
            .get("question")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("");
        let answer = item.get("answer").and_then(Value::as_str).map(str::trim).unwrap_or("");
        if question.is_empty() || answer.is_empty() {
            return Err(AnswerError::EmptyQa);
        }
        let lower = question.to_lowercase();
        if [
            "this text",
            "the document",
            "this document",
            "this paper",
            "this study",
            "the authors",
        ]
        .iter()
        .any(|p| lower.contains(p))
        {
            return Err(AnswerError::NotSelfContained(question.to_string()));
        }
        qa.push(QaPair {
            question: question.to_string(),
            answer: answer.to_string(),
        });
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
    fn prepare_answers_are_validated() {
        let schema = MetadataSchema::default();
        let example = json!({"metadata": {"research_fields": ["Immunology"], "study_type": "applied"},
            "qa": [{"question": "Does vaccine X protect adults against influenza?", "answer": "Yes, by 60%."}]});
        let fenced = format!("Here you go:\n```json\n{example}\n```");
        let p = parse_prepared(&schema, &fenced, 5).unwrap();
        assert_eq!(p.metadata["research_fields"], json!(["Immunology"]));
        assert_eq!(p.qa.len(), 1);
        let not_self_contained = r#"{"metadata": {"research_fields": [], "study_type": "review"},
            "qa": [{"question": "What does this study find?", "answer": "x"}]}"#;
        assert_eq!(
            parse_prepared(&schema, not_self_contained, 5).unwrap_err().to_string(),
            "question \"What does this study find?\" is not self-contained (it refers to the document)"
        );
        assert!(matches!(
            parse_prepared(&schema, "no json here", 5),
            Err(AnswerError::NoJson)
        ));
        let bad_label = r#"{"metadata": {"research_fields": ["Alchemy"], "study_type": "review"}, "qa": []}"#;
        let error = parse_prepared(&schema, bad_label, 5).unwrap_err().to_string();
        assert!(error.contains("'Alchemy' is not one of"), "{error}");
        let no_qa = r#"{"metadata": {"research_fields": [], "study_type": "review"}}"#;
        assert_eq!(
            parse_prepared(&schema, no_qa, 5).unwrap_err().to_string(),
            "the object has no \"qa\" list"
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
