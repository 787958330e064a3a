//! How a text is written before it is tokenised, by its role: models trained asymmetrically
//! (LaSER, Qwen3-Embedding, E5, BGE) want a query prefixed with a task instruction and a
//! document left as it is, and decoders trained on chat may want both sides wrapped in their
//! chat template.

use std::borrow::Cow;

use serde::Serialize;

use super::EmbeddingModelSpec;
use crate::decoder::ChatTemplate;

/// Which side of a search a text is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TextRole {
    /// What a user searches with (`vector_search(kb, 'text', k)`, `embed(text, 'query')`, the
    /// synthetic questions a query is matched against).
    Query,
    /// What is searched: the rows an `INSERT … embed(body)` stores.
    #[default]
    Document,
}

impl TextRole {
    /// Parses `query` or `document` (any case).
    pub fn parse(name: &str) -> Option<TextRole> {
        match name.to_ascii_lowercase().as_str() {
            "query" => Some(TextRole::Query),
            "document" | "passage" => Some(TextRole::Document),
            _ => None,
        }
    }

    /// The role's name as `embed(text, role)` takes it.
    pub fn name(self) -> &'static str {
        match self {
            TextRole::Query => "query",
            TextRole::Document => "document",
        }
    }
}

/// The placeholder a template's text goes in.
pub const TEXT_PLACEHOLDER: &str = "{text}";
/// The placeholder for the spec's task instruction.
pub const INSTRUCTION_PLACEHOLDER: &str = "{instruction}";
/// What LaSER's `add_chat_template` appends after the assistant's prompt: an empty think block.
pub const EMPTY_THINK_BLOCK: &str = "<think>\n\n</think>\n\n";

/// The text around each input, per role, worked out once when the model loads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prompts {
    query: Frame,
    document: Frame,
}

/// What goes before and after a text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Frame {
    prefix: String,
    suffix: String,
}

impl Frame {
    fn render<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if self.prefix.is_empty() && self.suffix.is_empty() {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(format!("{}{text}{}", self.prefix, self.suffix))
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl Prompts {
    /// The frames `spec` asks for. `chat` is the decoder's chat template, needed when the spec
    /// sets `chat_template`. Errors name what is wrong with the spec.
    pub fn new(spec: &EmbeddingModelSpec, chat: Option<&ChatTemplate>) -> Result<Prompts, String> {
        let frame = |template: &Option<String>, field: &str| -> Result<Frame, String> {
            let template = template.as_deref().unwrap_or(TEXT_PLACEHOLDER);
            if template.matches(TEXT_PLACEHOLDER).count() != 1 {
                return Err(format!(
                    "{field} must contain {TEXT_PLACEHOLDER} exactly once, where the text goes (got {template:?})"
                ));
            }
            let filled = match (&spec.instruction, template.contains(INSTRUCTION_PLACEHOLDER)) {
                (Some(instruction), true) => template.replace(INSTRUCTION_PLACEHOLDER, instruction),
                (None, true) => {
                    return Err(format!(
                        "{field} uses {INSTRUCTION_PLACEHOLDER} but the model description sets no \"instruction\""
                    ));
                }
                (_, false) => template.to_string(),
            };
            let (prefix, suffix) = filled
                .split_once(TEXT_PLACEHOLDER)
                .expect("the placeholder is there, checked above");
            let mut frame = Frame {
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
            };
            if spec.chat_template {
                frame = wrap_in_chat(frame, chat)?;
            }
            Ok(frame)
        };
        Ok(Prompts {
            query: frame(&spec.query_template, "query_template")?,
            document: frame(&spec.document_template, "document_template")?,
        })
    }

    /// `text` as the model reads it in `role`.
    pub fn render<'t>(&self, role: TextRole, text: &'t str) -> Cow<'t, str> {
        match role {
            TextRole::Query => self.query.render(text),
            TextRole::Document => self.document.render(text),
        }
    }
}

/// The frame inside one user turn of the chat template, followed by the assistant's prompt and
/// an empty think block.
fn wrap_in_chat(frame: Frame, chat: Option<&ChatTemplate>) -> Result<Frame, String> {
    let Some(chat) = chat else {
        return Err(
            "chat_template is set but the model has no chat template (only decoders exported with one do)".into(),
        );
    };
    // The template is rendered once around a marker that no template produces, and split there.
    const MARKER: &str = "\u{1}mkflow-text\u{1}";
    let rendered = chat
        .render(&[Message {
            role: "user",
            content: MARKER,
        }])
        .map_err(|e| e.to_string())?;
    let (before, after) = rendered
        .split_once(MARKER)
        .ok_or("the chat template drops the user's message")?;
    Ok(Frame {
        prefix: format!("{before}{}", frame.prefix),
        suffix: format!("{}{after}{EMPTY_THINK_BLOCK}", frame.suffix),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedding::Pooling;

    fn spec() -> EmbeddingModelSpec {
        serde_json::from_value(serde_json::json!({
            "name": "m", "model_path": "m.onnx", "tokenizer_path": "t.json", "dimensions": 4,
            "pooling": "last_token", "normalize": true, "max_tokens": 16
        }))
        .unwrap()
    }

    #[test]
    fn without_templates_texts_are_unchanged() {
        let prompts = Prompts::new(&spec(), None).unwrap();
        assert!(matches!(prompts.render(TextRole::Query, "q"), Cow::Borrowed("q")));
        assert_eq!(prompts.render(TextRole::Document, "d"), "d");
        assert_eq!(spec().pooling, Pooling::LastToken);
    }

    #[test]
    fn queries_get_the_instruction_and_documents_their_own_template() {
        let mut spec = spec();
        spec.query_template = Some("Instruct: {instruction}\nQuery: {text}".into());
        spec.document_template = Some("passage: {text}".into());
        spec.instruction = Some("Find the evidence".into());
        let prompts = Prompts::new(&spec, None).unwrap();
        assert_eq!(
            prompts.render(TextRole::Query, "vitamin D {instruction}"),
            "Instruct: Find the evidence\nQuery: vitamin D {instruction}"
        );
        assert_eq!(prompts.render(TextRole::Document, "bones"), "passage: bones");
    }

    #[test]
    fn chat_wrapping_puts_the_text_in_a_user_turn_before_an_empty_think_block() {
        let chat = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            None,
        )
        .unwrap();
        let mut spec = spec();
        spec.query_template = Some("Q: {text}".into());
        spec.chat_template = true;
        let prompts = Prompts::new(&spec, Some(&chat)).unwrap();
        assert_eq!(
            prompts.render(TextRole::Query, "x"),
            "<|im_start|>user\nQ: x<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        assert_eq!(
            prompts.render(TextRole::Document, "y"),
            "<|im_start|>user\ny<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        let err = Prompts::new(&spec, None).unwrap_err();
        assert!(err.contains("no chat template"), "{err}");
    }

    #[test]
    fn bad_templates_are_refused_with_the_field_named() {
        let mut bad = spec();
        bad.query_template = Some("no placeholder".into());
        let err = Prompts::new(&bad, None).unwrap_err();
        assert!(err.contains("query_template must contain {text}"), "{err}");
        let mut bad = spec();
        bad.document_template = Some("{instruction}: {text}".into());
        let err = Prompts::new(&bad, None).unwrap_err();
        assert!(err.contains("sets no \"instruction\""), "{err}");
        assert_eq!(TextRole::parse("QUERY"), Some(TextRole::Query));
        assert_eq!(TextRole::parse("doc"), None);
    }
}
