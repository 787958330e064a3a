//! Plain-text analysis for the embedded generator: sentences, key phrases (RAKE), links,
//! lexicon terms, and turning a statement into a self-contained question.

use std::collections::HashMap;

/// English function words plus words that carry no topic in scientific prose.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "although",
    "am",
    "among",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "either",
    "et",
    "al",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "him",
    "his",
    "how",
    "however",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "may",
    "might",
    "me",
    "more",
    "most",
    "much",
    "must",
    "my",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "out",
    "over",
    "own",
    "per",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "thus",
    "to",
    "too",
    "under",
    "until",
    "up",
    "upon",
    "very",
    "via",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "whether",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "within",
    "without",
    "would",
    "yet",
    "you",
    "your",
    "therefore",
    "moreover",
    "furthermore",
    "whereas",
    "here",
    "herein",
    "using",
    "used",
    "use",
    "based",
    "show",
    "shows",
    "showed",
    "shown",
    "found",
    "find",
    "finding",
    "findings",
    "study",
    "studies",
    "studied",
    "result",
    "results",
    "resulted",
    "method",
    "methods",
    "conclusion",
    "conclusions",
    "background",
    "objective",
    "objectives",
    "aim",
    "aims",
    "data",
    "analysis",
    "analyses",
    "report",
    "reported",
    "reports",
    "suggest",
    "suggests",
    "suggested",
    "indicate",
    "indicates",
    "indicated",
    "demonstrate",
    "demonstrates",
    "demonstrated",
    "present",
    "provide",
    "provides",
    "provided",
    "observed",
    "investigated",
    "examined",
    "evaluated",
    "assessed",
    "performed",
    "including",
    "included",
    "well",
    "one",
    "two",
    "three",
    "new",
    "novel",
    "significantly",
    "significant",
    "respectively",
    "paper",
    "article",
    "work",
    "approach",
    "conducted",
    "compared",
    "whose",
    "across",
    "several",
    "many",
    "various",
    "different",
    "similar",
    "likely",
    "known",
    "unknown",
    "remains",
    "remain",
    "role",
    "roles",
    "important",
    "potential",
    "increased",
    "decreased",
];

fn is_stopword(word: &str) -> bool {
    let lower = word.to_lowercase();
    STOPWORDS.contains(&lower.as_str())
}

/// Abbreviations whose period does not end a sentence.
const ABBREVIATIONS: &[&str] = &[
    "al", "e.g", "i.e", "eg", "ie", "vs", "fig", "figs", "dr", "mr", "ms", "prof", "approx", "ca", "no", "cf", "resp",
    "etc", "st", "inc", "ltd", "jr", "sr", "nos", "ref", "refs", "eq", "vol",
];

/// Section labels of structured abstracts, and how much a sentence under each matters.
const SECTIONS: &[(&str, f32)] = &[
    ("BACKGROUND", -0.3),
    ("INTRODUCTION", -0.3),
    ("CONTEXT", -0.3),
    ("OBJECTIVE", -0.3),
    ("OBJECTIVES", -0.3),
    ("AIM", -0.3),
    ("AIMS", -0.3),
    ("PURPOSE", -0.3),
    ("METHODS", -0.5),
    ("METHOD", -0.5),
    ("DESIGN", -0.5),
    ("SETTING", -0.5),
    ("PARTICIPANTS", -0.5),
    ("PATIENTS", -0.5),
    ("INTERVENTIONS", -0.5),
    ("MEASUREMENTS", -0.5),
    ("MAIN OUTCOME MEASURES", -0.5),
    ("RESULTS", 0.4),
    ("FINDINGS", 0.4),
    ("CONCLUSION", 0.7),
    ("CONCLUSIONS", 0.7),
    ("INTERPRETATION", 0.7),
    ("SIGNIFICANCE", 0.5),
];

/// A sentence of a text, with the section label of a structured abstract it sat under.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    /// The sentence, section label removed.
    pub text: String,
    /// Salience adjustment of its section (0 when none).
    pub section_weight: f32,
}

