//! What continuous and resumable inserts share: recognising an `INSERT INTO <knowledge index>`
//! that reads a given kind of source table, running its plan on one piece of that source, and
//! committing the piece with the source positions after it.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, UInt64Type};
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::datasource::MemTable;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{DmlStatement, LogicalPlan, TableScan, WriteOp};
use datafusion::physical_plan::collect;

use super::control::StreamControl;
use crate::sql::KbTable;
use mkflow_index::{KnowledgeIndex, SourceOffsets};

/// A piece of a resumable source, read on a blocking thread: its rows, the positions after it
/// (committed with them), and what the source reports about it (`meta`) before its commit.
pub(super) struct Piece<M> {
    pub rows: RecordBatch,
    pub offsets: SourceOffsets,
    pub meta: M,
}

/// What a run of pieces did.
#[derive(Debug, Default)]
pub(super) struct PiecesRun {
    /// Rows inserted.
    pub written: u64,
    /// Pieces committed.
    pub commits: usize,
    /// Whether the run stopped (asked to by its [`StreamControl`]) before the source's end.
    pub stopped: bool,
}

/// An `INSERT` statement and the scans of one kind of source table in it.
pub(super) struct InsertScans<'a> {
    /// The whole statement.
    pub plan: &'a LogicalPlan,
    /// The table inserted into.
    pub table_name: &'a TableReference,
    /// The inserted rows' plan.
    pub input: &'a LogicalPlan,
    /// The target, when it is a knowledge index.
    pub target: Option<Arc<KnowledgeIndex>>,
    /// The scans of the source kind: table name and provider.
    pub scans: Vec<(TableReference, Arc<dyn TableProvider>)>,
}

