#![allow(dead_code)]

//! Real Kafka-protocol brokers for the streaming tests, on free loopback ports:
//!
//! - [`Broker::mock`]: librdkafka's own mock cluster, run inside the test process (other
//!   processes — the `mkflow` binary — connect to it like to any broker). It serves fetches that
//!   start inside a producer batch, so restart tests use it with batching producers.
//! - [`Broker::start`]: `tansu` (Apache Kafka protocol, in-memory storage). tansu 0.6 returns
//!   nothing for a fetch that starts inside a producer batch, so it is used where that cannot
//!   happen (one record per batch, or reads from offset 0) — and where a broker that holds
//!   records it does not serve is wanted (stall detection). The binary comes from
//!   `$MKFLOW_TANSU`, else `<mkflow home>/tansu/bin/tansu`, else `PATH`; when none exists
//!   `scripts/install-tansu.sh` installs it into the mkflow home (once per machine, ~18 min on 2
//!   cores; `.ci/run` does it up front).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

static INSTALL: Mutex<()> = Mutex::new(());

/// The tansu binary, installing it when missing.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MKFLOW_TANSU") {
        return PathBuf::from(path);
    }
    let root = mkflow::assets::home_dir().join("tansu");
    let installed = root.join("bin/tansu");
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if installed.is_file() {
        return installed;
    }
    if let Ok(output) = Command::new("tansu").arg("--version").output()
        && output.status.success()
    {
        return PathBuf::from("tansu");
    }
    // The installer script takes the tansu lock and stages the build, so concurrent test
    // binaries (and `.ci/run`) never see a half-installed broker.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-tansu.sh");
    let status = Command::new("bash")
        .arg(&script)
        .env("MKFLOW_HOME", mkflow::assets::home_dir())
        .status()
        .expect("bash runs");
    assert!(status.success(), "{} failed", script.display());
    installed
}

/// What runs the broker.
enum Backend {
    /// A tansu process.
    Tansu(Child),
    /// librdkafka's mock cluster in this process.
    Mock(MockCluster<'static, DefaultProducerContext>),
}

/// A running broker, stopped on drop.
pub struct Broker {
    backend: Backend,
    /// `host:port` of its listener.
    pub servers: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Backend::Tansu(child) = &mut self.backend {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    /// Starts a broker with in-memory storage and waits until it accepts connections.
    pub fn start() -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {address}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            backend: Backend::Tansu(child),
            servers: format!("127.0.0.1:{port}"),
        }
    }

    /// Starts librdkafka's mock cluster (one broker) in this process.
    pub fn mock() -> Broker {
        let cluster = MockCluster::new(1).expect("librdkafka's mock cluster starts");
        Broker {
            servers: cluster.bootstrap_servers(),
            backend: Backend::Mock(cluster),
        }
    }

    /// Creates `topic` with `partitions` partitions.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        if let Backend::Mock(cluster) = &self.backend {
            cluster
                .create_topic(topic, partitions, 1)
                .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
            return;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .create()
            .unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for result in results {
            result.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }

    /// A producer that waits for every send.
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("linger.ms", "0")
            .create()
            .unwrap()
    }

    /// An ordinary batching producer (`linger.ms` 20): records sent together share a batch.
    pub fn batching_producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("linger.ms", "20")
            .create()
            .unwrap()
    }

    /// Sends every `(partition, key, value)` at once (batched by `producer`), then waits for
    /// all of them.
    pub async fn send_all(producer: &FutureProducer, topic: &str, records: &[(i32, String, Vec<u8>)]) {
        let sends = records.iter().map(|(partition, key, value)| {
            producer.send(
                FutureRecord::to(topic).partition(*partition).key(key).payload(value),
                Duration::from_secs(30),
            )
        });
        for result in futures::future::join_all(sends).await {
            result.unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        }
    }

    /// Makes the (mock) broker answer every fetch with a storage error until
    /// [`Broker::heal_fetches`]: it keeps the records and reports their high watermark, but
    /// serves none of them.
    pub fn fail_fetches(&self) {
        let Backend::Mock(cluster) = &self.backend else {
            panic!("only the mock cluster injects errors")
        };
        let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR; 1_000_000];
        cluster.request_errors(RDKafkaApiKey::Fetch, &errors);
    }

    /// Undoes [`Broker::fail_fetches`].
    pub fn heal_fetches(&self) {
        if let Backend::Mock(cluster) = &self.backend {
            cluster.clear_request_errors(RDKafkaApiKey::Fetch);
        }
    }

    /// Sends `value` (keyed by `key`) to `partition` of `topic`.
    pub async fn send(producer: &FutureProducer, topic: &str, partition: i32, key: &str, value: &[u8]) {
        producer
            .send(
                FutureRecord::to(topic).partition(partition).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    /// Offsets consumer group `group` committed for each of `partitions` of `topic`.
    pub fn group_offsets(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", group)
            .create()
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                other => panic!("partition {p}: no committed offset ({other:?})"),
            })
            .collect()
    }

    /// High watermark of each of `partitions` of `topic`.
    pub fn high_watermarks(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", "mkflow-tests")
            .create()
            .unwrap();
        (0..partitions)
            .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1)
            .collect()
    }
}
