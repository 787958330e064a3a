//! Continuous pipelines: an `INSERT INTO kb SELECT … FROM <kafka table>` runs as an unbounded
//! stream of micro-batches.
//!
//! Each micro-batch (bounded by the table's `max_batch_rows` and `linger_ms`) is decoded, run
//! through the statement's plan — the Kafka scan replaced by the batch's rows, every UDF as
//! written — and committed to the index together with the offsets where each partition
//! resumes. Only then is the next batch read, so a slow UDF slows consumption and memory stays
//! bounded by one batch plus librdkafka's prefetch queue. On restart the source resumes from
//! the index's offsets: a crash at any moment neither loses nor repeats a record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::LogicalPlan;

use super::control::{PipelineState, StreamControl};
use super::insert::{InsertScans, PieceInsert};
use crate::metrics::{self, PartitionLabels, PipelineLabels, StageLabels};
use crate::sources::kafka::{
    BatchLimits, KafkaReader, KafkaTable, KafkaTopic, MicroBatch, StallChange, position_key, position_prefix,
};

/// An `INSERT` into a knowledge index that reads a Kafka table.
#[derive(Debug)]
pub struct ContinuousInsert {
    insert: PieceInsert,
}

impl ContinuousInsert {
    /// Recognises an `INSERT INTO <knowledge index> … FROM <kafka table>` plan.
    pub fn find(plan: &LogicalPlan) -> Result<Option<Self>> {
        let Some(mut found) = InsertScans::find(plan, |provider| provider.is::<KafkaTable>())? else {
            return Ok(None);
        };
        let Some(source) = found.scans.pop() else {
            return Ok(None);
        };
        if !found.scans.is_empty() {
            return Err(DataFusionError::Plan(
                "a streaming INSERT reads one Kafka table (run one pipeline per topic)".into(),
            ));
        }
        let Some(target) = found.target else {
            return Err(DataFusionError::Plan(format!(
                "streaming from Kafka table '{}' needs a knowledge index (STORED AS KB) as the target, not '{}': \
                 its commits store the offsets that make ingestion exactly-once",
                source.0, found.table_name
            )));
        };
        Ok(Some(ContinuousInsert {
            insert: PieceInsert::new(found.plan, source, found.table_name, target),
        }))
    }

    fn kafka(&self) -> &KafkaTopic {
        self.insert
            .source()
            .downcast_ref::<KafkaTable>()
            .expect("checked by find()")
            .source()
    }

    /// Partition → offset where the index says consumption resumes.
    fn resume_offsets(&self) -> BTreeMap<i32, i64> {
        let prefix = position_prefix(&self.kafka().options().topic);
        self.insert
            .target()
            .source_offsets()
            .iter()
            .filter_map(|(key, offset)| Some((key.strip_prefix(prefix.as_str())?.parse::<i32>().ok()?, offset)))
            .collect()
    }

