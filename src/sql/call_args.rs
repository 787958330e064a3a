//! Arguments of mkflow's table functions: literals, named arguments (`k => 60.0`) and search
//! calls passed to a fusion (`rrf(vector_search(kb, 'q'), text_search(kb, 'q'))`).
//!
//! DataFusion plans the arguments of `FROM f(…)` as scalar expressions: it refuses named
//! arguments there, and a call of a table function inside them would name no scalar function.
//! So, before a statement is planned, [`rewrite_call_args`] turns every `name => value` inside
//! a table-function call (and inside the calls nested in it) into `named_arg('name', value)`,
//! and the search functions are also registered as scalar *markers* ([`CallMarker`]): a nested
//! `vector_search(kb, …)` plans as a call of its marker (its table name made a string), which
//! carries its arguments to the function receiving it. Markers never run: evaluated anywhere else they fail with a message
//! saying where they belong.

use std::any::Any;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::parser::{CopyToSource, Statement};
use datafusion::sql::sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident, ObjectName, TableFactor,
    VisitMut, VisitorMut,
};
use std::ops::ControlFlow;

/// The marker a named argument becomes.
pub const NAMED_ARG: &str = "named_arg";

/// Rewrites the named arguments of every table-function call in `statement` (see the module
/// documentation).
pub fn rewrite_call_args(statement: &mut Statement) {
    let mut rewriter = NamedArgRewriter;
    let _ = match statement {
        Statement::Statement(statement) => statement.visit(&mut rewriter),
        Statement::Explain(explain) => {
            rewrite_call_args(&mut explain.statement);
            ControlFlow::Continue(())
        }
        Statement::CopyTo(copy) => match &mut copy.source {
            CopyToSource::Query(query) => query.visit(&mut rewriter),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => ControlFlow::Continue(()),
    };
}

struct NamedArgRewriter;

impl VisitorMut for NamedArgRewriter {
    type Break = ();

    fn pre_visit_table_factor(&mut self, table_factor: &mut TableFactor) -> ControlFlow<()> {
        match table_factor {
            TableFactor::Table { args: Some(args), .. } => rewrite_args(&mut args.args),
            TableFactor::Function { args, .. } => rewrite_args(args),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Rewrites named arguments in `args`, and in the function calls among them.
fn rewrite_args(args: &mut [FunctionArg]) {
    for arg in args.iter_mut() {
        let named = match arg {
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(value),
                ..
            } => Some((name.value.clone(), value.clone())),
            FunctionArg::ExprNamed {
                name: ast::Expr::Identifier(name),
                arg: FunctionArgExpr::Expr(value),
                ..
            } => Some((name.value.clone(), value.clone())),
            _ => None,
        };
        if let Some((name, value)) = named {
            *arg = FunctionArg::Unnamed(FunctionArgExpr::Expr(named_arg_call(name, value)));
        }
        if let FunctionArg::Unnamed(FunctionArgExpr::Expr(ast::Expr::Function(function))) = arg
            && let FunctionArguments::List(list) = &mut function.args
        {
            // A call passed to a table function names its table as a bare identifier
            // (`vector_search(kb, …)`); planned as a scalar argument it would be a column.
            if let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(first))) = list.args.first_mut()
                && let ast::Expr::Identifier(table) = first
            {
                *first = ast::Expr::Value(ast::Value::SingleQuotedString(table.value.clone()).into());
            }
            rewrite_args(&mut list.args);
        }
    }
}

/// `named_arg('name', value)`.
fn named_arg_call(name: String, value: ast::Expr) -> ast::Expr {
    let unnamed = |e: ast::Expr| FunctionArg::Unnamed(FunctionArgExpr::Expr(e));
    ast::Expr::Function(ast::Function {
        name: ObjectName::from(vec![Ident::new(NAMED_ARG)]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: vec![
                unnamed(ast::Expr::Value(ast::Value::SingleQuotedString(name).into())),
                unnamed(value),
            ],
            clauses: Vec::new(),
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: Vec::new(),
    })
}

/// A scalar function standing for a named argument or a table-function call inside another
/// table function's arguments. It never runs.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CallMarker {
    name: String,
    signature: Signature,
}

impl CallMarker {
    /// The marker of `named_arg` and of each of `table_functions`.
    pub fn all(table_functions: &[&str]) -> Vec<ScalarUDF> {
        std::iter::once(NAMED_ARG)
            .chain(table_functions.iter().copied())
            .map(|name| {
                ScalarUDF::new_from_impl(CallMarker {
                    name: name.to_string(),
                    signature: Signature::variadic_any(Volatility::Volatile),
                })
            })
            .collect()
    }
}

impl ScalarUDFImpl for CallMarker {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Null)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if self.name == NAMED_ARG {
            exec_err!("'name => value' arguments belong in a table function call (FROM f(…, name => value))")
        } else {
            exec_err!(
                "{}(…) is a table function: call it in FROM, or pass it to rrf(…)",
                self.name
            )
        }
    }
}

/// The marker call `expr` is, as (marker name, its arguments).
fn marker_call(expr: &Expr) -> Option<(&str, &[Expr])> {
    match expr {
        Expr::ScalarFunction(call) if (call.func.inner().as_ref() as &dyn Any).is::<CallMarker>() => {
            Some((call.func.name(), &call.args))
        }
        _ => None,
    }
}

