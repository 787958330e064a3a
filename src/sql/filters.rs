//! SQL filters (`WHERE` clauses pushed into a scan) as row predicates over index rows.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, Result, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, Volatility, utils::conjunction};
use datafusion::physical_expr::PhysicalExpr;

use mkflow_index::IndexError;

/// The functions a stored filter (a persona's) may call: field and list access, and bounded
/// text tests. Each output is no larger than its input.
pub const STORED_FILTER_FUNCTIONS: [&str; 8] = [
    "get_field",
    "array_has",
    "array_has_any",
    "array_has_all",
    "lower",
    "upper",
    "starts_with",
    "ends_with",
];

/// Whether `filter` only reads columns of `schema` (and so can be evaluated on index rows).
pub fn is_row_filter(filter: &Expr, schema: &SchemaRef) -> bool {
    let columns_known = filter
        .column_refs()
        .iter()
        .all(|c| schema.field_with_name(&c.name).is_ok());
    columns_known && !is_volatile(filter)
}

/// Whether `expr` calls a volatile function, or an async one (`embed`, `mk_metadata`: they run
/// in their own plan step, not inside a search).
fn is_volatile(expr: &Expr) -> bool {
    expr.exists(|e| {
        Ok(matches!(e, Expr::ScalarFunction(f)
            if f.func.signature().volatility == Volatility::Volatile || f.func.as_async().is_some()))
    })
    .unwrap_or(true)
}

/// Pushdown support for each filter: exact where it reads only index columns.
pub fn pushdown_support(filters: &[&Expr], schema: &SchemaRef) -> Vec<TableProviderFilterPushDown> {
    filters
        .iter()
        .map(|f| {
            if is_row_filter(f, schema) {
                TableProviderFilterPushDown::Exact
            } else {
                TableProviderFilterPushDown::Unsupported
            }
        })
        .collect()
}

/// A compiled conjunction of filters, evaluated batch by batch.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    expr: Arc<dyn PhysicalExpr>,
}

impl CompiledFilter {
    /// Compiles the filters among `filters` that read only columns of `schema` (those a scan
    /// reported as pushed down); `None` when there are none.
    pub fn pushed(state: &dyn Session, schema: &SchemaRef, filters: &[Expr]) -> Result<Option<Self>> {
        let rows: Vec<Expr> = filters.iter().filter(|f| is_row_filter(f, schema)).cloned().collect();
        Self::compile(state, schema, &rows)
    }

    /// Compiles `filters` (ANDed) against the rows of `schema`; `None` when there are none.
    pub fn compile(state: &dyn Session, schema: &SchemaRef, filters: &[Expr]) -> Result<Option<Self>> {
        let unqualified = filters
            .iter()
            .cloned()
            .map(strip_qualifiers)
            .collect::<Result<Vec<_>>>()?;
        let Some(predicate) = conjunction(unqualified) else {
            return Ok(None);
        };
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        let expr = state.create_physical_expr(predicate, &df_schema)?;
        Ok(Some(CompiledFilter { expr }))
    }

    /// Compiles a SQL predicate written as text (a persona's filter, say) against the rows of
    /// `schema`. Stored predicates run inside every search later, so they may only compare
    /// columns (and fields of struct columns) with literals: functions other than
    /// [`STORED_FILTER_FUNCTIONS`] are refused, so none can grow a value without bound.
    pub fn from_sql(sql: &str, schema: &SchemaRef) -> Result<Self> {
        let context = datafusion::prelude::SessionContext::new();
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        let predicate = context.parse_sql_expr(sql, &df_schema)?;
        predicate.apply(|node| {
            if let Expr::ScalarFunction(call) = node
                && !STORED_FILTER_FUNCTIONS.contains(&call.name())
            {
                return plan_err!(
                    "function {}() is not allowed in a stored filter (allowed: {})",
                    call.name(),
                    STORED_FILTER_FUNCTIONS.join(", ")
                );
            }
            if matches!(
                node,
                Expr::ScalarSubquery(_)
                    | Expr::Exists(_)
                    | Expr::InSubquery(_)
                    | Expr::AggregateFunction(_)
                    | Expr::WindowFunction(_)
            ) {
                return plan_err!("a stored filter compares columns with values; '{node}' is not allowed");
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let state = context.state();
        Self::compile(&state, schema, &[predicate])?
            .ok_or_else(|| datafusion::common::DataFusionError::Plan("an empty filter".into()))
    }

    /// True where a row of `batch` passes (null counts as not passing).
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray, IndexError> {
        let value = self
            .expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| IndexError::Filter(e.to_string()))?;
        if value.data_type() != &DataType::Boolean {
            return Err(IndexError::Filter(format!(
                "filter gives {}, not a boolean",
                value.data_type()
            )));
        }
        Ok(value.as_boolean().clone())
    }
}

/// Filters reach a table provider qualified by the query's alias for it; the index's rows are
/// unqualified.
fn strip_qualifiers(expr: Expr) -> Result<Expr> {
    expr.transform(|e| {
        Ok(match e {
            Expr::Column(c) if c.relation.is_some() => Transformed::yes(Expr::Column(Column::new_unqualified(c.name))),
            other => Transformed::no(other),
        })
    })
    .map(|t| t.data)
}
