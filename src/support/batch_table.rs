//! One table type for every source whose rows are produced at scan time: a [`BatchSource`]
//! says what its schema is and how to stream its batches; [`BatchTable`] makes it a DataFusion
//! table whose scan is a [`StreamingTableExec`] (projection and `LIMIT` applied as the batches
//! flow). Nothing is read when a plan is made, only when it runs, and a scan stopped early (a
//! satisfied `LIMIT`) stops reading.
//!
//! The shapes mkflow's sources take: [`SnapshotView`] (one batch of in-memory state taken when
//! the scan starts), [`blocking_batches`] (batches pushed from a
//! blocking thread, with backpressure: files) and [`RecordBatchStreamAdapter`] for async
//! sources (Kafka). [`deferred_scan`] is the scan of one computed batch (a search's answer),
//! computed when the plan runs.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::{RecordBatchReceiverStream, RecordBatchStreamAdapter};
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use futures::FutureExt;
use futures::future::BoxFuture;

/// Batches pushed by a blocking producer are buffered at most this many at a time: a slow
/// consumer slows the producer instead of letting it read ahead without bound.
const BLOCKING_BUFFER: usize = 2;

/// A source of record batches, read afresh by every scan.
pub trait BatchSource: fmt::Debug + Send + Sync + 'static {
    /// The rows' schema; every batch of [`BatchSource::stream`] has it.
    fn schema(&self) -> &SchemaRef;

    /// What the table is to DataFusion (`Base` for sources, `View` for derived tables).
    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// The batches of one scan, produced as the stream is polled.
    fn stream(self: Arc<Self>, ctx: Arc<TaskContext>) -> SendableRecordBatchStream;
}

/// A [`BatchSource`] as a DataFusion table.
#[derive(Debug)]
pub struct BatchTable<S: BatchSource> {
    source: Arc<S>,
}

impl<S: BatchSource> BatchTable<S> {
    /// The table over `source`.
    pub fn new(source: impl Into<Arc<S>>) -> Self {
        BatchTable { source: source.into() }
    }

    /// The source behind the table.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }
}

/// One partition of a [`BatchTable`] scan: the whole source.
struct Partition<S: BatchSource>(Arc<S>);

impl<S: BatchSource> fmt::Debug for Partition<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<S: BatchSource> PartitionStream for Partition<S> {
    fn schema(&self) -> &SchemaRef {
        self.0.schema()
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        self.0.clone().stream(ctx)
    }
}

#[async_trait]
impl<S: BatchSource> TableProvider for BatchTable<S> {
    fn schema(&self) -> SchemaRef {
        self.source.schema().clone()
    }

    fn table_type(&self) -> TableType {
        self.source.table_type()
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let partition: Arc<dyn PartitionStream> = Arc::new(Partition(self.source.clone()));
        Ok(Arc::new(StreamingTableExec::try_new(
            self.source.schema().clone(),
            vec![partition],
            projection,
            [],
            false,
            limit,
        )?))
    }
}

/// In-memory state seen as a table: one batch, taken when a scan starts.
pub trait Snapshot: fmt::Debug + Send + Sync + 'static {
    /// The snapshot's schema.
    fn schema(&self) -> &SchemaRef;

    /// The rows as they are now.
    fn snapshot(&self) -> Result<RecordBatch>;
}

/// A [`Snapshot`] as a batch source: a view whose scan yields one snapshot, taken when the scan
/// is first polled (not when the plan is made).
#[derive(Debug)]
pub struct SnapshotView<T: Snapshot>(pub Arc<T>);

impl<T: Snapshot> BatchSource for SnapshotView<T> {
    fn schema(&self) -> &SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn stream(self: Arc<Self>, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.0.schema().clone();
        let stream = futures::stream::once(async move { self.0.snapshot() });
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// Hands batches from a blocking producer to its scan.
pub struct BatchSender {
    tx: tokio::sync::mpsc::Sender<Result<RecordBatch>>,
}

impl BatchSender {
    /// Sends one batch, waiting while the scan is behind. `false` once the scan has stopped
    /// (a satisfied `LIMIT`, a cancelled query): the producer should stop too.
    pub fn send(&self, batch: RecordBatch) -> bool {
        self.tx.blocking_send(Ok(batch)).is_ok()
    }
}

/// A stream of the batches `produce` sends from a blocking thread (file reads, decoding).
/// An error it returns ends the stream with that error.
pub fn blocking_batches(
    schema: SchemaRef,
    produce: impl FnOnce(&BatchSender) -> Result<()> + Send + 'static,
) -> SendableRecordBatchStream {
    let mut builder = RecordBatchReceiverStream::builder(schema, BLOCKING_BUFFER);
    let sender = BatchSender { tx: builder.tx() };
    builder.spawn_blocking(move || produce(&sender));
    builder.build()
}

/// Computes one batch when a plan runs.
type Compute = dyn Fn(Arc<TaskContext>) -> BoxFuture<'static, Result<RecordBatch>> + Send + Sync;

/// The partition of a [`deferred_scan`].
struct Deferred {
    schema: SchemaRef,
    compute: Arc<Compute>,
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred").field("schema", &self.schema).finish()
    }
}

impl PartitionStream for Deferred {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.schema.clone();
        // The batch takes the declared schema (its metadata, e.g. a call tag, included).
        let future = (self.compute)(ctx).map(move |batch| Ok(batch?.with_schema(schema)?));
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::once(future),
        ))
    }
}

/// A scan of the one batch `compute` produces when the plan runs — not when it is made, so
/// planning (`EXPLAIN`, a cancelled query) costs nothing — with the scan's projection and limit
/// applied as it flows. Search table functions answer this way.
pub fn deferred_scan(
    schema: SchemaRef,
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
    compute: impl Fn(Arc<TaskContext>) -> BoxFuture<'static, Result<RecordBatch>> + Send + Sync + 'static,
) -> Result<Arc<dyn ExecutionPlan>> {
    let partition: Arc<dyn PartitionStream> = Arc::new(Deferred {
        schema: schema.clone(),
        compute: Arc::new(compute),
    });
    Ok(Arc::new(StreamingTableExec::try_new(
        schema,
        vec![partition],
        projection,
        [],
        false,
        limit,
    )?))
}
