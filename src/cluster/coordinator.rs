//! The coordinator side of cluster mode: a sharded table's searches and scans become a
//! [`ShardExec`] over its shards, merged here (searches: sorted by score, the first `k` kept).
//!
//! Per-shard top-k is enough for the global top-k: a row among the `k` best overall is among
//! the `k` best of its own shard. The coordinator learns a call's columns by asking a worker
//! (the [`SHARD_SCHEMA_ACTION`] Flight action, answered without running the call) and keeps
//! them per function, table and named arguments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;

use super::client::{
    Connection, SHARD_READY_ACTION, SHARD_SCHEMA_ACTION, SHARD_TEXT_STATISTICS_ACTION, TableUnreachable, WorkerClient,
    WorkerUnreachable,
};
use super::codec::{decode_schema, encode_exprs};
use super::exec::{ShardCall, ShardExec};
use super::partial::{MissingShard, PartialAnswers};
use super::shard_map::{Shard, ShardMap};
use crate::access::Access;
use crate::sql::call_args::{int_arg, named_arg_name, table_arg};
use crate::sql::catalog::RemoteTables;
use crate::sql::vector_search::search_k;
use mkflow_index::TextStatistics;

/// The table functions whose calls over a sharded table run on every shard.
pub const SHARDED_SEARCHES: &[&str] = &[
    "vector_search",
    "qa_search",
    "chunk_search",
    "text_search",
    "qa_text_search",
    "chunk_text_search",
    "hybrid_search",
    "qa_hybrid_search",
    "chunk_hybrid_search",
];

/// The columns a search's answer is ranked by (`fused_score`: the hybrid searches).
const SCORE_COLUMNS: &[&str] = &["score", "fused_score"];

/// How long a request that allows partial answers waits for a shard to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A coordinator's view of the cluster: the shard map, the call schemas learnt so far, and a
/// client of its workers.
#[derive(Debug)]
pub struct Cluster {
    map: ShardMap,
    schemas: Mutex<HashMap<String, SchemaRef>>,
    /// Asks workers questions.
    client: WorkerClient,
}

impl Cluster {
    /// The cluster `map` describes.
    pub fn new(map: ShardMap) -> Self {
        Cluster {
            client: WorkerClient::new(map.token().map(str::to_string)),
            map,
            schemas: Mutex::new(HashMap::new()),
        }
    }

    /// The shard map.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// What a failure to reach a worker means for the user: the shards on every worker whose
    /// address `error` names, e.g. "shard kb-1 of kb (http://10.0.0.2:50051/)".
    pub fn shards_named_in(&self, error: &str) -> Vec<String> {
        self.map
            .all_shards()
            .filter(|(_, shard)| {
                let address = shard.worker.as_str().trim_end_matches('/');
                let host_port = address.trim_start_matches("http://");
                error.contains(address) || error.contains(host_port)
            })
            .map(|(table, shard)| described(table, shard))
            .collect()
    }

    /// Whether `shard` says it is ready now (asked, at most [`READY_TIMEOUT`]); if not, whether
    /// it could not be reached at all (or did not answer in time), and why.
    async fn shard_ready(&self, shard: &Shard) -> std::result::Result<(), (bool, String)> {
        let call = for_shard(&ShardCall::template(None, Vec::new()), shard);
        match tokio::time::timeout(READY_TIMEOUT, self.client.ask(SHARD_READY_ACTION, &call)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err((is_unreachable(&e), e.to_string())),
            Err(_) => Err((true, format!("not ready within {} s", READY_TIMEOUT.as_secs()))),
        }
    }

    /// Whether each shard says it is ready now ([`Cluster::shard_ready`], all at once): its
    /// table, the shard, and why not.
    pub async fn shard_states(&self) -> Vec<(&str, &Shard, Result<(), String>)> {
        let asked = self.map.all_shards().map(|(table, shard)| async move {
            let ready = self.shard_ready(shard).await.map_err(|(_, why)| why);
            (table, shard, ready)
        });
        futures::future::join_all(asked).await
    }

    /// The shards that do not say they are ready now, as [`Cluster::shards_named_in`] names
    /// them: after a query lost a worker's connection without the error saying which.
    pub async fn shards_down(&self) -> Vec<String> {
        self.shard_states()
            .await
            .into_iter()
            .filter(|(_, _, ready)| ready.is_err())
            .map(|(table, shard, _)| described(table, shard))
            .collect()
    }

