//! The coordinator's distributed planning (datafusion-distributed): a [`ShardExec`] leaf runs
//! as one task per worker, each routed to the worker that serves its shards; everything above
//! the leaf (the merge by score, filters, aggregates) is placed by the distributed planner.

use std::sync::Arc;

use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{
    DesiredTaskCountEvent, DesiredTaskCountEventResponse, DistributedExt, DistributedLeafExec, RouteTasksEvent,
    RouteTasksEventResponse, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse, SessionStateBuilderExt,
    WorkerResolver,
};
use url::Url;

use super::codec::ShardCodec;
use super::exec::ShardExec;
use super::shard_map::ShardMap;

/// The workers of a shard map (fixed for the coordinator's life).
#[derive(Debug, Clone)]
struct MappedWorkers(Vec<Url>);

impl WorkerResolver for MappedWorkers {
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        Ok(self.0.clone())
    }
}

/// `state` planning distributed over the workers of `map`: shard leaves split by worker and
/// routed to them, the map's token sent with every request to a worker.
pub fn coordinator_state(state: SessionState, map: &ShardMap) -> Result<SessionState> {
    let mut headers = tonic::codegen::http::HeaderMap::new();
    if let Some(token) = map.token() {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| DataFusionError::Configuration("the cluster token is not a valid header value".into()))?;
        headers.insert("authorization", value);
    }
    Ok(SessionStateBuilder::new_from_existing(state)
        .with_distributed_worker_resolver(MappedWorkers(map.workers()))
        .with_distributed_planner()
        .with_distributed_user_codec(ShardCodec::default())
        .with_distributed_desired_task_count_handler(one_task_per_worker)
        .with_distributed_scale_up_leaf_node_handler(split_by_worker)
        .with_distributed_route_tasks_handler(route_to_owners)
        .with_distributed_passthrough_headers(headers)?
        .build())
}

/// A shard leaf asks for one task per worker serving its shards.
fn one_task_per_worker(event: DesiredTaskCountEvent) -> Option<Result<DesiredTaskCountEventResponse>> {
    let leaf = event.plan.downcast_ref::<ShardExec>()?;
    Some(Ok(DesiredTaskCountEventResponse::desired(leaf.tasks().len())))
}

/// Splits a shard leaf into one variant per task, each holding one worker's calls.
fn split_by_worker(event: ScaleUpLeafNodeEvent) -> Option<Result<ScaleUpLeafNodeEventResponse>> {
    let leaf = event.plan.downcast_ref::<ShardExec>()?;
    if event.task_count != leaf.tasks().len() {
        return Some(plan_err!(
            "cluster: {} workers serve this table, but the plan gives its stage {} tasks (a query joining two sharded tables is not distributed yet)",
            leaf.tasks().len(),
            event.task_count
        ));
    }
    let variants = leaf
        .tasks()
        .iter()
        .map(|task| Arc::new(ShardExec::new(vec![task.clone()], leaf.schema(), None)) as Arc<dyn ExecutionPlan>);
    Some(
        DistributedLeafExec::try_new(event.plan.clone(), variants)
            .map(|leaf| ScaleUpLeafNodeEventResponse::new(Arc::new(leaf))),
    )
}

/// Sends task *i* of a stage holding a shard leaf to the worker of variant *i*.
fn route_to_owners(event: RouteTasksEvent) -> Option<Result<RouteTasksEventResponse>> {
    let leaf = find_leaf(event.plan)?;
    let urls: Vec<Url> = leaf
        .variants()
        .iter()
        .filter_map(|v| v.downcast_ref::<ShardExec>())
        .filter_map(|v| v.calls().next().map(|c| c.worker.clone()))
        .collect();
    if urls.len() != event.task_count {
        return Some(plan_err!(
            "cluster: {} tasks to route, {} shard workers known",
            event.task_count,
            urls.len()
        ));
    }
    Some(Ok(RouteTasksEventResponse::new(urls)))
}

/// The shard leaf in the stage headed by `plan`, if there is one.
fn find_leaf(plan: &Arc<dyn ExecutionPlan>) -> Option<&DistributedLeafExec> {
    if let Some(leaf) = plan.downcast_ref::<DistributedLeafExec>()
        && leaf.original().downcast_ref::<ShardExec>().is_some()
    {
        return Some(leaf);
    }
    plan.children().into_iter().find_map(find_leaf)
}
