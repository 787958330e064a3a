//! Parameters (`$1`, `$2`, …) in the arguments of mkflow's table functions.
//!
//! DataFusion replaces the placeholders of a planned statement with their values
//! ([`LogicalPlan::with_param_values`](datafusion::logical_expr::LogicalPlan::with_param_values)),
//! but a table function receives its arguments while the statement is planned, before any
//! value is known. So a statement run with parameters carries their values in its session's
//! config ([`BoundParameters`]), and every table function is registered behind
//! [`WithParameters`], which replaces the placeholders among its arguments (nested search
//! calls included) with those values before the function sees them. A bound vector reaches
//! `vector_search` as one Arrow list, never as hundreds of literals to parse and plan.

use std::sync::Arc;

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, ParamValues, Result};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::expr::Placeholder;
use datafusion::prelude::SessionConfig;

/// The values of a statement's parameters, in its session's config while it is planned.
#[derive(Debug, Clone)]
pub struct BoundParameters(pub ParamValues);

impl BoundParameters {
    /// `config` with `values` bound.
    pub fn bind(config: &mut SessionConfig, values: ParamValues) {
        config.set_extension(Arc::new(BoundParameters(values)));
    }
}

/// A placeholder among a table function's arguments that no value is bound to (a statement
/// with parameters must be prepared, and the values bound before it runs).
#[derive(Debug, thiserror::Error)]
#[error(
    "{function}: no value is bound to {id} (bind the values of $1, $2, … to a prepared statement, e.g. \
     with a Flight SQL client)"
)]
pub struct UnboundParameter {
    /// The table function.
    pub function: String,
    /// The placeholder (`$1`).
    pub id: String,
}

/// Whether `error` says a placeholder has no value yet.
pub fn is_unbound_parameter(error: &DataFusionError) -> bool {
    match error.find_root() {
        DataFusionError::External(e) => e.is::<UnboundParameter>(),
        _ => false,
    }
}

/// A table function whose arguments may be placeholders (see the module documentation).
#[derive(Debug)]
pub struct WithParameters {
    name: String,
    function: Arc<dyn TableFunctionImpl>,
}

impl WithParameters {
    /// `function`, registered as `name`, with its placeholders bound.
    pub fn new(name: &str, function: Arc<dyn TableFunctionImpl>) -> Arc<Self> {
        Arc::new(WithParameters {
            name: name.to_string(),
            function,
        })
    }
}

impl TableFunctionImpl for WithParameters {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        if !args.exprs().iter().any(has_placeholder) {
            return self.function.call_with_args(args);
        }
        let bound = args.session().config().get_extension::<BoundParameters>();
        let exprs = args
            .exprs()
            .iter()
            .map(|expr| self.bind(expr, bound.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        self.function
            .call_with_args(TableFunctionArgs::new(&exprs, args.session()))
    }
}

impl WithParameters {
    /// `expr` with its placeholders replaced by their bound values.
    fn bind(&self, expr: &Expr, bound: Option<&BoundParameters>) -> Result<Expr> {
        expr.clone()
            .transform(|e| match e {
                Expr::Placeholder(Placeholder { id, .. }) => {
                    let value = bound
                        .and_then(|b| b.0.get_placeholders_with_values(&id).ok())
                        .ok_or_else(|| {
                            DataFusionError::External(Box::new(UnboundParameter {
                                function: self.name.clone(),
                                id,
                            }))
                        })?;
                    let (value, metadata) = value.into_inner();
                    Ok(Transformed::yes(Expr::Literal(value, metadata)))
                }
                other => Ok(Transformed::no(other)),
            })
            .map(|t| t.data)
    }
}

/// Whether `expr` holds a placeholder.
fn has_placeholder(expr: &Expr) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        found = matches!(e, Expr::Placeholder(_));
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::{col, lit};

    #[test]
    fn placeholders_are_found_inside_nested_calls() {
        let nested = col("a").eq(Expr::Placeholder(Placeholder::new_with_field("$1".into(), None)));
        assert!(has_placeholder(&nested));
        assert!(!has_placeholder(&col("a").eq(lit(1))));
    }

    #[test]
    fn binding_replaces_placeholders_and_names_a_missing_one() {
        let function = WithParameters {
            name: "vector_search".into(),
            function: Arc::new(NoFunction),
        };
        let expr = lit("x").eq(Expr::Placeholder(Placeholder::new_with_field("$2".into(), None)));
        let values = BoundParameters(ParamValues::from(vec![
            ScalarValue::from("first"),
            ScalarValue::from("second"),
        ]));
        assert_eq!(function.bind(&expr, Some(&values)).unwrap(), lit("x").eq(lit("second")));
        let missing = function.bind(&expr, None).unwrap_err();
        assert!(is_unbound_parameter(&missing), "{missing}");
        assert!(
            missing.to_string().contains("vector_search: no value is bound to $2"),
            "{missing}"
        );
        let short = BoundParameters(ParamValues::from(vec![ScalarValue::from("first")]));
        assert!(is_unbound_parameter(&function.bind(&expr, Some(&short)).unwrap_err()));
    }

    #[derive(Debug)]
    struct NoFunction;

    impl TableFunctionImpl for NoFunction {}
}
