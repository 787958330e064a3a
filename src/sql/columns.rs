//! Arrow columns the table functions build.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, ListBuilder, StringBuilder};

/// A `List<Utf8>` column with one list per row.
pub(crate) fn string_lists<'a>(rows: impl Iterator<Item = Vec<&'a str>>) -> ArrayRef {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for row in rows {
        for value in row {
            builder.values().append_value(value);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}
