//! A byte-level pushdown automaton that accepts exactly the JSON texts of one [`JsonShape`].

use super::shape::{JsonShape, MAX_FORBIDDEN_BYTES, member_bytes};

/// Most whitespace bytes in a row between JSON tokens (enough for pretty-printing, not for a
/// model to idle in).
const MAX_WHITESPACE: u8 = 16;

/// Reads a JSON text byte by byte and refuses the first byte that cannot lead to a text of the
/// shape. After a refused byte the matcher is spent: try bytes on a clone.
#[derive(Debug, Clone)]
pub struct JsonMatcher<'s> {
    stack: Vec<Frame<'s>>,
    whitespace: u8,
}

/// Where the matcher stands inside one value.
#[derive(Debug, Clone, Copy)]
enum Frame<'s> {
    /// A value of this shape comes next.
    Value(&'s JsonShape),
    /// Inside an object, at property `next`.
    Object {
        properties: &'s [(String, JsonShape)],
        next: usize,
        at: ObjectAt,
    },
    /// Inside an array holding `count` items.
    Array {
        items: &'s JsonShape,
        min: usize,
        max: usize,
        count: usize,
    },
    /// Inside a string of `chars` characters so far.
    String {
        min: usize,
        max: usize,
        chars: usize,
        escape: Escape,
        forbidden: &'s [String],
        /// The string's last bytes, lower-cased (for `forbidden`).
        tail: Tail,
    },
    /// Inside a string, within a UTF-8 character: this many continuation bytes still due.
    Utf8 { left: u8 },
    /// Inside an enumerated string: the first `typed` bytes of `options[like]` so far.
    Enum {
        options: &'s [String],
        like: usize,
        typed: usize,
    },
}

