//! Where streaming sources resume, stored in the same atomic commit as the rows they produced.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where each streaming source resumes: a source position key (e.g. `kafka:papers:0`) → the
/// next offset to read. A commit that carries offsets stores them with its rows in one manifest
/// generation, so ingestion is exactly once: after a crash, a source restarts from the offsets
/// of the last commit, whose rows are all there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceOffsets(pub BTreeMap<String, i64>);

impl SourceOffsets {
    /// No offsets.
    pub fn new() -> Self {
        SourceOffsets::default()
    }

    /// Whether no source position is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next offset of the source position `key`.
    pub fn get(&self, key: &str) -> Option<i64> {
        self.0.get(key).copied()
    }

    /// Sets the next offset of `key`.
    pub fn insert(&mut self, key: impl Into<String>, next_offset: i64) {
        self.0.insert(key.into(), next_offset);
    }

    /// Merges `other` into these offsets (its positions win).
    pub fn merge(&mut self, other: &SourceOffsets) {
        self.0.extend(other.0.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// Source positions and their next offsets, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

impl FromIterator<(String, i64)> for SourceOffsets {
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(iter: I) -> Self {
        SourceOffsets(iter.into_iter().collect())
    }
}

impl std::ops::Index<&str> for SourceOffsets {
    type Output = i64;

    fn index(&self, key: &str) -> &i64 {
        &self.0[key]
    }
}
