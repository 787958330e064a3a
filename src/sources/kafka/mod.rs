//! Kafka topics as tables (`STORED AS KAFKA`): JSON values become the declared columns, each
//! row also carries its record's key, topic, partition, offset and timestamp, and malformed
//! records go to the dead-letter table with their coordinates.
//!
//! - [`options`]: `LOCATION` and `OPTIONS` (librdkafka properties pass through);
//! - [`consumer`]: micro-batch reads from explicitly assigned partitions and resume offsets;
//! - [`decode`]: records to rows and dead letters;
//! - [`stall`]: noticing a partition that holds records but delivers none;
//! - [`table`]: the table provider (a `SELECT` reads the topic up to its current end).

pub mod consumer;
pub mod decode;
pub mod options;
pub mod stall;
pub mod table;

pub use consumer::{BatchLimits, KafkaReader, KafkaRecord, MicroBatch};
pub use decode::RecordDecoder;
pub use options::{KafkaOptions, StartFrom, position_key, position_prefix};
pub use stall::{Stall, StallChange};
pub use table::{KAFKA_FORMAT, KafkaFactory, KafkaTable, KafkaTopic};