    /// Runs the stream until stopped (or caught up, per `control`); returns the rows committed.
    pub async fn run(&self, ctx: &SessionContext, pipeline: &str, control: &StreamControl) -> Result<u64> {
        let kafka = self.kafka();
        let mut reader = KafkaReader::connect(kafka.options().clone(), self.resume_offsets()).await?;
        let options = kafka.options();
        log::info!(
            "pipeline {pipeline}: streaming topic '{}' partitions {:?} into '{}'",
            options.topic,
            reader.partitions(),
            self.insert.target_name()
        );
        control.set_state(pipeline, PipelineState::Streaming);
        let gauges = PartitionGauges::new(pipeline, &options.topic);
        gauges.record_committed(&self.resume_offsets());
        for &partition in reader.partitions() {
            gauges.record_stalled(partition, false);
        }
        let metrics = PipelineMetrics::new(pipeline);
        let limits = BatchLimits {
            max_rows: options.max_batch_rows,
            linger: options.linger,
        };
        let mut committed_rows = 0u64;
        let mut last_lag_check: Option<Instant> = None;
        loop {
            let polled = Instant::now();
            let batch = reader
                .next_batch(limits, &control.stop, control.until_caught_up)
                .await?;
            metrics.stage("poll", polled.elapsed());
            if !batch.records.is_empty() {
                committed_rows += self.commit_batch(ctx, pipeline, &metrics, &batch, &reader).await?;
                gauges.record_committed(&batch.next_offsets);
                if last_lag_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_lag_check = Some(Instant::now());
                    match reader.high_watermarks().await {
                        Ok(high) => gauges.record_lag(&high, &self.resume_offsets()),
                        Err(e) => log::warn!("pipeline {pipeline}: {e}"),
                    }
                }
            }
            self.report_stalls(pipeline, control, &gauges, &mut reader)?;
            if control.stopping() || (control.until_caught_up && reader.settled()) {
                break;
            }
        }
        let committed = self.resume_offsets();
        reader.commit_group_offsets(&committed, true);
        if let Ok(high) = reader.high_watermarks().await {
            gauges.record_lag(&high, &committed);
        }
        Ok(committed_rows)
    }

    /// Decodes a micro-batch (refused records to the dead letters), runs it through the
    /// statement's plan and commits it with its offsets. Returns the rows written.
    async fn commit_batch(
        &self,
        ctx: &SessionContext,
        pipeline: &str,
        metrics: &PipelineMetrics,
        batch: &MicroBatch,
        reader: &KafkaReader,
    ) -> Result<u64> {
        let kafka = self.kafka();
        let topic = &kafka.options().topic;
        let started = Instant::now();
        let (rows, refused) = kafka.decoder().decode(&batch.records)?;
        metrics.decoded(batch.records.len(), refused.len());
        if !refused.is_empty() {
            log::warn!(
                "pipeline {pipeline}: {} bad records went to the dead_letters table",
                refused.len()
            );
            kafka.dead_letters().record(refused);
        }
        metrics.stage("decode", started.elapsed());
        let executing = Instant::now();
        let offsets = batch
            .next_offsets
            .iter()
            .map(|(&p, &o)| (position_key(topic, p), o))
            .collect();
        let written = self.insert.execute(ctx, rows, offsets).await?;
        metrics.stage("execute", executing.elapsed());
        metrics.committed(written, started.elapsed());
        reader.commit_group_offsets(&batch.next_offsets, false);
        Ok(written)
    }

    /// Logs stalls and recoveries, sets the stalled gauge and the pipeline's state; a batch
    /// run (`--until-caught-up`) fails once nothing but stalled partitions is left to read.
    fn report_stalls(
        &self,
        pipeline: &str,
        control: &StreamControl,
        gauges: &PartitionGauges,
        reader: &mut KafkaReader,
    ) -> Result<()> {
        let topic = &self.kafka().options().topic;
        let changes = reader.take_stall_changes();
        for change in &changes {
            match change {
                StallChange::Stalled(stall) => {
                    log::error!("pipeline {pipeline}: {}", stall.describe(topic));
                    gauges.record_stalled(stall.partition, true);
                }
                StallChange::Recovered { partition } => {
                    log::info!("pipeline {pipeline}: kafka topic '{topic}' partition {partition} delivers again");
                    gauges.record_stalled(*partition, false);
                }
            }
        }
        let stalled: Vec<String> = reader.stalled().map(|s| s.describe(topic)).collect();
        if control.until_caught_up && !stalled.is_empty() && reader.settled() {
            return Err(DataFusionError::Execution(format!(
                "pipeline {pipeline}: cannot catch up: {}",
                stalled.join("; ")
            )));
        }
        if !changes.is_empty() {
            let state = match stalled.is_empty() {
                true => PipelineState::Streaming,
                false => PipelineState::Stalled(stalled.join("; ")),
            };
            control.set_state(pipeline, state);
        }
        Ok(())
    }
}

/// The metrics of one pipeline's micro-batches.
struct PipelineMetrics {
    labels: PipelineLabels,
}

impl PipelineMetrics {
    fn new(pipeline: &str) -> Self {
        PipelineMetrics {
            labels: PipelineLabels {
                pipeline: pipeline.to_string(),
            },
        }
    }

    fn stage(&self, stage: &str, elapsed: Duration) {
        let labels = StageLabels {
            pipeline: self.labels.pipeline.clone(),
            stage: stage.to_string(),
        };
        metrics::global()
            .stage_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    fn decoded(&self, records: usize, refused: usize) {
        let metrics = metrics::global();
        metrics.records_in.get_or_create(&self.labels).inc_by(records as u64);
        metrics
            .records_failed
            .get_or_create(&self.labels)
            .inc_by(refused as u64);
    }

    fn committed(&self, rows: u64, elapsed: Duration) {
        let metrics = metrics::global();
        metrics
            .batch_seconds
            .get_or_create(&self.labels)
            .observe(elapsed.as_secs_f64());
        metrics.records_out.get_or_create(&self.labels).inc_by(rows);
        metrics.batches.get_or_create(&self.labels).inc();
    }
}

/// Per-partition gauges of one stream.
struct PartitionGauges {
    pipeline: String,
    topic: String,
}

impl PartitionGauges {
    fn new(pipeline: &str, topic: &str) -> Self {
        PartitionGauges {
            pipeline: pipeline.to_string(),
            topic: topic.to_string(),
        }
    }

    fn labels(&self, partition: i32) -> PartitionLabels {
        PartitionLabels {
            pipeline: self.pipeline.clone(),
            topic: self.topic.clone(),
            partition: partition.to_string(),
        }
    }

    fn record_committed(&self, next_offsets: &BTreeMap<i32, i64>) {
        for (&partition, &offset) in next_offsets {
            metrics::global()
                .committed_offset
                .get_or_create(&self.labels(partition))
                .set(offset);
        }
    }

    fn record_stalled(&self, partition: i32, stalled: bool) {
        metrics::global()
            .partition_stalled
            .get_or_create(&self.labels(partition))
            .set(i64::from(stalled));
    }

    fn record_lag(&self, high: &BTreeMap<i32, i64>, committed: &BTreeMap<i32, i64>) {
        for (&partition, &high) in high {
            let next = committed.get(&partition).copied().unwrap_or(0);
            metrics::global()
                .consumer_lag
                .get_or_create(&self.labels(partition))
                .set((high - next).max(0));
        }
    }
}
