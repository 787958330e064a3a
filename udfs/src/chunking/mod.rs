//! Chunking long texts within an embedding model's token limit.
//!
//! - [`split`] cuts a text into spans of at most N tokens at the strongest boundaries available
//!   (Markdown sections, paragraphs, lines, sentences, words, tokens), keeping headings with
//!   their sections, with an optional overlap;
//! - [`Chunker`] counts with a model's own tokenizer and guarantees the limit;
//! - [`ChunkUdf`] is `chunk(text [, max_tokens [, overlap_tokens]])` in SQL.

pub mod split;
mod udf;

use std::collections::VecDeque;
use std::path::Path;

use tokenizers::Tokenizer;

pub use udf::{ChunkUdf, chunk_type};

/// A chunk of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its position among the text's chunks, from 0.
    pub index: usize,
    /// Its text (a span of the original, whitespace-trimmed).
    pub text: String,
    /// Character offset of its first character in the original text.
    pub start_char: usize,
    /// Character offset just after its last character.
    pub end_char: usize,
    /// Its tokens under the model's tokenizer (special tokens not counted).
    pub tokens: usize,
}

/// Chunking errors.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The tokenizer could not be read.
    #[error("chunk: cannot read the tokenizer {path}: {message}")]
    Tokenizer {
        /// Its file.
        path: String,
        /// Why.
        message: String,
    },
    /// A limit the model cannot honour, or an overlap that leaves no room.
    #[error("chunk: {0}")]
    Limits(String),
    /// Tokenizing a text failed.
    #[error("chunk: tokenizing failed: {0}")]
    Tokenize(String),
}

/// Chunks texts for one embedding model: counts with its tokenizer, never past its limit.
#[derive(Debug)]
pub struct Chunker {
    model: String,
    tokenizer: Tokenizer,
    /// Tokens of text a model input holds (its limit less its special tokens).
    limit: usize,
}

impl Chunker {
    /// A chunker for the model `model`, whose inputs hold at most `max_input_tokens` tokens
    /// (special tokens included), with the `tokenizer.json` at `tokenizer_path`.
    pub fn load(model: &str, tokenizer_path: &Path, max_input_tokens: usize) -> Result<Self, ChunkError> {
        let error = |message: String| ChunkError::Tokenizer {
            path: tokenizer_path.display().to_string(),
            message,
        };
        let mut tokenizer = Tokenizer::from_file(tokenizer_path).map_err(|e| error(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| error(e.to_string()))?;
        let specials = tokenizer
            .encode("", true)
            .map_err(|e| error(e.to_string()))?
            .get_ids()
            .len();
        Ok(Chunker {
            model: model.to_string(),
            tokenizer,
            limit: max_input_tokens.saturating_sub(specials).max(1),
        })
    }

    /// The most tokens a chunk may hold: the model's input limit less its special tokens.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Tokens of `text` (special tokens not counted).
    pub fn count(&self, text: &str) -> Result<usize, ChunkError> {
        Ok(self.starts(text)?.len())
    }

    /// Byte offsets where the tokens of `text` start, in order.
    fn starts(&self, text: &str) -> Result<Vec<usize>, ChunkError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ChunkError::Tokenize(e.to_string()))?;
        let mut starts: Vec<usize> = encoding.get_offsets().iter().map(|(s, _)| *s).collect();
        starts.sort_unstable();
        Ok(starts)
    }

    /// Checks `max_tokens` and `overlap_tokens` against the model.
    pub fn check(&self, max_tokens: usize, overlap_tokens: usize) -> Result<(), ChunkError> {
        if max_tokens == 0 || max_tokens > self.limit {
            return Err(ChunkError::Limits(format!(
                "max_tokens must be between 1 and {}, the most {} reads at once; got {max_tokens}",
                self.limit, self.model
            )));
        }
        if overlap_tokens * 2 > max_tokens {
            return Err(ChunkError::Limits(format!(
                "overlap_tokens ({overlap_tokens}) must be at most half of max_tokens ({max_tokens})"
            )));
        }
        Ok(())
    }

    /// The chunks of `text`: at most `max_tokens` tokens each, the next one repeating up to
    /// `overlap_tokens` of the end of the one before.
    pub fn chunks(&self, text: &str, max_tokens: usize, overlap_tokens: usize) -> Result<Vec<Chunk>, ChunkError> {
        self.check(max_tokens, overlap_tokens)?;
        let mut spans: VecDeque<split::Span> =
            split::split(text, &self.starts(text)?, max_tokens, overlap_tokens).into();
        // A span counted inside the whole text can tokenize differently alone (a word cut at a
        // token boundary): each is checked alone and cut again with a tighter limit if over.
        let mut checked = Vec::with_capacity(spans.len());
        let mut tighter = max_tokens;
        while let Some(span) = spans.pop_front() {
            let piece = &text[span.start..span.end];
            let alone = self.count(piece)?;
            if alone <= max_tokens {
                checked.push(split::Span { tokens: alone, ..span });
                continue;
            }
            tighter = tighter.saturating_sub(alone - max_tokens).max(1);
            let mut parts = split::split(piece, &self.starts(piece)?, tighter, 0);
            if parts.len() <= 1 {
                // No cut left at token starts: halve it by characters (one character is never
                // cut, the only way a chunk can pass a limit below a character's tokens).
                let Some(middle) = piece
                    .char_indices()
                    .map(|(i, _)| i)
                    .nth(piece.chars().count() / 2)
                    .filter(|m| *m > 0)
                else {
                    checked.push(split::Span { tokens: alone, ..span });
                    continue;
                };
                parts = vec![
                    split::Span {
                        start: 0,
                        end: middle,
                        tokens: 0,
                    },
                    split::Span {
                        start: middle,
                        end: piece.len(),
                        tokens: 0,
                    },
                ];
            }
            for part in parts.into_iter().rev() {
                spans.push_front(split::Span {
                    start: span.start + part.start,
                    end: span.start + part.end,
                    tokens: part.tokens,
                });
            }
        }
        Ok(to_chunks(text, &checked))
    }
}

/// Spans (byte offsets) as chunks (character offsets, text).
fn to_chunks(text: &str, spans: &[split::Span]) -> Vec<Chunk> {
    let mut chars_before = 0;
    let mut byte = 0;
    let mut char_at = |target: usize| {
        if target < byte {
            chars_before = text[..target].chars().count();
        } else {
            chars_before += text[byte..target].chars().count();
        }
        byte = target;
        chars_before
    };
    spans
        .iter()
        .enumerate()
        .map(|(index, span)| {
            let start_char = char_at(span.start);
            let end_char = char_at(span.end);
            Chunk {
                index,
                text: text[span.start..span.end].to_string(),
                start_char,
                end_char,
                tokens: span.tokens,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_characters() {
        let text = "héllo wörld. ünïcode";
        let spans = vec![
            split::Span {
                start: 0,
                end: text.find('.').unwrap() + 1,
                tokens: 2,
            },
            split::Span {
                start: text.find('ü').unwrap(),
                end: text.len(),
                tokens: 1,
            },
        ];
        let chunks = to_chunks(text, &spans);
        let chars: Vec<char> = text.chars().collect();
        for chunk in &chunks {
            assert_eq!(
                chars[chunk.start_char..chunk.end_char].iter().collect::<String>(),
                chunk.text
            );
        }
        assert_eq!((chunks[1].start_char, chunks[1].end_char), (13, 20));
    }
}
