//! mkflow's SQL surface on DataFusion:
//! - [`catalog`]: the default schema, where the data directory's indexes are tables;
//! - [`kb_table`]: a knowledge index as a table (`SELECT`, `INSERT` = upsert, `DELETE`);
//! - [`kb_entry`]: an index with its Meta-Knowledge side and chunks, as the schema records it;
//! - [`kb_factory`]: `CREATE EXTERNAL TABLE … STORED AS KB` creates or opens one;
//! - [`vector_search`]: the `vector_search(kb, 'query', k)` and `qa_search` table functions;
//! - [`text_search`]: BM25 full-text search, `text_search(kb, 'query', k)` and `qa_text_search`;
//! - [`fusion`]: `rrf(search, search, …)`, `hybrid_search`, `qa_hybrid_search` and
//!   `chunk_hybrid_search`; [`rerank`]: their `rerank => N` (a cross-encoder over the top);
//! - [`call_args`]: table-function arguments (literals, `name => value`, nested search calls);
//! - [`mk_search`]: Meta-Knowledge retrieval, `mk_search(kb, 'query', k)`; [`mk_answer`]: its
//!   "read" step, an answer with numbered citations; [`personas`]: the `<kb>_personas` table;
//! - [`filters`]: SQL `WHERE` clauses turned into row predicates evaluated inside searches;
//! - [`async_calls`]: async functions (`embed`) in `ORDER BY` keys and `VALUES` rows;
//! - [`parameters`]: `$1`, `$2`, … bound to the arguments of the table functions.

pub mod async_calls;
pub mod call_args;
pub mod catalog;
mod columns;
pub mod filters;
pub mod fusion;
pub mod kb_entry;
pub mod kb_factory;
pub mod kb_table;
pub mod mk_answer;
pub mod mk_search;
pub mod parameters;
pub mod personas;
pub mod reasoning;
pub mod rerank;
pub mod text_search;
pub mod vector_search;

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;

pub use catalog::{KbSchema, SessionSchema};
pub use kb_factory::KbTableFactory;
pub use kb_table::KbTable;
pub use vector_search::VectorSearchFunction;

/// A scan over batches already in memory (one partition), with the scan's projection and limit.
pub fn memory_scan(
    batches: Vec<RecordBatch>,
    schema: SchemaRef,
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let source = MemorySourceConfig::try_new(&[batches], schema, projection.cloned())?.with_limit(limit);
    Ok(DataSourceExec::from_data_source(source))
}
