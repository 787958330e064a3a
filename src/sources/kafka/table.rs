//! `STORED AS KAFKA`: a topic as a table. A `SELECT` reads the topic from its start position
//! up to its end at query time; an `INSERT INTO kb SELECT … FROM topic` runs as a continuous
//! micro-batch stream (run by the `streaming` module, above this one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::CreateExternalTable;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

use super::consumer::{BatchLimits, KafkaReader};
use super::decode::{RecordDecoder, table_schema};
use super::options::KafkaOptions;
use crate::sources::DeadLetters;
use crate::support::batch_table::{BatchSource, BatchTable};

/// An ad-hoc scan is never stopped from outside: it ends when the topic is read to its end.
static NEVER_STOP: AtomicBool = AtomicBool::new(false);

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
        Ok(Arc::new(KafkaTable::new(KafkaTopic {
            decoder: RecordDecoder::new(&options.topic, schema.clone(), options.max_record_bytes),
            options,
            schema,
            dead_letters: self.dead_letters.clone(),
        })))
    }
}

/// A Kafka topic as a table.
pub type KafkaTable = BatchTable<KafkaTopic>;

/// A Kafka topic of JSON values with declared columns.
#[derive(Debug)]
pub struct KafkaTopic {
    options: KafkaOptions,
    schema: SchemaRef,
    decoder: RecordDecoder,
    dead_letters: Arc<DeadLetters>,
}

impl KafkaTopic {
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

/// A scan in progress: the topic and, once connected, its reader.
struct Scan {
    topic: Arc<KafkaTopic>,
    reader: Option<KafkaReader>,
}

impl Scan {
    /// The next decoded batch, or `None` once every partition is read to its end. Refused
    /// records go to the dead letters.
    async fn next(&mut self) -> Result<Option<RecordBatch>> {
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => self
                .reader
                .insert(KafkaReader::connect(self.topic.options.clone(), BTreeMap::new()).await?),
        };
        if reader.caught_up() {
            return Ok(None);
        }
        let limits = BatchLimits {
            max_rows: self.topic.options.max_batch_rows,
            linger: self.topic.options.linger,
        };
        let batch = reader.next_batch(limits, &NEVER_STOP, true).await?;
        if let Some(stall) = reader.stalled().next() {
            return Err(DataFusionError::Execution(stall.describe(&self.topic.options.topic)));
        }
        let (decoded, refused) = self.topic.decoder.decode(&batch.records)?;
        self.topic.dead_letters.record(refused);
        Ok(Some(decoded))
    }
}

/// A `SELECT` reads the topic from its start to its end as of the scan, batch by batch, within
/// `scan_timeout_ms`; a satisfied `LIMIT` stops reading.
impl BatchSource for KafkaTopic {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn stream(self: Arc<Self>, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let timeout = self.options.scan_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let schema = self.schema.clone();
        let scan = Scan {
            topic: self,
            reader: None,
        };
        let batches = futures::stream::try_unfold(scan, move |mut scan| async move {
            match tokio::time::timeout_at(deadline, scan.next()).await {
                Ok(next) => Ok(next?.map(|batch| (batch, scan))),
                Err(_) => Err(DataFusionError::Execution(format!(
                    "kafka topic '{}': not read to its end within scan_timeout_ms ({} ms)",
                    scan.topic.options.topic,
                    timeout.as_millis()
                ))),
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }
}