    /// The shards of `table` a query reads. All of them, unless the request allows partial
    /// answers (`partial`): then each is asked whether it is ready, and those that do not say
    /// so in time are left out (and recorded in `partial`); none ready is an error.
    async fn reachable(&self, table: &str, partial: Option<&PartialAnswers>) -> Result<Vec<Shard>> {
        let shards = self.shards(table)?;
        let Some(partial) = partial else {
            return Ok(shards.to_vec());
        };
        let answers = futures::future::join_all(shards.iter().map(|shard| self.shard_ready(shard))).await;
        let mut ready = Vec::new();
        let mut failures = Vec::new();
        for (shard, answer) in shards.iter().zip(answers) {
            match answer {
                Ok(()) => ready.push(shard.clone()),
                Err((unreachable, error)) => {
                    failures.push((unreachable, error.clone()));
                    partial.leave_out(MissingShard {
                        shard: shard.name.clone(),
                        table: table.to_string(),
                        worker: shard.worker.to_string(),
                        error,
                    });
                }
            }
        }
        if ready.is_empty() {
            return Err(none_answered(table, failures));
        }
        Ok(ready)
    }

    /// The calls of one query over `shards`, one per shard, grouped into one task per worker.
    fn tasks(shards: &[Shard], template: &ShardCall) -> Vec<Vec<ShardCall>> {
        let mut tasks: Vec<Vec<ShardCall>> = Vec::new();
        for shard in shards {
            let call = for_shard(template, shard);
            match tasks.iter_mut().find(|t| t[0].worker == shard.worker) {
                Some(task) => task.push(call),
                None => tasks.push(vec![call]),
            }
        }
        tasks
    }

    fn shards(&self, table: &str) -> Result<&[Shard]> {
        self.map
            .shards(table)
            .ok_or_else(|| DataFusionError::Plan(format!("'{table}' is not a sharded table")))
    }

    /// The columns `template` answers over `table`, asked of its shards' workers in turn
    /// (until one answers, over `connection`) unless known under `key`.
    async fn schema(
        &self,
        connection: Connection,
        key: String,
        table: &str,
        template: &ShardCall,
    ) -> Result<SchemaRef> {
        if let Some(schema) = self.schemas.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(schema.clone());
        }
        let mut failures = Vec::new();
        for shard in self.shards(table)? {
            let answer = self
                .client
                .ask_over(connection, SHARD_SCHEMA_ACTION, &for_shard(template, shard))
                .await;
            match answer.and_then(|body| decode_schema(&body)).map(Arc::new) {
                Ok(schema) => {
                    self.schemas
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, schema.clone());
                    return Ok(schema);
                }
                Err(e) => failures.push((is_unreachable(&e), e.to_string())),
            }
        }
        Err(none_answered(table, failures))
    }

    /// [`Cluster::schema`] from synchronous planning code: on a thread of its own, so the
    /// caller's runtime (whatever its kind) is not blocked inside a task it drives.
    fn schema_blocking(&self, key: String, table: &str, template: &ShardCall) -> Result<SchemaRef> {
        if let Some(schema) = self.schemas.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(schema.clone());
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| DataFusionError::Execution(format!("cluster: cannot start a runtime: {e}")))?
                        .block_on(self.schema(Connection::Fresh, key, table, template))
                })
                .join()
                .unwrap_or_else(|_| Err(DataFusionError::Execution("cluster: asking a worker panicked".into())))
        })
    }

    /// The BM25 statistics of `template`'s text searches summed over `shards` (JSON): the
    /// first of a text search's two rounds.
    async fn text_statistics(&self, shards: &[Shard], template: &ShardCall) -> Result<Vec<u8>> {
        let calls: Vec<ShardCall> = shards.iter().map(|shard| for_shard(template, shard)).collect();
        let asked = calls
            .iter()
            .map(|call| self.client.ask(SHARD_TEXT_STATISTICS_ACTION, call));
        let mut summed = TextStatistics::default();
        for answer in futures::future::try_join_all(asked).await? {
            let statistics: TextStatistics = serde_json::from_slice(&answer)
                .map_err(|e| DataFusionError::Execution(format!("text statistics from a worker: {e}")))?;
            summed.add(&statistics);
        }
        serde_json::to_vec(&summed).map_err(|e| DataFusionError::Execution(e.to_string()))
    }
}

