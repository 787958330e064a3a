//! `vector_search(kb, 'query text' [, column] [, k])`: the `k` rows of a knowledge index
//! nearest to a query, with a `score` column (cosine similarity, higher is closer).
//!
//! Accepted forms:
//! - `vector_search(kb, 'query', k)`;
//! - Spice.ai's `vector_search(table, query [, column [, limit]])`, where `column` names the
//!   vector column or the text column the vectors were computed from;
//! - the query may also be a vector literal (`[0.1, 0.2, …]`).
//!
//! Without `k`, the query's `LIMIT` (when DataFusion pushes it) or 10 rows; either is checked
//! against the session's `max_k`. `WHERE` clauses on the index's columns are evaluated inside the
//! search, so the answer holds `k` rows whenever `k` rows match.
//!
//! `reasoning => 'explicit'` (any of the three) searches with the query and a rationale the
//! session's LLM writes for it, returned in a `rationale` column ([`super::reasoning`]).
//!
//! Nothing is computed while the statement is planned: when it runs, a text query is embedded
//! by the model's queue (batched with other queries, off the async runtime), then searched in
//! the index's published state (a commit running meanwhile changes nothing it reads).
//!
//! `qa_search(kb, 'query' [, k])` is the same search over the synthetic questions of a
//! Meta-Knowledge index (columns `question_id`, `doc_id`, `question`, `answer`, `cluster_name`,
//! `metadata`, `score`), and `chunk_search(kb, 'query' [, k])` over the chunks of a chunked index
//! (passages: `chunk_id`, `doc_id`, `chunk_index`, `context`, `text`, `start_char`, `end_char`,
//! `tokens`, `score`). On a chunked index, `vector_search` ranks documents by their best chunk
//! and returns it (`best_chunk`, `best_chunk_index`, `best_chunk_start`, `best_chunk_end`).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float32Type, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, ScalarValue, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::FutureExt;

use super::KbSchema;
use super::call_args::{CallArgs, int_arg, literal_arg, string_arg, table_arg};
use super::catalog::SearchTarget;
use super::filters::{CompiledFilter, pushdown_support};
use super::reasoning::{Reasoner, Reasoning, add_rationale, reasoned_query, with_rationale_column};
use crate::access::Access;
use crate::chunks::{ChunkIndex, search::search_schema as chunked_schema};
use crate::models::ModelRegistry;
use crate::support::batch_table::deferred_scan;
use crate::support::{index_error, tag_call};
use mkflow_index::{KnowledgeIndex, RowPredicate};
use mkflow_udfs::mk::GeneratorRegistry;

/// Rows returned when neither `k` nor a pushed `LIMIT` says how many.
pub const DEFAULT_K: usize = 10;

/// The rows a search returns: its own `k`, else the query's pushed `LIMIT` or [`DEFAULT_K`]
/// checked against the session's `max_k`.
pub fn search_k(state: &dyn Session, function: &str, k: Option<usize>, limit: Option<usize>) -> Result<usize> {
    match k {
        Some(k) => Ok(k),
        None => Access::of(state.config()).check_k(function, limit.unwrap_or(DEFAULT_K)),
    }
}

/// The `vector_search` and `qa_search` table functions.
#[derive(Debug)]
pub struct VectorSearchFunction {
    registry: Arc<KbSchema>,
    models: Arc<ModelRegistry>,
    /// The session's generators, for `reasoning => 'explicit'`.
    generators: Arc<GeneratorRegistry>,
    target: SearchTarget,
}

impl VectorSearchFunction {
    /// A function searching `target`, resolving tables in `registry`, embedding queries with
    /// `models` and reasoning about them with `generators`.
    pub fn new(
        registry: Arc<KbSchema>,
        models: Arc<ModelRegistry>,
        generators: Arc<GeneratorRegistry>,
        target: SearchTarget,
    ) -> Self {
        VectorSearchFunction {
            registry,
            models,
            generators,
            target,
        }
    }

    fn function_name(&self) -> &'static str {
        match self.target {
            SearchTarget::Documents => "vector_search",
            SearchTarget::Questions => "qa_search",
            SearchTarget::Chunks => "chunk_search",
        }
    }
}

