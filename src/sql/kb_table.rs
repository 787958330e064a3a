//! A knowledge index as a DataFusion table: scan, `INSERT` (upsert by key), `DELETE`.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, not_impl_err, plan_err};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::StreamExt;

use super::filters::{CompiledFilter, pushdown_support};
use super::kb_entry::KbEntry;
use super::memory_scan;
use crate::chunks::ChunkIndex;
use crate::metrics;
use crate::mk::{MkAttachment, PendingQuestions};
use crate::support::{blocking, compaction, index_error};
use mkflow_index::{KnowledgeIndex, RowPredicate, SourceOffsets};

/// Counts rows as they flow into knowledge indexes, for progress display.
#[derive(Debug, Default)]
pub struct IngestProgress {
    rows: AtomicU64,
}

impl IngestProgress {
    /// Rows received by index sinks since the process started.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    fn add(&self, rows: usize) {
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// The table over a [`KnowledgeIndex`].
#[derive(Debug)]
pub struct KbTable {
    name: String,
    index: Arc<KnowledgeIndex>,
    progress: Arc<IngestProgress>,
    mk: Option<MkAttachment>,
    chunks: Option<Arc<ChunkIndex>>,
    /// The table whose documents this one is derived from (`<kb>_questions`, `<kb>_chunks`):
    /// read-only, since its rows commit only together with the documents'.
    parent: Option<String>,
}

impl KbTable {
    /// Table `name` over `entry`'s index, reporting ingested rows to `progress`; inserts and
    /// deletes also maintain the entry's questions and clusters, and its chunks.
    pub fn new(name: &str, entry: KbEntry, progress: Arc<IngestProgress>) -> Self {
        KbTable {
            name: name.to_string(),
            index: entry.index,
            progress,
            mk: entry.mk,
            chunks: entry.chunks,
            parent: None,
        }
    }

    /// Read-only table `name` over `index`, kept by mkflow from the documents of `parent`.
    pub fn derived(name: &str, index: Arc<KnowledgeIndex>, parent: &str, progress: Arc<IngestProgress>) -> Self {
        KbTable {
            name: name.to_string(),
            index,
            progress,
            mk: None,
            chunks: None,
            parent: Some(parent.to_string()),
        }
    }

    /// Refuses a write to a derived table, naming the table to write instead.
    fn check_writable(&self, what: &str) -> Result<()> {
        match &self.parent {
            Some(parent) => plan_err!(
                "{} is kept by mkflow from the documents of {parent} and commits with them: {what} {parent} instead",
                self.name
            ),
            None => Ok(()),
        }
    }

