//! Personas of a Meta-Knowledge index (`<kb>_personas`): who asks, as rows. The seed paper
//! personalises retrieval: a user's interests select the clusters whose Meta-Knowledge
//! summary augments their queries. A persona names the clusters it cares about (topics or
//! metadata clusters) — or, naming none, gets the topics nearest its description — and may
//! confine its searches with a filter over the question rows (a SQL predicate such as
//! `metadata.study_type = 'randomized controlled trial'`). Each persona gets a summary written
//! from its clusters' questions; `mk_search(kb, 'query', k, persona => 'name')` routes among its
//! clusters, conditions the rewrites on its summary and applies its filter.
//!
//! Persisted in `personas.json` in the index directory (replaced atomically with each change).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::clusters::{Summary, read_json, write_json};
use mkflow_index::IndexError;

/// File of the personas, in the index directory.
pub const PERSONAS_FILE: &str = "personas.json";

/// A persona: what it is interested in, and its Meta-Knowledge summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persona {
    /// Its name (the key of `<kb>_personas`).
    pub name: String,
    /// What it is interested in, in words.
    pub description: String,
    /// The clusters it names (topics or metadata clusters); empty for those nearest the
    /// description.
    pub clusters: Vec<String>,
    /// A SQL predicate over the question rows confining its searches.
    pub filter: Option<String>,
    /// The description's embedding (routes a persona that names no clusters).
    pub description_vector: Vec<f32>,
    /// Its summary, once written.
    pub summary: Option<Summary>,
}

impl Persona {
    /// Whether `other` asks for the same (so a summary written for one serves the other).
    pub fn same_interests(&self, other: &Persona) -> bool {
        self.description == other.description && self.clusters == other.clusters && self.filter == other.filter
    }
}

/// The personas of an index, by name.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PersonaFile {
    /// Persona per name.
    pub personas: BTreeMap<String, Persona>,
}

impl PersonaFile {
    /// Reads `personas.json` in `dir` (none when absent).
    pub fn read(dir: &Path) -> Result<Self, IndexError> {
        read_json(&dir.join(PERSONAS_FILE))
    }

    /// Writes `personas.json` in `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), IndexError> {
        write_json(&dir.join(PERSONAS_FILE), self)
    }

    /// This file with `personas` added or replaced by name; a persona whose interests did not
    /// change keeps its summary.
    pub fn with(&self, personas: Vec<Persona>) -> PersonaFile {
        let mut next = self.clone();
        for mut persona in personas {
            if let Some(old) = next.personas.get(&persona.name)
                && old.same_interests(&persona)
            {
                persona.summary = old.summary.clone();
            }
            next.personas.insert(persona.name.clone(), persona);
        }
        next
    }

    /// This file without the personas named in `names`, and how many there were.
    pub fn without(&self, names: &HashSet<String>) -> (PersonaFile, usize) {
        let mut next = self.clone();
        let before = next.personas.len();
        next.personas.retain(|name, _| !names.contains(name));
        let removed = before - next.personas.len();
        (next, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persona(name: &str, description: &str) -> Persona {
        Persona {
            name: name.into(),
            description: description.into(),
            clusters: vec!["topic_001".into()],
            filter: None,
            description_vector: vec![1.0, 0.0],
            summary: None,
        }
    }

    fn summary(text: &str) -> Summary {
        Summary {
            text: text.into(),
            version: 1,
            written_at_ms: 0,
            questions: 10,
            generator: "embedded".into(),
        }
    }

    #[test]
    fn a_persona_keeps_its_summary_until_its_interests_change() {
        let mut written = persona("oncologist", "cancer trials");
        written.summary = Some(summary("cancer"));
        let file = PersonaFile::default().with(vec![written]);
        let same = file.with(vec![persona("oncologist", "cancer trials")]);
        assert_eq!(same.personas["oncologist"].summary, Some(summary("cancer")));
        let changed = file.with(vec![persona("oncologist", "cardiology")]);
        assert_eq!(changed.personas["oncologist"].summary, None);

        let dir = tempfile::tempdir().unwrap();
        same.write(dir.path()).unwrap();
        assert_eq!(PersonaFile::read(dir.path()).unwrap().personas, same.personas);
        let (emptied, removed) = same.without(&["oncologist".to_string(), "nobody".to_string()].into());
        assert_eq!((emptied.personas.len(), removed), (0, 1));
        std::fs::write(dir.path().join(PERSONAS_FILE), "[").unwrap();
        let error = PersonaFile::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains(PERSONAS_FILE), "{error}");
    }
}
