//! The default schema of every session: the data directory's knowledge indexes as tables, with
//! the questions, clusters and personas tables of those that have a Meta-Knowledge side, the engine's own
//! tables (`dead_letters`) — all shared by every session ([`KbSchema`]) — and the tables one
//! session creates (its sources), which no other session sees ([`SessionSchema`]).
//!
//! [`SessionSchema`] is a DataFusion [`SchemaProvider`], so `SHOW TABLES`, `information_schema`
//! and qualified names (`datafusion.public.kb`) work as for any table; the search functions look
//! their index up in the shared part ([`KbSchema::entry_or_error`]).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use mkflow_index::KnowledgeIndex;

use super::kb_table::{IngestProgress, KbTable};

/// What a search function searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchTarget {
    /// The documents (`vector_search`, `text_search`).
    Documents,
    /// The synthetic questions of a Meta-Knowledge index (`qa_search`, `qa_text_search`).
    Questions,
    /// The chunks of a chunked index (`chunk_search`, `chunk_text_search`).
    Chunks,
}
use super::kb_entry::{KbEntry, Searched};
use super::personas::PersonasTable;
use crate::chunks::ChunkIndex;
use crate::mk::{ClustersTable, MkAttachment};
use crate::support::BatchTable;
use crate::support::batch_table::SnapshotView;

/// Suffix of a chunked index's chunks table.
pub const CHUNKS_SUFFIX: &str = "_chunks";

/// Suffix of a Meta-Knowledge index's questions table.
pub const QUESTIONS_SUFFIX: &str = "_questions";

/// Suffix of a Meta-Knowledge index's clusters table.
pub const CLUSTERS_SUFFIX: &str = "_clusters";

/// Suffix of a Meta-Knowledge index's personas table.
pub const PERSONAS_SUFFIX: &str = "_personas";

/// What every session sees: knowledge indexes by table name, and the engine's own tables.
#[derive(Debug)]
pub struct KbSchema {
    indexes: RwLock<HashMap<String, KbEntry>>,
    globals: MemorySchemaProvider,
    progress: Arc<IngestProgress>,
    /// Tables served from elsewhere, found after the local ones.
    remote: OnceLock<Arc<dyn RemoteTables>>,
}

/// Tables a schema serves from elsewhere (a coordinator's sharded tables).
#[async_trait]
pub trait RemoteTables: std::fmt::Debug + Send + Sync {
    /// Their names.
    fn names(&self) -> Vec<String>;
    /// The table called `name`, if it is one of them.
    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>>;
}

/// What a table name of the schema stands for.
enum Named {
    /// A knowledge index.
    Index(KbEntry),
    /// The questions index of a Meta-Knowledge index.
    Questions(MkAttachment),
    /// The clusters of a Meta-Knowledge index.
    Clusters(MkAttachment),
    /// The personas of a Meta-Knowledge index.
    Personas(MkAttachment),
    /// The chunks of a chunked index.
    Chunks(Arc<ChunkIndex>),
}

impl KbSchema {
    /// An empty schema whose index tables report ingested rows to `progress`.
    pub fn new(progress: Arc<IngestProgress>) -> Self {
        KbSchema {
            indexes: RwLock::default(),
            globals: MemorySchemaProvider::new(),
            progress,
            remote: OnceLock::new(),
        }
    }

    /// Serves `remote`'s tables too (once; later calls change nothing).
    pub fn set_remote(&self, remote: Arc<dyn RemoteTables>) {
        let _ = self.remote.set(remote);
    }

    /// Makes `table` visible to every session as `name` (the engine's own tables).
    pub fn register_global(&self, name: &str, table: Arc<dyn TableProvider>) -> Result<()> {
        self.globals.register_table(name.to_string(), table).map(drop)
    }