/// Whether `error` is a worker that could not be reached.
fn is_unreachable(error: &DataFusionError) -> bool {
    matches!(error, DataFusionError::External(e) if e.is::<WorkerUnreachable>())
}

/// The error when no shard of `table` answered, given each one's `(unreachable, error)`: a
/// [`TableUnreachable`] when none could be reached (the query may succeed once they are back),
/// else the workers' answers (a shard missing its table, say: a mistake to fix).
fn none_answered(table: &str, failures: Vec<(bool, String)>) -> DataFusionError {
    let all_unreachable = failures.iter().all(|(unreachable, _)| *unreachable);
    let failures: Vec<String> = failures.into_iter().map(|(_, error)| error).collect();
    if all_unreachable {
        return DataFusionError::External(Box::new(TableUnreachable {
            table: table.to_string(),
            failures,
        }));
    }
    DataFusionError::Execution(format!("no shard of '{table}' answered: {}", failures.join("; ")))
}

/// `shard` of `table` as errors name it: "shard kb-1 of kb (http://10.0.0.2:50051/)".
fn described(table: &str, shard: &Shard) -> String {
    format!("shard {} of {table} ({})", shard.name, shard.worker)
}

/// `template` addressed to `shard`.
fn for_shard(template: &ShardCall, shard: &Shard) -> ShardCall {
    ShardCall {
        shard: shard.name.clone(),
        worker: shard.worker.clone(),
        table: shard.local_table.clone(),
        ..template.clone()
    }
}

/// The `k` a search call names: its last integer argument after the table and the query.
fn call_k(exprs: &[Expr]) -> Option<usize> {
    exprs
        .iter()
        .filter(|e| named_arg_name(e).is_none())
        .skip(2)
        .filter_map(int_arg)
        .last()
        .and_then(|k| usize::try_from(k).ok())
}

/// A search function that runs across the shards when its table is sharded, and as `inner`
/// otherwise.
#[derive(Debug)]
pub struct ShardedFunction {
    name: String,
    inner: Arc<dyn TableFunctionImpl>,
    cluster: Arc<Cluster>,
    /// The function whose argument this call is (e.g. `rrf`), where sharded tables are refused.
    nested_in: Option<&'static str>,
}

impl ShardedFunction {
    /// `inner` (registered as `name`), sharded over `cluster`'s tables.
    pub fn new(name: &str, inner: Arc<dyn TableFunctionImpl>, cluster: Arc<Cluster>) -> Self {
        ShardedFunction {
            name: name.to_string(),
            inner,
            cluster,
            nested_in: None,
        }
    }

    /// `inner` as called inside `outer(…)`, which does not run across shards: a sharded table
    /// is refused, naming it.
    pub fn refusing_in(
        outer: &'static str,
        name: &str,
        inner: Arc<dyn TableFunctionImpl>,
        cluster: Arc<Cluster>,
    ) -> Self {
        ShardedFunction {
            nested_in: Some(outer),
            ..ShardedFunction::new(name, inner, cluster)
        }
    }
}

impl TableFunctionImpl for ShardedFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        let Some(table) = exprs.first().and_then(table_arg) else {
            return self.inner.call_with_args(args);
        };
        if self.cluster.map.shards(&table).is_none() {
            return self.inner.call_with_args(args);
        }
        let name = self.name.as_str();
        if let Some(outer) = self.nested_in {
            return plan_err!(
                "{outer}({name}(…)): '{table}' is sharded, and {outer} does not run across shards yet (call {name} on its own, or hybrid_search)"
            );
        }
        if !SHARDED_SEARCHES.contains(&name) {
            return plan_err!(
                "{name}: '{table}' is sharded, and {name} does not run across shards yet (sharded tables answer {} and scans)",
                SHARDED_SEARCHES.join(", ")
            );
        }
        let k = call_k(exprs)
            .map(|k| Access::of(args.session().config()).check_k(name, k))
            .transpose()?;
        let template = ShardCall::template(Some(self.name.clone()), encode_exprs(&exprs[1..])?);
        let named: Vec<&str> = exprs.iter().filter_map(named_arg_name).collect();
        let key = format!("{name}\0{table}\0{}", named.join(","));
        let schema = self.cluster.schema_blocking(key, &table, &template)?;
        Ok(Arc::new(ShardedTable {
            cluster: self.cluster.clone(),
            table,
            template,
            schema,
            k,
        }))
    }
}

