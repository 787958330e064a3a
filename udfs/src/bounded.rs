//! Guards on DataFusion's functions whose output can dwarf their input.
//!
//! DataFusion's memory pool accounts for operators (sorts, joins, aggregates), not for the
//! values scalar functions make: `repeat('a', 2000000000)` allocates 2 GB, and a larger count
//! aborts the process when the allocation fails. [`bound`] wraps such a function so that each
//! call first estimates the bytes it would make over its batch — from its arguments, scalars
//! counted once per row — and refuses, naming `max_value_bytes`, when that is more than the
//! bound. A chain of calls cannot grow past the bound either: each link's input is the previous
//! link's bounded output.
//!
//! The wrapped functions keep their name, signature, simplifications and ordering properties.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, IntervalMonthDayNano, IntervalUnit, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};

/// How a function's output grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text `n` times.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: `n` characters (up to 4 bytes each).
    Pad,
    /// `replace`/`regexp_replace(text, from, to …)`: up to one `to` per character.
    Replace,
    /// The sum of the arguments (`concat`, `concat_ws`, `array_concat`, `make_array`, …).
    Sum,
    /// Twice the sum of the arguments (`to_hex`, `encode`).
    Double,
    /// `array_repeat(element, n)`: the element `n` times.
    ArrayRepeat,
    /// `range`/`generate_series(start, stop [, step])` as values: one element per step.
    Series,
    /// `array_resize(array, n [, fill])`: `n` elements.
    Resize,
}

/// The growth of the function called `name`, if it is one that can grow.
fn growth_of(name: &str) -> Option<Growth> {
    Some(match name {
        "repeat" => Growth::Repeat,
        "lpad" | "rpad" => Growth::Pad,
        "replace" | "regexp_replace" => Growth::Replace,
        "concat" | "concat_ws" | "overlay" | "translate" | "array_concat" | "array_append" | "array_prepend"
        | "make_array" | "struct" | "named_struct" => Growth::Sum,
        "to_hex" | "encode" => Growth::Double,
        "array_repeat" => Growth::ArrayRepeat,
        "range" | "generate_series" => Growth::Series,
        "array_resize" => Growth::Resize,
        _ => return None,
    })
}

/// `udf` guarded by `max_bytes`, if it is a function whose output can outgrow its input.
pub fn bound(udf: &Arc<ScalarUDF>, max_bytes: usize) -> Option<ScalarUDF> {
    let growth = growth_of(udf.name())?;
    Some(ScalarUDF::new_from_impl(Bounded {
        inner: udf.clone(),
        growth,
        max_bytes,
    }))
}

/// A call refused because it would make more than `max_value_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{function}() would make about {estimate} bytes, more than max_value_bytes ({max_bytes})")]
pub struct ValueTooLarge {
    /// The function called.
    pub function: String,
    /// The bytes it would have made, estimated from its arguments.
    pub estimate: u128,
    /// The bound.
    pub max_bytes: usize,
}

/// A function refusing calls whose estimated output exceeds `max_bytes`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    max_bytes: usize,
}

impl Bounded {
    fn rewrap(&self, udf: Arc<ScalarUDF>) -> Arc<ScalarUDF> {
        Arc::new(ScalarUDF::new_from_impl(Bounded {
            inner: udf,
            growth: self.growth,
            max_bytes: self.max_bytes,
        }))
    }

    /// Refuses the call when it would make more than `max_bytes`.
    fn check(&self, args: &[ColumnarValue], rows: usize) -> Result<()> {
        let estimate = estimate(self.growth, args, rows.max(1));
        if estimate > self.max_bytes as u128 {
            return Err(DataFusionError::External(Box::new(ValueTooLarge {
                function: self.inner.name().to_string(),
                estimate,
                max_bytes: self.max_bytes,
            })));
        }
        Ok(())
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.check(&args.args, args.number_rows)?;
        self.inner.invoke_with_args(args)
    }

