//! `STORED AS KAFKA`: a topic as a table. A `SELECT` reads the topic from its start position
//! up to its end at query time; an `INSERT INTO kb SELECT … FROM topic` runs as a continuous
//! micro-batch stream (see [`crate::streaming`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::{CreateExternalTable, Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::consumer::{BatchLimits, KafkaReader};
use super::decode::{RecordDecoder, table_schema};
use super::options::KafkaOptions;
use crate::sources::DeadLetters;
use crate::sql::memory_scan;

/// The `STORED AS` name of Kafka topics.
pub const KAFKA_FORMAT: &str = "KAFKA";

/// Creates [`KafkaTable`]s reporting bad records to a dead-letter store.
#[derive(Debug)]
pub struct KafkaFactory {
    dead_letters: Arc<DeadLetters>,
}

impl KafkaFactory {
    /// A factory reporting to `dead_letters`.
    pub fn new(dead_letters: Arc<DeadLetters>) -> Self {
        KafkaFactory { dead_letters }
    }
}

#[async_trait]
impl TableProviderFactory for KafkaFactory {
    async fn create(&self, _state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let [location] = cmd.locations.as_slice() else {
            return plan_err!("STORED AS KAFKA takes one LOCATION (the topic, or kafka://host:port/topic)");
        };
        if cmd.schema.fields().is_empty() {
            return plan_err!(
                "STORED AS KAFKA needs the columns of the JSON values, e.g. (doc_id VARCHAR NOT NULL, body VARCHAR)"
            );
        }
        let options = KafkaOptions::parse(location, &cmd.options)?;
        let schema = table_schema(cmd.schema.as_arrow())?;
        Ok(Arc::new(KafkaTable {
            decoder: RecordDecoder::new(&options.topic, schema.clone(), options.max_record_bytes),
            options,
            schema,
            dead_letters: self.dead_letters.clone(),
        }))
    }
}

/// A Kafka topic of JSON values with declared columns.
#[derive(Debug)]
pub struct KafkaTable {
    options: KafkaOptions,
    schema: SchemaRef,
    decoder: RecordDecoder,
    dead_letters: Arc<DeadLetters>,
}

impl KafkaTable {
    /// The table's Kafka settings.
    pub fn options(&self) -> &KafkaOptions {
        &self.options
    }

    /// Turns records into rows and dead letters.
    pub fn decoder(&self) -> &RecordDecoder {
        &self.decoder
    }

    /// Where refused records go.
    pub fn dead_letters(&self) -> &Arc<DeadLetters> {
        &self.dead_letters
    }
}

#[async_trait]
impl TableProvider for KafkaTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut reader = KafkaReader::connect(self.options.clone(), BTreeMap::new()).await?;
        let limits = BatchLimits {
            max_rows: self.options.max_batch_rows,
            linger: self.options.linger,
        };
        let never = AtomicBool::new(false);
        let mut batches = Vec::new();
        let mut rows = 0;
        let read = async {
            while !reader.caught_up() && limit.is_none_or(|l| rows < l) {
                let batch = reader.next_batch(limits, &never, true).await?;
                let (decoded, refused) = self.decoder.decode(&batch.records)?;
                self.dead_letters.record(refused);
                rows += decoded.num_rows();
                batches.push(decoded);
            }
            Ok::<_, DataFusionError>(())
        };
        tokio::time::timeout(self.options.scan_timeout, read)
            .await
            .map_err(|_| {
                DataFusionError::Execution(format!(
                    "kafka topic '{}': not read to its end within scan_timeout_ms ({} ms)",
                    self.options.topic,
                    self.options.scan_timeout.as_millis()
                ))
            })??;
        memory_scan(batches, self.schema.clone(), projection, limit)
    }
}
