//! Cluster mode: a sharded table spread over workers, queried through a coordinator, on
//! datafusion-distributed.
//!
//! - A **worker** (`mkflow serve --worker`) is an ordinary mkflow server whose Flight address
//!   also serves datafusion-distributed's worker service (`server::worker`); each of its knowledge
//!   indexes can be a shard, ingesting its own Kafka partitions with its own stored offsets.
//! - A **coordinator** (`mkflow serve --coordinator cluster.toml`) reads the [`shard_map`] and
//!   serves the sharded tables by name: `vector_search`, `qa_search`, `chunk_search`, the
//!   text and hybrid searches, and scans. It plans a query as usual, with a [`ShardExec`] leaf
//!   (one call per shard) where a sharded table is read ([`coordinator`]); the distributed
//!   planner ([`planner`]) runs the leaf as one task per worker, routed to the worker serving
//!   those shards, and merges above it: a search sorts the shards' top-k by score and keeps k.
//!   A text (or hybrid) search first asks every shard for its BM25 statistics of the query and
//!   sends their sum with the call, so each shard scores as one index of all documents would.
//! - The leaf crosses the network through [`codec`]; each call's arguments and filters travel
//!   as DataFusion expressions and run on the worker as its own table function would run them.
//!
//! - A shard that cannot be reached fails the query (503, naming the shard), unless the request
//!   allows partial answers ([`partial`]): then the shards that say they are ready answer, and
//!   the answer names those left out.
//!
//! Requests to workers carry the shard map's token; a worker runs them as that token's role.

pub mod client;
pub mod codec;
pub mod coordinator;
pub mod exec;
pub mod partial;
pub mod planner;
pub mod shard_map;

pub use coordinator::{Cluster, ShardedFunction, ShardedTables};
pub use exec::{ShardCall, ShardExec, ShardRunner};
pub use partial::{MissingShard, PartialAnswers};
pub use shard_map::{Shard, ShardMap};