    /// The inner function's simplification, with the calls it makes to itself guarded too.
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(expr) => {
                let expr = expr.transform(|e| match e {
                    Expr::ScalarFunction(f)
                        if f.func.name() == self.inner.name() && f.func.as_ref() == self.inner.as_ref() =>
                    {
                        let ScalarFunction { func, args } = f;
                        Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                            self.rewrap(func),
                            args,
                        ))))
                    }
                    other => Ok(Transformed::no(other)),
                })?;
                Ok(ExprSimplifyResult::Simplified(expr.data))
            }
            original => Ok(original),
        }
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(&self, interval: &Interval, inputs: &[&Interval]) -> Result<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// An upper estimate of the bytes a call makes over `rows` rows.
fn estimate(growth: Growth, args: &[ColumnarValue], rows: usize) -> u128 {
    let bytes = |i: usize| {
        args.get(i)
            .map(|a| byte_lengths(a, rows))
            .unwrap_or_else(|| vec![0; rows])
    };
    let counts = |i: usize| args.get(i).map(|a| integers(a, rows)).unwrap_or_else(|| vec![0; rows]);
    let per_row = |a: Vec<u128>, b: Vec<u128>| -> u128 { a.iter().zip(&b).map(|(x, y)| x.saturating_mul(*y)).sum() };
    match growth {
        Growth::Repeat => per_row(bytes(0), counts(1)),
        Growth::Pad => counts(1).iter().map(|n| n.saturating_mul(4)).sum(),
        // `replace(text, from, to)`, `regexp_replace(text, pattern, replacement [, flags])`.
        Growth::Replace => per_row(
            bytes(0).iter().map(|n| n + 1).collect(),
            bytes(2).iter().map(|n| n + 1).collect(),
        ),
        Growth::Sum => (0..args.len()).map(|i| bytes(i).iter().sum::<u128>()).sum(),
        Growth::Double => (0..args.len())
            .map(|i| bytes(i).iter().sum::<u128>())
            .sum::<u128>()
            .saturating_mul(2),
        Growth::ArrayRepeat => per_row(bytes(0), counts(1)),
        Growth::Resize => {
            let element: Vec<u128> = bytes(0).iter().map(|_| 16).collect();
            per_row(element, counts(1))
        }
        Growth::Series => series_lengths(args, rows).iter().map(|n| n.saturating_mul(16)).sum(),
    }
}

/// Each row's byte length of a value: text and binary by their bytes, anything else by its
/// share of the array's memory.
fn byte_lengths(value: &ColumnarValue, rows: usize) -> Vec<u128> {
    match value {
        ColumnarValue::Scalar(scalar) => {
            let size = match scalar {
                ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                    s.len()
                }
                ScalarValue::Binary(Some(b)) | ScalarValue::LargeBinary(Some(b)) | ScalarValue::BinaryView(Some(b)) => {
                    b.len()
                }
                other => other.size(),
            };
            vec![size as u128; rows]
        }
        ColumnarValue::Array(array) => match array.data_type() {
            DataType::Utf8 => array
                .as_string::<i32>()
                .iter()
                .map(|s| s.map_or(0, str::len) as u128)
                .collect(),
            DataType::LargeUtf8 => array
                .as_string::<i64>()
                .iter()
                .map(|s| s.map_or(0, str::len) as u128)
                .collect(),
            DataType::Utf8View => array
                .as_string_view()
                .iter()
                .map(|s| s.map_or(0, str::len) as u128)
                .collect(),
            _ => {
                let share = array.get_array_memory_size() / array.len().max(1) + 1;
                vec![share as u128; array.len()]
            }
        },
    }
}

/// Each row's value as a count: its magnitude (a negative count is estimated as large as it is
/// long, since some functions read it unsigned); null or not a number: 0.
fn integers(value: &ColumnarValue, rows: usize) -> Vec<u128> {
    as_i64(value, rows)
        .into_iter()
        .map(|v| v.unsigned_abs() as u128)
        .collect()
}

fn as_i64(value: &ColumnarValue, rows: usize) -> Vec<i64> {
    let array: ArrayRef = match value {
        ColumnarValue::Scalar(scalar) => match scalar.to_array_of_size(1) {
            Ok(array) => array,
            Err(_) => return vec![0; rows],
        },
        ColumnarValue::Array(array) => array.clone(),
    };
    let array = match array.data_type() {
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) => {
            cast(&array, &DataType::Timestamp(TimeUnit::Nanosecond, None)).and_then(|a| cast(&a, &DataType::Int64))
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let nanos = |v: IntervalMonthDayNano| {
                (v.months as i64)
                    .saturating_mul(30 * 86_400_000_000_000)
                    .saturating_add((v.days as i64).saturating_mul(86_400_000_000_000))
                    .saturating_add(v.nanoseconds)
            };
            let values: Vec<i64> = array
                .as_primitive::<datafusion::arrow::datatypes::IntervalMonthDayNanoType>()
                .iter()
                .map(|v| v.map_or(0, nanos))
                .collect();
            Ok(Arc::new(datafusion::arrow::array::Int64Array::from(values)) as ArrayRef)
        }
        _ => cast(&array, &DataType::Int64),
    };
    let Ok(array) = array else {
        return vec![0; rows];
    };
    let values = array.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    let value = |i: usize| if values.is_valid(i) { values.value(i) } else { 0 };
    match values.len() {
        1 => vec![value(0); rows],
        n => (0..n).map(value).collect(),
    }
}