    /// The index behind the table.
    pub fn index(&self) -> &Arc<KnowledgeIndex> {
        &self.index
    }
}

#[async_trait]
impl TableProvider for KbTable {
    fn schema(&self) -> SchemaRef {
        self.index.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters prune rows before they are copied out of the store; DataFusion re-checks.
        Ok(pushdown_support(filters, &self.schema())
            .into_iter()
            .map(|s| match s {
                TableProviderFilterPushDown::Exact => TableProviderFilterPushDown::Inexact,
                other => other,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut batches = self.index.snapshot().map_err(index_error)?;
        let pushed: Vec<Expr> = filters
            .iter()
            .filter(|f| super::filters::is_row_filter(f, &self.schema()))
            .cloned()
            .collect();
        if let Some(filter) = CompiledFilter::compile(state, &self.schema(), &pushed)? {
            batches = batches
                .iter()
                .map(|b| {
                    let mask = filter.evaluate(b).map_err(index_error)?;
                    Ok(datafusion::arrow::compute::filter_record_batch(b, &mask)?)
                })
                .collect::<Result<Vec<_>>>()?;
        }
        memory_scan(batches, self.schema(), projection, limit)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.check_writable("INSERT INTO")?;
        if insert_op != InsertOp::Append {
            return not_impl_err!(
                "{insert_op} is not supported by knowledge indexes: INSERT upserts by key; use DELETE FROM first to replace everything"
            );
        }
        let sink = UpsertSink {
            name: self.name.clone(),
            index: self.index.clone(),
            progress: self.progress.clone(),
            mk: self.mk.clone(),
            chunks: self.chunks.clone(),
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }

    async fn delete_from(&self, state: &dyn Session, filters: Vec<Expr>) -> Result<Arc<dyn ExecutionPlan>> {
        self.check_writable("DELETE FROM")?;
        let filter = CompiledFilter::compile(state, &self.schema(), &filters)?;
        let sink = DeleteSink {
            index: self.index.clone(),
            filter,
            schema: self.schema(),
            mk: self.mk.clone(),
            chunks: self.chunks.clone(),
        };
        // The sink ignores its (empty) input and deletes when the plan runs, so planning a
        // DELETE (e.g. EXPLAIN) changes nothing.
        let input = Arc::new(EmptyExec::new(self.schema()));
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Collects an `INSERT`'s rows and upserts them as one commit (for Meta-Knowledge indexes, the
/// documents' questions are replaced first and the clusters refreshed after; for chunked
/// indexes, the documents' chunks are replaced first).
#[derive(Debug)]
struct UpsertSink {
    name: String,
    index: Arc<KnowledgeIndex>,
    progress: Arc<IngestProgress>,
    mk: Option<MkAttachment>,
    chunks: Option<Arc<ChunkIndex>>,
}

impl DisplayAs for UpsertSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "UpsertSink: index={}", self.index.dir().display())
    }
}

#[async_trait]
impl DataSink for UpsertSink {
    fn schema(&self) -> &SchemaRef {
        self.index.schema_ref()
    }

    async fn write_all(&self, mut data: SendableRecordBatchStream, context: &Arc<TaskContext>) -> Result<u64> {
        let mut batches = Vec::new();
        while let Some(batch) = data.next().await {
            let batch = batch?;
            self.progress.add(batch.num_rows());
            batches.push(batch);
        }
        // Chunks and questions are embedded before anything is committed: a failure leaves all
        // as it was.
        let mut pending_chunks = None;
        if let Some(chunks) = &self.chunks {
            let (chunks, key_column) = (chunks.clone(), self.index.manifest().key_column);
            let vector_column = self.index.manifest().vector_column;
            let mut pending = blocking(move || chunks.pending(&batches, &key_column, Some(&vector_column))).await?;
            batches = std::mem::take(&mut pending.documents);
            pending_chunks = Some(pending);
        }
        let batches = Arc::new(batches);
        let pending: Option<PendingQuestions> = match &self.mk {
            Some(mk) => Some(mk.pending_questions(&self.index, batches.clone()).await?),
            None => None,
        };
        // A streaming micro-batch commits where its sources resume together with its rows.
        let offsets = context
            .session_config()
            .get_extension::<SourceOffsets>()
            .map(|o| o.as_ref().clone())
            .unwrap_or_default();
        let (index, rows) = (self.index.clone(), batches.clone());
        let (mk, chunks) = (self.mk.as_ref().map(|mk| mk.index.clone()), self.chunks.clone());
        let started = Instant::now();
        // One group commit: the questions and chunks first, then the documents, whose manifest
        // names all three (a crash at any point leaves the previous generation of each).
        let stats = blocking(move || {
            let group = index.lock_group();
            if let (Some(mk), Some(pending)) = (mk, pending) {
                mk.commit_questions(&pending)?;
            }
            if let (Some(chunks), Some(pending)) = (chunks, pending_chunks) {
                chunks.commit(&pending)?;
            }
            group.upsert_from_source(&rows, &offsets)
        })
        .await?;
        metrics::global().observe_commit(&self.name, started.elapsed());
        self.after_commit();
        if let Some(mk) = &self.mk {
            mk.refresh(context).await?;
        }
        Ok(stats.rows as u64)
    }
}

impl UpsertSink {
    /// Lets the background compactor look at every index the commit wrote.
    fn after_commit(&self) {
        if let Some(mk) = &self.mk {
            compaction::after_commit(mk.index.questions());
        }
        if let Some(chunks) = &self.chunks {
            compaction::after_commit(chunks.chunks());
        }
        compaction::after_commit(&self.index);
    }
}

/// Deletes the rows matching a filter when executed (and, for Meta-Knowledge indexes, their
/// questions).
#[derive(Debug)]
struct DeleteSink {
    index: Arc<KnowledgeIndex>,
    filter: Option<CompiledFilter>,
    schema: SchemaRef,
    mk: Option<MkAttachment>,
    chunks: Option<Arc<ChunkIndex>>,
}

impl DisplayAs for DeleteSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "DeleteSink: index={}", self.index.dir().display())
    }
}

#[async_trait]
impl DataSink for DeleteSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, _data: SendableRecordBatchStream, context: &Arc<TaskContext>) -> Result<u64> {
        let index = self.index.clone();
        let filter = self.filter.clone();
        let (mk, chunks) = (self.mk.as_ref().map(|mk| mk.index.clone()), self.chunks.clone());
        // One group commit: the documents' questions and chunks go first, then the documents.
        let deleted = blocking(move || {
            let all = |batch: &RecordBatch| Ok(vec![true; batch.num_rows()].into());
            let predicate: &RowPredicate<'_> = match &filter {
                Some(f) => &|batch| f.evaluate(batch),
                None => &all,
            };
            let group = index.lock_group();
            let doomed: HashSet<String> = group.matching(predicate)?.into_iter().collect();
            if doomed.is_empty() {
                return Ok(Vec::new());
            }
            if let Some(chunks) = chunks {
                chunks.remove_chunks_of(&doomed)?;
            }
            if let Some(mk) = mk {
                mk.remove_questions_of(&doomed)?;
            }
            group.delete_keys(&doomed)
        })
        .await?;
        if let Some(mk) = &self.mk
            && !deleted.is_empty()
        {
            mk.refresh(context).await?;
        }
        Ok(deleted.len() as u64)
    }
}