/// A sharded table's rows, or a search's answer over it.
#[derive(Debug)]
struct ShardedTable {
    cluster: Arc<Cluster>,
    table: String,
    /// The call each shard runs (`function: None`: a scan).
    template: ShardCall,
    schema: SchemaRef,
    /// The call's own `k`, if it names one.
    k: Option<usize>,
}

#[async_trait]
impl TableProvider for ShardedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        match self.template.function {
            Some(_) => TableType::Temporary,
            None => TableType::Base,
        }
    }

    /// Every filter goes to the shards, and is applied again above the merged rows (a shard
    /// applies those its table takes).
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let filters = encode_exprs(filters)?;
        let partial = PartialAnswers::allowed_in(state.config());
        let shards = self.cluster.reachable(&self.table, partial.as_deref()).await?;
        let Some(function) = &self.template.function else {
            let template = ShardCall {
                filters,
                projection: projection.cloned(),
                limit,
                ..self.template.clone()
            };
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(ShardExec::new(
                Cluster::tasks(&shards, &template),
                schema,
                None,
            )));
        };
        let k = search_k(state, function, self.k, limit)?;
        let mut template = ShardCall {
            filters,
            limit,
            ..self.template.clone()
        };
        if function.contains("text_search") || function.contains("hybrid_search") {
            template.text_statistics = self.cluster.text_statistics(&shards, &template).await?;
        }
        let leaf = Arc::new(ShardExec::new(
            Cluster::tasks(&shards, &template),
            self.schema.clone(),
            None,
        ));
        let Some((column, score)) = SCORE_COLUMNS
            .iter()
            .find_map(|name| self.schema.index_of(name).ok().map(|i| (*name, i)))
        else {
            return plan_err!("{function}: its answer has no score column to merge the shards by");
        };
        let by_score = PhysicalSortExpr::new(
            Arc::new(Column::new(column, score)),
            SortOptions {
                descending: true,
                nulls_first: false,
            },
        );
        let ordering = LexOrdering::new(vec![by_score]).expect("one sort expression");
        let merged: Arc<dyn ExecutionPlan> = Arc::new(SortExec::new(ordering, leaf).with_fetch(Some(k)));
        Ok(match projection {
            Some(columns) => {
                let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = columns
                    .iter()
                    .map(|&i| {
                        let name = self.schema.field(i).name().clone();
                        (Arc::new(Column::new(&name, i)) as _, name)
                    })
                    .collect();
                Arc::new(ProjectionExec::try_new(exprs, merged)?)
            }
            None => merged,
        })
    }
}

/// A coordinator's sharded tables, as tables of its catalog (scans of every shard).
#[derive(Debug)]
pub struct ShardedTables(pub Arc<Cluster>);

#[async_trait]
impl RemoteTables for ShardedTables {
    fn names(&self) -> Vec<String> {
        self.0.map.tables().map(str::to_string).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if self.0.map.shards(name).is_none() {
            return Ok(None);
        }
        let template = ShardCall::template(None, Vec::new());
        let schema = self
            .0
            .schema(Connection::Kept, format!("\0{name}"), name, &template)
            .await?;
        Ok(Some(Arc::new(ShardedTable {
            cluster: self.0.clone(),
            table: name.to_string(),
            template,
            schema,
            k: None,
        })))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::lit;

    use super::*;

    #[test]
    fn no_shard_answering_is_unreachable_only_when_none_could_be_reached() {
        let down = none_answered("kb", vec![(true, "a".into()), (true, "b".into())]);
        assert!(matches!(&down, DataFusionError::External(e) if e.is::<TableUnreachable>()));
        assert!(
            down.to_string().contains("no shard of 'kb' is reachable: a; b"),
            "{down}"
        );
        let mistaken = none_answered("kb", vec![(true, "a".into()), (false, "no table 'kb'".into())]);
        assert!(matches!(mistaken, DataFusionError::Execution(_)));
    }

    #[test]
    fn the_k_of_a_call_is_its_last_integer_after_table_and_query() {
        let table = Expr::Column("kb".into());
        assert_eq!(call_k(&[table.clone(), lit("q"), lit(5i64)]), Some(5));
        assert_eq!(call_k(&[table.clone(), lit("q"), lit("text"), lit(7i64)]), Some(7));
        assert_eq!(call_k(&[table.clone(), lit("q")]), None);
        assert_eq!(call_k(&[table, lit(3i64)]), None, "the query is not k");
    }
}
