//! Telling table-function calls apart in a plan.
//!
//! DataFusion names the scan of a table function after the function alone (`text_search()`)
//! and compares scans by name, schema, filters and limit, never by their source: two calls with
//! different arguments would compare equal, and its common-subexpression elimination would
//! answer `SELECT (SELECT count(*) FROM text_search(kb, 'a')), (SELECT count(*) FROM
//! text_search(kb, 'b'))` with the first result twice. Tagging each call's schema with its
//! arguments makes different calls different scans.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::logical_expr::Expr;

/// The schema metadata key holding the call's tag.
pub const CALL_TAG: &str = "mkflow.call";

/// `schema` tagged with the call `function(args)` that produces it.
pub fn tag_call(schema: &SchemaRef, function: &str, args: &[Expr]) -> SchemaRef {
    let mut hasher = DefaultHasher::new();
    function.hash(&mut hasher);
    // Hashed as expressions, not as their text: a bound query vector would be written out as
    // hundreds of floats on every run of a prepared search.
    args.hash(&mut hasher);
    let mut metadata: HashMap<String, String> = schema.metadata().clone();
    metadata.insert(CALL_TAG.to_string(), format!("{function}#{:016x}", hasher.finish()));
    Arc::new(Schema::new_with_metadata(schema.fields().clone(), metadata))
}
