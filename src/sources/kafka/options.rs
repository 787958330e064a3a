//! Options of `CREATE EXTERNAL TABLE … STORED AS KAFKA`.

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};

/// Where a partition without a stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record still in the topic.
    Earliest,
    /// Only records produced after the consumer starts.
    Latest,
    /// The consumer group's committed offset (earliest when there is none).
    Committed,
}

/// mkflow's own options (keys without a dot); every key with a dot goes to librdkafka.
pub const KNOWN_OPTIONS: [&str; 7] = [
    "start",
    "partitions",
    "max_batch_rows",
    "linger_ms",
    "max_record_bytes",
    "scan_timeout_ms",
    "stall_timeout_ms",
];

/// A Kafka table's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaOptions {
    /// The topic.
    pub topic: String,
    /// librdkafka properties (`bootstrap.servers`, `group.id`, `security.protocol`, …).
    pub client: BTreeMap<String, String>,
    /// Start position of partitions the index holds no offset for.
    pub start: StartFrom,
    /// Partitions to read (all when `None`): one shard of a scaled-out deployment.
    pub partitions: Option<Vec<i32>>,
    /// Largest micro-batch.
    pub max_batch_rows: usize,
    /// Longest wait for a micro-batch to fill once its first record arrived.
    pub linger: Duration,
    /// Records larger than this go to the dead-letter table.
    pub max_record_bytes: usize,
    /// How long a `SELECT` over the topic waits for the broker before giving up.
    pub scan_timeout: Duration,
    /// How long a partition may hold records past the reader's position without delivering
    /// one before it is reported stalled.
    pub stall_timeout: Duration,
}

/// Default group id (consumer-group offsets are committed for lag monitoring only).
pub const DEFAULT_GROUP_ID: &str = "mkflow";

impl KafkaOptions {
    /// Parses `LOCATION` (a topic name, or `kafka://host:port[,host:port]/topic`) and `OPTIONS`
    /// (DataFusion may prefix dot-less keys with `format.`).
    pub fn parse(location: &str, options: &std::collections::HashMap<String, String>) -> Result<Self> {
        let plan_error = |m: String| DataFusionError::Plan(m);
        let mut client = BTreeMap::new();
        let topic = match location.strip_prefix("kafka://") {
            Some(rest) => {
                let (servers, topic) = rest
                    .split_once('/')
                    .ok_or_else(|| plan_error(format!("LOCATION '{location}': expected kafka://host:port/topic")))?;
                client.insert("bootstrap.servers".to_string(), servers.to_string());
                topic.to_string()
            }
            None => location.to_string(),
        };
        if topic.is_empty() || topic.contains('/') {
            return Err(plan_error(format!(
                "LOCATION '{location}' names no topic (give the topic, or kafka://host:port/topic)"
            )));
        }
        let mut parsed = KafkaOptions {
            topic,
            client,
            start: StartFrom::Earliest,
            partitions: None,
            max_batch_rows: 1000,
            linger: Duration::from_millis(200),
            max_record_bytes: 1 << 20,
            scan_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
        };
        for (key, value) in options {
            let bare = key.strip_prefix("format.").unwrap_or(key);
            if bare.contains('.') {
                parsed.client.insert(bare.to_string(), value.clone());
                continue;
            }
            let number = |what: &str| -> Result<u64> {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| plan_error(format!("option {what}: '{value}' is not a positive integer")))
            };
            match bare {
                "start" => {
                    parsed.start = match value.to_ascii_lowercase().as_str() {
                        "earliest" => StartFrom::Earliest,
                        "latest" => StartFrom::Latest,
                        "committed" => StartFrom::Committed,
                        other => {
                            return Err(plan_error(format!(
                                "option start: '{other}' (expected earliest, latest or committed)"
                            )));
                        }
                    }
                }
                "partitions" => {
                    let list = value
                        .split(',')
                        .map(|p| p.trim().parse::<i32>().ok().filter(|p| *p >= 0))
                        .collect::<Option<Vec<_>>>()
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| {
                            plan_error(format!("option partitions: '{value}' is not a list like '0,1,2'"))
                        })?;
                    parsed.partitions = Some(list);
                }
                "max_batch_rows" => parsed.max_batch_rows = number(bare)? as usize,
                "linger_ms" => parsed.linger = Duration::from_millis(number(bare)?),
                "max_record_bytes" => parsed.max_record_bytes = number(bare)? as usize,
                "scan_timeout_ms" => parsed.scan_timeout = Duration::from_millis(number(bare)?),
                "stall_timeout_ms" => parsed.stall_timeout = Duration::from_millis(number(bare)?),
                other => {
                    return Err(plan_error(format!(
                        "unknown option '{other}' for STORED AS KAFKA (mkflow options: {}; librdkafka properties contain a dot, e.g. 'bootstrap.servers')",
                        KNOWN_OPTIONS.join(", ")
                    )));
                }
            }
        }
        if !parsed.client.contains_key("bootstrap.servers") {
            return Err(plan_error(
                "STORED AS KAFKA needs the brokers: OPTIONS ('bootstrap.servers' 'host:9092') or LOCATION 'kafka://host:9092/topic'"
                    .into(),
            ));
        }
        parsed
            .client
            .entry("group.id".into())
            .or_insert_with(|| DEFAULT_GROUP_ID.into());
        Ok(parsed)
    }

    /// The brokers.
    pub fn servers(&self) -> &str {
        self.client.get("bootstrap.servers").map(String::as_str).unwrap_or("")
    }

    /// The key under which an index stores where `partition` resumes.
    pub fn position_key(&self, partition: i32) -> String {
        position_key(&self.topic, partition)
    }
}

/// `kafka:<topic>:<partition>`: the key of a partition's resume offset in an index manifest.
pub fn position_key(topic: &str, partition: i32) -> String {
    format!("{}{partition}", position_prefix(topic))
}

/// The common prefix of a topic's [`position_key`]s.
pub fn position_prefix(topic: &str) -> String {
    format!("kafka:{topic}:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn location_url_and_options_parse() {
        let o = KafkaOptions::parse(
            "kafka://127.0.0.1:9092/papers",
            &options(&[
                ("format.partitions", "1, 3"),
                ("format.start", "latest"),
                ("linger_ms", "50"),
                ("stall_timeout_ms", "2500"),
                ("security.protocol", "plaintext"),
            ]),
        )
        .unwrap();
        assert_eq!(o.topic, "papers");
        assert_eq!(o.servers(), "127.0.0.1:9092");
        assert_eq!(o.partitions, Some(vec![1, 3]));
        assert_eq!(o.start, StartFrom::Latest);
        assert_eq!(o.linger, Duration::from_millis(50));
        assert_eq!(o.stall_timeout, Duration::from_millis(2500));
        assert_eq!(o.client["security.protocol"], "plaintext");
        assert_eq!(o.client["group.id"], DEFAULT_GROUP_ID);
        assert_eq!(o.position_key(3), "kafka:papers:3");
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let err = |location: &str, pairs: &[(&str, &str)]| {
            KafkaOptions::parse(location, &options(pairs)).unwrap_err().to_string()
        };
        assert!(err("papers", &[]).contains("bootstrap.servers"));
        assert!(err("papers", &[("bootstrap.servers", "b:1"), ("start", "now")]).contains("earliest"));
        assert!(err("papers", &[("bootstrap.servers", "b:1"), ("partitions", "a")]).contains("partitions"));
        assert!(err("papers", &[("bootstrap.servers", "b:1"), ("linger", "5")]).contains("unknown option 'linger'"));
        assert!(err("kafka://b:1", &[]).contains("kafka://host:port/topic"));
    }
}
