//! Reading a topic in micro-batches: partitions are assigned explicitly (never rebalanced), each
//! starting where the index's last commit says, so a restart resumes exactly after what the
//! index holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
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
use super::stall::{Stall, StallChange, StallWatch};

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
    consumer: Arc<StreamConsumer<ReaderContext>>,
    options: KafkaOptions,
    partitions: Vec<i32>,
    /// Partitions read up to their end (reset by any new record).
    at_end: BTreeSet<i32>,
    /// Partitions that hold records past the position but deliver none.
    stalls: StallWatch,
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
        let positions = start_positions(&consumer, options, &partitions, resume);
        Ok(KafkaReader {
            consumer: Arc::new(consumer),
            options: options.clone(),
            partitions,
            at_end: BTreeSet::new(),
            stalls: StallWatch::new(options.stall_timeout, positions),
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

    /// Whether every assigned partition has been read to its end or is stalled: nothing more
    /// will come without a change at the broker.
    pub fn settled(&self) -> bool {
        self.partitions
            .iter()
            .all(|p| self.at_end.contains(p) || self.stalls.is_stalled(*p))
    }

    /// The partitions stalled now (see [`StallWatch`]).
    pub fn stalled(&self) -> impl Iterator<Item = &Stall> {
        self.stalls.stalled()
    }

    /// Partitions found stalled, or delivering again, since the last call.
    pub fn take_stall_changes(&mut self) -> Vec<StallChange> {
        self.stalls.take_changes()
    }

    /// Reads the next micro-batch: returns when it holds `max_rows` records, when `linger` has
    /// passed since its first record, when `stop` is set, when a partition is newly found
    /// stalled or delivers again, or — with `until_caught_up` — when every partition has been read to its end (or
    /// is stalled). May return an empty batch.
    pub async fn next_batch(
        &mut self,
        limits: BatchLimits,
        stop: &AtomicBool,
        until_caught_up: bool,
    ) -> Result<MicroBatch> {
        self.stalls.resume(Instant::now());
        let batch = self.poll_batch(limits, stop, until_caught_up).await;
        self.stalls.pause(Instant::now());
        Ok(batch)
    }

    async fn poll_batch(&mut self, limits: BatchLimits, stop: &AtomicBool, until_caught_up: bool) -> MicroBatch {
        let mut batch = MicroBatch::default();
        let mut first_at: Option<Instant> = None;
        loop {
            if batch.records.len() >= limits.max_rows || stop.load(Ordering::Relaxed) {
                break;
            }
            if until_caught_up && self.settled() {
                break;
            }
            if self.stalls.due(Instant::now()) {
                self.check_stalls().await;
                if self.stalls.has_changes() {
                    break;
                }
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
                    self.stalls.delivered(partition, message.offset() + 1);
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
                    self.stalls.reached_end(partition);
                }
                Ok(Err(e)) => {
                    // librdkafka retries transient errors itself; report and keep reading.
                    log::warn!("kafka topic '{}': {e}", self.options.topic);
                }
            }
        }
        batch
    }

    /// Compares positions with high watermarks (an unreachable broker skips the check: its
    /// errors are logged by librdkafka, and a stall needs a known high watermark).
    async fn check_stalls(&mut self) {
        match self.high_watermarks().await {
            Ok(high) => self.stalls.check(&high, Instant::now()),
            Err(e) => log::warn!("{e}"),
        }
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

    /// Each assigned partition's high watermark (offset after its last record), asked of the
    /// broker off the async executor.
    pub async fn high_watermarks(&self) -> Result<BTreeMap<i32, i64>> {
        let consumer = self.consumer.clone();
        let options = self.options.clone();
        let partitions = self.partitions.clone();
        tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|&p| {
                    consumer
                        .fetch_watermarks(&options.topic, p, METADATA_TIMEOUT)
                        .map(|(_, high)| (p, high))
                        .map_err(|e| kafka_error("cannot fetch watermarks", &options, e))
                })
                .collect()
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
    }
}

/// The offset each partition starts at, for stall detection: the resume offset, else what the
/// `start` option resolves to now (`None` where it is the partition's end, or unknown).
fn start_positions(
    consumer: &StreamConsumer<ReaderContext>,
    options: &KafkaOptions,
    partitions: &[i32],
    resume: &BTreeMap<i32, i64>,
) -> Vec<(i32, Option<i64>)> {
    let low = |p: i32| {
        consumer
            .fetch_watermarks(&options.topic, p, METADATA_TIMEOUT)
            .ok()
            .map(|(low, _)| low)
    };
    let resets_to_earliest = options
        .client
        .get("auto.offset.reset")
        .is_none_or(|r| matches!(r.as_str(), "earliest" | "smallest" | "beginning"));
    let committed = || {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&options.topic, p);
        }
        consumer.committed_offsets(list, METADATA_TIMEOUT).ok()
    };
    let committed = (options.start == StartFrom::Committed).then(committed).flatten();
    partitions
        .iter()
        .map(|&p| {
            let position = match resume.get(&p) {
                Some(&next) => Some(next),
                None => match options.start {
                    StartFrom::Earliest => low(p),
                    StartFrom::Latest => None,
                    StartFrom::Committed => match committed
                        .as_ref()
                        .and_then(|c| c.find_partition(&options.topic, p))
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) => Some(o),
                        _ if resets_to_earliest => low(p),
                        _ => None,
                    },
                },
            };
            (p, position)
        })
        .collect()
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
    async fn a_partition_that_serves_nothing_is_found_stalled_from_the_committed_offset() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("docs", 2, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let records: Vec<(i32, String)> = (0..12).map(|i| (i % 2, format!("{{\"n\": {i}}}"))).collect();
        produce(&servers, "docs", &records).await;
        let group: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", "g")
            .create()
            .unwrap();
        let mut committed = TopicPartitionList::new();
        committed.add_partition_offset("docs", 1, Offset::Offset(2)).unwrap();
        group.commit(&committed, CommitMode::Sync).unwrap();
        // The broker keeps the records but answers every fetch with an error.
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR; 100_000],
        );
        let options = options(
            &servers,
            "docs",
            &[("start", "committed"), ("group.id", "g"), ("stall_timeout_ms", "300")],
        );
        let mut reader = KafkaReader::open(&options, &BTreeMap::new()).unwrap();
        let limits = BatchLimits {
            max_rows: 10,
            linger: Duration::from_millis(50),
        };
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        while !reader.settled() {
            assert!(started.elapsed() < Duration::from_secs(20), "no stall found");
            let batch = reader.next_batch(limits, &stop, true).await.unwrap();
            assert!(batch.records.is_empty());
        }
        let stalls: Vec<(i32, i64, i64)> = reader
            .stalled()
            .map(|s| (s.partition, s.position, s.high_watermark))
            .collect();
        // Partition 0 has no committed offset: it starts at the earliest record.
        assert_eq!(stalls, vec![(0, 0, 6), (1, 2, 6)]);
        assert_eq!(reader.take_stall_changes().len(), 2);
        // The broker recovers: the reader delivers what was held and clears the stalls.
        cluster.clear_request_errors(RDKafkaApiKey::Fetch);
        let mut read = 0;
        while read < 10 || reader.stalled().count() > 0 {
            assert!(started.elapsed() < Duration::from_secs(40), "no recovery ({read} read)");
            read += reader.next_batch(limits, &stop, false).await.unwrap().records.len();
        }
        assert_eq!(read, 10);
        assert_eq!(reader.take_stall_changes().len(), 2);
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