impl<'a> InsertScans<'a> {
    /// `plan`'s scans of tables whose provider `is_source` accepts, when `plan` is an `INSERT`.
    pub fn find(plan: &'a LogicalPlan, is_source: impl Fn(&dyn TableProvider) -> bool) -> Result<Option<Self>> {
        let LogicalPlan::Dml(DmlStatement {
            table_name,
            target,
            op: WriteOp::Insert(_),
            input,
            ..
        }) = plan
        else {
            return Ok(None);
        };
        let mut scans = Vec::new();
        input.apply(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Ok(provider) = source_as_provider(&scan.source)
                && is_source(provider.as_ref())
            {
                scans.push((scan.table_name.clone(), provider));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let target = source_as_provider(target)?
            .downcast_ref::<KbTable>()
            .map(|kb| kb.index().clone());
        Ok(Some(InsertScans {
            plan,
            table_name,
            input,
            target,
            scans,
        }))
    }
}

/// An `INSERT INTO <knowledge index> … FROM <source>` that runs on one piece of its source at a
/// time.
#[derive(Debug)]
pub(super) struct PieceInsert {
    plan: LogicalPlan,
    source_name: TableReference,
    source: Arc<dyn TableProvider>,
    target_name: String,
    target: Arc<KnowledgeIndex>,
}

impl PieceInsert {
    /// The `INSERT INTO <knowledge index> … FROM <source>` of `plan` when it can run piece by
    /// piece: one scan of a table `is_source` accepts, a knowledge index as the target, and a
    /// plan that works row by row. Any other insert runs whole, as one commit.
    pub fn find_row_by_row(plan: &LogicalPlan, is_source: impl Fn(&dyn TableProvider) -> bool) -> Result<Option<Self>> {
        let Some(mut found) = InsertScans::find(plan, is_source)? else {
            return Ok(None);
        };
        let (Some(source), true, Some(target)) = (found.scans.pop(), found.scans.is_empty(), found.target) else {
            return Ok(None);
        };
        if !works_row_by_row(found.input)? {
            return Ok(None);
        }
        Ok(Some(PieceInsert::new(found.plan, source, found.table_name, target)))
    }

    /// `plan` run piece by piece from the scan of `source` (`source_name`) into `target`.
    pub fn new(
        plan: &LogicalPlan,
        (source_name, source): (TableReference, Arc<dyn TableProvider>),
        target_name: &TableReference,
        target: Arc<KnowledgeIndex>,
    ) -> Self {
        PieceInsert {
            plan: plan.clone(),
            source_name,
            source,
            target_name: target_name.table().to_string(),
            target,
        }
    }

    /// The source table's provider.
    pub fn source(&self) -> &Arc<dyn TableProvider> {
        &self.source
    }

    /// The name of the index inserted into.
    pub fn target_name(&self) -> &str {
        &self.target_name
    }

    /// The index inserted into.
    pub fn target(&self) -> &Arc<KnowledgeIndex> {
        &self.target
    }

    /// Runs the statement on `rows` in place of the source's scan; the index commit stores
    /// `offsets` with them. Returns the rows written.
    pub async fn execute(&self, ctx: &SessionContext, rows: RecordBatch, offsets: SourceOffsets) -> Result<u64> {
        let plan = self.plan_for(rows)?;
        let mut state = ctx.state();
        state.config_mut().set_extension(Arc::new(offsets));
        let physical = state.create_physical_plan(&plan).await?;
        Ok(inserted_rows(&collect(physical, state.task_ctx()).await?))
    }

    /// Commits the pieces `read` emits (on a blocking thread, one piece ahead of the commits)
    /// one by one, until `read` returns or `control` stops the run after a commit. `before`
    /// sees each piece's `meta` before its commit. `source` names the source in errors.
    pub async fn run_pieces<M: Send + 'static>(
        &self,
        ctx: &SessionContext,
        control: &StreamControl,
        source: &str,
        read: impl FnOnce(&mut dyn FnMut(Piece<M>) -> bool) -> Result<()> + Send + 'static,
        mut before: impl FnMut(M),
    ) -> Result<PiecesRun> {
        let (sender, mut pieces) = tokio::sync::mpsc::channel::<Piece<M>>(1);
        let reading = tokio::task::spawn_blocking(move || read(&mut |piece| sender.blocking_send(piece).is_ok()));
        let mut run = PiecesRun::default();
        while let Some(piece) = pieces.recv().await {
            before(piece.meta);
            run.written += self.execute(ctx, piece.rows, piece.offsets).await?;
            run.commits += 1;
            if control.stopping() {
                run.stopped = true;
                break;
            }
        }
        drop(pieces);
        reading
            .await
            .map_err(|e| DataFusionError::Execution(format!("reading {source} failed: {e}")))??;
        Ok(run)
    }

    /// The statement's plan with the source's scan reading `rows` instead.
    fn plan_for(&self, rows: RecordBatch) -> Result<LogicalPlan> {
        let table = Arc::new(MemTable::try_new(self.source.schema(), vec![vec![rows]])?);
        let plan = self.plan.clone().transform_up(|node| match node {
            LogicalPlan::TableScan(scan) if scan.table_name == self.source_name => {
                Ok(Transformed::yes(LogicalPlan::TableScan(TableScan {
                    source: provider_as_source(table.clone()),
                    ..scan
                })))
            }
            other => Ok(Transformed::no(other)),
        })?;
        Ok(plan.data)
    }
}

/// Whether `plan` computes each output row from one input row (so running it on pieces of
/// the input gives the rows running it once would).
fn works_row_by_row(plan: &LogicalPlan) -> Result<bool> {
    let mut row_by_row = true;
    plan.apply(|node| {
        row_by_row &= matches!(
            node,
            LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::TableScan(_)
        );
        Ok(match row_by_row {
            true => TreeNodeRecursion::Continue,
            false => TreeNodeRecursion::Stop,
        })
    })?;
    Ok(row_by_row)
}

/// The `count` an INSERT plan returns.
fn inserted_rows(batches: &[RecordBatch]) -> u64 {
    batches
        .iter()
        .filter(|b| b.num_columns() == 1)
        .filter_map(|b| b.column(0).as_primitive_opt::<UInt64Type>())
        .flat_map(|c| c.iter().flatten())
        .sum()
}

/// The one-row `count` result a streaming INSERT returns, like any INSERT.
pub fn count_batch(rows: u64) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![Field::new("count", DataType::UInt64, false)]));
    Ok(RecordBatch::try_new(
        schema,
        vec![Arc::new(UInt64Array::from(vec![rows]))],
    )?)
}