/// Splits prose into sentences: at `.`, `?` or `!` followed by a space and an upper-case
/// letter, digit or bracket, except after common abbreviations, initials and inside decimals.
pub fn sentences(text: &str) -> Vec<Sentence> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut section = 0.0f32;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_end = i + 1 == chars.len();
        let boundary = matches!(c, '.' | '?' | '!')
            && (at_end
                || (chars[i + 1].is_whitespace()
                    && chars[i + 1..]
                        .iter()
                        .find(|c| !c.is_whitespace())
                        .is_some_and(|n| n.is_uppercase() || n.is_ascii_digit() || *n == '(' || *n == '[')
                    && !(c == '.' && ends_with_abbreviation(&chars[start..i]))));
        if boundary || at_end {
            let raw: String = chars[start..=i].iter().collect();
            let (label_weight, body) = strip_section_label(raw.trim());
            if let Some(w) = label_weight {
                section = w;
            }
            let body = body.trim();
            if body.chars().any(char::is_alphabetic) {
                out.push(Sentence {
                    text: body.to_string(),
                    section_weight: section,
                });
            }
            start = i + 1;
        }
        i += 1;
    }
    out
}

fn ends_with_abbreviation(before: &[char]) -> bool {
    let word: String = before
        .iter()
        .rev()
        .take_while(|c| !c.is_whitespace() && **c != '(')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let lower = word.to_lowercase();
    let single_initial = word.chars().count() == 1 && word.chars().all(char::is_uppercase);
    single_initial || ABBREVIATIONS.contains(&lower.as_str())
}

/// Removes a leading `RESULTS:`-style label; returns its weight when there was one.
fn strip_section_label(sentence: &str) -> (Option<f32>, &str) {
    for (label, weight) in SECTIONS {
        if let Some(rest) = sentence.strip_prefix(label) {
            if rest.starts_with(|c: char| c.is_alphanumeric()) {
                continue;
            }
            let rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix(':').or_else(|| rest.strip_prefix('.')) {
                return (Some(*weight), after);
            }
            if rest.starts_with(|c: char| c.is_uppercase()) {
                return (Some(*weight), rest);
            }
        }
    }
    (None, sentence)
}

/// Words of a text: runs of letters, digits and inner hyphens or apostrophes.
pub fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\''))
        .map(|w| w.trim_matches(|c: char| c == '-' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect()
}

/// A key phrase and its RAKE score.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyphrase {
    /// The phrase as first written in the text.
    pub phrase: String,
    /// Sum of its words' degree/frequency ratios.
    pub score: f32,
}

/// Key phrases by RAKE (Rose et al., 2010): candidates are runs of content words between
/// stopwords, past-tense verbs and punctuation (at most four words); a word scores its co-occurrence degree over
/// its frequency; a phrase the sum of its words. Best first, without case-insensitive repeats.
pub fn keyphrases(text: &str, max: usize) -> Vec<Keyphrase> {
    let mut candidates: Vec<Vec<&str>> = Vec::new();
    for fragment in text.split(|c: char| ",;:.!?()[]{}\"\n\t/".contains(c)) {
        let mut run: Vec<&str> = Vec::new();
        for word in words(fragment) {
            let letters = word.chars().count();
            // Single capitals name things ("vitamin D", "T cells"); past-tense verbs
            // ("reduced", "observed") join phrases the way stopwords do.
            let named = letters > 1 || word.chars().all(char::is_uppercase);
            let verb = letters >= 5 && word.to_lowercase().ends_with("ed");
            let content = named && !verb && !is_stopword(word) && !word.chars().all(|c| c.is_ascii_digit());
            if content {
                run.push(word);
            } else if !run.is_empty() {
                candidates.push(std::mem::take(&mut run));
            }
        }
        if !run.is_empty() {
            candidates.push(run);
        }
    }
    candidates.retain(|c| c.len() <= 4);
    let mut frequency: HashMap<String, f32> = HashMap::new();
    let mut degree: HashMap<String, f32> = HashMap::new();
    for candidate in &candidates {
        for word in candidate {
            let w = word.to_lowercase();
            *frequency.entry(w.clone()).or_default() += 1.0;
            *degree.entry(w).or_default() += candidate.len() as f32;
        }
    }
    let mut scored: Vec<Keyphrase> = Vec::new();
    let mut phrase_counts: HashMap<String, usize> = HashMap::new();
    for candidate in &candidates {
        let key = candidate.join(" ").to_lowercase();
        *phrase_counts.entry(key.clone()).or_default() += 1;
        if scored.iter().any(|k| k.phrase.to_lowercase() == key) {
            continue;
        }
        let score = candidate
            .iter()
            .map(|w| {
                let w = w.to_lowercase();
                degree[&w] / frequency[&w]
            })
            .sum();
        scored.push(Keyphrase {
            phrase: candidate.join(" "),
            score,
        });
    }
    // Repeated phrases are what a text is about: weigh by how often they occur.
    for k in &mut scored {
        k.score *= 1.0 + 0.5 * (phrase_counts[&k.phrase.to_lowercase()] as f32 - 1.0);
    }
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    scored.truncate(max);
    scored
}

