//! Reading a topic in micro-batches: partitions are assigned explicitly (never rebalanced), each
//! starting where the index's last commit says, so a restart resumes exactly after what the
//! index holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::common::{DataFusionError, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::options::{KafkaOptions, StartFrom};

/// How long one wait for a record lasts before the reader checks for shutdown and linger.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Timeout of metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// One record as read from the topic.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Producer or broker timestamp (milliseconds since the epoch).
    pub timestamp_ms: Option<i64>,
}

/// Records read together, and where each partition resumes after them.
#[derive(Debug, Default)]
pub struct MicroBatch {
    /// The records, in arrival order.
    pub records: Vec<KafkaRecord>,
    /// Partition → offset after the last record read from it.
    pub next_offsets: BTreeMap<i32, i64>,
}

/// When a read stops.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records per batch.
    pub max_rows: usize,
    /// Longest wait for more records once the first one arrived.
    pub linger: Duration,
}

/// Client callbacks: reaching a partition's end is routine (it is how a reader knows it caught
/// up), so librdkafka's end-of-partition notices are logged at debug level, not as errors.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            log::debug!("librdkafka: {error}: {reason}");
        } else {
            log::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer of one topic's assigned partitions.
pub struct KafkaReader {
    consumer: StreamConsumer<ReaderContext>,
    options: KafkaOptions,
    partitions: Vec<i32>,
    /// Partitions read up to their end (reset by any new record).
    at_end: BTreeSet<i32>,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("topic", &self.options.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

fn kafka_error(what: &str, options: &KafkaOptions, e: KafkaError) -> DataFusionError {
    DataFusionError::Execution(format!(
        "kafka topic '{}' on {}: {what}: {e}",
        options.topic,
        options.servers()
    ))
}

impl KafkaReader {
    /// Connects, finds the topic's partitions (or checks the configured ones) and assigns them:
    /// a partition in `resume` starts at that offset, the others per the `start` option.
    pub fn open(options: &KafkaOptions, resume: &BTreeMap<i32, i64>) -> Result<Self> {
        let mut config = ClientConfig::new();
        for (key, value) in &options.client {
            config.set(key, value);
        }
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true");
        if !options.client.contains_key("queued.max.messages.kbytes") {
            // Bounds what librdkafka prefetches while a batch is being processed (backpressure).
            config.set("queued.max.messages.kbytes", "16384");
        }
        if !options.client.contains_key("fetch.wait.max.ms") {
            // librdkafka's 500 ms lets a broker that answers fetches only at the deadline add
            // half a second to every document's freshness.
            config.set("fetch.wait.max.ms", "100");
        }
        if !options.client.contains_key("client.id") {
            config.set("client.id", "mkflow");
        }
        if !options.client.contains_key("auto.offset.reset") {
            // A stored offset that retention has deleted, or a group without committed offsets,
            // starts at the oldest record rather than skipping to the newest.
            config.set("auto.offset.reset", "earliest");
        }
        let consumer: StreamConsumer<ReaderContext> = config
            .create_with_context(ReaderContext)
            .map_err(|e| kafka_error("cannot create consumer", options, e))?;
        let metadata = consumer
            .fetch_metadata(Some(&options.topic), METADATA_TIMEOUT)
            .map_err(|e| kafka_error("cannot fetch metadata (is the broker reachable?)", options, e))?;
        let available: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|t| t.name() == options.topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if available.is_empty() {
            return Err(DataFusionError::Execution(format!(
                "kafka topic '{}' does not exist on {} (hint: create it first, or check the LOCATION)",
                options.topic,
                options.servers()
            )));
        }
        let partitions = match &options.partitions {
            Some(wanted) => {
                if let Some(missing) = wanted.iter().find(|p| !available.contains(p)) {
                    return Err(DataFusionError::Plan(format!(
                        "kafka topic '{}' has no partition {missing} (it has {})",
                        options.topic,
                        available.len()
                    )));
                }
                wanted.clone()
            }
            None => {
                let mut all = available;
                all.sort_unstable();
                all
            }
        };
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            let offset = match resume.get(&partition) {
                Some(&next) => Offset::Offset(next),
                None => match options.start {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => Offset::End,
                    StartFrom::Committed => Offset::Stored,
                },
            };
            assignment
                .add_partition_offset(&options.topic, partition, offset)
                .map_err(|e| kafka_error("bad assignment", options, e))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| kafka_error("cannot assign partitions", options, e))?;
        Ok(KafkaReader {
            consumer,
            options: options.clone(),
            partitions,
            at_end: BTreeSet::new(),
        })
    }

    /// [`KafkaReader::open`] off the async executor (it waits for the broker's metadata).
    pub async fn connect(options: KafkaOptions, resume: BTreeMap<i32, i64>) -> Result<Self> {
        tokio::task::spawn_blocking(move || KafkaReader::open(&options, &resume))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
    }

    /// The assigned partitions.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// Whether every assigned partition has been read to its end (as of the last poll).
    pub fn caught_up(&self) -> bool {
        self.at_end.len() == self.partitions.len()
    }

    /// Reads the next micro-batch: returns when it holds `max_rows` records, when `linger` has
    /// passed since its first record, when `stop` is set, or — with `until_caught_up` — when
    /// every partition has been read to its end. May return an empty batch.
    pub async fn next_batch(
        &mut self,
        limits: BatchLimits,
        stop: &AtomicBool,
        until_caught_up: bool,
    ) -> Result<MicroBatch> {
        let mut batch = MicroBatch::default();
        let mut first_at: Option<Instant> = None;
        loop {
            if batch.records.len() >= limits.max_rows || stop.load(Ordering::Relaxed) {
                break;
            }
            if until_caught_up && self.caught_up() {
                break;
            }
            let wait = match first_at {
                Some(t) => match limits.linger.checked_sub(t.elapsed()) {
                    Some(left) if !left.is_zero() => left.min(POLL_SLICE),
                    _ => break,
                },
                None => POLL_SLICE,
            };
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => continue,
                Ok(Ok(message)) => {
                    let partition = message.partition();
                    self.at_end.remove(&partition);
                    batch.next_offsets.insert(partition, message.offset() + 1);
                    batch.records.push(KafkaRecord {
                        partition,
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        timestamp_ms: message.timestamp().to_millis(),
                    });
                    first_at.get_or_insert_with(Instant::now);
                }
                Ok(Err(KafkaError::PartitionEOF(partition))) => {
                    self.at_end.insert(partition);
                }
                Ok(Err(e)) => {
                    // librdkafka retries transient errors itself; report and keep reading.
                    log::warn!("kafka topic '{}': {e}", self.options.topic);
                }
            }
        }
        Ok(batch)
    }

    /// Records `next_offsets` as the consumer group's committed offsets (for lag monitoring;
    /// the index's own commit is what a restart resumes from). `wait` blocks until the broker
    /// acknowledged (used when a stream ends).
    pub fn commit_group_offsets(&self, next_offsets: &BTreeMap<i32, i64>, wait: bool) {
        if next_offsets.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (&partition, &offset) in next_offsets {
            if list
                .add_partition_offset(&self.options.topic, partition, Offset::Offset(offset))
                .is_err()
            {
                return;
            }
        }
        let mode = if wait { CommitMode::Sync } else { CommitMode::Async };
        if let Err(e) = self.consumer.commit(&list, mode) {
            log::warn!("kafka topic '{}': group offset commit failed: {e}", self.options.topic);
        }
    }

    /// Each assigned partition's high watermark (offset after its last record).
    pub fn high_watermarks(&self) -> Result<BTreeMap<i32, i64>> {
        self.partitions
            .iter()
            .map(|&p| {
                self.consumer
                    .fetch_watermarks(&self.options.topic, p, METADATA_TIMEOUT)
                    .map(|(_, high)| (p, high))
                    .map_err(|e| kafka_error("cannot fetch watermarks", &self.options, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::collections::HashMap;

    async fn produce(servers: &str, topic: &str, records: &[(i32, String)]) {
        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
        for (partition, value) in records {
            producer
                .send(
                    FutureRecord::<(), _>::to(topic).partition(*partition).payload(value),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
    }

    fn options(servers: &str, topic: &str, extra: &[(&str, &str)]) -> KafkaOptions {
        let mut map: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        map.insert("bootstrap.servers".into(), servers.into());
        KafkaOptions::parse(topic, &map).unwrap()
    }

    async fn drain(reader: &mut KafkaReader, limits: BatchLimits) -> Vec<MicroBatch> {
        let stop = AtomicBool::new(false);
        let mut batches = Vec::new();
        loop {
            let batch = reader.next_batch(limits, &stop, true).await.unwrap();
            if batch.records.is_empty() {
                assert!(reader.caught_up());
                return batches;
            }
            batches.push(batch);
        }
    }

    #[tokio::test]
    async fn reads_in_bounded_batches_and_resumes_from_offsets() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("docs", 2, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let first: Vec<(i32, String)> = (0..25).map(|i| (i % 2, format!("{{\"n\": {i}}}"))).collect();
        produce(&servers, "docs", &first).await;

        let limits = BatchLimits {
            max_rows: 10,
            linger: Duration::from_millis(50),
        };
        let options = options(&servers, "docs", &[]);
        let mut reader = KafkaReader::open(&options, &BTreeMap::new()).unwrap();
        assert_eq!(reader.partitions(), &[0, 1]);
        let batches = drain(&mut reader, limits).await;
        assert!(batches.iter().all(|b| b.records.len() <= 10));
        let read: usize = batches.iter().map(|b| b.records.len()).sum();
        assert_eq!(read, 25);
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for batch in &batches {
            next.extend(batch.next_offsets.iter().map(|(p, o)| (*p, *o)));
        }
        assert_eq!(next, BTreeMap::from([(0, 13), (1, 12)]));

        // A reader resuming from those offsets sees only records produced afterwards.
        produce(&servers, "docs", &[(1, "{\"n\": 25}".into())]).await;
        let mut resumed = KafkaReader::open(&options, &next).unwrap();
        let batches = drain(&mut resumed, limits).await;
        let records: Vec<&KafkaRecord> = batches.iter().flat_map(|b| &b.records).collect();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].partition, records[0].offset), (1, 12));
        assert_eq!(records[0].payload.as_deref(), Some(&b"{\"n\": 25}"[..]));

        // One shard reads only its partitions.
        let shard = options_with_partitions(&servers);
        let mut reader = KafkaReader::open(&shard, &BTreeMap::new()).unwrap();
        let batches = drain(&mut reader, limits).await;
        assert!(batches.iter().flat_map(|b| &b.records).all(|r| r.partition == 1));
        assert_eq!(batches.iter().map(|b| b.records.len()).sum::<usize>(), 13);
    }

    fn options_with_partitions(servers: &str) -> KafkaOptions {
        options(servers, "docs", &[("partitions", "1")])
    }

    #[tokio::test]
    async fn a_missing_topic_or_partition_is_named() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("docs", 1, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let err = KafkaReader::open(&options(&servers, "docs", &[("partitions", "0,4")]), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no partition 4"), "{err}");
    }
}
