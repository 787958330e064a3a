//! The `"params"` of an HTTP SQL request: JSON values bound to the statement's `$1`, `$2`, …
//! in order, as a Flight SQL client binds a prepared statement's — so a search's query vector
//! travels as a JSON array and is never parsed as hundreds of SQL float literals.
//!
//! | JSON                      | bound as                                  |
//! |---------------------------|-------------------------------------------|
//! | `null`                    | a null                                    |
//! | `true` / `false`          | a boolean                                 |
//! | an integer                | a 64-bit integer                          |
//! | any other number          | a 64-bit float                            |
//! | a string                  | a text (a search's query text)            |
//! | an array of numbers       | a list of 32-bit floats (a query vector)  |
//! | an array of strings       | a list of texts                           |

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float32Array, StringArray};
use datafusion::common::ScalarValue;
use datafusion::common::utils::SingleRowListArrayBuilder;
use serde_json::Value;

/// The values a request's `params` (a JSON array) binds, in order; else the message of a 400
/// naming the value at fault.
pub fn bound_values(params: &Value) -> Result<Vec<ScalarValue>, String> {
    let Value::Array(values) = params else {
        return Err("\"params\" must be an array of values, one per parameter ($1, $2, …)".into());
    };
    values
        .iter()
        .enumerate()
        .map(|(i, value)| scalar(value).map_err(|e| format!("params[{i}] (bound to ${}): {e}", i + 1)))
        .collect()
}

/// One JSON value as the scalar it binds (see the module's table).
fn scalar(value: &Value) -> Result<ScalarValue, String> {
    Ok(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ScalarValue::Int64(Some(i)),
            None => ScalarValue::Float64(n.as_f64()),
        },
        Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
        Value::Array(items) => list(items)?,
        Value::Object(_) => {
            return Err("an object cannot be bound; send a number, a string, or an array of them".into());
        }
    })
}

/// An array of numbers as a float list (a query vector), or of strings as a text list.
fn list(items: &[Value]) -> Result<ScalarValue, String> {
    let values: ArrayRef = if items.iter().all(Value::is_string) && !items.is_empty() {
        Arc::new(items.iter().map(Value::as_str).collect::<StringArray>())
    } else {
        let floats = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_f64().map(|x| x as f32).ok_or_else(|| {
                    format!("item {i} of the array is {item}: a list must hold only numbers (a vector) or only strings")
                })
            })
            .collect::<Result<Float32Array, String>>()?;
        Arc::new(floats)
    };
    Ok(SingleRowListArrayBuilder::new(values).build_list_scalar())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Float32Type;
    use serde_json::json;

    #[test]
    fn json_values_bind_as_the_scalars_a_statement_expects() {
        let values = bound_values(&json!([
            null,
            true,
            7,
            0.5,
            "protein folding",
            [0.25, -1, 2e3],
            ["a", "b"]
        ]))
        .unwrap();
        assert_eq!(values[0], ScalarValue::Null);
        assert_eq!(values[1], ScalarValue::Boolean(Some(true)));
        assert_eq!(values[2], ScalarValue::Int64(Some(7)));
        assert_eq!(values[3], ScalarValue::Float64(Some(0.5)));
        assert_eq!(values[4], ScalarValue::Utf8(Some("protein folding".into())));
        let ScalarValue::List(vector) = &values[5] else {
            panic!("{:?}", values[5])
        };
        assert_eq!(
            vector.value(0).as_primitive::<Float32Type>().values(),
            &[0.25, -1.0, 2000.0]
        );
        let ScalarValue::List(texts) = &values[6] else {
            panic!("{:?}", values[6])
        };
        let texts = texts.value(0);
        assert_eq!(texts.len(), 2);
        assert_eq!(texts.as_string::<i32>().value(1), "b");
    }

    #[test]
    fn what_cannot_be_bound_is_named() {
        assert!(bound_values(&json!({"a": 1})).unwrap_err().contains("must be an array"));
        let object = bound_values(&json!(["x", {"a": 1}])).unwrap_err();
        assert!(
            object.starts_with("params[1] (bound to $2): an object cannot be bound"),
            "{object}"
        );
        let mixed = bound_values(&json!([[0.1, "x"]])).unwrap_err();
        assert!(
            mixed.contains("params[0] (bound to $1): item 1 of the array is \"x\""),
            "{mixed}"
        );
    }
}
