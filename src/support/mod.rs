//! Helpers shared by the modules above: they import nothing from the rest of the crate.
//!
//! - [`batch_table`]: a table whose scan produces record batches as it runs (every source and
//!   in-memory table of mkflow is one);
//! - [`blocking`]: index work off the async executor, index errors as DataFusion errors;
//! - [`call_tag`]: table-function calls told apart in plans;
//! - [`clock`]: wall-clock time as stored in tables;
//! - [`compaction`]: full index rewrites on the blocking pool, after commits;
//! - [`random`]: a seeded pseudo-random generator for reproducible samples and shuffles.

pub mod batch_table;
pub mod blocking;
pub mod call_tag;
pub mod clock;
pub mod compaction;
pub mod random;

pub use batch_table::{BatchSource, BatchTable};
pub use blocking::{blocking, index_error};
pub use call_tag::tag_call;
pub use clock::now_ms;
pub use random::SplitMix;
