//! Async functions (`embed`, `mk_metadata`) where DataFusion cannot run them.
//!
//! DataFusion runs async scalar functions in their own plan step before a projection, a filter
//! or an aggregate, but not before a sort or in a `VALUES` list: `ORDER BY
//! cosine_distance(embedding, embed('q'))` and `INSERT INTO kb VALUES ('a', …, embed('…'))`
//! would fail at run time. [`AsyncCalls`] rewrites such a sort to compute its async keys in a
//! projection below it, sort by those columns and project them away again; and such a `VALUES`
//! list to one projection per row, unioned.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Result};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Sort, SortExpr, Values};
use datafusion::optimizer::AnalyzerRule;

/// The analyzer rule that moves async calls of sort keys and `VALUES` rows into projections.
#[derive(Debug, Default)]
pub struct AsyncCalls;

/// Whether `expr` calls an async scalar function.
fn calls_async(expr: &Expr) -> bool {
    expr.exists(|e| Ok(matches!(e, Expr::ScalarFunction(f) if f.func.as_async().is_some())))
        .unwrap_or(false)
}

impl AnalyzerRule for AsyncCalls {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::Sort(sort) if sort.expr.iter().any(|key| calls_async(&key.expr)) => {
                Ok(Transformed::yes(computed_keys(sort)?))
            }
            LogicalPlan::Values(values) if values.values.iter().flatten().any(calls_async) => {
                Ok(Transformed::yes(projected_rows(values)?))
            }
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "mkflow_async_calls"
    }
}

/// `VALUES (row), (row), …` as the union of one projection per row, each with the list's
/// column names.
fn projected_rows(values: Values) -> Result<LogicalPlan> {
    let Values { schema, values } = values;
    let mut rows = values.into_iter().map(|row| {
        let named: Vec<Expr> = row
            .into_iter()
            .zip(schema.fields())
            .map(|(expr, field)| expr.alias(field.name()))
            .collect();
        LogicalPlanBuilder::empty(true).project(named)
    });
    let first = rows.next().expect("a VALUES list has a row")?;
    rows.try_fold(first, |union, row| union.union(row?.build()?))?.build()
}

/// `Sort(keys, input)` as `Projection(input's columns, Sort(key columns, Projection(input's
/// columns, async keys)))`.
fn computed_keys(sort: Sort) -> Result<LogicalPlan> {
    let Sort { expr, input, fetch } = sort;
    let columns: Vec<Expr> = input.schema().columns().into_iter().map(Expr::Column).collect();
    let mut projected = columns.clone();
    let mut keys = Vec::with_capacity(expr.len());
    for (i, key) in expr.into_iter().enumerate() {
        if calls_async(&key.expr) {
            let name = format!("__mkflow_sort_key_{i}");
            projected.push(key.expr.alias(&name));
            keys.push(SortExpr {
                expr: Expr::Column(Column::from_name(name)),
                ..key
            });
        } else {
            keys.push(key);
        }
    }
    LogicalPlanBuilder::from(Arc::unwrap_or_clone(input))
        .project(projected)?
        .sort_with_limit(keys, fetch)?
        .project(columns)?
        .build()
}
