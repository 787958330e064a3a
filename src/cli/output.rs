//! Printing query results: aligned tables for people, CSV and JSON Lines for programs.

use std::sync::Arc;

use clap::ValueEnum;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::util::pretty::pretty_format_batches;

/// Output formats of `mkflow sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned table; vectors are summarised.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per row.
    Json,
}

/// Renders `batches` in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<String, ArrowError> {
    match format {
        Format::Table => {
            let summarised = batches.iter().map(summarise_vectors).collect::<Result<Vec<_>, _>>()?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            if summarised.is_empty() {
                return Ok("(no rows)".into());
            }
            Ok(format!(
                "{}\n({rows} row{})",
                pretty_format_batches(&summarised)?,
                if rows == 1 { "" } else { "s" }
            ))
        }
        Format::Csv => {
            let mut out = Vec::new();
            {
                let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for batch in batches {
                    writer.write(batch)?;
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Format::Json => {
            let mut out = Vec::new();
            {
                let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
                for batch in batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// Replaces float-vector columns by a short text (`[0.0123, -0.0456, … 384 dims]`).
fn summarise_vectors(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match field.data_type() {
            DataType::FixedSizeList(item, dims) if item.data_type() == &DataType::Float32 => {
                let list = column.as_fixed_size_list();
                let texts: StringArray = (0..list.len())
                    .map(|i| {
                        list.is_valid(i).then(|| {
                            let values = list.value(i);
                            let values = values.as_primitive::<Float32Type>();
                            let head: Vec<String> = values.values().iter().take(3).map(|v| format!("{v:.4}")).collect();
                            format!("[{}, … {dims} dims]", head.join(", "))
                        })
                    })
                    .collect();
                fields.push(Field::new(field.name(), DataType::Utf8, true));
                columns.push(Arc::new(texts));
            }
            _ => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}
