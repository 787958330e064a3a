//! JSON records to typed Arrow rows, refusing bad records one by one instead of failing the
//! whole batch. Shared by the JSON Lines files source and the Kafka source.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::ReaderBuilder;

/// Rows decoded from a list of records.
#[derive(Debug)]
pub struct DecodedRecords {
    /// Rows of the accepted records, in input order.
    pub batch: RecordBatch,
    /// Positions (in the input list) of the accepted records, one per row of `batch`.
    pub accepted: Vec<usize>,
    /// Positions of the refused records with the reason.
    pub refused: Vec<(usize, String)>,
}

/// Decodes JSON objects into rows of a declared schema: values are converted to the column
/// types, undeclared fields are ignored, and a record that is not a JSON object, holds a value
/// of the wrong type or lacks a `NOT NULL` column is refused with a message saying why.
#[derive(Debug, Clone)]
pub struct JsonRecordDecoder {
    schema: SchemaRef,
}

impl JsonRecordDecoder {
    /// A decoder producing rows of `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        JsonRecordDecoder { schema }
    }

    /// Decodes `records`. The common case (all valid) costs one decoder pass; when some record
    /// is bad, records are decoded one by one to keep the good ones.
    pub fn decode(&self, records: &[&str]) -> Result<DecodedRecords, ArrowError> {
        if let Ok(batch) = self.decode_all(records) {
            return Ok(DecodedRecords {
                batch,
                accepted: (0..records.len()).collect(),
                refused: Vec::new(),
            });
        }
        let mut batches = Vec::new();
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for (i, record) in records.iter().enumerate() {
            match self.decode_all(std::slice::from_ref(record)) {
                Ok(batch) => {
                    batches.push(batch);
                    accepted.push(i);
                }
                Err(ArrowError::JsonError(message)) => refused.push((i, message)),
                Err(other) => refused.push((i, other.to_string())),
            }
        }
        Ok(DecodedRecords {
            batch: concat_batches(&self.schema, &batches)?,
            accepted,
            refused,
        })
    }

    fn decode_all(&self, records: &[&str]) -> Result<RecordBatch, ArrowError> {
        let mut decoder = ReaderBuilder::new(self.schema.clone())
            .with_batch_size(records.len().max(1))
            .build_decoder()?;
        for record in records {
            if !record.trim_start().starts_with('{') {
                return Err(ArrowError::JsonError("not a JSON object".into()));
            }
            let mut bytes = Vec::with_capacity(record.len() + 1);
            bytes.extend_from_slice(record.as_bytes());
            bytes.push(b'\n');
            let consumed = decoder.decode(&bytes)?;
            if consumed != bytes.len() {
                return Err(ArrowError::JsonError("trailing data after the JSON object".into()));
            }
        }
        let batch = decoder
            .flush()?
            .unwrap_or_else(|| RecordBatch::new_empty(self.schema.clone()));
        for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
            if !field.is_nullable() && column.null_count() > 0 {
                return Err(ArrowError::JsonError(format!(
                    "required column '{}' is missing or null",
                    field.name()
                )));
            }
        }
        Ok(batch)
    }
}