/// A table function's arguments: positional ones in order, then the named ones.
#[derive(Debug, Clone)]
pub struct CallArgs {
    function: String,
    /// The positional arguments.
    pub positional: Vec<Expr>,
    named: Vec<(String, Expr)>,
}

impl CallArgs {
    /// Splits the arguments of `function`; `accepted` lists the names it takes.
    pub fn of(function: &str, exprs: &[Expr], accepted: &[&str]) -> Result<Self> {
        let mut positional = Vec::new();
        let mut named: Vec<(String, Expr)> = Vec::new();
        for expr in exprs {
            match marker_call(expr) {
                Some((NAMED_ARG, [name, value])) => {
                    let name = string_arg(name).unwrap_or_default().to_ascii_lowercase();
                    if !accepted.contains(&name.as_str()) {
                        return plan_err!(
                            "{function} takes no argument named '{name}'{}",
                            if accepted.is_empty() {
                                String::new()
                            } else {
                                format!(" (named arguments: {})", accepted.join(", "))
                            }
                        );
                    }
                    if named.iter().any(|(n, _)| *n == name) {
                        return plan_err!("{function}: argument '{name}' is given twice");
                    }
                    named.push((name, value.clone()));
                }
                _ => positional.push(expr.clone()),
            }
        }
        Ok(CallArgs {
            function: function.to_string(),
            positional,
            named,
        })
    }

    /// The named argument `name`, if given.
    pub fn named(&self, name: &str) -> Option<&Expr> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    /// The named argument `name` as a string literal.
    pub fn named_string(&self, name: &str) -> Result<Option<String>> {
        self.named(name)
            .map(|e| {
                string_arg(e)
                    .ok_or_else(|| DataFusionError::Plan(format!("{}: {name} must be a string literal", self.function)))
            })
            .transpose()
    }

    /// The named argument `name` as a positive number.
    pub fn named_number(&self, name: &str) -> Result<Option<f64>> {
        self.named(name)
            .map(|e| {
                number_arg(e).filter(|v| *v > 0.0 && v.is_finite()).ok_or_else(|| {
                    DataFusionError::Plan(format!("{}: {name} must be a positive number", self.function))
                })
            })
            .transpose()
    }

    /// The named argument `name` as a positive integer.
    pub fn named_count(&self, name: &str) -> Result<Option<usize>> {
        self.named(name)
            .map(|e| {
                int_arg(e)
                    .filter(|v| *v > 0)
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| {
                        DataFusionError::Plan(format!("{}: {name} must be a positive integer", self.function))
                    })
            })
            .transpose()
    }
}

/// The name of the named argument `expr` is, if it is one.
pub fn named_arg_name(expr: &Expr) -> Option<&str> {
    match marker_call(expr) {
        Some((NAMED_ARG, [name, _])) => match literal(name)? {
            ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                Some(s.as_str())
            }
            _ => None,
        },
        _ => None,
    }
}

/// A table-function call given as an argument: the function's name and arguments.
pub fn nested_call(expr: &Expr) -> Option<(&str, &[Expr])> {
    marker_call(expr).filter(|(name, _)| *name != NAMED_ARG)
}

/// The literal value of a table-function argument.
fn literal(expr: &Expr) -> Option<&ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value),
        Expr::Cast(cast) => literal(&cast.expr),
        _ => None,
    }
}

/// The literal value of an argument, as written (for arguments such as vectors).
pub fn literal_arg(expr: &Expr) -> Option<&ScalarValue> {
    literal(expr)
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

/// The numeric literal value of an argument (an integer or a decimal).
pub fn number_arg(expr: &Expr) -> Option<f64> {
    if let Some(v) = int_arg(expr) {
        return Some(v as f64);
    }
    match literal(expr)? {
        ScalarValue::Float32(Some(v)) => Some(*v as f64),
        ScalarValue::Float64(Some(v)) => Some(*v),
        value @ (ScalarValue::Decimal128(..) | ScalarValue::Decimal256(..)) => {
            value.cast_to(&DataType::Float64).ok().and_then(|v| match v {
                ScalarValue::Float64(v) => v,
                _ => None,
            })
        }
        _ => None,
    }
}

/// The table name an argument designates: a bare identifier or a string.
pub fn table_arg(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Column(c) => Some(c.name.clone()),
        other => string_arg(other),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut statements = DFParser::parse_sql(sql).unwrap();
        let mut statement = statements.pop_front().unwrap();
        rewrite_call_args(&mut statement);
        statement.to_string()
    }

    #[test]
    fn named_arguments_become_markers_at_any_depth_of_a_table_call() {
        assert_eq!(
            rewritten("SELECT * FROM rrf(vector_search(kb, 'q', rank_weight => 2), text_search(kb, 'q'), k => 60.0)"),
            "SELECT * FROM rrf(vector_search('kb', 'q', named_arg('rank_weight', 2)), text_search('kb', 'q'), named_arg('k', 60.0))"
        );
        assert_eq!(
            rewritten("EXPLAIN SELECT * FROM hybrid_search(kb, 'q', rerank => 20)"),
            "EXPLAIN SELECT * FROM hybrid_search(kb, 'q', named_arg('rerank', 20))"
        );
        // Scalar calls outside FROM are left alone.
        assert_eq!(rewritten("SELECT f(a => 1)"), "SELECT f(a => 1)");
    }
}
