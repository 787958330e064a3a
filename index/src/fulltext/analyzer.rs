//! Text analyzers: how a text column (and a query against it) is cut into the terms BM25
//! counts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer, TokenizerManager,
    WhitespaceTokenizer,
};

/// Terms longer than this many bytes are dropped (base64 blobs, URLs glued together).
const MAX_TERM_BYTES: usize = 40;

/// Stemming languages an analyzer may name, by their lowercase names.
const LANGUAGES: [(&str, Language); 18] = [
    ("arabic", Language::Arabic),
    ("danish", Language::Danish),
    ("dutch", Language::Dutch),
    ("english", Language::English),
    ("finnish", Language::Finnish),
    ("french", Language::French),
    ("german", Language::German),
    ("greek", Language::Greek),
    ("hungarian", Language::Hungarian),
    ("italian", Language::Italian),
    ("norwegian", Language::Norwegian),
    ("portuguese", Language::Portuguese),
    ("romanian", Language::Romanian),
    ("russian", Language::Russian),
    ("spanish", Language::Spanish),
    ("swedish", Language::Swedish),
    ("tamil", Language::Tamil),
    ("turkish", Language::Turkish),
];

/// How a text column is tokenized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Analyzer {
    /// Words (runs of letters and digits), lowercased, the language's stop words removed
    /// (where it has a list), stemmed with its Snowball stemmer. `english` is the default.
    Language(Language),
    /// Words, lowercased; no stop words, no stemming (names, codes, mixed languages).
    Simple,
    /// Whitespace-separated tokens, lowercased (identifiers with punctuation in them).
    Whitespace,
}

impl Default for Analyzer {
    fn default() -> Self {
        Analyzer::Language(Language::English)
    }
}

impl Analyzer {
    /// The analyzer's name (as in `text_columns` options and the manifest).
    pub fn name(self) -> &'static str {
        match self {
            Analyzer::Language(language) => LANGUAGES
                .iter()
                .find(|(_, l)| *l == language)
                .map(|(n, _)| *n)
                .unwrap_or("english"),
            Analyzer::Simple => "simple",
            Analyzer::Whitespace => "whitespace",
        }
    }

    /// Every accepted name, for error messages.
    pub fn names() -> Vec<&'static str> {
        let mut names = vec!["simple", "whitespace"];
        names.extend(LANGUAGES.iter().map(|(n, _)| *n));
        names
    }

    /// The tantivy tokenizer name it is registered under.
    pub(crate) fn tokenizer_name(self) -> String {
        format!("mkflow_{}", self.name())
    }

    /// The tantivy analyzer.
    fn build(self) -> TextAnalyzer {
        match self {
            Analyzer::Language(language) => {
                let builder = TextAnalyzer::builder(SimpleTokenizer::default())
                    .filter(RemoveLongFilter::limit(MAX_TERM_BYTES))
                    .filter(LowerCaser);
                match StopWordFilter::new(language) {
                    Some(stop_words) => builder.filter(stop_words).filter(Stemmer::new(language)).build(),
                    None => builder.filter(Stemmer::new(language)).build(),
                }
            }
            Analyzer::Simple => TextAnalyzer::builder(SimpleTokenizer::default())
                .filter(RemoveLongFilter::limit(MAX_TERM_BYTES))
                .filter(LowerCaser)
                .build(),
            Analyzer::Whitespace => TextAnalyzer::builder(WhitespaceTokenizer::default())
                .filter(RemoveLongFilter::limit(MAX_TERM_BYTES))
                .filter(LowerCaser)
                .build(),
        }
    }

    /// Registers the analyzers in `manager` under their tokenizer names.
    pub(crate) fn register_all(analyzers: impl IntoIterator<Item = Analyzer>, manager: &TokenizerManager) {
        for analyzer in analyzers {
            manager.register(&analyzer.tokenizer_name(), analyzer.build());
        }
    }

    /// The terms of `text` under this analyzer, in order.
    pub fn terms(self, text: &str) -> Vec<String> {
        self.terms_with(self.build(), text)
    }

    /// The terms of `text` under this analyzer as registered in `manager` (a copy of the
    /// registered one costs less than building it: no stop-word set, no stemmer to set up).
    pub(crate) fn terms_in(self, manager: &TokenizerManager, text: &str) -> Vec<String> {
        let analyzer = manager.get(&self.tokenizer_name()).unwrap_or_else(|| self.build());
        self.terms_with(analyzer, text)
    }

    fn terms_with(self, mut analyzer: TextAnalyzer, text: &str) -> Vec<String> {
        let mut stream = analyzer.token_stream(text);
        let mut terms = Vec::new();
        stream.process(&mut |token| terms.push(token.text.clone()));
        terms
    }
}

impl fmt::Display for Analyzer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Analyzer {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "simple" => Ok(Analyzer::Simple),
            "whitespace" => Ok(Analyzer::Whitespace),
            other => LANGUAGES
                .iter()
                .find(|(n, _)| *n == other)
                .map(|(_, l)| Analyzer::Language(*l))
                .ok_or_else(|| {
                    format!(
                        "unknown text analyzer '{name}' (one of: {})",
                        Analyzer::names().join(", ")
                    )
                }),
        }
    }
}

impl From<Analyzer> for String {
    fn from(analyzer: Analyzer) -> String {
        analyzer.name().to_string()
    }
}

impl TryFrom<String> for Analyzer {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

/// A column indexed for full-text search, and its analyzer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextColumn {
    /// The column's name.
    pub name: String,
    /// How its text is cut into terms.
    #[serde(default)]
    pub analyzer: Analyzer,
}

impl TextColumn {
    /// Parses a `text_columns` option: column names separated by commas, each optionally
    /// followed by `:analyzer` (`title:simple, body`); columns without one get `default`.
    pub fn parse_list(option: &str, default: Analyzer) -> Result<Vec<TextColumn>, String> {
        option
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| match part.split_once(':') {
                Some((name, analyzer)) => Ok(TextColumn {
                    name: name.trim().to_string(),
                    analyzer: analyzer.parse()?,
                }),
                None => Ok(TextColumn {
                    name: part.to_string(),
                    analyzer: default,
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_drops_stop_words_and_stems() {
        assert_eq!(
            Analyzer::default().terms("The Running of the Bulls, in Pamplona!"),
            vec!["run", "bull", "pamplona"]
        );
        assert_eq!(Analyzer::Simple.terms("The Running"), vec!["the", "running"]);
        assert_eq!(Analyzer::Whitespace.terms("GPT-4o mini"), vec!["gpt-4o", "mini"]);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for name in Analyzer::names() {
            assert_eq!(name.parse::<Analyzer>().unwrap().name(), name);
        }
        let error = "klingon".parse::<Analyzer>().unwrap_err();
        assert!(error.contains("klingon") && error.contains("english"), "{error}");
    }

    #[test]
    fn column_lists_take_an_analyzer_per_column() {
        let columns = TextColumn::parse_list("title:simple, body ,", Analyzer::default()).unwrap();
        assert_eq!(
            columns,
            vec![
                TextColumn {
                    name: "title".into(),
                    analyzer: Analyzer::Simple
                },
                TextColumn {
                    name: "body".into(),
                    analyzer: Analyzer::default()
                },
            ]
        );
        assert!(TextColumn::parse_list("", Analyzer::default()).unwrap().is_empty());
        assert!(TextColumn::parse_list("title:nope", Analyzer::default()).is_err());
    }
}
