//! Constrained decoding: the sampler only takes tokens that keep an answer on its way to a
//! JSON text of the required shape, so every finished answer parses and every enumerated value
//! (e.g. a taxonomy label) is one of its options.
//!
//! - [`JsonShape`]: the shape, read from a subset of JSON Schema.
//! - [`JsonMatcher`]: a byte-level pushdown automaton for one shape.
//! - [`TokenBytes`]: the bytes each token of a vocabulary writes, indexed by first byte.
//! - [`JsonConstraint`]: the two together, as the sampler's [`TokenConstraint`].

mod matcher;
mod shape;

use tokenizers::Tokenizer;
use tokenizers::decoders::DecoderWrapper;

pub use matcher::JsonMatcher;
pub use shape::{DEFAULT_MAX_CHARS, DEFAULT_MAX_ITEMS, FORBIDDEN_PHRASES, JsonShape, MAX_FORBIDDEN_BYTES, ShapeError};

/// Limits which tokens one sequence may take next.
pub trait TokenConstraint: Send {
    /// Whether `token` may come next.
    fn allows(&self, token: u32) -> bool;
    /// Every token that might be allowed next (a superset of the allowed ones), for when the
    /// likeliest tokens are all refused.
    fn candidates(&self) -> Vec<u32>;
    /// Takes `token` (one that [`allows`](Self::allows) accepted).
    fn advance(&mut self, token: u32);
    /// Whether the answer is complete: the sequence ends here.
    fn is_complete(&self) -> bool;
    /// At most this many tokens complete the answer from here.
    fn tokens_to_complete(&self) -> usize;
    /// At most `tokens` more tokens may be taken, the next one included: from now on only
    /// tokens after which the answer can still be completed in time are allowed, so an answer
    /// that runs long is wrapped up (strings closed, optional items left out) instead of cut off.
    fn set_budget(&mut self, tokens: usize);
}

/// The bytes each token writes (empty for special tokens, which a constraint never allows),
/// with the tokens grouped by first byte.
#[derive(Debug)]
pub struct TokenBytes {
    bytes: Vec<Vec<u8>>,
    by_first_byte: Vec<Vec<u32>>,
}

impl TokenBytes {
    /// The table for `tokenizer`'s vocabulary: byte-level BPE vocabularies (GPT-2, Llama 3,
    /// Qwen, SmolLM) are mapped back through the byte-to-character table; others (SentencePiece
    /// style) write `▁` as a space and `<0xNN>` as that byte.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Self {
        let byte_level = matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let from_char = byte_level.then(byte_level_table);
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut bytes = vec![Vec::new(); size];
        let special: std::collections::HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        for (text, id) in vocab {
            if special.contains(&id) {
                continue;
            }
            bytes[id as usize] = match &from_char {
                Some(table) => text
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| text.into_bytes()),
                None => sentencepiece_bytes(&text),
            };
        }
        Self::from_bytes(bytes)
    }

    /// The table for tokens writing `bytes` (token id = index).
    pub fn from_bytes(bytes: Vec<Vec<u8>>) -> Self {
        let mut by_first_byte = vec![Vec::new(); 256];
        for (id, b) in bytes.iter().enumerate() {
            if let Some(&first) = b.first() {
                by_first_byte[first as usize].push(id as u32);
            }
        }
        TokenBytes { bytes, by_first_byte }
    }

    /// The bytes `token` writes (empty for special and unknown tokens).
    pub fn bytes(&self, token: u32) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], Vec::as_slice)
    }

    /// Tokens whose first byte is `byte`.
    pub fn starting_with(&self, byte: u8) -> &[u32] {
        &self.by_first_byte[byte as usize]
    }
}

/// GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the others
/// for the characters from U+0100 on.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut table = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("valid code point")
        };
        table.insert(c, b);
    }
    table
}

/// A SentencePiece-style token's bytes: `▁` is a space, `<0xNN>` the byte NN.
fn sentencepiece_bytes(text: &str) -> Vec<u8> {
    if let Some(hex) = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    text.replace('\u{2581}', " ").into_bytes()
}

/// Holds a sequence to a JSON shape.
#[derive(Debug, Clone)]
pub struct JsonConstraint<'a> {
    matcher: JsonMatcher<'a>,
    tokens: &'a TokenBytes,
    /// Tokens left, the next one included.
    budget: usize,
}

impl<'a> JsonConstraint<'a> {
    /// A constraint for an answer of `shape`, written in `tokens`' vocabulary.
    pub fn new(shape: &'a JsonShape, tokens: &'a TokenBytes) -> Self {
        JsonConstraint {
            matcher: JsonMatcher::new(shape),
            tokens,
            budget: usize::MAX,
        }
    }

    /// Feeds text the answer already holds (e.g. a prefilled opening); false if the shape
    /// cannot start that way.
    pub fn feed_text(&mut self, text: &str) -> bool {
        self.matcher.feed_all(text.as_bytes())
    }
}

impl TokenConstraint for JsonConstraint<'_> {
    fn allows(&self, token: u32) -> bool {
        let bytes = self.tokens.bytes(token);
        if bytes.is_empty() {
            return false;
        }
        let mut next = self.matcher.clone();
        // Every byte has a token of its own, so a text `closing_bytes` short can be finished in
        // that many tokens.
        next.feed_all(bytes) && (self.budget == usize::MAX || next.closing_bytes() < self.budget)
    }

    fn candidates(&self) -> Vec<u32> {
        (0..=255u8)
            .filter(|&b| self.matcher.accepts(&[b]))
            .flat_map(|b| self.tokens.starting_with(b).iter().copied())
            .collect()
    }

    fn advance(&mut self, token: u32) {
        let accepted = self.matcher.feed_all(self.tokens.bytes(token));
        debug_assert!(accepted, "advance() takes only allowed tokens");
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_complete()
    }

    fn tokens_to_complete(&self) -> usize {
        self.matcher.closing_bytes()
    }

    fn set_budget(&mut self, tokens: usize) {
        self.budget = tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_table_covers_every_byte_once() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'\u{120}'], b' ', "Ġ is the space");
        assert_eq!(table[&'\u{10a}'], b'\n', "Ċ is the newline");
        assert_eq!(table[&'a'], b'a');
    }

    #[test]
    fn sentencepiece_pieces_write_spaces_and_bytes() {
        assert_eq!(sentencepiece_bytes("\u{2581}the"), b" the");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>");
    }

    #[test]
    fn a_constraint_allows_only_tokens_that_fit_and_lists_candidates_by_first_byte() {
        let vocab: Vec<&[u8]> = vec![b"", b"{\"", b"a", b"\"", b"}", b"\":", b" \"", b"x\"}", b"ab"];
        let tokens = TokenBytes::from_bytes(vocab.iter().map(|b| b.to_vec()).collect());
        let shape = JsonShape::Object(vec![("a".into(), JsonShape::Enum(vec!["x".into(), "y".into()]))]);
        let mut c = JsonConstraint::new(&shape, &tokens);
        assert!(!c.allows(0), "a token writing nothing (special) is never allowed");
        assert!(c.allows(1) && !c.allows(2) && !c.allows(4));
        c.advance(1);
        assert!(c.allows(2) && !c.allows(8), "the key is \"a\", not \"ab\"");
        assert_eq!(c.candidates(), vec![2, 8]);
        for t in [2, 5, 6] {
            assert!(c.allows(t));
            c.advance(t);
        }
        assert!(!c.is_complete());
        assert!(c.allows(7));
        c.advance(7);
        assert!(c.is_complete());
        assert!(!c.allows(4) && c.candidates().is_empty());
    }
}