/// A literal list of numbers (`[0.1, 0.2]`), as floats.
fn vector_arg(expr: &Expr) -> Option<Vec<f32>> {
    let array = match literal_arg(expr)? {
        ScalarValue::List(list) => list.value(0),
        ScalarValue::LargeList(list) => list.value(0),
        ScalarValue::FixedSizeList(list) => list.value(0),
        _ => return None,
    };
    let floats = datafusion::arrow::compute::cast(&array, &DataType::Float32).ok()?;
    let floats = floats.as_primitive::<Float32Type>();
    (floats.null_count() == 0).then(|| floats.values().to_vec())
}

impl TableFunctionImpl for VectorSearchFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let function = self.function_name();
        let usage = format!("usage: {function}(kb, 'query text' [, column] [, k] [, reasoning => 'explicit'])");
        let access = Access::of(args.session().config());
        let call = CallArgs::of(function, args.exprs(), &["reasoning"])?;
        let exprs = &call.positional;
        if !(2..=4).contains(&exprs.len()) {
            return plan_err!("{function} takes 2 to 4 arguments; {usage}");
        }
        let name = table_arg(&exprs[0]).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{function}: the first argument must name a knowledge index; {usage}"
            ))
        })?;
        let searched = self.registry.search_target(function, &name, self.target)?;
        let (index, chunks) = (searched.index, searched.chunks);
        let mut k = None;
        let mut rest = &exprs[2..];
        if let Some(first) = rest.first().filter(|e| int_arg(e).is_none()) {
            let column = string_arg(first).or_else(|| table_arg(first)).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{function}: the third argument must be k or a column name; {usage}"
                ))
            })?;
            searched_column(&index, &column).map_err(|e| DataFusionError::Plan(format!("{function}: '{name}' {e}")))?;
            rest = &rest[1..];
        }
        if let Some(limit) = rest.first() {
            let value = int_arg(limit)
                .filter(|v| *v > 0)
                .ok_or_else(|| DataFusionError::Plan(format!("{function}: k must be a positive integer; {usage}")))?;
            k = Some(access.check_k(function, usize::try_from(value).unwrap_or(usize::MAX))?);
        }
        let query = self.query(&access, &exprs[1])?;
        let mut schema = match &chunks {
            Some(_) => chunked_schema(&index),
            None => index.search_schema(),
        };
        let reasoner = match Reasoning::parse(function, call.named_string("reasoning")?.as_deref())? {
            Reasoning::None => None,
            Reasoning::Explicit if matches!(query, Query::Vector(_)) => {
                return plan_err!("{function}: reasoning => 'explicit' needs a query text, not a vector");
            }
            Reasoning::Explicit => {
                schema = with_rationale_column(&schema);
                Some(Reasoner::of_session(function, args.session(), &self.generators)?)
            }
        };
        Ok(Arc::new(VectorSearchTable {
            function,
            // Tagged with every argument, the reasoning included.
            schema: tag_call(&schema, function, args.exprs()),
            index,
            chunks,
            models: self.models.clone(),
            query,
            reasoner,
            k,
        }))
    }
}

