//! mkflow's SQL surface on DataFusion:
//! - [`kb_table`]: a knowledge index as a table (`SELECT`, `INSERT` = upsert, `DELETE`);
//! - [`kb_factory`]: `CREATE EXTERNAL TABLE … STORED AS KB` creates or opens one;
//! - [`vector_search`]: the `vector_search(kb, 'query', k)` table function;
//! - [`filters`]: SQL `WHERE` clauses turned into row predicates evaluated inside searches.

pub mod filters;
pub mod kb_factory;
pub mod kb_table;
pub mod registry;
pub mod vector_search;

pub use kb_factory::KbTableFactory;
pub use kb_table::KbTable;
pub use registry::KbRegistry;
pub use vector_search::VectorSearchFunction;
