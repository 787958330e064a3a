//! One session: a DataFusion context of its own (settings, its own tables) over the engine's
//! shared indexes, running scripts statement by statement.
//!
//! Before a statement of a network session is planned, it is checked against the session's
//! [`Access`] (see [`super::authorize`]); while a statement's result is gathered, it is held to
//! `max_result_rows` and `max_result_bytes`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, ParamValues, Result, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::{SessionContext, SessionState};
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use datafusion::logical_expr::{AggregateUDF, LogicalPlan, ScalarUDF};
use datafusion::sql::parser::{DFParser, Statement};
use futures::StreamExt;
use mkflow_udfs::mk::{ClusterUdf, MkOptions, PrepareUdf, PreparedPart, Preparer, SummaryUdaf};

use super::Shared;
use super::authorize::{authorize, confine};
use crate::access::{Access, Refusal};
use crate::mk::MkServices;
use crate::sql::call_args::rewrite_call_args;
use crate::sql::parameters::{BoundParameters, is_unbound_parameter};
use crate::statement::{StatementKind, placeholders};
use crate::streaming::{ContinuousInsert, DirectoryInsert, FileInsert, count_batch};

/// The result of one statement of a script.
#[derive(Debug)]
pub struct StatementResult {
    /// The statement, as SQL.
    pub sql: String,
    /// Its output rows.
    pub batches: Vec<RecordBatch>,
}

/// A statement parsed and checked once (see [`Session::prepare`]).
#[derive(Debug, Clone)]
pub struct PreparedStatement {
    /// As parsed (each run rewrites and checks a copy, as an unprepared statement is).
    statement: Statement,
    /// The schema of the query's result, when known before its values are bound.
    pub schema: Option<SchemaRef>,
    /// Its parameters, in order (`$1`, `$2`, …).
    pub parameters: Vec<String>,
}

/// A session: its own settings and tables, the engine's indexes and services.
pub struct Session {
    ctx: SessionContext,
    shared: Arc<Shared>,
}

impl Session {
    /// A session over `state` (the engine's template: its Meta-Knowledge functions are those of
    /// the template's settings, until a `SET mkflow.…` changes them).
    pub(super) fn start(state: SessionState, shared: Arc<Shared>) -> Self {
        Session {
            ctx: SessionContext::new_with_state(state),
            shared,
        }
    }

    /// The session's DataFusion context.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Who runs the session's statements, and their bounds.
    pub fn access(&self) -> Arc<Access> {
        // Read in place: cloning the whole session state per statement costs more than planning.
        Access::of(self.ctx.state_ref().read().config())
    }

    /// The session's Meta-Knowledge settings.
    pub fn mk_options(&self) -> MkOptions {
        MkOptions::of(self.ctx.state_ref().read().config_options())
    }

    /// Registers the Meta-Knowledge functions of the session's current settings anew.
    fn register_mk_functions(&self) -> Result<()> {
        register_mk_functions(&self.ctx, &self.shared.mk_services)
    }