/// Links in a text (`http://`, `https://`, `www.`), without trailing punctuation.
pub fn urls(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for token in text.split_whitespace() {
        let lower = token.to_lowercase();
        let Some(start) = ["https://", "http://", "www."]
            .iter()
            .filter_map(|p| lower.find(p))
            .min()
        else {
            continue;
        };
        let url = token[start..].trim_end_matches(|c: char| ".,;:)]}>\"'".contains(c));
        if url.len() > 8 && !out.iter().any(|u| u == url) {
            out.push(url.to_string());
        }
    }
    out
}

/// The lexicon entries a text mentions as whole words (case-insensitive), in lexicon order.
pub fn mentioned_terms(text: &str, lexicon: &[String]) -> Vec<String> {
    let lower = text.to_lowercase();
    lexicon
        .iter()
        .filter(|term| {
            let t = term.to_lowercase();
            lower.match_indices(&t).any(|(at, _)| {
                let before = lower[..at].chars().next_back();
                let after = lower[at + t.len()..].chars().next();
                !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
            })
        })
        .cloned()
        .collect()
}

/// Leading connectives that tie a sentence to the one before it.
const CONNECTIVES: &[&str] = &[
    "however",
    "in addition",
    "additionally",
    "moreover",
    "furthermore",
    "thus",
    "therefore",
    "hence",
    "overall",
    "together",
    "taken together",
    "collectively",
    "in conclusion",
    "in summary",
    "to conclude",
    "finally",
    "here",
    "importantly",
    "notably",
    "interestingly",
    "strikingly",
    "consequently",
    "in contrast",
    "conversely",
    "in particular",
    "specifically",
    "surprisingly",
    "similarly",
    "accordingly",
    "as a result",
    "in this study",
    "in the present study",
    "in this work",
    "in this paper",
    "in this report",
];

/// Reporting frames whose content is the clause after them.
const FRAMES: &[&str] = &[
    "we found that",
    "we find that",
    "we show that",
    "we showed that",
    "we demonstrate that",
    "we demonstrated that",
    "we report that",
    "we conclude that",
    "we concluded that",
    "we propose that",
    "we observed that",
    "we observe that",
    "we identified that",
    "we provide evidence that",
    "we reveal that",
    "we confirm that",
    "we establish that",
    "we hypothesize that",
    "we suggest that",
    "our results show that",
    "our results suggest that",
    "our results indicate that",
    "our results demonstrate that",
    "our data show that",
    "our data suggest that",
    "our data indicate that",
    "our findings show that",
    "our findings suggest that",
    "our findings indicate that",
    "our study shows that",
    "our study suggests that",
    "these results show that",
    "these results suggest that",
    "these results indicate that",
    "these results demonstrate that",
    "these data show that",
    "these data suggest that",
    "these data indicate that",
    "these data demonstrate that",
    "these findings show that",
    "these findings suggest that",
    "these findings indicate that",
    "these findings demonstrate that",
    "this study shows that",
    "this study suggests that",
    "this study demonstrates that",
    "the results show that",
    "the results suggest that",
    "the results indicate that",
    "results show that",
    "results suggest that",
    "results indicate that",
    "results showed that",
    "it was found that",
    "it is shown that",
    "it was shown that",
    "we show here that",
    "here we show that",
    "here, we show that",
    "here we report that",
    "here we demonstrate that",
    "this suggests that",
    "this indicates that",
    "evidence suggests that",
    "our analysis shows that",
    "our analyses show that",
];