    /// Records `entry` under `name`, replacing any previous one.
    pub fn insert(&self, name: &str, entry: KbEntry) {
        self.indexes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), entry);
    }

    /// The index called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<KnowledgeIndex>> {
        self.entry(name).map(|entry| entry.index)
    }

    /// The index called `name` and its attachments.
    pub fn entry(&self, name: &str) -> Option<KbEntry> {
        self.indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The index called `name` and its attachments, or an error for `function` that
    /// lists the known indexes.
    pub fn entry_or_error(&self, function: &str, name: &str) -> Result<KbEntry> {
        self.entry(name).ok_or_else(|| {
            let known = self.names();
            DataFusionError::Plan(format!(
                "{function}: no knowledge index called '{name}' ({})",
                if known.is_empty() {
                    "this data directory has none yet: create one with CREATE EXTERNAL TABLE … STORED AS KB".to_string()
                } else {
                    format!("known: {}", known.join(", "))
                }
            ))
        })
    }

    /// Whether index `name` has a Meta-Knowledge side (synthetic questions).
    pub fn has_questions(&self, name: &str) -> bool {
        self.entry(name).is_some_and(|entry| entry.mk.is_some())
    }

    /// What `function` searches for table `name`: the documents (through their chunks when the
    /// index is chunked), the synthetic questions of its Meta-Knowledge side, or its chunks.
    pub fn search_target(&self, function: &str, name: &str, target: SearchTarget) -> Result<Searched> {
        let entry = self.entry_or_error(function, name)?;
        let index = match target {
            SearchTarget::Documents => {
                return Ok(Searched {
                    index: entry.index,
                    chunks: entry.chunks,
                });
            }
            SearchTarget::Questions => entry.mk.map(|mk| mk.index.questions().clone()).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{function}: '{name}' has no synthetic questions (create it with OPTIONS ('meta_knowledge' 'true'))"
                ))
            })?,
            SearchTarget::Chunks => entry.chunks.map(|c| c.chunks().clone()).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{function}: '{name}' is not chunked (create it with OPTIONS ('chunk_tokens' '200'))"
                ))
            })?,
        };
        Ok(Searched { index, chunks: None })
    }

    /// Names of all knowledge indexes, sorted.
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

    /// What `name` stands for among the indexes and their derived tables.
    fn named(&self, name: &str) -> Option<Named> {
        if let Some(entry) = self.entry(name) {
            return Some(Named::Index(entry));
        }
        let owner = |suffix: &str| self.entry(name.strip_suffix(suffix)?);
        if let Some(chunks) = owner(CHUNKS_SUFFIX).and_then(|e| e.chunks) {
            return Some(Named::Chunks(chunks));
        }
        if let Some(mk) = owner(QUESTIONS_SUFFIX).and_then(|e| e.mk) {
            return Some(Named::Questions(mk));
        }
        if let Some(mk) = owner(PERSONAS_SUFFIX).and_then(|e| e.mk) {
            return Some(Named::Personas(mk));
        }
        owner(CLUSTERS_SUFFIX).and_then(|e| e.mk).map(Named::Clusters)
    }

    /// The table `name` stands for.
    fn table_for(&self, name: &str, named: Named) -> Arc<dyn TableProvider> {
        match named {
            Named::Index(entry) => Arc::new(KbTable::new(name, entry, self.progress.clone())),
            Named::Questions(mk) => Arc::new(KbTable::derived(
                name,
                mk.index.questions().clone(),
                name.strip_suffix(QUESTIONS_SUFFIX).unwrap_or(name),
                self.progress.clone(),
            )),
            Named::Chunks(chunks) => Arc::new(KbTable::derived(
                name,
                chunks.chunks().clone(),
                name.strip_suffix(CHUNKS_SUFFIX).unwrap_or(name),
                self.progress.clone(),
            )),
            Named::Clusters(mk) => Arc::new(BatchTable::new(SnapshotView(Arc::new(ClustersTable::new(
                mk.index.clone(),
            ))))),
            Named::Personas(mk) => Arc::new(PersonasTable::new(mk)),
        }
    }
}

impl KbSchema {
    /// Every name the shared part knows, unsorted.
    fn shared_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, entry) in self.indexes.read().unwrap_or_else(|e| e.into_inner()).iter() {
            names.push(name.clone());
            if entry.mk.is_some() {
                names.push(format!("{name}{QUESTIONS_SUFFIX}"));
                names.push(format!("{name}{CLUSTERS_SUFFIX}"));
                names.push(format!("{name}{PERSONAS_SUFFIX}"));
            }
            if entry.chunks.is_some() {
                names.push(format!("{name}{CHUNKS_SUFFIX}"));
            }
        }
        if let Some(remote) = self.remote.get() {
            names.extend(remote.names());
        }
        names.extend(self.globals.table_names());
        names
    }

    /// The shared table called `name`, if any.
    async fn shared_table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(named) = self.named(name) {
            return Ok(Some(self.table_for(name, named)));
        }
        if let Some(table) = self.globals.table(name).await? {
            return Ok(Some(table));
        }
        match self.remote.get() {
            Some(remote) => remote.table(name).await,
            None => Ok(None),
        }
    }

    /// Whether the shared part has a table called `name`.
    fn shares(&self, name: &str) -> bool {
        self.named(name).is_some()
            || self.globals.table_exist(name)
            || self.remote.get().is_some_and(|r| r.names().iter().any(|n| n == name))
    }
}

