//! Prometheus metrics (`GET /metrics` of `mkflow serve`), following Prometheus conventions: the
//! `mkflow_` prefix, base units (seconds, bytes), `_total` counters, histograms for latencies.
//!
//! Instrumented code records into the process-wide [`global`] metrics; values that other parts
//! already count (embedding and generation counters, index sizes) are copied in at scrape time by
//! [`Metrics::render`] from a [`ScrapeSources`].

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::render`]'s output.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels naming a pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    /// The pipeline (its file name without extension, or its name in the server config).
    pub pipeline: String,
}

/// Labels naming a pipeline stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// The pipeline.
    pub pipeline: String,
    /// `poll` (waiting for records), `decode` (JSON to rows), `execute` (UDFs and commit).
    pub stage: String,
}

/// Labels naming a topic partition consumed by a pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The pipeline.
    pub pipeline: String,
    /// The Kafka topic.
    pub topic: String,
    /// The partition number.
    pub partition: String,
}

/// Labels naming a knowledge index.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IndexLabels {
    /// The index's table name.
    pub index: String,
}

/// Labels naming a UDF.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UdfLabels {
    /// The function name (`embed`, `mk_metadata`, …).
    pub udf: String,
}

/// Labels naming an embedding model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model name.
    pub model: String,
}

/// Labels naming a generation backend and a token kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GeneratorLabels {
    /// The backend (`embedded`, `openai:<model>`).
    pub generator: String,
}

/// Labels naming a generation backend and a token kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// The backend.
    pub generator: String,
    /// `prompt` or `completion`.
    pub kind: String,
}

/// Labels of a query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// The search function it calls (`vector_search`, `qa_search`, `mk_search`) or the kind of
    /// statement (`select`, `insert`, `ddl`, `other`).
    pub function: String,
}

/// Labels of a finished query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryOutcomeLabels {
    /// See [`QueryLabels::function`].
    pub function: String,
    /// `ok`, `error` or `timeout`.
    pub outcome: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn latency_family<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Embedding counters of one model at scrape time.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingTotals {
    /// The model.
    pub model: String,
    /// Texts embedded by the model (cache hits excluded).
    pub documents: u64,
    /// Tokens fed to the model.
    pub tokens: u64,
    /// Seconds spent in model calls.
    pub seconds: f64,
}

/// Generation counters of one backend at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GenerationTotals {
    /// The backend.
    pub generator: String,
    /// Its counters.
    pub counts: mkflow_udfs::mk::GenerationCounts,
}

/// Size of one knowledge index at scrape time.
#[derive(Debug, Clone, Default)]
pub struct IndexSize {
    /// The index's table name.
    pub index: String,
    /// Live rows.
    pub rows: u64,
    /// Vectors the ANN graph has room for.
    pub capacity: u64,
    /// Bytes the ANN graph uses.
    pub memory_bytes: u64,
}

/// What a scrape reads from the engine.
pub trait ScrapeSources {
    /// Embedding counters per loaded model.
    fn embedding_totals(&self) -> Vec<EmbeddingTotals>;
    /// Generation counters per backend in use.
    fn generation_totals(&self) -> Vec<GenerationTotals>;
    /// Sizes of the registered indexes.
    fn index_sizes(&self) -> Vec<IndexSize>;
}

/// Every metric mkflow exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Records read from sources, per pipeline.
    pub records_in: Family<PipelineLabels, Counter>,
    /// Rows committed to the index, per pipeline.
    pub records_out: Family<PipelineLabels, Counter>,
    /// Records refused (dead letters), per pipeline.
    pub records_failed: Family<PipelineLabels, Counter>,
    /// Micro-batches committed, per pipeline.
    pub batches: Family<PipelineLabels, Counter>,
    /// Time per micro-batch from decoding to commit.
    pub batch_seconds: Histograms<PipelineLabels>,
    /// Time per stage of a micro-batch.
    pub stage_seconds: Histograms<StageLabels>,
    /// Consumer lag (high watermark − next offset) per partition.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    /// Last offset committed to the index per partition (the next offset to read).
    pub committed_offset: Family<PartitionLabels, Gauge>,
    /// 1 while a partition holds records past the position but delivers none.
    pub partition_stalled: Family<PartitionLabels, Gauge>,
    /// Time per UDF invocation (one batch of rows).
    pub udf_seconds: Histograms<UdfLabels>,
    /// Rows processed per UDF.
    pub udf_rows: Family<UdfLabels, Counter>,
    embedding_documents: Family<ModelLabels, Counter>,
    embedding_tokens: Family<ModelLabels, Counter>,
    embedding_seconds: Family<ModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    generation_calls: Family<GeneratorLabels, Counter>,
    generation_requests: Family<GeneratorLabels, Counter>,
    generation_errors: Family<GeneratorLabels, Counter>,
    generation_retries: Family<GeneratorLabels, Counter>,
    generation_cache_hits: Family<GeneratorLabels, Counter>,
    generation_tokens: Family<TokenLabels, Counter>,
    index_rows: Family<IndexLabels, Gauge>,
    index_capacity: Family<IndexLabels, Gauge>,
    index_memory: Family<IndexLabels, Gauge>,
    /// Time per index commit.
    pub commit_seconds: Histograms<IndexLabels>,
    /// Queries answered, by function and outcome.
    pub queries: Family<QueryOutcomeLabels, Counter>,
    /// Query latency by function.
    pub query_seconds: Histograms<QueryLabels>,
    /// Flight SQL connections holding a session.
    pub flight_sessions: Gauge,
    /// Flight SQL prepared statements open.
    pub flight_prepared_statements: Gauge,
    /// Serialises scrapes (counters copied in are deltas against the last scrape).
    scrape: Mutex<()>,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("mkflow");
        let m = Metrics {
            registry: Registry::default(),
            records_in: Family::default(),
            records_out: Family::default(),
            records_failed: Family::default(),
            batches: Family::default(),
            batch_seconds: latency_family(),
            stage_seconds: latency_family(),
            consumer_lag: Family::default(),
            committed_offset: Family::default(),
            partition_stalled: Family::default(),
            udf_seconds: latency_family(),
            udf_rows: Family::default(),
            embedding_documents: Family::default(),
            embedding_tokens: Family::default(),
            embedding_seconds: Family::default(),
            generation_calls: Family::default(),
            generation_requests: Family::default(),
            generation_errors: Family::default(),
            generation_retries: Family::default(),
            generation_cache_hits: Family::default(),
            generation_tokens: Family::default(),
            index_rows: Family::default(),
            index_capacity: Family::default(),
            index_memory: Family::default(),
            commit_seconds: latency_family(),
            queries: Family::default(),
            query_seconds: latency_family(),
            flight_sessions: Gauge::default(),
            flight_prepared_statements: Gauge::default(),
            scrape: Mutex::new(()),
        };
        let r = &mut registry;
        r.register("pipeline_records_in", "Records read from sources", m.records_in.clone());
        r.register(
            "pipeline_records_out",
            "Rows committed to knowledge indexes",
            m.records_out.clone(),
        );
        r.register(
            "pipeline_records_failed",
            "Records refused into the dead_letters table",
            m.records_failed.clone(),
        );
        r.register("pipeline_batches", "Micro-batches committed", m.batches.clone());
        r.register_with_unit(
            "pipeline_batch_duration",
            "Time per micro-batch from decoding to commit",
            Unit::Seconds,
            m.batch_seconds.clone(),
        );
        r.register_with_unit(
            "pipeline_stage_duration",
            "Time per micro-batch stage (poll, decode, execute)",
            Unit::Seconds,
            m.stage_seconds.clone(),
        );
        r.register(
            "kafka_consumer_lag",
            "Records in the partition not yet committed to the index",
            m.consumer_lag.clone(),
        );
        r.register(
            "kafka_committed_offset",
            "Next offset to read, as committed with the index",
            m.committed_offset.clone(),
        );
        r.register(
            "kafka_partition_stalled",
            "1 while the partition holds records past the reader's position but delivers none for stall_timeout_ms",
            m.partition_stalled.clone(),
        );
        r.register_with_unit(
            "udf_duration",
            "Time per UDF invocation (one batch)",
            Unit::Seconds,
            m.udf_seconds.clone(),
        );
        r.register("udf_rows", "Rows processed by UDFs", m.udf_rows.clone());
        r.register(
            "embedding_documents",
            "Texts embedded by the model (cache hits excluded)",
            m.embedding_documents.clone(),
        );
        r.register(
            "embedding_tokens",
            "Tokens fed to embedding models",
            m.embedding_tokens.clone(),
        );
        r.register_with_unit(
            "embedding_model",
            "Time spent in embedding model calls",
            Unit::Seconds,
            m.embedding_seconds.clone(),
        );
        r.register(
            "generation_calls",
            "Generation calls (documents, summaries, rewrites)",
            m.generation_calls.clone(),
        );
        r.register(
            "generation_requests",
            "LLM requests sent",
            m.generation_requests.clone(),
        );
        r.register(
            "generation_errors",
            "Generation calls that failed",
            m.generation_errors.clone(),
        );
        r.register(
            "generation_retries",
            "LLM requests retried",
            m.generation_retries.clone(),
        );
        r.register(
            "generation_cache_hits",
            "Answers served from the generation cache",
            m.generation_cache_hits.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens reported by LLM backends",
            m.generation_tokens.clone(),
        );
        r.register("index_rows", "Live rows per knowledge index", m.index_rows.clone());
        r.register(
            "index_capacity",
            "Vectors the ANN graph has room for",
            m.index_capacity.clone(),
        );
        r.register_with_unit(
            "index_memory",
            "Memory used by the ANN graph",
            Unit::Bytes,
            m.index_memory.clone(),
        );
        r.register_with_unit(
            "index_commit_duration",
            "Time per index commit",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register(
            "queries",
            "Queries answered, by function and outcome",
            m.queries.clone(),
        );
        r.register_with_unit(
            "query_duration",
            "Query latency by function",
            Unit::Seconds,
            m.query_seconds.clone(),
        );
        r.register(
            "flight_sessions",
            "Flight SQL connections holding a session",
            m.flight_sessions.clone(),
        );
        r.register(
            "flight_prepared_statements",
            "Flight SQL prepared statements open (closed by the client, or with its connection)",
            m.flight_prepared_statements.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records a commit of the index in `dir` (labelled by the directory's name).
    pub fn observe_commit(&self, index: &str, elapsed: Duration) {
        self.commit_seconds
            .get_or_create(&IndexLabels { index: index.into() })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a finished query.
    pub fn observe_query(&self, function: &str, outcome: &str, elapsed: Duration) {
        self.queries
            .get_or_create(&QueryOutcomeLabels {
                function: function.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.query_seconds
            .get_or_create(&QueryLabels {
                function: function.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The metrics in the Prometheus text format, after copying in `sources`' counters.
    pub fn render(&self, sources: &dyn ScrapeSources) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for totals in sources.embedding_totals() {
            let labels = ModelLabels { model: totals.model };
            raise(&self.embedding_documents.get_or_create(&labels), totals.documents);
            raise(&self.embedding_tokens.get_or_create(&labels), totals.tokens);
            let seconds = self.embedding_seconds.get_or_create(&labels);
            let delta = totals.seconds - seconds.get();
            if delta > 0.0 {
                seconds.inc_by(delta);
            }
        }
        for totals in sources.generation_totals() {
            let labels = GeneratorLabels {
                generator: totals.generator.clone(),
            };
            let c = totals.counts;
            raise(&self.generation_calls.get_or_create(&labels), c.calls);
            raise(&self.generation_requests.get_or_create(&labels), c.requests);
            raise(&self.generation_errors.get_or_create(&labels), c.errors);
            raise(&self.generation_retries.get_or_create(&labels), c.retries);
            raise(&self.generation_cache_hits.get_or_create(&labels), c.cache_hits);
            for (kind, value) in [("prompt", c.prompt_tokens), ("completion", c.completion_tokens)] {
                let labels = TokenLabels {
                    generator: totals.generator.clone(),
                    kind: kind.into(),
                };
                raise(&self.generation_tokens.get_or_create(&labels), value);
            }
        }
        for size in sources.index_sizes() {
            let labels = IndexLabels { index: size.index };
            self.index_rows.get_or_create(&labels).set(size.rows as i64);
            self.index_capacity.get_or_create(&labels).set(size.capacity as i64);
            self.index_memory.get_or_create(&labels).set(size.memory_bytes as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Raises a counter to `total` (counters copied from elsewhere only grow).
fn raise(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

/// Records UDF latencies into the global metrics (installed as the UDF crate's observer).
#[derive(Debug)]
pub struct UdfMetrics;

impl mkflow_udfs::observe::UdfObserver for UdfMetrics {
    fn observe(&self, udf: &str, rows: usize, elapsed: Duration) {
        let labels = UdfLabels { udf: udf.into() };
        let metrics = global();
        metrics
            .udf_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        metrics.udf_rows.get_or_create(&labels).inc_by(rows as u64);
    }
}

/// Installs [`UdfMetrics`] (once per process).
pub fn install_udf_observer() {
    mkflow_udfs::observe::set_observer(Arc::new(UdfMetrics));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoSources;

    impl ScrapeSources for NoSources {
        fn embedding_totals(&self) -> Vec<EmbeddingTotals> {
            vec![EmbeddingTotals {
                model: "m".into(),
                documents: 5,
                tokens: 70,
                seconds: 0.25,
            }]
        }
        fn generation_totals(&self) -> Vec<GenerationTotals> {
            vec![GenerationTotals {
                generator: "embedded".into(),
                counts: Default::default(),
            }]
        }
        fn index_sizes(&self) -> Vec<IndexSize> {
            vec![IndexSize {
                index: "kb".into(),
                rows: 3,
                capacity: 64,
                memory_bytes: 1024,
            }]
        }
    }

    #[test]
    fn copied_counters_only_grow_and_gauges_follow() {
        let metrics = Metrics::new();
        let text = metrics.render(&NoSources);
        assert!(
            text.contains("mkflow_embedding_documents_total{model=\"m\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("mkflow_embedding_model_seconds_total{model=\"m\"} 0.25"),
            "{text}"
        );
        assert!(text.contains("mkflow_index_rows{index=\"kb\"} 3"), "{text}");
        // A second scrape with the same totals adds nothing.
        let again = metrics.render(&NoSources);
        assert!(
            again.contains("mkflow_embedding_tokens_total{model=\"m\"} 70"),
            "{again}"
        );
        metrics.observe_query("vector_search", "ok", Duration::from_millis(3));
        let text = metrics.render(&NoSources);
        assert!(text.contains("mkflow_queries_total{function=\"vector_search\",outcome=\"ok\"} 1"));
        assert!(text.contains("mkflow_query_duration_seconds_bucket{function=\"vector_search\",le=\"0.004\"} 1"));
    }

    /// Every metric the shipped Grafana dashboard queries exists.
    #[test]
    fn the_grafana_dashboard_uses_exported_metrics() {
        let dashboard = include_str!("../deploy/grafana/mkflow-dashboard.json");
        let metrics = Metrics::new();
        // Families appear in the output once they have a labelled series.
        let pipeline = PipelineLabels { pipeline: "p".into() };
        for family in [
            &metrics.records_in,
            &metrics.records_out,
            &metrics.records_failed,
            &metrics.batches,
        ] {
            family.get_or_create(&pipeline).inc();
        }
        metrics.batch_seconds.get_or_create(&pipeline).observe(0.1);
        let stage = StageLabels {
            pipeline: "p".into(),
            stage: "poll".into(),
        };
        metrics.stage_seconds.get_or_create(&stage).observe(0.1);
        let partition = PartitionLabels {
            pipeline: "p".into(),
            topic: "t".into(),
            partition: "0".into(),
        };
        metrics.consumer_lag.get_or_create(&partition).set(1);
        metrics.committed_offset.get_or_create(&partition).set(1);
        metrics.partition_stalled.get_or_create(&partition).set(1);
        let udf = UdfLabels { udf: "embed".into() };
        metrics.udf_seconds.get_or_create(&udf).observe(0.1);
        metrics.udf_rows.get_or_create(&udf).inc();
        metrics.observe_commit("kb", Duration::from_millis(5));
        metrics.observe_query("select", "ok", Duration::from_millis(5));
        let text = metrics.render(&NoSources);
        let mut names: Vec<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("mkflow_"))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() > 10);
        for name in names {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "dashboard queries {name}, not exported"
            );
        }
    }
}