/// Elements each row's `range`/`generate_series` call makes: `|stop − start| / |step|` (one
/// argument is `stop` from 0; the step defaults to 1, or a day for dates).
fn series_lengths(args: &[ColumnarValue], rows: usize) -> Vec<u128> {
    let (starts, stops) = match args.len() {
        0 => return vec![0; rows],
        1 => (vec![0; rows], as_i64(&args[0], rows)),
        _ => (as_i64(&args[0], rows), as_i64(&args[1], rows)),
    };
    let temporal = matches!(
        args[0].data_type(),
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
    );
    let steps = match args.get(2) {
        Some(step) => as_i64(step, rows),
        None if temporal => vec![86_400_000_000_000; rows],
        None => vec![1; rows],
    };
    starts
        .iter()
        .zip(&stops)
        .zip(&steps)
        .map(|((start, stop), step)| {
            let span = (*stop as i128 - *start as i128).unsigned_abs();
            span / step.unsigned_abs().max(1) as u128 + 1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<datafusion::arrow::array::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    fn guarded(max_bytes: usize) -> SessionContext {
        let ctx = SessionContext::new();
        let functions: Vec<Arc<ScalarUDF>> = ctx.state().scalar_functions().values().cloned().collect();
        for udf in &functions {
            if let Some(bounded) = bound(udf, max_bytes) {
                ctx.register_udf(bounded);
            }
        }
        ctx
    }

    #[tokio::test]
    async fn growing_calls_are_refused_before_they_allocate() {
        let ctx = guarded(1 << 20);
        for sql in [
            "SELECT length(repeat('a', 2000000000))",
            "SELECT repeat('ab', 1000000000000000)",
            "SELECT lpad('x', 100000000)",
            "SELECT rpad('x', 9000000000000, 'yz')",
            "SELECT rpad(1e308, -8595613850522028636, CAST(NULL AS VARCHAR))",
            "SELECT replace(repeat('a', 100000), 'a', repeat('b', 100))",
            "SELECT array_repeat(1, 1000000000000)",
            "SELECT range(1, 1000000000000)",
            "SELECT generate_series(DATE '1900-01-01', DATE '2100-01-01', INTERVAL '1 second')",
            "SELECT array_resize([1], 10000000000)",
            "SELECT concat(repeat('a', 600000), repeat('b', 600000))",
        ] {
            let error = run(&ctx, sql).await.unwrap_err().to_string();
            assert!(error.contains("max_value_bytes (1048576)"), "{sql}: {error}");
        }
    }

    #[tokio::test]
    async fn small_calls_answer_as_before() {
        let ctx = guarded(1 << 20);
        let batches = run(
            &ctx,
            "SELECT repeat('ab', 3) AS r, lpad('7', 3, '0') AS p, replace('aXa', 'X', 'yy') AS s, \
             concat_ws('-', 'a', 'b') AS c, cardinality(range(1, 11)) AS n, cardinality(array_repeat(0, 4)) AS m",
        )
        .await
        .unwrap();
        let row = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        for expected in ["ababab", "007", "ayya", "a-b", "| 10", "| 4"] {
            assert!(row.contains(expected), "{expected} in\n{row}");
        }
        // Over a table, each row's arguments count.
        run(
            &ctx,
            "CREATE TABLE t AS SELECT * FROM (VALUES ('x', 3), ('y', 4)) AS v(s, n)",
        )
        .await
        .unwrap();
        let batches = run(&ctx, "SELECT repeat(s, n) AS r FROM t ORDER BY r").await.unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("xxx") && text.contains("yyyy"), "{text}");
    }
}
