//! The knowledge indexes a session knows, by table name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::index::KnowledgeIndex;

/// Knowledge indexes by table name, shared by the table factory (which adds them) and the
/// search functions (which look them up).
#[derive(Debug, Default)]
pub struct KbRegistry {
    indexes: RwLock<HashMap<String, Arc<KnowledgeIndex>>>,
}

impl KbRegistry {
    /// Records `index` under `name` (replacing any previous one).
    pub fn insert(&self, name: &str, index: Arc<KnowledgeIndex>) {
        self.indexes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), index);
    }

    /// The index called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<KnowledgeIndex>> {
        self.indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
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
