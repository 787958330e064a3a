//! The JSON shapes a constrained answer can be held to, read from a subset of JSON Schema.

use serde_json::Value;

/// Longest string a schema without `maxLength` lets a model write (characters), so a looping
/// model still closes its strings.
pub const DEFAULT_MAX_CHARS: usize = 400;
/// Most items of an array whose schema has no `maxItems`.
pub const DEFAULT_MAX_ITEMS: usize = 16;
/// The schema keyword (an extension) listing phrases a string may not contain.
pub const FORBIDDEN_PHRASES: &str = "x-forbidden-phrases";
/// Longest forbidden phrase (bytes).
pub const MAX_FORBIDDEN_BYTES: usize = 32;

/// A JSON value's required shape: objects with every property in the listed order, arrays with
/// bounded length, strings with bounded length, and enumerations.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonShape {
    /// `{"a": …, "b": …}`: exactly these properties, in this order.
    Object(Vec<(String, JsonShape)>),
    /// `[…]` of `min..=max` items of one shape.
    Array {
        /// The items' shape.
        items: Box<JsonShape>,
        /// Fewest items.
        min: usize,
        /// Most items.
        max: usize,
    },
    /// A string of `min..=max` characters (JSON escapes count as one) that contains none of
    /// `forbidden` (ASCII phrases, compared case-insensitively).
    String {
        /// Fewest characters.
        min: usize,
        /// Most characters.
        max: usize,
        /// Phrases the string may not contain, lower-cased.
        forbidden: Vec<String>,
    },
    /// One of these strings.
    Enum(Vec<String>),
}

/// Why a JSON Schema cannot be used for constrained decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON schema at {path}: {message}")]
pub struct ShapeError {
    /// Where in the schema (`$.properties.qa.items`).
    pub path: String,
    /// What is not supported.
    pub message: String,
}

impl JsonShape {
    /// Reads a JSON Schema of the supported subset: `type` `object` (with `properties`, all
    /// written, in the order of `required` when it names every property, else by name), `array` (`items`, `minItems`, `maxItems`), `string`
    /// (`minLength`, `maxLength`), and `enum` of strings.
    pub fn from_schema(schema: &Value) -> Result<Self, ShapeError> {
        Self::read(schema, "$")
    }

    /// Length in bytes of the shortest JSON text of this shape (no whitespace): what a
    /// constrained answer must still have room for.
    pub fn min_bytes(&self) -> usize {
        match self {
            JsonShape::Object(properties) => {
                let members: usize = properties.iter().map(|(k, v)| member_bytes(k, v)).sum();
                2 + members + properties.len().saturating_sub(1)
            }
            JsonShape::Array { items, min, .. } => 2 + min * items.min_bytes() + min.saturating_sub(1),
            JsonShape::String { min, .. } => 2 + min,
            JsonShape::Enum(options) => 2 + options.iter().map(String::len).min().unwrap_or(0),
        }
    }