    /// Runs one or more `;`-separated statements and returns the last one's rows.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let mut results = self.run_script("sql", sql, |_| {}).await?;
        Ok(results.pop().map(|r| r.batches).unwrap_or_default())
    }

    /// Parses and checks `sql` (one statement) once, to be run with [`Session::run_prepared`]
    /// any number of times, with values for its parameters (`$1`, `$2`, …; anywhere a value
    /// may stand, the arguments of the search functions included). A query is planned now, so
    /// a bad one fails here and its result schema is known, unless a table function's argument
    /// is a parameter (it is planned when its values are bound).
    pub async fn prepare(&self, sql: &str) -> Result<PreparedStatement> {
        let access = self.access();
        let original = self.parse_one(sql, "a prepared statement")?;
        let statement = self.checked(&access, original.clone())?;
        let parameters = placeholders(&statement);
        let schema = match StatementKind::of(&statement) {
            StatementKind::Query | StatementKind::Explain { .. } => match self.plan(&access, statement, None).await {
                Ok((_, plan)) => Some(Arc::clone(plan.schema().inner())),
                Err(e) if is_unbound_parameter(&e) => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        Ok(PreparedStatement {
            statement: original,
            schema,
            parameters,
        })
    }

    /// Runs `prepared` with `values` for its parameters (in order: `$1`, `$2`, …) and returns
    /// its rows.
    pub async fn run_prepared(
        &self,
        prepared: &PreparedStatement,
        values: Vec<ScalarValue>,
    ) -> Result<Vec<RecordBatch>> {
        self.run_bound(prepared.statement.clone(), &prepared.parameters, values)
            .await
    }

    /// Runs the one statement `sql` holds with `values` for its parameters (in order: `$1`,
    /// `$2`, …), without preparing it first: what an HTTP request with `"params"` runs. A
    /// search's query vector bound this way is never parsed as hundreds of float literals.
    pub async fn sql_with_params(&self, sql: &str, values: Vec<ScalarValue>) -> Result<Vec<RecordBatch>> {
        let statement = self.parse_one(sql, "a statement with parameters")?;
        let parameters = placeholders(&statement);
        self.run_bound(statement, &parameters, values).await
    }

    /// Runs `statement`, whose parameters are `parameters`, with `values` bound to them.
    async fn run_bound(
        &self,
        statement: Statement,
        parameters: &[String],
        values: Vec<ScalarValue>,
    ) -> Result<Vec<RecordBatch>> {
        check_bound(parameters, &values)?;
        let values = (!values.is_empty()).then(|| ParamValues::from(values));
        self.execute("sql", statement, values.as_ref()).await
    }

    /// Runs a script statement by statement; `before` is told each statement before it runs.
    /// Stops at the first failing statement, naming it in the error. `pipeline` names the
    /// script in metrics and logs; an `INSERT` reading a Kafka table runs as a continuous
    /// stream (see [`crate::streaming`]) until the engine's streams are stopped.
    pub async fn run_script(
        &self,
        pipeline: &str,
        script: &str,
        mut before: impl FnMut(&str),
    ) -> Result<Vec<StatementResult>> {
        let statements = self.parse(script)?;
        let mut results = Vec::with_capacity(statements.len());
        let count = statements.len();
        for (i, statement) in statements.into_iter().enumerate() {
            // Rendering a statement back to SQL costs time on large literals: a single
            // statement is its own script.
            let sql = if count == 1 {
                script.trim().to_string()
            } else {
                statement.to_string()
            };
            before(&sql);
            let batches = self.execute(pipeline, statement, None).await.map_err(|e| {
                if count > 1 {
                    e.context(format!("statement {} of {count}: {}", i + 1, super::abbreviate(&sql)))
                } else {
                    e
                }
            })?;
            results.push(StatementResult { sql, batches });
        }
        Ok(results)
    }

    /// Runs the SQL file at `path` as pipeline `name` (see [`Session::run_script`]).
    pub async fn run_file(&self, name: &str, path: &Path, before: impl FnMut(&str)) -> Result<Vec<StatementResult>> {
        let script = std::fs::read_to_string(path)
            .map_err(|e| DataFusionError::Execution(format!("cannot read pipeline {}: {e}", path.display())))?;
        self.run_script(name, &script, before).await
    }

    async fn execute(
        &self,
        pipeline: &str,
        statement: Statement,
        values: Option<&ParamValues>,
    ) -> Result<Vec<RecordBatch>> {
        let access = self.access();
        let outcome = self.execute_as(&access, pipeline, statement, values).await;
        match outcome {
            // The memory pool of a network session is its max_query_memory: say so.
            Err(e) if access.is_network() && matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => {
                Err(too_large(format!(
                    "the query needs more memory than max_query_memory ({} bytes): {e}",
                    access.limits.max_query_memory
                )))
            }
            other => other,
        }
    }

    /// The statements of `sql`, refused before parsing when nested deeper than the session
    /// allows.
    fn parse(&self, sql: &str) -> Result<VecDeque<Statement>> {
        self.access().check_expression_depth(sql)?;
        DFParser::parse_sql(sql)
    }

    /// The one statement of `sql`, which `what` (a prepared statement, …) must be.
    fn parse_one(&self, sql: &str, what: &str) -> Result<Statement> {
        let mut statements = self.parse(sql)?;
        match statements.len() {
            1 => Ok(statements.pop_front().expect("one statement")),
            n => Err(DataFusionError::Plan(format!(
                "{what} holds one statement, not {n}; send each on its own"
            ))),
        }
    }

    /// `statement` ready to plan for `access`: its named arguments rewritten and, for a network
    /// client, authorised and its locations confined to the allowed directories.
    fn checked(&self, access: &Access, mut statement: Statement) -> Result<Statement> {
        rewrite_call_args(&mut statement);
        if let Some(role) = access.role() {
            authorize(&statement, role, access)?;
            confine(&mut statement, access, &self.shared.data_dir)?;
        }
        Ok(statement)
    }

    /// Plans a [`checked`](Session::checked) statement with `values` bound to its parameters
    /// (in the state it returns, where table functions find them, and in the plan); a network
    /// client's plan is authorised too.
    async fn plan(
        &self,
        access: &Access,
        statement: Statement,
        values: Option<&ParamValues>,
    ) -> Result<(SessionState, LogicalPlan)> {
        let mut state = self.ctx.state();
        if let Some(values) = values {
            BoundParameters::bind(state.config_mut(), values.clone());
        }
        let mut plan = state.statement_to_plan(statement).await?;
        if let Some(values) = values {
            plan = plan.with_param_values(values.clone())?;
        }
        if let Some(role) = access.role() {
            super::authorize::authorize_plan(&plan, role)?;
        }
        Ok((state, plan))
    }

    /// Runs `statement` as `access` allows, with `values` for its parameters if it has any.
    async fn execute_as(
        &self,
        access: &Access,
        pipeline: &str,
        statement: Statement,
        values: Option<&ParamValues>,
    ) -> Result<Vec<RecordBatch>> {
        let statement = self.checked(access, statement)?;
        let sets_mk_option = StatementKind::of(&statement).sets_mkflow_option();
        let previous = sets_mk_option.then(|| self.mk_options());
        let (state, plan) = self.plan(access, statement, values).await?;
        if let Some(stream) = ContinuousInsert::find(&plan)? {
            let rows = stream.run(&self.ctx, pipeline, &self.shared.streams).await?;
            return Ok(vec![count_batch(rows)?]);
        }
        if let Some(insert) = FileInsert::find(&plan)? {
            let rows = insert.run(&self.ctx, pipeline, &self.shared.streams).await?;
            return Ok(vec![count_batch(rows)?]);
        }
        if let Some(insert) = DirectoryInsert::find(&plan)? {
            let rows = insert.run(&self.ctx, pipeline, &self.shared.streams).await?;
            return Ok(vec![count_batch(rows)?]);
        }
        // A query runs on the state it was planned with; DDL and statements (`SET`, `CREATE`)
        // change the context, which runs them.
        let frame = match plan {
            LogicalPlan::Ddl(_) | LogicalPlan::Statement(_) => self.ctx.execute_logical_plan(plan).await?,
            plan => DataFrame::new(state, plan),
        };
        let stream = frame.execute_stream().await?;
        let batches = collect_bounded(stream, access).await?;
        if let Some(previous) = previous
            && let Err(e) = self.register_mk_functions()
        {
            // Refused settings do not stay in force.
            self.ctx
                .state_ref()
                .write()
                .config_mut()
                .options_mut()
                .extensions
                .insert(previous);
            return Err(e);
        }
        Ok(batches)
    }
}

/// (Re)registers `mk_metadata`, `mk_qa`, `mk_cluster` and `mk_summary` in `ctx` for its current
/// settings (their result types follow the metadata schema).
pub(super) fn register_mk_functions(ctx: &SessionContext, services: &MkServices) -> Result<()> {
    let options = MkOptions::of(ctx.state_ref().read().config_options());
    let schema = services
        .generators
        .schema(&options)
        .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
    let generator = services
        .generators
        .generator(&options)
        .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
    let preparer = Arc::new(Preparer::new(
        generator.clone(),
        schema.clone(),
        services.failures.clone(),
    ));
    for part in [PreparedPart::Metadata, PreparedPart::Questions] {
        let udf = PrepareUdf::new(part, preparer.clone());
        ctx.register_udf(AsyncScalarUDF::new(Arc::new(udf)).into_scalar_udf());
    }
    ctx.register_udf(ScalarUDF::new_from_impl(ClusterUdf::new(schema)));
    ctx.register_udaf(AggregateUDF::new_from_impl(SummaryUdaf::new(generator)));
    Ok(())
}

/// Gathers a statement's result, refusing a network session's once it passes `max_result_rows`
/// or `max_result_bytes` (the rest is not computed).
async fn collect_bounded(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    access: &Access,
) -> Result<Vec<RecordBatch>> {
    if !access.is_network() {
        return datafusion::physical_plan::common::collect(stream).await;
    }
    let limits = &access.limits;
    let (mut rows, mut bytes) = (0usize, 0usize);
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows();
        bytes += batch.get_array_memory_size();
        if rows > limits.max_result_rows {
            return Err(too_large(format!(
                "the result has more than max_result_rows ({}) rows; add a LIMIT or aggregate",
                limits.max_result_rows
            )));
        }
        if bytes > limits.max_result_bytes {
            return Err(too_large(format!(
                "the result holds more than max_result_bytes ({} bytes); select fewer columns or rows",
                limits.max_result_bytes
            )));
        }
        batches.push(batch);
    }
    Ok(batches)
}

fn too_large(message: String) -> DataFusionError {
    Refusal::TooLarge(message).into_error()
}

/// Refuses `values` that are not one per parameter of a statement whose parameters are
/// `parameters`.
fn check_bound(parameters: &[String], values: &[ScalarValue]) -> Result<()> {
    if values.len() == parameters.len() {
        return Ok(());
    }
    let named = match parameters.is_empty() {
        true => "none".to_string(),
        false => parameters.join(", "),
    };
    Err(DataFusionError::Plan(format!(
        "the statement has {} parameter(s) ({named}), {} value(s) are bound",
        parameters.len(),
        values.len()
    )))
}
