//! Cutting a text into chunks of at most `max_tokens` tokens, at the strongest boundaries
//! available: Markdown sections, then paragraphs, lines, sentences, words, and — for a run of
//! text with none of those — tokens.
//!
//! The text is split recursively: a span over the limit is cut at its section starts, each part
//! still over the limit at its paragraph breaks, and so on down to tokens, giving *pieces* that
//! each fit. Pieces are then packed greedily into chunks, with four rules: a heading line is
//! never the last piece of a chunk (it stays with its section); a section that does not fit in
//! what is left of a chunk starts the next one; a chunk that begins inside a section (the rest
//! of a long one) takes no other section, so a short section is never read mixed with the tail
//! of a long one; and each chunk after the first may begin with up to `overlap_tokens` tokens
//! of the end of the one before (cut at a word boundary), unless it begins a section.
//!
//! Token counts come from the model's own tokenizer: the caller gives the byte offset where
//! each token of the whole text starts, and the tokens of a span are those starting inside it.

/// A chunk: a span of the text, by byte offsets, and its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Byte offset of its first character.
    pub start: usize,
    /// Byte offset just after its last character.
    pub end: usize,
    /// Tokens in it.
    pub tokens: usize,
}

/// Boundary kinds, strongest first; a level's boundaries are where a span over the limit is
/// cut before trying the next level.
const SECTION: usize = 0;
const PARAGRAPH: usize = 1;
const LINE: usize = 2;
const SENTENCE: usize = 3;
const WORD: usize = 4;
const LEVELS: usize = 5;

/// A text and where its tokens start.
struct Text<'a> {
    text: &'a str,
    token_starts: &'a [usize],
}

impl Text<'_> {
    /// Tokens starting in `[start, end)`.
    fn tokens(&self, start: usize, end: usize) -> usize {
        let from = self.token_starts.partition_point(|&t| t < start);
        let to = self.token_starts.partition_point(|&t| t < end);
        to - from
    }

    /// Boundaries of `level` strictly inside `(start, end)`: byte offsets where a piece may
    /// begin (always at a non-whitespace character).
    fn boundaries(&self, level: usize, start: usize, end: usize) -> Vec<usize> {
        let bytes = self.text.as_bytes();
        let mut found = Vec::new();
        let next_word = |mut p: usize| {
            while p < end && bytes[p].is_ascii_whitespace() {
                p += 1;
            }
            p
        };
        let mut p = start;
        while p < end {
            let candidate = match level {
                SECTION => (p > start && bytes[p - 1] == b'\n' && is_heading(&self.text[p..end])).then_some(p),
                PARAGRAPH | LINE if bytes[p] == b'\n' => {
                    let next = next_word(p);
                    let newlines = bytes[p..next].iter().filter(|b| **b == b'\n').count();
                    let wanted = if level == PARAGRAPH { 2 } else { 1 };
                    p = next.max(p + 1) - 1;
                    (newlines >= wanted).then_some(next)
                }
                SENTENCE if matches!(bytes[p], b'.' | b'!' | b'?') => {
                    let mut q = p + 1;
                    while q < end && matches!(bytes[q], b'"' | b'\'' | b')' | b']') {
                        q += 1;
                    }
                    (q < end && bytes[q].is_ascii_whitespace()).then(|| next_word(q))
                }
                WORD if bytes[p].is_ascii_whitespace() => {
                    let next = next_word(p);
                    p = next.max(p + 1) - 1;
                    Some(next)
                }
                _ => None,
            };
            if let Some(b) = candidate
                && b > start
                && b < end
                && found.last() != Some(&b)
            {
                found.push(b);
            }
            p += 1;
        }
        found
    }

    /// Token starts strictly inside `(start, end)`, every `max` tokens.
    fn token_cuts(&self, start: usize, end: usize, max: usize) -> Vec<usize> {
        let from = self.token_starts.partition_point(|&t| t < start);
        let to = self.token_starts.partition_point(|&t| t < end);
        self.token_starts[from..to]
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, t)| *i > 0 && i % max == 0 && *t > start)
            .map(|(_, t)| t)
            .collect()
    }

    /// Pieces of `[start, end)`, each within `max` tokens, with the level of the boundary each
    /// starts at (`LEVELS`: a token cut); the span itself starts at a boundary of
    /// `start_level`, and is cut at boundaries of `level` or weaker.
    fn pieces(
        &self,
        (start, end): (usize, usize),
        level: usize,
        start_level: usize,
        max: usize,
        out: &mut Vec<(usize, usize, usize)>,
    ) {
        if self.tokens(start, end) <= max {
            out.push((start, end, start_level));
            return;
        }
        if level >= LEVELS {
            let mut from = (start, start_level);
            for cut in self.token_cuts(start, end, max) {
                out.push((from.0, cut, from.1));
                from = (cut, LEVELS);
            }
            out.push((from.0, end, from.1));
            return;
        }
        let cuts = self.boundaries(level, start, end);
        let mut from = (start, start_level);
        for cut in cuts.into_iter().chain(std::iter::once(end)) {
            self.pieces((from.0, cut), level + 1, from.1, max, out);
            from = (cut, level);
        }
    }
}

