//! Kafka records to rows: the JSON value becomes the declared columns, and the record's
//! coordinates become `kafka_key`, `kafka_topic`, `kafka_partition`, `kafka_offset` and
//! `kafka_timestamp`. Records that cannot become rows turn into dead letters.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::{DataFusionError, Result};

use super::consumer::KafkaRecord;
use crate::sources::DeadLetter;
use crate::sources::records::JsonRecordDecoder;

/// Names of the columns appended to the declared ones.
pub const COORDINATE_COLUMNS: [&str; 5] = [
    "kafka_key",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_timestamp",
];

/// Longest payload a dead letter keeps for an oversized record (bytes).
const OVERSIZED_PAYLOAD_KEPT: usize = 4096;

/// The table schema: declared columns, then the record coordinates.
pub fn table_schema(declared: &Schema) -> Result<SchemaRef> {
    if let Some(clash) = declared
        .fields()
        .iter()
        .find(|f| COORDINATE_COLUMNS.contains(&f.name().as_str()))
    {
        return Err(DataFusionError::Plan(format!(
            "column '{}' is reserved for the record coordinates of STORED AS KAFKA tables",
            clash.name()
        )));
    }
    let mut fields: Vec<Field> = declared.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend([
        Field::new("kafka_key", DataType::Utf8, true),
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new(
            "kafka_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        ),
    ]);
    Ok(Arc::new(Schema::new(fields)))
}

/// Decodes records into rows of `schema` (from [`table_schema`]); refused records come back as
/// dead letters with their payload, the reason and their topic/partition/offset.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    topic: String,
    schema: SchemaRef,
    values: JsonRecordDecoder,
    max_record_bytes: usize,
}

impl RecordDecoder {
    /// A decoder for `topic` producing rows of `schema`.
    pub fn new(topic: &str, schema: SchemaRef, max_record_bytes: usize) -> Self {
        let declared = schema.fields().len() - COORDINATE_COLUMNS.len();
        let value_schema = Arc::new(Schema::new(schema.fields()[..declared].to_vec()));
        RecordDecoder {
            topic: topic.to_string(),
            schema,
            values: JsonRecordDecoder::new(value_schema),
            max_record_bytes,
        }
    }

    /// Rows of the good records and dead letters of the others.
    pub fn decode(&self, records: &[KafkaRecord]) -> Result<(RecordBatch, Vec<DeadLetter>)> {
        let mut refused = Vec::new();
        let mut candidates: Vec<(&KafkaRecord, &str)> = Vec::with_capacity(records.len());
        for record in records {
            match self.check(record) {
                Ok(text) => candidates.push((record, text)),
                Err(error) => refused.push(self.dead_letter(record, error)),
            }
        }
        let texts: Vec<&str> = candidates.iter().map(|(_, t)| *t).collect();
        let decoded = self.values.decode(&texts)?;
        for (i, error) in decoded.refused {
            refused.push(self.dead_letter(candidates[i].0, error));
        }
        let accepted: Vec<&KafkaRecord> = decoded.accepted.iter().map(|&i| candidates[i].0).collect();
        let mut columns: Vec<ArrayRef> = decoded.batch.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter(
            accepted
                .iter()
                .map(|r| r.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned())),
        )));
        columns.push(Arc::new(StringArray::from(vec![self.topic.as_str(); accepted.len()])));
        columns.push(Arc::new(Int32Array::from_iter_values(
            accepted.iter().map(|r| r.partition),
        )));
        columns.push(Arc::new(Int64Array::from_iter_values(
            accepted.iter().map(|r| r.offset),
        )));
        columns.push(Arc::new(TimestampMillisecondArray::from_iter(
            accepted.iter().map(|r| r.timestamp_ms),
        )));
        refused.sort_by_key(|d| (d.source.clone(), d.position));
        Ok((RecordBatch::try_new(self.schema.clone(), columns)?, refused))
    }

    /// The record's value as text, or why it cannot become a row.
    fn check<'a>(&self, record: &'a KafkaRecord) -> std::result::Result<&'a str, String> {
        let payload = record
            .payload
            .as_deref()
            .ok_or_else(|| "record has no value (a tombstone?)".to_string())?;
        if payload.len() > self.max_record_bytes {
            return Err(format!(
                "record of {} bytes exceeds max_record_bytes ({}); payload truncated to {OVERSIZED_PAYLOAD_KEPT} bytes",
                payload.len(),
                self.max_record_bytes
            ));
        }
        std::str::from_utf8(payload).map_err(|e| format!("value is not UTF-8 text: {e}"))
    }

    fn dead_letter(&self, record: &KafkaRecord, error: String) -> DeadLetter {
        let payload = record.payload.as_deref().unwrap_or_default();
        let kept = if payload.len() > self.max_record_bytes {
            &payload[..payload.len().min(OVERSIZED_PAYLOAD_KEPT)]
        } else {
            payload
        };
        DeadLetter {
            source: format!("kafka:{}/{}", self.topic, record.partition),
            position: record.offset as u64,
            payload: String::from_utf8_lossy(kept).into_owned(),
            error,
            recorded_at_ms: crate::support::now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;

    fn record(offset: i64, payload: Option<&[u8]>) -> KafkaRecord {
        KafkaRecord {
            partition: 2,
            offset,
            key: Some(format!("k{offset}").into_bytes()),
            payload: payload.map(<[u8]>::to_vec),
            timestamp_ms: Some(1_700_000_000_000 + offset),
        }
    }

    #[test]
    fn good_records_become_rows_with_coordinates_and_bad_ones_dead_letters() {
        let declared = Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("year", DataType::Int64, true),
        ]);
        let schema = table_schema(&declared).unwrap();
        let decoder = RecordDecoder::new("papers", schema, 64);
        let big = format!("{{\"doc_id\": \"x\", \"pad\": \"{}\"}}", "a".repeat(100));
        let records = vec![
            record(10, Some(br#"{"doc_id": "a", "year": 2020}"#)),
            record(11, Some(b"{not json")),
            record(12, None),
            record(13, Some(br#"{"year": 2021}"#)),
            record(14, Some(big.as_bytes())),
            record(15, Some(&[0xff, 0xfe])),
            record(16, Some(br#"{"doc_id": "b"}"#)),
        ];
        let (batch, dead) = decoder.decode(&records).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let ids: Vec<&str> = batch.column(0).as_string::<i32>().iter().flatten().collect();
        assert_eq!(ids, vec!["a", "b"]);
        let offsets: Vec<i64> = batch.column(5).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(offsets, vec![10, 16]);
        assert_eq!(batch.column(2).as_string::<i32>().value(1), "k16");
        assert_eq!(batch.column(3).as_string::<i32>().value(0), "papers");
        let positions: Vec<u64> = dead.iter().map(|d| d.position).collect();
        assert_eq!(positions, vec![11, 12, 13, 14, 15]);
        assert!(dead.iter().all(|d| d.source == "kafka:papers/2"));
        assert!(dead[2].error.contains("doc_id"), "{}", dead[2].error);
        assert!(dead[3].error.contains("max_record_bytes"), "{}", dead[3].error);
        assert!(dead[4].error.contains("UTF-8"), "{}", dead[4].error);
        assert_eq!(dead[0].payload, "{not json");
    }

    #[test]
    fn declared_columns_may_not_shadow_coordinates() {
        let declared = Schema::new(vec![Field::new("kafka_offset", DataType::Int64, true)]);
        assert!(table_schema(&declared).unwrap_err().to_string().contains("reserved"));
    }
}