/// The claim of a statement, as a clause that reads on its own: connectives and reporting
/// frames ("we found that …") removed, first-person subjects named, final period dropped.
pub fn claim_clause(sentence: &str) -> String {
    let mut s = sentence.trim().trim_end_matches(['.', '!', ';']).trim().to_string();
    loop {
        let lower = s.to_lowercase();
        let before = s.len();
        for connective in CONNECTIVES {
            if lower.starts_with(connective) {
                let rest = &s[connective.len()..];
                if rest.starts_with(',') || rest.starts_with(' ') {
                    s = rest.trim_start_matches([',', ' ']).to_string();
                    break;
                }
            }
        }
        let lower = s.to_lowercase();
        for frame in FRAMES {
            if lower.starts_with(frame) {
                s = s[frame.len()..].trim_start().to_string();
                break;
            }
        }
        if s.len() == before {
            break;
        }
    }
    let replaced = words_replaced(&self_references_replaced(&s));
    lower_first(&replaced)
}

/// Phrases by which a text refers to itself, and what a reader who has not seen it reads.
const SELF_REFERENCES: &[(&str, &str)] = &[
    ("the present study", "research"),
    ("the current study", "research"),
    ("this study", "research"),
    ("our study", "research"),
    ("this paper", "research"),
    ("this work", "research"),
    ("this report", "research"),
    ("this article", "research"),
    ("these results", "the results"),
    ("these findings", "the findings"),
    ("these data", "the data"),
    ("this finding", "the finding"),
];

/// Replaces the text's references to itself (case-insensitively, at word boundaries).
fn self_references_replaced(s: &str) -> String {
    let mut out = s.to_string();
    for (phrase, replacement) in SELF_REFERENCES {
        loop {
            let lower = out.to_lowercase();
            let Some(at) = lower.match_indices(phrase).map(|(i, _)| i).find(|&i| {
                let before = lower[..i].chars().next_back();
                let after = lower[i + phrase.len()..].chars().next();
                !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
            }) else {
                break;
            };
            out.replace_range(at..at + phrase.len(), replacement);
        }
    }
    out
}

/// Names the authors where the text speaks as "we"/"our".
fn words_replaced(s: &str) -> String {
    let mut out = Vec::new();
    for (i, token) in s.split(' ').enumerate() {
        let replacement = match token {
            "We" if i == 0 => "researchers",
            "we" => "researchers",
            "Our" if i == 0 => "the",
            "our" => "the",
            "us" => "researchers",
            _ => token,
        };
        out.push(replacement.to_string());
    }
    out.join(" ")
}

/// Lower-cases the first letter unless the first word is an acronym or a name with inner
/// capitals or digits (`DNA`, `IL-6`, `mTOR`).
fn lower_first(s: &str) -> String {
    let first_word = s.split_whitespace().next().unwrap_or("");
    let keep = first_word
        .chars()
        .skip(1)
        .any(|c| c.is_uppercase() || c.is_ascii_digit());
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if !keep => c.to_lowercase().chain(chars).collect(),
        _ => s.to_string(),
    }
}