impl Frame<'_> {
    /// The fewest bytes that end this frame (frames above it on the stack not counted).
    fn closing_bytes(&self) -> usize {
        match self {
            Frame::Value(shape) => shape.min_bytes(),
            Frame::Object { properties, next, at } => {
                // The members after the current one, each with its comma, and the `}`.
                let later: usize = properties[*next + 1..]
                    .iter()
                    .map(|(k, v)| 1 + member_bytes(k, v))
                    .sum();
                let (key, value) = &properties[*next];
                let current = match at {
                    ObjectAt::BeforeKey => member_bytes(key, value),
                    ObjectAt::Key(matched) => key.len() - matched + 2 + value.min_bytes(),
                    ObjectAt::Colon => 1 + value.min_bytes(),
                    // The value is under way, on the frames above.
                    ObjectAt::AfterValue => 0,
                };
                current + later + 1
            }
            Frame::Array { items, min, count, .. } => {
                let item = items.min_bytes();
                let due = match count {
                    0 => min * item + min.saturating_sub(1),
                    // `count` counts the item under way (on the frames above).
                    _ => min.saturating_sub(*count) * (1 + item),
                };
                due + 1
            }
            Frame::String { min, chars, escape, .. } => {
                let (pending, written) = match escape {
                    Escape::None => (0, *chars),
                    Escape::Backslash => (1, chars + 1),
                    Escape::Unicode(left) => (usize::from(*left), chars + 1),
                };
                pending + min.saturating_sub(written) + 1
            }
            Frame::Utf8 { left } => usize::from(*left),
            Frame::Enum { options, like, typed } => {
                let prefix = &options[*like].as_bytes()[..*typed];
                let rest = options
                    .iter()
                    .filter(|o| o.as_bytes().starts_with(prefix))
                    .map(|o| o.len() - typed)
                    .min()
                    .unwrap_or(0);
                rest + 1
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ObjectAt {
    /// Before the next key's opening quote.
    BeforeKey,
    /// Inside the key, this many bytes matched.
    Key(usize),
    /// After the key, before the colon.
    Colon,
    /// After the value, before `,` or `}`.
    AfterValue,
}

/// The last bytes of a string, lower-cased, as many as the longest forbidden phrase needs.
#[derive(Debug, Clone, Copy)]
struct Tail {
    bytes: [u8; MAX_FORBIDDEN_BYTES],
    len: usize,
}

impl Tail {
    const EMPTY: Tail = Tail {
        bytes: [0; MAX_FORBIDDEN_BYTES],
        len: 0,
    };

    /// Appends `b`; false when the string then ends with one of `forbidden`.
    fn push(&mut self, b: u8, forbidden: &[String]) -> bool {
        if forbidden.is_empty() {
            return true;
        }
        if self.len == MAX_FORBIDDEN_BYTES {
            self.bytes.copy_within(1.., 0);
            self.len -= 1;
        }
        self.bytes[self.len] = b.to_ascii_lowercase();
        self.len += 1;
        let tail = &self.bytes[..self.len];
        !forbidden.iter().any(|p| tail.ends_with(p.as_bytes()))
    }
}

#[derive(Debug, Clone, Copy)]
enum Escape {
    None,
    Backslash,
    /// Hex digits still expected after `\u`.
    Unicode(u8),
}

impl<'s> JsonMatcher<'s> {
    /// A matcher at the start of a value of `shape`.
    pub fn new(shape: &'s JsonShape) -> Self {
        JsonMatcher {
            stack: vec![Frame::Value(shape)],
            whitespace: 0,
        }
    }

    /// Whether a whole value has been read (no further byte is accepted).
    pub fn is_complete(&self) -> bool {
        self.stack.is_empty()
    }

    /// Feeds `bytes`; false at the first refused one.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Whether `bytes` could be fed from here (the matcher is unchanged).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        self.clone().feed_all(bytes)
    }

    /// Feeds one byte; false when no text of the shape continues with it.
    pub fn feed(&mut self, b: u8) -> bool {
        let Some(top) = self.stack.last_mut() else {
            return false;
        };
        // Inside strings every byte is content.
        match top {
            Frame::Utf8 { left } => {
                if !(0x80..=0xbf).contains(&b) {
                    return false;
                }
                *left -= 1;
                if *left == 0 {
                    self.stack.pop();
                }
                return true;
            }
            Frame::String {
                min,
                max,
                chars,
                escape,
                forbidden,
                tail,
            } => {
                return match escape {
                    Escape::None => match b {
                        b'"' if *chars >= *min => self.pop(),
                        b'"' => false,
                        b'\\' if *chars < *max => {
                            *escape = Escape::Backslash;
                            true
                        }
                        0..=0x1f | b'\\' | 0x7f..=0xc1 | 0xf5..=0xff => false,
                        _ if *chars < *max => {
                            if !tail.push(b, forbidden) {
                                return false;
                            }
                            *chars += 1;
                            // A multi-byte character: its continuation bytes come next.
                            let left = match b {
                                0xc2..=0xdf => 1,
                                0xe0..=0xef => 2,
                                0xf0..=0xf4 => 3,
                                _ => 0,
                            };
                            if left > 0 {
                                self.stack.push(Frame::Utf8 { left });
                            }
                            true
                        }
                        _ => false,
                    },
                    Escape::Backslash => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            *chars += 1;
                            *escape = Escape::None;
                            true
                        }
                        b'u' => {
                            *escape = Escape::Unicode(4);
                            true
                        }
                        _ => false,
                    },
                    Escape::Unicode(left) => {
                        if !b.is_ascii_hexdigit() {
                            return false;
                        }
                        *escape = match *left {
                            1 => {
                                *chars += 1;
                                Escape::None
                            }
                            n => Escape::Unicode(n - 1),
                        };
                        true
                    }
                };
            }
            Frame::Enum { options, like, typed } => {
                let prefix = &options[*like].as_bytes()[..*typed];
                if b == b'"' {
                    return match options.iter().any(|o| o.as_bytes() == prefix) {
                        true => self.pop(),
                        false => false,
                    };
                }
                let next = options.iter().position(|o| {
                    let o = o.as_bytes();
                    o.len() > *typed && o.starts_with(prefix) && o[*typed] == b
                });
                return match next {
                    Some(i) => {
                        *like = i;
                        *typed += 1;
                        true
                    }
                    None => false,
                };
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            // Whitespace goes between tokens, never inside a key.
            if matches!(
                top,
                Frame::Object {
                    at: ObjectAt::Key(_),
                    ..
                }
            ) || self.whitespace >= MAX_WHITESPACE
            {
                return false;
            }
            self.whitespace += 1;
            return true;
        }
        self.whitespace = 0;
        match top {
            Frame::Value(shape) => {
                *top = match (*shape, b) {
                    (JsonShape::Object(properties), b'{') => Frame::Object {
                        properties,
                        next: 0,
                        at: ObjectAt::BeforeKey,
                    },
                    (JsonShape::Array { items, min, max }, b'[') => Frame::Array {
                        items,
                        min: *min,
                        max: *max,
                        count: 0,
                    },
                    (JsonShape::String { min, max, forbidden }, b'"') => Frame::String {
                        min: *min,
                        max: *max,
                        chars: 0,
                        escape: Escape::None,
                        forbidden,
                        tail: Tail::EMPTY,
                    },
                    (JsonShape::Enum(options), b'"') => Frame::Enum {
                        options,
                        like: 0,
                        typed: 0,
                    },
                    _ => return false,
                };
                true
            }
            Frame::Object { properties, next, at } => match at {
                ObjectAt::BeforeKey if b == b'"' => {
                    *at = ObjectAt::Key(0);
                    true
                }
                ObjectAt::Key(matched) => {
                    let key = properties[*next].0.as_bytes();
                    match (*matched < key.len(), b) {
                        (true, _) if key[*matched] == b => {
                            *matched += 1;
                            true
                        }
                        (false, b'"') => {
                            *at = ObjectAt::Colon;
                            true
                        }
                        _ => false,
                    }
                }
                ObjectAt::Colon if b == b':' => {
                    *at = ObjectAt::AfterValue;
                    let properties: &'s [(String, JsonShape)] = properties;
                    let value = &properties[*next].1;
                    self.stack.push(Frame::Value(value));
                    true
                }
                ObjectAt::AfterValue if b == b',' && *next + 1 < properties.len() => {
                    *next += 1;
                    *at = ObjectAt::BeforeKey;
                    true
                }
                ObjectAt::AfterValue if b == b'}' && *next + 1 == properties.len() => self.pop(),
                _ => false,
            },
            Frame::Array { items, min, max, count } => {
                // `count` items are complete; the byte closes the array, separates, or opens the first item.
                if b == b']' && *count >= *min {
                    return self.pop();
                }
                let items = *items;
                if *count == 0 {
                    *count = 1;
                    self.stack.push(Frame::Value(items));
                    return self.feed(b);
                }
                if b == b',' && *count < *max {
                    *count += 1;
                    self.stack.push(Frame::Value(items));
                    return true;
                }
                false
            }
            Frame::String { .. } | Frame::Enum { .. } | Frame::Utf8 { .. } => unreachable!("handled above"),
        }
    }

    /// The fewest bytes that complete the value from here. Some single byte always brings it
    /// down by one, so a text that must end within `n` more bytes can, as long as this stays
    /// at most `n`.
    pub fn closing_bytes(&self) -> usize {
        self.stack.iter().map(Frame::closing_bytes).sum()
    }

    /// Ends the innermost value.
    fn pop(&mut self) -> bool {
        self.stack.pop();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape() -> JsonShape {
        JsonShape::from_schema(&json!({
            "type": "object", "required": ["metadata", "qa"],
            "properties": {
                "metadata": {"type": "object", "required": ["field", "tags"], "properties": {
                    "field": {"enum": ["Oncology", "Onco", "Cardiology"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}
                }},
                "qa": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                    "type": "object", "required": ["question", "answer"],
                    "properties": {"question": {"type": "string", "minLength": 1}, "answer": {"type": "string"}}
                }}
            }
        }))
        .unwrap()
    }

    fn accepts_whole(shape: &JsonShape, text: &str) -> bool {
        let mut m = JsonMatcher::new(shape);
        m.feed_all(text.as_bytes()) && m.is_complete()
    }

    #[test]
    fn accepts_valid_texts_and_nothing_after_them() {
        let shape = shape();
        let good = [
            r#"{"metadata": {"field": "Oncology", "tags": []}, "qa": [{"question": "Why?", "answer": ""}]}"#,
            "{\n  \"metadata\" : {\"field\":\"Onco\",\"tags\":[\"a\\\"b\", \"\\u00e9t\u{e9}\"]},\n  \"qa\":[{\"question\":\"q\",\"answer\":\"a\"},{\"question\":\"r\",\"answer\":\"b\"}]\n}",
        ];
        for text in good {
            assert!(accepts_whole(&shape, text), "{text}");
            let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
            assert!(parsed.is_object());
            let mut m = JsonMatcher::new(&shape);
            assert!(m.feed_all(text.as_bytes()));
            assert!(
                !m.feed(b' ') && !m.clone().feed(b'}'),
                "nothing follows a complete value"
            );
        }
    }

    #[test]
    fn refuses_what_breaks_the_shape() {
        let shape = shape();
        let bad = [
            // Properties out of order, unknown, or missing.
            r#"{"qa": "#,
            r#"{"metadata": {"tags": "#,
            r#"{"metadata": {"field": "Oncology", "tags": []}}"#,
            // A label outside the taxonomy, or a prefix of one that is not a label.
            r#"{"metadata": {"field": "Neuro"#,
            r#"{"metadata": {"field": "Cardio""#,
            // Too long a string, too many items, too few items.
            r#"{"metadata": {"field": "Onco", "tags": ["abcdef"#,
            r#"{"metadata": {"field": "Onco", "tags": ["a", "b", "#,
            r#"{"metadata": {"field": "Onco", "tags": []}, "qa": []"#,
            // An empty question, a raw newline in a string, a bad escape, trailing commas.
            r#"{"metadata": {"field": "Onco", "tags": []}, "qa": [{"question": """#,
            "{\"metadata\": {\"field\": \"Onco\", \"tags\": [\"a\n",
            r#"{"metadata": {"field": "Onco", "tags": ["\x"#,
            r#"{"metadata": {"field": "Onco", "tags": ["a",]"#,
            // Not an object at all.
            "[",
        ];
        for text in bad {
            let mut m = JsonMatcher::new(&shape);
            assert!(!m.feed_all(text.as_bytes()), "accepted {text:?}");
        }
        // Prefixes of valid texts are accepted but not complete.
        let mut m = JsonMatcher::new(&shape);
        assert!(m.feed_all(br#"{"metadata": {"field": "Onc"#));
        assert!(!m.is_complete());
        assert!(m.accepts(b"ology\"") && m.accepts(b"o\"") && !m.accepts(b"\""));
    }

    #[test]
    fn strings_hold_only_whole_utf8_characters() {
        let shape = JsonShape::String {
            min: 0,
            max: 3,
            forbidden: Vec::new(),
        };
        let mut m = JsonMatcher::new(&shape);
        assert!(m.feed_all("\"é€".as_bytes()));
        assert!(!m.accepts(&[0x80]), "a stray continuation byte");
        assert!(!m.accepts(&[0xe2, b'a']), "a character cut short");
        assert!(
            !m.accepts(&[0xff]) && !m.accepts(&[0x7f]),
            "bytes UTF-8 never uses, DEL"
        );
        assert!(m.accepts("😀\"".as_bytes()), "a 4-byte character is one character");
        assert!(!m.accepts("😀a".as_bytes()), "three characters at most");
    }

    #[test]
    fn forbidden_phrases_are_refused_in_any_case() {
        let shape = JsonShape::from_schema(&json!({"type": "string",
            "x-forbidden-phrases": ["this study", "the document"]}))
        .unwrap();
        let mut m = JsonMatcher::new(&shape);
        assert!(m.feed_all(b"\"What does This Stud"));
        assert!(!m.accepts(b"y") && !m.accepts(b"Y"), "the phrase would be complete");
        assert!(m.accepts(b"io of mice find?\""), "other words go on");
        let mut long = JsonMatcher::new(&shape);
        let padding = "x".repeat(100);
        assert!(long.feed_all(format!("\"{padding} the documen").as_bytes()));
        assert!(!long.accepts(b"t"), "the window follows a long string");
    }

    #[test]
    fn closing_bytes_is_the_shortest_way_to_finish() {
        let shape = shape();
        // From any prefix of a valid text, stepping by single bytes that each lower the count by
        // one finishes the value in exactly that many bytes.
        let text =
            r#"{"metadata": {"field": "Onco", "tags": ["a\u00e9"]}, "qa": [{"question": "Why é?", "answer": "b"}]}"#;
        assert!(accepts_whole(&shape, text), "{text}");
        assert_eq!(JsonMatcher::new(&shape).closing_bytes(), shape.min_bytes());
        for cut in 0..text.len() {
            let mut m = JsonMatcher::new(&shape);
            assert!(m.feed_all(&text.as_bytes()[..cut]));
            let mut left = m.closing_bytes();
            assert!(
                left <= text.len() - cut,
                "at {cut}: {left} > what the text still writes"
            );
            while !m.is_complete() {
                let step = (0..=255u8).find(|&b| {
                    let mut next = m.clone();
                    next.feed(b) && next.closing_bytes() + 1 == left
                });
                let b = step.unwrap_or_else(|| {
                    panic!(
                        "no byte finishes {:?} faster",
                        String::from_utf8_lossy(&text.as_bytes()[..cut])
                    )
                });
                assert!(m.feed(b));
                left -= 1;
            }
            assert_eq!(left, 0, "at {cut}");
        }
    }

    #[test]
    fn whitespace_runs_are_bounded() {
        let shape = JsonShape::from_schema(&json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let mut m = JsonMatcher::new(&shape);
        assert!(m.feed_all(&[b' '; 16]));
        assert!(!m.accepts(b" "), "a 17th space is refused");
        assert!(m.feed_all(b"[ \"a b  c\" ]"), "spaces inside strings are content");
        assert!(m.is_complete());
    }
}