/// One session's default schema: the shared indexes and tables, and the session's own tables.
#[derive(Debug)]
pub struct SessionSchema {
    shared: Arc<KbSchema>,
    local: MemorySchemaProvider,
}

impl SessionSchema {
    /// A session's schema over the engine's shared one.
    pub fn new(shared: Arc<KbSchema>) -> Self {
        SessionSchema {
            shared,
            local: MemorySchemaProvider::new(),
        }
    }
}

#[async_trait]
impl SchemaProvider for SessionSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.shared.shared_names();
        names.extend(self.local.table_names());
        names.sort();
        names.dedup();
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        match self.shared.shared_table(name).await? {
            Some(table) => Ok(Some(table)),
            None => self.local.table(name).await,
        }
    }

    /// A knowledge index made by `CREATE EXTERNAL TABLE … STORED AS KB` is already shared (the
    /// table factory recorded it, with its Meta-Knowledge side); any other table belongs to this
    /// session.
    fn register_table(&self, name: String, table: Arc<dyn TableProvider>) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(kb) = table.downcast_ref::<KbTable>()
            && self
                .shared
                .get(&name)
                .is_some_and(|index| Arc::ptr_eq(&index, kb.index()))
        {
            return Ok(None);
        }
        if self.shared.shares(&name) {
            return plan_err!(
                "table '{name}' already exists (a knowledge index, one of its tables, or an engine table)"
            );
        }
        self.local.register_table(name, table)
    }

    /// Dropping a knowledge index forgets it for every session; its files stay in the data
    /// directory (delete the directory to remove it).
    fn deregister_table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if self.local.table_exist(name) {
            return self.local.deregister_table(name);
        }
        match self.shared.named(name) {
            Some(Named::Index(entry)) => {
                let table = self.shared.table_for(name, Named::Index(entry));
                self.shared
                    .indexes
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                Ok(Some(table))
            }
            Some(_) => plan_err!("'{name}' belongs to a knowledge index: drop the index itself"),
            None if self.shared.globals.table_exist(name) => {
                plan_err!("'{name}' is an engine table and cannot be dropped")
            }
            None => Ok(None),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.shared.shares(name) || self.local.table_exist(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use mkflow_index::{IndexSettings, Quantization};

    fn index(dir: &std::path::Path) -> Arc<KnowledgeIndex> {
        let columns = Schema::new(vec![Field::new("doc_id", DataType::Utf8, false)]);
        let settings = IndexSettings {
            model: "m".into(),
            dimensions: 4,
            quantization: Quantization::F32,
            key_column: "doc_id".into(),
            vector_column: "embedding".into(),
            text_columns: None,
        };
        Arc::new(KnowledgeIndex::open_or_create(dir, &columns, &settings).unwrap())
    }

    #[tokio::test]
    async fn indexes_are_shared_and_other_tables_belong_to_their_session() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(KbSchema::new(Arc::default()));
        shared.insert(
            "kb",
            KbEntry {
                index: index(dir.path()),
                mk: None,
                chunks: None,
            },
        );
        let (one, two) = (SessionSchema::new(shared.clone()), SessionSchema::new(shared.clone()));
        let other = Arc::new(MemTable::try_new(Arc::new(Schema::empty()), vec![vec![]]).unwrap());
        one.register_table("notes".into(), other.clone()).unwrap();
        assert_eq!(one.table_names(), vec!["kb", "notes"]);
        assert_eq!(two.table_names(), vec!["kb"], "a session's own tables stay its own");
        assert!(one.table_exist("kb") && one.table_exist("notes") && !two.table_exist("notes"));
        // An index without a Meta-Knowledge side has no questions table.
        assert!(!one.table_exist("kb_questions"));
        let kb = two.table("kb").await.unwrap().unwrap();
        assert!(kb.downcast_ref::<KbTable>().is_some());
        // A name taken by an index is refused to any other table.
        assert!(two.register_table("kb".into(), other).is_err());
        // Dropping an index forgets it for every session.
        assert!(one.deregister_table("kb").unwrap().is_some());
        assert_eq!(two.table_names(), Vec::<String>::new());
        assert_eq!(one.table_names(), vec!["notes"]);
        let error = shared.entry_or_error("vector_search", "kb").unwrap_err().to_string();
        assert!(error.contains("no knowledge index called 'kb'"), "{error}");
    }
}
