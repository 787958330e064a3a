//! The session's default schema: the data directory's knowledge indexes as tables, with the
//! questions and clusters tables of those that have a Meta-Knowledge side, and every other
//! table a session creates (sources, `dead_letters`).
//!
//! It is a DataFusion [`SchemaProvider`], so `SHOW TABLES`, `information_schema` and qualified
//! names (`datafusion.public.kb`) work as for any table; the search functions look their index
//! up here too ([`KbSchema::entry_or_error`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use mkflow_index::KnowledgeIndex;

use super::kb_table::{IngestProgress, KbTable};
use crate::mk::{ClustersTable, MkAttachment};
use crate::support::BatchTable;
use crate::support::batch_table::SnapshotView;

/// A registered index and its Meta-Knowledge side, if it has one.
pub type KbEntry = (Arc<KnowledgeIndex>, Option<MkAttachment>);

/// Suffix of a Meta-Knowledge index's questions table.
pub const QUESTIONS_SUFFIX: &str = "_questions";

/// Suffix of a Meta-Knowledge index's clusters table.
pub const CLUSTERS_SUFFIX: &str = "_clusters";

/// Knowledge indexes by table name, and the session's other tables.
#[derive(Debug)]
pub struct KbSchema {
    indexes: RwLock<HashMap<String, KbEntry>>,
    others: MemorySchemaProvider,
    progress: Arc<IngestProgress>,
}

/// What a table name of the schema stands for.
enum Named {
    /// A knowledge index.
    Index(KbEntry),
    /// The questions index of a Meta-Knowledge index.
    Questions(MkAttachment),
    /// The clusters of a Meta-Knowledge index.
    Clusters(MkAttachment),
}

impl KbSchema {
    /// An empty schema whose index tables report ingested rows to `progress`.
    pub fn new(progress: Arc<IngestProgress>) -> Self {
        KbSchema {
            indexes: RwLock::default(),
            others: MemorySchemaProvider::new(),
            progress,
        }
    }

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
    pub fn entry(&self, name: &str) -> Option<KbEntry> {
        self.indexes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The index called `name` and its Meta-Knowledge side, or an error for `function` that
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
        let attachment = |suffix: &str| {
            let (_, mk) = self.entry(name.strip_suffix(suffix)?)?;
            mk
        };
        if let Some(mk) = attachment(QUESTIONS_SUFFIX) {
            return Some(Named::Questions(mk));
        }
        attachment(CLUSTERS_SUFFIX).map(Named::Clusters)
    }

    /// The table `name` stands for.
    fn table_for(&self, name: &str, named: Named) -> Arc<dyn TableProvider> {
        match named {
            Named::Index((index, mk)) => Arc::new(KbTable::new(name, index, self.progress.clone(), mk)),
            Named::Questions(mk) => Arc::new(KbTable::new(
                name,
                mk.index.questions().clone(),
                self.progress.clone(),
                None,
            )),
            Named::Clusters(mk) => Arc::new(BatchTable::new(SnapshotView(Arc::new(ClustersTable::new(
                mk.index.clone(),
            ))))),
        }
    }
}

#[async_trait]
impl SchemaProvider for KbSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, (_, mk)) in self.indexes.read().unwrap_or_else(|e| e.into_inner()).iter() {
            names.push(name.clone());
            if mk.is_some() {
                names.push(format!("{name}{QUESTIONS_SUFFIX}"));
                names.push(format!("{name}{CLUSTERS_SUFFIX}"));
            }
        }
        names.extend(self.others.table_names());
        names.sort();
        names.dedup();
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        match self.named(name) {
            Some(named) => Ok(Some(self.table_for(name, named))),
            None => self.others.table(name).await,
        }
    }

    /// A knowledge index made by `CREATE EXTERNAL TABLE … STORED AS KB` is already recorded
    /// (by the table factory, with its Meta-Knowledge side); any other table is kept as given.
    fn register_table(&self, name: String, table: Arc<dyn TableProvider>) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(kb) = table.downcast_ref::<KbTable>()
            && self.get(&name).is_some_and(|index| Arc::ptr_eq(&index, kb.index()))
        {
            return Ok(None);
        }
        if self.named(&name).is_some() {
            return plan_err!("table '{name}' already exists (a knowledge index or one of its tables)");
        }
        self.others.register_table(name, table)
    }

    /// Dropping a knowledge index forgets it for the session; its files stay in the data
    /// directory (delete the directory to remove it).
    fn deregister_table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        match self.named(name) {
            Some(Named::Index(entry)) => {
                let table = self.table_for(name, Named::Index(entry));
                self.indexes.write().unwrap_or_else(|e| e.into_inner()).remove(name);
                Ok(Some(table))
            }
            Some(_) => plan_err!("'{name}' belongs to a Meta-Knowledge index: drop the index itself"),
            None => self.others.deregister_table(name),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.named(name).is_some() || self.others.table_exist(name)
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
        };
        Arc::new(KnowledgeIndex::open_or_create(dir, &columns, &settings).unwrap())
    }

    #[tokio::test]
    async fn indexes_and_other_tables_are_listed_found_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let schema = KbSchema::new(Arc::default());
        schema.insert("kb", index(dir.path()), None);
        let other = Arc::new(MemTable::try_new(Arc::new(Schema::empty()), vec![vec![]]).unwrap());
        schema.register_table("notes".into(), other.clone()).unwrap();
        assert_eq!(schema.table_names(), vec!["kb", "notes"]);
        assert!(schema.table_exist("kb") && schema.table_exist("notes"));
        // An index without a Meta-Knowledge side has no questions table.
        assert!(!schema.table_exist("kb_questions"));
        let kb = schema.table("kb").await.unwrap().unwrap();
        assert!(kb.downcast_ref::<KbTable>().is_some());
        // A name taken by an index is refused to any other table.
        assert!(schema.register_table("kb".into(), other).is_err());
        assert!(schema.deregister_table("kb").unwrap().is_some());
        assert_eq!(schema.table_names(), vec!["notes"]);
        let error = schema.entry_or_error("vector_search", "kb").unwrap_err().to_string();
        assert!(error.contains("no knowledge index called 'kb'"), "{error}");
    }
}