/// Checks that `column` designates the vectors a search reads: Spice.ai's `column` argument
/// names the vector column or the text column its vectors were computed from. An index holds one
/// vector column, which both designate; any other column is refused, naming the accepted ones.
fn searched_column(index: &KnowledgeIndex, column: &str) -> std::result::Result<(), String> {
    let schema = index.schema();
    let vector_column = index.manifest().vector_column;
    let field = schema
        .field_with_name(column)
        .map_err(|_| format!("has no column '{column}'"))?;
    let is_text = matches!(
        field.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    if column == vector_column || is_text {
        Ok(())
    } else {
        Err(format!(
            "cannot be searched by '{column}' ({}): name the vector column '{vector_column}' or a text column its vectors were computed from",
            field.data_type()
        ))
    }
}

/// What a search looks for.
#[derive(Debug, Clone)]
enum Query {
    /// A text, embedded with the index's model when the search runs.
    Text(String),
    /// A vector given as a literal.
    Vector(Vec<f32>),
}

impl VectorSearchFunction {
    /// The query argument: a text (checked against `max_query_text_bytes`) or a vector literal
    /// (checked against the index's dimension when the search runs).
    fn query(&self, access: &Access, expr: &Expr) -> Result<Query> {
        if let Some(vector) = vector_arg(expr) {
            return Ok(Query::Vector(vector));
        }
        let Some(text) = string_arg(expr) else {
            return plan_err!("{}: the query must be a text or a vector literal", self.function_name());
        };
        if text.trim().is_empty() {
            return plan_err!("{}: the query text is empty", self.function_name());
        }
        access.check_query_text(self.function_name(), &text)?;
        Ok(Query::Text(text))
    }
}

/// The result of one `vector_search` call, computed when the plan runs.
#[derive(Debug)]
struct VectorSearchTable {
    function: &'static str,
    /// The search schema, tagged with this call.
    schema: SchemaRef,
    index: Arc<KnowledgeIndex>,
    /// The chunks searched in the documents' place, when the index is chunked.
    chunks: Option<Arc<ChunkIndex>>,
    models: Arc<ModelRegistry>,
    query: Query,
    /// Writes the query's rationale, when the call reasons (`reasoning => 'explicit'`).
    reasoner: Option<Reasoner>,
    k: Option<usize>,
}

impl VectorSearchTable {
    /// The query as a vector, and the rationale embedded with it if the call reasons: a text is
    /// embedded as a query by the index model's queue and mapped by the index's query adapter,
    /// if it has one.
    async fn query_vector(&self) -> Result<(Vec<f32>, Option<String>)> {
        match (&self.query, &self.reasoner) {
            (Query::Vector(vector), _) => Ok((vector.clone(), None)),
            (Query::Text(text), None) => Ok((self.models.search_vector(&self.index, text).await?, None)),
            (Query::Text(text), Some(reasoner)) => {
                let rationale = reasoner.rationale(self.function, text).await?;
                let vector = self
                    .models
                    .search_vector(&self.index, &reasoned_query(text, &rationale))
                    .await?;
                Ok((vector, Some(rationale)))
            }
        }
    }
}

#[async_trait]
impl TableProvider for VectorSearchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown_support(filters, &self.index.schema()))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let k = search_k(state, self.function, self.k, limit)?;
        let filter = CompiledFilter::pushed(state, &self.index.schema(), filters)?;
        let search = Arc::new(SearchCall {
            table: VectorSearchTable {
                function: self.function,
                schema: self.schema.clone(),
                index: self.index.clone(),
                chunks: self.chunks.clone(),
                models: self.models.clone(),
                query: self.query.clone(),
                reasoner: self.reasoner.clone(),
                k: Some(k),
            },
            filter,
        });
        deferred_scan(self.schema(), projection, None, move |_| {
            let search = search.clone();
            async move { search.run().await }.boxed()
        })
    }
}

/// A planned search: the table's query and `k`, and the filters pushed into it.
#[derive(Debug)]
struct SearchCall {
    table: VectorSearchTable,
    filter: Option<CompiledFilter>,
}

impl SearchCall {
    async fn run(&self) -> Result<RecordBatch> {
        let (query, rationale) = self.table.query_vector().await?;
        let (index, k) = (&self.table.index, self.table.k.unwrap_or(DEFAULT_K));
        // The search is CPU work like any operator's (no I/O, no lock a commit holds): it runs
        // where DataFusion runs its operators, without a hop to another thread.
        let evaluate = self.filter.as_ref().map(|f| move |b: &_| f.evaluate(b));
        let filter = evaluate.as_ref().map(|f| f as &RowPredicate<'_>);
        let found = match &self.table.chunks {
            Some(chunks) => chunks.best_documents(index, k, filter, &|depth, within| {
                chunks.chunks().search(&query, depth, within)
            }),
            None => index.search(&query, k, filter),
        }
        .map_err(index_error)?;
        match rationale {
            Some(rationale) => add_rationale(found, self.table.schema.clone(), &rationale),
            None => Ok(found),
        }
    }
}