/// Finite verbs and verb endings that mark a title as a statement rather than a topic.
const STATEMENT_MARKERS: &[&str] = &[
    " is ",
    " are ",
    " was ",
    " were ",
    " has ",
    " have ",
    " can ",
    " cannot ",
    " does ",
    " do ",
    " causes ",
    " cause ",
    " induces ",
    " induce ",
    " reduces ",
    " reduce ",
    " increases ",
    " increase ",
    " promotes ",
    " promote ",
    " regulates ",
    " regulate ",
    " inhibits ",
    " inhibit ",
    " predicts ",
    " predict ",
    " improves ",
    " improve ",
    " prevents ",
    " prevent ",
    " controls ",
    " control ",
    " drives ",
    " drive ",
    " requires ",
    " require ",
    " enhances ",
    " enhance ",
    " suppresses ",
    " suppress ",
    " mediates ",
    " mediate ",
    " leads ",
    " lead ",
    " protects ",
    " protect ",
    " limits ",
    " limit ",
    " blocks ",
    " block ",
    " determines ",
    " determine ",
    " modulates ",
    " modulate ",
    " triggers ",
    " trigger ",
    " confers ",
    " confer ",
    " reveals ",
    " reveal ",
    " affects ",
    " affect ",
    " activates ",
    " activate ",
    " impairs ",
    " impair ",
    " links ",
    " contributes ",
    " contribute ",
    " underlies ",
    " is associated ",
    " are associated ",
];

/// Whether a title states a finding ("X induces Y") rather than naming a topic.
pub fn is_statement(title: &str) -> bool {
    let padded = format!(" {} ", title.to_lowercase());
    STATEMENT_MARKERS.iter().any(|m| padded.contains(m))
}

/// A self-contained yes/no question asking whether a statement holds.
pub fn statement_question(sentence: &str) -> String {
    format!("Is it true that {}?", claim_clause(sentence))
}

/// A question asking what is known about a topic.
pub fn topic_question(topic: &str) -> String {
    format!(
        "What is known about {}?",
        lower_first(topic.trim().trim_end_matches(['.', '?', '!']))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sentences_and_strips_section_labels() {
        let text = "BACKGROUND: Smoking is common (Smith et al. 2001). METHODS We enrolled 3.5 thousand \
                    patients, e.g. adults. RESULTS: Risk rose by 2.1 fold! CONCLUSIONS: Quit now.";
        let s = sentences(text);
        let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "Smoking is common (Smith et al. 2001).",
                "We enrolled 3.5 thousand patients, e.g. adults.",
                "Risk rose by 2.1 fold!",
                "Quit now."
            ]
        );
        assert!(s[0].section_weight < 0.0 && s[2].section_weight > 0.0 && s[3].section_weight > s[2].section_weight);
    }

    #[test]
    fn rake_prefers_repeated_multiword_concepts() {
        let text = "Vitamin D supplementation reduced fracture risk. Fracture risk was lower with vitamin D \
                    supplementation in elderly women, and the effect was dose dependent.";
        let k = keyphrases(text, 3);
        assert_eq!(k[0].phrase, "Vitamin D supplementation");
        assert!(
            k.iter().any(|k| k.phrase.eq_ignore_ascii_case("fracture risk")),
            "{k:?}"
        );
        assert!(k.iter().all(|k| !k.phrase.contains("was")));
    }

    #[test]
    fn statements_become_self_contained_questions() {
        assert_eq!(
            statement_question("However, we found that IL-6 levels increased after surgery."),
            "Is it true that IL-6 levels increased after surgery?"
        );
        assert_eq!(
            statement_question("Taken together, these results suggest that Notch signalling drives tumour growth."),
            "Is it true that notch signalling drives tumour growth?"
        );
        assert_eq!(
            statement_question("We identified 12 risk loci."),
            "Is it true that researchers identified 12 risk loci?"
        );
        assert_eq!(
            statement_question("This study corroborates earlier work, as these findings show."),
            "Is it true that research corroborates earlier work, as the findings show?"
        );
        assert_eq!(
            topic_question("Genome-wide association of height."),
            "What is known about genome-wide association of height?"
        );
        assert!(is_statement("Aspirin reduces the risk of colorectal cancer"));
        assert!(!is_statement("Genome-wide association of height in European cohorts"));
    }

    #[test]
    fn finds_links_and_terms() {
        assert_eq!(
            urls("Code: https://github.com/a/b. Also (www.example.org/x)."),
            vec!["https://github.com/a/b", "www.example.org/x"]
        );
        let lexicon = vec!["odds ratio".to_string(), "AUC".to_string(), "recall".to_string()];
        assert_eq!(
            mentioned_terms("The adjusted Odds Ratio was 2; AUC=0.8; recalled items", &lexicon),
            vec!["odds ratio", "AUC"]
        );
    }
}