/// Whether `text` begins with a Markdown ATX heading (`#`… `######` then a space).
fn is_heading(text: &str) -> bool {
    let hashes = text.bytes().take_while(|b| *b == b'#').count();
    (1..=6).contains(&hashes) && text.as_bytes().get(hashes).is_some_and(|b| *b == b' ' || *b == b'\t')
}

/// Trims whitespace off both ends of `[start, end)`.
fn trimmed(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let lead = slice.len() - slice.trim_start().len();
    let trail = slice.len() - slice.trim_end().len();
    if lead == slice.len() {
        return (start, start);
    }
    (start + lead, end - trail)
}

/// Chunks of `text` (see the module documentation). `token_starts`: the byte offset where each
/// of its tokens starts, in order. `max_tokens` ≥ 1; `overlap_tokens` < `max_tokens`.
pub fn split(text: &str, token_starts: &[usize], max_tokens: usize, overlap_tokens: usize) -> Vec<Span> {
    let max = max_tokens.max(1);
    let overlap = overlap_tokens.min(max.saturating_sub(1));
    let doc = Text { text, token_starts };
    let (start, end) = trimmed(text, 0, text.len());
    if start == end {
        return Vec::new();
    }
    let mut pieces = Vec::new();
    doc.pieces((start, end), SECTION, SECTION, max, &mut pieces);
    let section_starts: Vec<usize> = std::iter::once(start)
        .chain(doc.boundaries(SECTION, start, end))
        .chain(std::iter::once(end))
        .collect();
    let section_end = |at: usize| {
        section_starts[section_starts.partition_point(|&s| s <= at)..]
            .first()
            .copied()
            .unwrap_or(end)
    };
    let heading_only =
        |(s, e, _): (usize, usize, usize)| is_heading(&text[s..e]) && !text[s..e].trim_end().contains('\n');

    let mut chunks: Vec<Span> = Vec::new();
    let mut i = 0;
    let mut chunk_start = pieces[0].0;
    while i < pieces.len() {
        let whole_sections = i == 0 || pieces[i].2 == SECTION;
        let mut j = i;
        while j + 1 < pieces.len() {
            let next = pieces[j + 1];
            if doc.tokens(chunk_start, next.1) > max {
                break;
            }
            // A section that will not fit whole in this chunk starts the next one, as does any
            // section after the rest of a long one.
            if next.2 == SECTION && (!whole_sections || doc.tokens(chunk_start, section_end(next.0)) > max) {
                break;
            }
            j += 1;
        }
        // A heading stays with what follows it.
        while j > i && j + 1 < pieces.len() && heading_only(pieces[j]) {
            j -= 1;
        }
        // A heading that cannot take the next piece along takes its beginning: the next piece
        // is cut finer, within what the heading leaves of the chunk.
        if j == i && i + 1 < pieces.len() && heading_only(pieces[i]) {
            let budget = max.saturating_sub(doc.tokens(chunk_start, pieces[i].1));
            let next = pieces[i + 1];
            let mut finer = Vec::new();
            if budget > 0 {
                doc.pieces((next.0, next.1), LINE, next.2, budget, &mut finer);
            }
            if finer.len() > 1 {
                pieces.splice(i + 1..i + 2, finer);
                continue;
            }
        }
        let (s, e) = trimmed(text, chunk_start, pieces[j].1);
        chunks.push(Span {
            start: s,
            end: e,
            tokens: doc.tokens(s, e),
        });
        i = j + 1;
        if i < pieces.len() {
            chunk_start = pieces[i].0;
            if overlap > 0 && pieces[i].2 != SECTION {
                // Back up into the previous chunk, word by word, while the overlap and the next
                // piece stay within their limits.
                let words = doc.boundaries(WORD, s, e);
                if let Some(&back) = words
                    .iter()
                    .find(|&&w| doc.tokens(w, e) <= overlap && doc.tokens(w, pieces[i].1) <= max)
                {
                    chunk_start = back;
                }
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whitespace-separated words as tokens.
    fn words(text: &str) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut previous_space = true;
        for (i, c) in text.char_indices() {
            if !c.is_whitespace() && previous_space {
                starts.push(i);
            }
            previous_space = c.is_whitespace();
        }
        starts
    }

    fn chunks(text: &str, max: usize, overlap: usize) -> Vec<String> {
        split(text, &words(text), max, overlap)
            .iter()
            .map(|s| text[s.start..s.end].to_string())
            .collect()
    }

    #[test]
    fn short_texts_are_one_chunk_and_empty_ones_none() {
        assert_eq!(chunks("  one two three \n", 10, 0), vec!["one two three"]);
        assert!(chunks(" \n\t ", 10, 0).is_empty());
    }

    #[test]
    fn paragraphs_then_sentences_then_words() {
        let text = "Alpha beta gamma. Delta epsilon.\n\nZeta eta theta iota. Kappa lambda mu nu xi.";
        assert_eq!(
            chunks(text, 5, 0),
            vec![
                "Alpha beta gamma. Delta epsilon.",
                "Zeta eta theta iota.",
                "Kappa lambda mu nu xi."
            ]
        );
        assert_eq!(chunks("a b c d e f g", 3, 0), vec!["a b c", "d e f", "g"]);
        // Every chunk within the limit, whatever the text.
        let long: String = (0..500)
            .map(|i| format!("w{i}{}", if i % 7 == 0 { ". " } else { " " }))
            .collect();
        for chunk in split(&long, &words(&long), 16, 4) {
            assert!(chunk.tokens <= 16 && chunk.tokens > 0);
        }
    }

    #[test]
    fn headings_stay_with_their_sections() {
        let text = "# Intro\n\nShort intro here.\n\n## Install\n\nRun the installer now. Then restart it.\n\n## Use\n\nCall it.";
        // 5 + 9 + 4 words: the second section does not fit after the first, the third fits
        // after the second.
        let got = chunks(text, 13, 0);
        assert_eq!(
            got,
            vec![
                "# Intro\n\nShort intro here.",
                "## Install\n\nRun the installer now. Then restart it.\n\n## Use\n\nCall it."
            ]
        );
        // A long section is cut inside, but its heading opens its first chunk.
        let text = "# A\n\none two three four five six\n\n# B\n\nseven eight nine ten eleven twelve thirteen";
        let got = chunks(text, 6, 0);
        assert_eq!(got[0], "# A\n\none two three four");
        assert!(got.iter().any(|c| c.starts_with("# B")), "{got:?}");
        assert!(got.iter().all(|c| !c.ends_with("# B")), "{got:?}");
    }

    #[test]
    fn a_short_section_is_not_mixed_with_the_tail_of_a_long_one() {
        let text = "# A

one two three four five six seven

## B

eight nine";
        // The rest of A ("five six seven") and all of B would fit in 6 tokens together.
        let got = chunks(text, 6, 2);
        assert_eq!(
            got.last().unwrap(),
            "## B

eight nine",
            "{got:?}"
        );
        assert!(got.iter().filter(|c| c.contains("## B")).count() == 1, "{got:?}");
    }

    #[test]
    fn overlap_repeats_the_end_of_the_previous_chunk() {
        let got = chunks("a b c d e f g h i j", 4, 2);
        assert_eq!(got[0], "a b c d");
        assert!(got[1].starts_with("c d"), "{got:?}");
        let all: String = got.join(" ");
        for w in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
            assert!(all.split(' ').any(|x| x == w));
        }
    }

    #[test]
    fn a_word_longer_than_the_limit_is_cut_at_tokens() {
        // One "word" of 9 tokens (token starts every 2 bytes).
        let text = "abcdefghijklmnopqr";
        let starts: Vec<usize> = (0..text.len()).step_by(2).collect();
        let spans = split(text, &starts, 4, 0);
        assert_eq!(spans.iter().map(|s| s.tokens).collect::<Vec<_>>(), vec![4, 4, 1]);
        assert_eq!(spans[0].end, spans[1].start);
    }
}
