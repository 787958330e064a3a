//! The knowledge indexes a session knows, by table name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::index::KnowledgeIndex;
use crate::mk::MkAttachment;

/// A registered index and its Meta-Knowledge side, if it has one.
type Entry = (Arc<KnowledgeIndex>, Option<MkAttachment>);

/// Knowledge indexes by table name, shared by the table factory (which adds them) and the
/// search functions (which look them up).
#[derive(Debug, Default)]
pub struct KbRegistry {
    indexes: RwLock<HashMap<String, Entry>>,
}

impl KbRegistry {
    /// Records `index` (with its Meta-Knowledge side) under `name`, replacing any previous one.
    pub fn insert(&self, name: &str, index: Arc<KnowledgeIndex>, mk: Option<MkAttachment>) {
        self.indexes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (index, mk));
    }

    /// The index called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<KnowledgeIndex>> {
        self.entry(name).map(|(index, _)| index)
    }

    /// The index called `name` and its Meta-Knowledge side.
    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The index called `name` and its Meta-Knowledge side, or an error for `function` that
    /// lists the known indexes.
    pub fn entry_or_error(&self, function: &str, name: &str) -> datafusion::common::Result<Entry> {
        self.entry(name).ok_or_else(|| {
            let known = self.names();
            datafusion::common::DataFusionError::Plan(format!(
                "{function}: no knowledge index called '{name}' ({})",
                if known.is_empty() {
                    "this data directory has none yet: create one with CREATE EXTERNAL TABLE … STORED AS KB".to_string()
                } else {
                    format!("known: {}", known.join(", "))
                }
            ))
        })
    }

    /// The Meta-Knowledge sides of the indexes that have one, by table name.
    pub fn attachments(&self) -> Vec<(String, MkAttachment)> {
        self.indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(name, (_, mk))| mk.clone().map(|mk| (name.clone(), mk)))
            .collect()
    }

    /// Names of all known indexes, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }
}
