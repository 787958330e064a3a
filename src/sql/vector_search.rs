//! `vector_search(kb, 'query text' [, column] [, k])`: the `k` rows of a knowledge index
//! nearest to a query, with a `score` column (cosine similarity, higher is closer).
//!
//! Accepted forms:
//! - `vector_search(kb, 'query', k)`;
//! - Spice.ai's `vector_search(table, query [, column [, limit]])`, where `column` names the
//!   vector column or the text column the vectors were computed from;
//! - the query may also be a vector literal (`[0.1, 0.2, …]`).
//!
//! Without `k`, the query's `LIMIT` (when DataFusion pushes it) or 10 rows. `WHERE` clauses on
//! the index's columns are evaluated inside the search, so the answer holds `k` rows whenever
//! `k` rows match.
//!
//! `qa_search(kb, 'query' [, k])` is the same search over the synthetic questions of a
//! Meta-Knowledge index (columns `question_id`, `doc_id`, `question`, `answer`, `cluster_name`,
//! `metadata`, `score`).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Float32Type, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, ScalarValue, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::filters::{CompiledFilter, is_row_filter, pushdown_support};
use super::{KbSchema, memory_scan};
use crate::models::ModelRegistry;
use crate::support::index_error;
use mkflow_index::KnowledgeIndex;

/// Rows returned when neither `k` nor a pushed `LIMIT` says how many.
pub const DEFAULT_K: usize = 10;

/// What a search function searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchTarget {
    /// The documents (`vector_search`).
    Documents,
    /// The synthetic questions of a Meta-Knowledge index (`qa_search`).
    Questions,
}

/// The `vector_search` and `qa_search` table functions.
#[derive(Debug)]
pub struct VectorSearchFunction {
    registry: Arc<KbSchema>,
    models: Arc<ModelRegistry>,
    target: SearchTarget,
}

impl VectorSearchFunction {
    /// A function searching `target`, resolving tables in `registry` and embedding queries
    /// with `models`.
    pub fn new(registry: Arc<KbSchema>, models: Arc<ModelRegistry>, target: SearchTarget) -> Self {
        VectorSearchFunction {
            registry,
            models,
            target,
        }
    }

    fn function_name(&self) -> &'static str {
        match self.target {
            SearchTarget::Documents => "vector_search",
            SearchTarget::Questions => "qa_search",
        }
    }

    /// The index searched for table `name`.
    fn resolve(&self, name: &str) -> Result<Arc<KnowledgeIndex>> {
        let function = self.function_name();
        let (index, mk) = self.registry.entry_or_error(function, name)?;
        match self.target {
            SearchTarget::Documents => Ok(index),
            SearchTarget::Questions => mk.map(|mk| mk.index.questions().clone()).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{function}: '{name}' has no synthetic questions (create it with OPTIONS ('meta_knowledge' 'true'))"
                ))
            }),
        }
    }
}

/// The literal value of a table-function argument.
fn literal(expr: &Expr) -> Option<&ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value),
        Expr::Cast(cast) => literal(&cast.expr),
        _ => None,
    }
}

/// The string literal value of an argument.
pub fn string_arg(expr: &Expr) -> Option<String> {
    match literal(expr)? {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            Some(s.clone())
        }
        _ => None,
    }
}

/// The integer literal value of an argument.
pub fn int_arg(expr: &Expr) -> Option<i64> {
    match literal(expr)? {
        ScalarValue::Int8(Some(v)) => Some(*v as i64),
        ScalarValue::Int16(Some(v)) => Some(*v as i64),
        ScalarValue::Int32(Some(v)) => Some(*v as i64),
        ScalarValue::Int64(Some(v)) => Some(*v),
        ScalarValue::UInt8(Some(v)) => Some(*v as i64),
        ScalarValue::UInt16(Some(v)) => Some(*v as i64),
        ScalarValue::UInt32(Some(v)) => Some(*v as i64),
        ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A literal list of numbers (`[0.1, 0.2]`), as floats.
fn vector_arg(expr: &Expr) -> Option<Vec<f32>> {
    let array = match literal(expr)? {
        ScalarValue::List(list) => list.value(0),
        ScalarValue::LargeList(list) => list.value(0),
        ScalarValue::FixedSizeList(list) => list.value(0),
        _ => return None,
    };
    let floats = datafusion::arrow::compute::cast(&array, &DataType::Float32).ok()?;
    let floats = floats.as_primitive::<Float32Type>();
    (floats.null_count() == 0).then(|| floats.values().to_vec())
}

/// The table name an argument designates: a bare identifier or a string.
pub fn table_arg(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Column(c) => Some(c.name.clone()),
        other => string_arg(other),
    }
}

impl TableFunctionImpl for VectorSearchFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let function = self.function_name();
        let usage = format!("usage: {function}(kb, 'query text' [, column] [, k])");
        let exprs = args.exprs();
        if !(2..=4).contains(&exprs.len()) {
            return plan_err!("{function} takes 2 to 4 arguments; {usage}");
        }
        let name = table_arg(&exprs[0]).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{function}: the first argument must name a knowledge index; {usage}"
            ))
        })?;
        let index = self.resolve(&name)?;
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
            k = Some(value as usize);
        }
        let query = self.query_vector(&index, &exprs[1])?;
        Ok(Arc::new(VectorSearchTable { index, query, k }))
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

impl VectorSearchFunction {
    /// Embeds a text query with the index's model, or takes a vector literal as is.
    fn query_vector(&self, index: &KnowledgeIndex, expr: &Expr) -> Result<Vec<f32>> {
        if let Some(vector) = vector_arg(expr) {
            return Ok(vector);
        }
        let Some(text) = string_arg(expr) else {
            return plan_err!("{}: the query must be a text or a vector literal", self.function_name());
        };
        let embedder = self
            .models
            .model_of(index)?
            .get()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        embedder
            .embed_one(&text)
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }
}

/// The result of one `vector_search` call, computed when scanned.
#[derive(Debug)]
struct VectorSearchTable {
    index: Arc<KnowledgeIndex>,
    query: Vec<f32>,
    k: Option<usize>,
}

#[async_trait]
impl TableProvider for VectorSearchTable {
    fn schema(&self) -> SchemaRef {
        self.index.search_schema()
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
        let k = self.k.or(limit).unwrap_or(DEFAULT_K);
        let row_schema = self.index.schema();
        let pushed: Vec<Expr> = filters
            .iter()
            .filter(|f| is_row_filter(f, &row_schema))
            .cloned()
            .collect();
        let filter = CompiledFilter::compile(state, &row_schema, &pushed)?;
        let batch = match &filter {
            Some(f) => self.index.search(&self.query, k, Some(&|b| f.evaluate(b))),
            None => self.index.search(&self.query, k, None),
        }
        .map_err(index_error)?;
        memory_scan(vec![batch], self.schema(), projection, None)
    }
}