    fn read(schema: &Value, path: &str) -> Result<Self, ShapeError> {
        let error = |message: String| ShapeError {
            path: path.to_string(),
            message,
        };
        let count = |key: &str, default: usize| -> Result<usize, ShapeError> {
            match schema.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| error(format!("{key} must be a non-negative integer"))),
            }
        };
        if let Some(values) = schema.get("enum") {
            let options: Vec<String> = values
                .as_array()
                .ok_or_else(|| error("enum must be a list".into()))?
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| error("only enums of strings are supported".into()))?;
            if options.is_empty() {
                return Err(error("enum lists no value".into()));
            }
            if options
                .iter()
                .any(|o| o.chars().any(|c| c == '"' || c == '\\' || c < ' '))
            {
                return Err(error(
                    "enum values may not hold quotes, backslashes or control characters".into(),
                ));
            }
            return Ok(JsonShape::Enum(options));
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => {
                let properties = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .ok_or_else(|| error("an object needs properties".into()))?;
                if properties.is_empty() {
                    return Err(error("an object needs at least one property".into()));
                }
                let required: Vec<&str> = schema
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|names| names.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let ordered =
                    required.len() == properties.len() && required.iter().all(|n| properties.contains_key(*n));
                let names: Vec<&str> = match ordered {
                    true => required,
                    false => properties.keys().map(String::as_str).collect(),
                };
                names
                    .into_iter()
                    .map(|name| {
                        if name.chars().any(|c| c == '"' || c == '\\' || c < ' ') {
                            return Err(error(format!("property name {name:?} needs escaping")));
                        }
                        let sub = &properties[name];
                        Ok((name.to_string(), Self::read(sub, &format!("{path}.properties.{name}"))?))
                    })
                    .collect::<Result<_, _>>()
                    .map(JsonShape::Object)
            }
            Some("array") => {
                let items = schema
                    .get("items")
                    .ok_or_else(|| error("an array needs items".into()))?;
                let min = count("minItems", 0)?;
                let max = count("maxItems", DEFAULT_MAX_ITEMS.max(min))?;
                if max < min || max == 0 {
                    return Err(error(format!("maxItems {max} allows no list of at least {min} items")));
                }
                Ok(JsonShape::Array {
                    items: Box::new(Self::read(items, &format!("{path}.items"))?),
                    min,
                    max,
                })
            }
            Some("string") => {
                let min = count("minLength", 0)?;
                let max = count("maxLength", DEFAULT_MAX_CHARS.max(min))?;
                if max < min {
                    return Err(error(format!("maxLength {max} is below minLength {min}")));
                }
                let forbidden = match schema.get(FORBIDDEN_PHRASES) {
                    None => Vec::new(),
                    Some(list) => list
                        .as_array()
                        .and_then(|l| l.iter().map(|p| p.as_str().map(str::to_ascii_lowercase)).collect())
                        .filter(|l: &Vec<String>| {
                            l.iter()
                                .all(|p| p.is_ascii() && !p.is_empty() && p.len() <= MAX_FORBIDDEN_BYTES)
                        })
                        .ok_or_else(|| {
                            error(format!(
                                "{FORBIDDEN_PHRASES} must list non-empty ASCII phrases of at most {MAX_FORBIDDEN_BYTES} bytes"
                            ))
                        })?,
                };
                Ok(JsonShape::String { min, max, forbidden })
            }
            Some(other) => Err(error(format!(
                "type {other:?} is not supported (object, array, string, enum)"
            ))),
            None => Err(error("a schema needs a type or an enum".into())),
        }
    }
}

/// Bytes of the shortest `"key":value` member.
pub(super) fn member_bytes(key: &str, value: &JsonShape) -> usize {
    key.len() + 3 + value.min_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_supported_subset_in_the_order_required_lists() {
        let schema = json!({"type": "object", "required": ["zeta", "alpha"], "properties": {
            "alpha": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
            "zeta": {"enum": ["a", "b"]}
        }});
        let shape = JsonShape::from_schema(&schema).unwrap();
        assert_eq!(
            shape,
            JsonShape::Object(vec![
                ("zeta".into(), JsonShape::Enum(vec!["a".into(), "b".into()])),
                (
                    "alpha".into(),
                    JsonShape::Array {
                        items: Box::new(JsonShape::String {
                            min: 0,
                            max: 20,
                            forbidden: Vec::new()
                        }),
                        min: 1,
                        max: 3
                    }
                ),
            ])
        );
    }

    #[test]
    fn unsupported_schemas_are_refused_with_their_path() {
        let cases = [
            (json!({"type": "number"}), "$", "not supported"),
            (
                json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
                "$.properties.n",
                "integer",
            ),
            (json!({"enum": [1, 2]}), "$", "strings"),
            (
                json!({"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 2}),
                "$",
                "maxItems",
            ),
            (json!({"type": "object"}), "$", "properties"),
            (json!({"enum": ["say \"hi\""]}), "$", "quotes"),
            (
                json!({"type": "string", "x-forbidden-phrases": ["caf\u{e9}"]}),
                "$",
                "ASCII",
            ),
            (json!({"type": "string", "x-forbidden-phrases": [""]}), "$", "non-empty"),
        ];
        for (schema, path, message) in cases {
            let e = JsonShape::from_schema(&schema).unwrap_err();
            assert_eq!(e.path, path, "{schema}");
            assert!(e.to_string().contains(message), "{schema}: {e}");
        }
    }
}
