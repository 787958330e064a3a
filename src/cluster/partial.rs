//! Partial answers: what one request does about shards it cannot reach. A request that allows
//! it is answered from the shards that are there, and told which were left out; otherwise a
//! shard that is gone fails the query (503, naming the shard).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use datafusion::execution::config::SessionConfig;

/// A shard left out of an answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MissingShard {
    /// The shard's name (the shard map's).
    pub shard: String,
    /// The sharded table it belongs to.
    pub table: String,
    /// The worker serving it.
    pub worker: String,
    /// Why it was left out.
    pub error: String,
}

/// One request's policy on unreachable shards, and the shards its answer left out: a session
/// extension the server sets before each statement (without one, nothing is left out).
#[derive(Debug, Default)]
pub struct PartialAnswers {
    allowed: bool,
    missing: Mutex<BTreeMap<String, MissingShard>>,
}

impl PartialAnswers {
    /// A request that allows partial answers (`allowed`) or not.
    pub fn new(allowed: bool) -> Self {
        PartialAnswers {
            allowed,
            missing: Mutex::new(BTreeMap::new()),
        }
    }

    /// The policy of the session configured by `config`, if it allows partial answers.
    pub fn allowed_in(config: &SessionConfig) -> Option<Arc<PartialAnswers>> {
        config.get_extension::<PartialAnswers>().filter(|p| p.allowed)
    }

    /// Records that `shard` was left out (once per shard).
    pub fn leave_out(&self, shard: MissingShard) {
        self.lock().insert(shard.shard.clone(), shard);
    }

    /// The shards left out so far, by name.
    pub fn missing(&self) -> Vec<MissingShard> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, MissingShard>> {
        self.missing.lock().unwrap_or_else(|e| e.into_inner())
    }
}
