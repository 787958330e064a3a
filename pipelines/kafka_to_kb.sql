-- Streaming ingestion: a Kafka topic of JSON documents into a knowledge index, exactly once.
--
--   mkflow run pipelines/kafka_to_kb.sql                    # runs until Ctrl-C / SIGTERM
--   mkflow run --until-caught-up pipelines/kafka_to_kb.sql  # stops at the end of the topic
--   mkflow serve --pipeline pipelines/kafka_to_kb.sql       # as a service with HTTP SQL + /metrics
--
-- Each micro-batch (at most max_batch_rows records, or what arrived within linger_ms) is
-- embedded and committed to the index together with the offset where each partition resumes;
-- a restart continues from there. Bad records (invalid JSON, missing doc_id, wrong types,
-- values over max_record_bytes) go to the dead_letters table with topic/partition/offset.
-- Every option with a dot is a librdkafka property ('security.protocol', 'sasl.username', …).

CREATE EXTERNAL TABLE papers (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
STORED AS KAFKA LOCATION 'papers'
OPTIONS (
  'bootstrap.servers' '127.0.0.1:9092',
  'group.id' 'mkflow-papers',      -- offsets are also committed here, for lag monitoring
  'start' 'earliest',              -- where partitions the index has not seen yet start
  'max_batch_rows' '500',
  'linger_ms' '200'
);

CREATE EXTERNAL TABLE IF NOT EXISTS papers_kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
STORED AS KB LOCATION 'papers_kb';

INSERT INTO papers_kb
SELECT doc_id, title, body, embed(concat_ws('. ', title, body)) FROM papers;
