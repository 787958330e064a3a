//! [`ShardExec`]: the leaf of a query over a sharded table. It holds one [`ShardCall`] per
//! shard, grouped into tasks by worker; the distributed planner runs task *i* on the worker
//! that serves its shards ([`super::planner`]), where the call runs as it would on a single
//! node: the same table function, over the shard's own index.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result, exec_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{StreamExt, TryStreamExt};
use url::Url;

/// Runs the shard calls a worker receives (the worker's engine, as the role of the
/// coordinator's token: see `server::worker`).
#[async_trait]
pub trait ShardRunner: fmt::Debug + Send + Sync {
    /// Runs `call`; its rows come back as `schema`.
    async fn run(&self, call: &ShardCall, schema: SchemaRef) -> Result<SendableRecordBatchStream>;
}

/// What one shard runs: a table function's call over the shard's table, or a scan of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardCall {
    /// The shard's name (in errors and plans).
    pub shard: String,
    /// The worker serving it.
    pub worker: Url,
    /// The table function called (`None`: a scan of the table).
    pub function: Option<String>,
    /// The table's name on the worker, passed as the function's first argument.
    pub table: String,
    /// The function's other arguments, serialized (see [`super::codec`]).
    pub args: Vec<u8>,
    /// Filters pushed into the scan, serialized.
    pub filters: Vec<u8>,
    /// The columns the scan returns.
    pub projection: Option<Vec<usize>>,
    /// The rows it returns at most.
    pub limit: Option<usize>,
    /// BM25 statistics summed over every shard (JSON; empty: none), which the shard's text
    /// searches score with so that scores compare across shards.
    pub text_statistics: Vec<u8>,
}

impl ShardCall {
    /// A call of `function` (`None`: a scan) with `args`, not yet addressed to a shard: the
    /// template a query's calls are made from, one per shard.
    pub fn template(function: Option<String>, args: Vec<u8>) -> Self {
        ShardCall {
            shard: String::new(),
            worker: Url::parse("http://unaddressed:0").expect("a valid URL"),
            function,
            table: String::new(),
            args,
            filters: Vec::new(),
            projection: None,
            limit: None,
            text_statistics: Vec::new(),
        }
    }
}

/// The leaf over a sharded table: task *i* runs the calls of `tasks[i]` (the shards of one
/// worker) on that worker and streams their rows, one call after another, as partition *i*.
#[derive(Debug, Clone)]
pub struct ShardExec {
    tasks: Vec<Vec<ShardCall>>,
    properties: Arc<PlanProperties>,
    /// Runs calls; set on workers only (a coordinator has no shards of its own).
    runner: Option<Arc<dyn ShardRunner>>,
}

impl ShardExec {
    /// A leaf of `schema` running `tasks`, with `runner` on a worker. It has a partition per
    /// task, so the plan above it merges them (a coalesce, or a sorted merge): where the
    /// distributed planner puts the network boundary.
    pub fn new(tasks: Vec<Vec<ShardCall>>, schema: SchemaRef, runner: Option<Arc<dyn ShardRunner>>) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(tasks.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        ShardExec {
            tasks,
            properties,
            runner,
        }
    }

    /// The calls, grouped into tasks.
    pub fn tasks(&self) -> &[Vec<ShardCall>] {
        &self.tasks
    }

    /// Every call, in task order.
    pub fn calls(&self) -> impl Iterator<Item = &ShardCall> {
        self.tasks.iter().flatten()
    }
}

impl DisplayAs for ShardExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ShardExec: ")?;
        for (i, task) in self.tasks.iter().enumerate() {
            let shards: Vec<&str> = task.iter().map(|c| c.shard.as_str()).collect();
            let worker = task.first().map_or(String::new(), |c| c.worker.to_string());
            write!(
                f,
                "{}t{i}:[{}]@{worker}",
                if i > 0 { ", " } else { "" },
                shards.join(",")
            )?;
        }
        Ok(())
    }
}

impl ExecutionPlan for ShardExec {
    fn name(&self) -> &str {
        "ShardExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let Some(runner) = self.runner.clone() else {
            let shards: Vec<&str> = self.calls().map(|c| c.shard.as_str()).collect();
            return exec_err!(
                "shards {} run on their workers, not on the coordinator (the distributed planner kept them here: are the workers in the shard map reachable?)",
                shards.join(", ")
            );
        };
        // A worker receives one task's variant; a whole leaf runs task i as its partition i.
        let Some(task) = self.tasks.get(partition) else {
            return exec_err!("ShardExec: partition {partition} of {}", self.tasks.len());
        };
        let schema = self.schema();
        let calls = task.clone();
        let streams = futures::stream::iter(calls)
            .then(move |call| {
                let (runner, schema) = (runner.clone(), schema.clone());
                async move { runner.run(&call, schema).await }
            })
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), streams)))
    }
}
