//! The worker side of cluster mode (see [`crate::cluster`]): `mkflow serve --worker` serves datafusion-distributed's
//! worker service beside Flight SQL, and runs the shard calls coordinators send it as the role
//! of the token they present (the same tokens as `/v1/sql`).

use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{TableFunctionArgs, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, lit};
use datafusion::physical_plan::execute_stream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion_distributed::{DistributedExt, WorkerQueryContext, WorkerSessionBuilder};
use futures::TryStreamExt;

use super::config::ServerSettings;
use super::query::role_of;
use crate::Engine;
use crate::access::Role;
use crate::cluster::codec::{ShardCodec, decode_exprs};
use crate::cluster::{ShardCall, ShardRunner};
use crate::sql::text_search::ShardStatistics;
use mkflow_index::TextStatistics;

/// Runs a worker's shard calls on its engine, as one role.
pub struct EngineShards {
    engine: Arc<Engine>,
    role: Role,
}

impl std::fmt::Debug for EngineShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineShards")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl EngineShards {
    /// Runs calls on `engine` as `role`.
    pub fn new(engine: Arc<Engine>, role: Role) -> Self {
        EngineShards { engine, role }
    }

    fn state(&self) -> Result<SessionState> {
        Ok(self.engine.network_session(self.role)?.context().state())
    }

    /// The BM25 statistics of `call`'s text searches over this shard (the coordinator sums
    /// every shard's): the call runs with its text searches collecting them and answering no
    /// rows.
    pub async fn text_statistics(&self, call: &ShardCall) -> Result<TextStatistics> {
        let mut state = self.state()?;
        let collected = Arc::new(Mutex::new(TextStatistics::default()));
        state
            .config_mut()
            .set_extension(Arc::new(ShardStatistics::Collect(collected.clone())));
        let provider = self.provider(call, &state).await?;
        let plan = provider.scan(&state, None, &[], call.limit).await?;
        execute_stream(plan, state.task_ctx())?.try_collect::<Vec<_>>().await?;
        Ok(collected.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The table a call reads: its function's answer, or the table itself.
    async fn provider(&self, call: &ShardCall, state: &SessionState) -> Result<Arc<dyn TableProvider>> {
        let Some(name) = &call.function else {
            return match state
                .catalog_list()
                .catalog(&state.config_options().catalog.default_catalog)
                .and_then(|c| c.schema(&state.config_options().catalog.default_schema))
            {
                Some(schema) => schema.table(&call.table).await?.ok_or_else(|| {
                    DataFusionError::Plan(format!(
                        "shard {}: this worker has no table '{}'",
                        call.shard, call.table
                    ))
                }),
                None => plan_err!("shard {}: this worker has no default schema", call.shard),
            };
        };
        let Some(function) = state.table_functions().get(name) else {
            return plan_err!("shard {}: this worker has no table function {name}", call.shard);
        };
        let mut args: Vec<Expr> = vec![lit(call.table.clone())];
        args.extend(decode_exprs(&call.args, &state.task_ctx())?);
        function.create_table_provider_with_args(TableFunctionArgs::new(&args, state))
    }

    /// Whether this worker can run calls on `call`'s shard: it has the shard's table.
    pub async fn ready(&self, call: &ShardCall) -> Result<()> {
        let scan = ShardCall {
            function: None,
            ..call.clone()
        };
        self.provider(&scan, &self.state()?).await.map(|_| ())
    }

    /// The schema of what `call` returns, without running it.
    pub async fn schema(&self, call: &ShardCall) -> Result<SchemaRef> {
        let state = self.state()?;
        let provider = self.provider(call, &state).await?;
        Ok(match &call.projection {
            Some(projection) => Arc::new(provider.schema().project(projection)?),
            None => provider.schema(),
        })
    }
}

#[async_trait]
impl ShardRunner for EngineShards {
    /// Runs `call`; its rows come back as `schema` (the coordinator's, learnt from
    /// [`EngineShards::schema`]).
    async fn run(&self, call: &ShardCall, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
        let mut state = self.state()?;
        if !call.text_statistics.is_empty() {
            let summed: TextStatistics = serde_json::from_slice(&call.text_statistics)
                .map_err(|e| DataFusionError::Execution(format!("shard {}: text statistics: {e}", call.shard)))?;
            state.config_mut().set_extension(Arc::new(ShardStatistics::Use(summed)));
        }
        let provider = self.provider(call, &state).await?;
        // Only the filters the table takes are pushed; the coordinator applies every filter
        // again above the merged rows.
        let filters = decode_exprs(&call.filters, &state.task_ctx())?;
        let support = provider.supports_filters_pushdown(&filters.iter().collect::<Vec<_>>())?;
        let pushed: Vec<Expr> = filters
            .into_iter()
            .zip(support)
            .filter(|(_, s)| *s != TableProviderFilterPushDown::Unsupported)
            .map(|(f, _)| f)
            .collect();
        let plan = provider
            .scan(&state, call.projection.as_ref(), &pushed, call.limit)
            .await?;
        let found = plan.schema();
        let same = found.fields().len() == schema.fields().len()
            && found
                .fields()
                .iter()
                .zip(schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            return plan_err!(
                "shard {} answers columns ({}) where the coordinator expected ({}): do all shards of '{}' hold the same kind of index?",
                call.shard,
                column_list(&found),
                column_list(&schema),
                call.table
            );
        }
        let stream = execute_stream(plan, state.task_ctx())?;
        let out = schema.clone();
        let batches = stream.and_then(move |batch| {
            let out = out.clone();
            // A projection of no columns (`count(*)`) still carries its row count.
            let rows = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
            async move { Ok(RecordBatch::try_new_with_options(out, batch.columns().to_vec(), &rows)?) }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

fn column_list(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the session of each task a coordinator sends: refuses a request without an accepted
/// token, and decodes shard leaves with a runner of the token's role.
#[derive(Clone)]
pub struct WorkerSessions {
    engine: Arc<OnceLock<Arc<Engine>>>,
    settings: Arc<ServerSettings>,
}

impl std::fmt::Debug for WorkerSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSessions").finish_non_exhaustive()
    }
}

impl WorkerSessions {
    /// Sessions over the server's engine (set once it has started) and tokens.
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>, settings: Arc<ServerSettings>) -> Self {
        WorkerSessions { engine, settings }
    }

    /// The runner for a request whose `authorization` header is `authorization`.
    pub fn runner(&self, authorization: Option<&str>) -> Result<Arc<EngineShards>> {
        let role = role_of(&self.settings, authorization).ok_or_else(|| {
            DataFusionError::Execution(
                "cluster: the coordinator's token is missing or wrong (hint: the shard map's token_env must name a token this worker accepts)"
                    .into(),
            )
        })?;
        let engine =
            self.engine.get().cloned().ok_or_else(|| {
                DataFusionError::Execution("cluster: this worker is still starting; try again".into())
            })?;
        Ok(Arc::new(EngineShards::new(engine, role)))
    }
}

#[async_trait]
impl WorkerSessionBuilder for WorkerSessions {
    async fn build_session_state(&self, context: WorkerQueryContext) -> Result<SessionState> {
        let authorization = context.headers.get("authorization").and_then(|v| v.to_str().ok());
        let runner = self.runner(authorization)?;
        Ok(context
            .builder
            .with_distributed_user_codec(ShardCodec::for_worker(runner))
            .build())
    }
}
