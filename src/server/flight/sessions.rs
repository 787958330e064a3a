//! What a Flight SQL connection keeps between its calls: a session of its own until it closes
//! (its `SET`s stay, as in a database connection), the statements it prepared with the values
//! bound to them, and the results waiting for their `DoGet`. Each store is bounded: past the
//! bound the least recently used session, or the oldest statement or result, goes first.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use prometheus_client::metrics::gauge::Gauge;

use crate::Engine;
use crate::access::Role;
use crate::engine::{PreparedStatement, Session};
use crate::metrics;
use crate::server::query::{QueryFailure, loaded};

/// Connections with a session of their own at most (a client past it gets a fresh session in
/// the place of the least recently used one).
pub const MAX_SESSIONS: usize = 1024;

/// Prepared statements kept at most, over all connections.
pub const MAX_PREPARED: usize = 4096;

/// Results that wait for their `DoGet` at most.
pub const MAX_WAITING: usize = 64;

/// Bytes the waiting results hold at most (each is bounded by `max_result_bytes` on its own;
/// clients that never fetch must not pile up 64 of them).
pub const MAX_WAITING_BYTES: usize = 1 << 30;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// 16 bytes another client cannot guess: two SipHash values under the process's random keys
/// (a fresh key pair for each handle).
pub fn new_handle() -> Vec<u8> {
    let keys = RandomState::new();
    [keys.hash_one(1u8), keys.hash_one(2u8)]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect()
}

/// A connection's session, and when it was last used.
type OpenSession = (Arc<Session>, Instant);

/// One session per connection and role, from the connection's first call until it closes, and
/// the statements the connections prepared.
pub struct Sessions {
    engine: Arc<OnceLock<Arc<Engine>>>,
    open: Mutex<HashMap<(u64, Role), OpenSession>>,
    prepared: Handles<Arc<Prepared>>,
}

impl Sessions {
    /// No session yet, on `engine` once it is loaded.
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>) -> Self {
        Sessions {
            engine,
            open: Mutex::new(HashMap::new()),
            prepared: Handles::counted(MAX_PREPARED, metrics::global().flight_prepared_statements.clone()),
        }
    }

    /// The statements prepared and not closed yet.
    pub fn prepared(&self) -> &Handles<Arc<Prepared>> {
        &self.prepared
    }

    /// The engine, once loaded.
    pub fn engine(&self) -> Result<Arc<Engine>, QueryFailure> {
        loaded(&self.engine)
    }

    /// The session of `connection` for `role`, opened on its first call; a call whose
    /// connection is unknown gets a session of its own.
    pub fn of(&self, connection: Option<u64>, role: Role) -> Result<Arc<Session>, QueryFailure> {
        let engine = self.engine()?;
        let open_new = || {
            engine
                .network_session(role)
                .map(Arc::new)
                .map_err(QueryFailure::Session)
        };
        let Some(connection) = connection else {
            return open_new();
        };
        let now = Instant::now();
        let mut open = lock(&self.open);
        if let Some((session, used)) = open.get_mut(&(connection, role)) {
            *used = now;
            return Ok(session.clone());
        }
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open.iter().min_by_key(|(_, (_, used))| *used).map(|(key, _)| *key)
        {
            open.remove(&oldest);
        }
        let session = open_new()?;
        open.insert((connection, role), (session.clone(), now));
        metrics::global().flight_sessions.set(open.len() as i64);
        Ok(session)
    }

    /// Ends the sessions of `connection` (it closed), and the statements it prepared.
    pub fn close(&self, connection: u64) {
        let mut open = lock(&self.open);
        open.retain(|(id, _), _| *id != connection);
        metrics::global().flight_sessions.set(open.len() as i64);
        drop(open);
        self.prepared.retain(|p| p.connection != Some(connection));
    }
}

/// A statement a connection prepared.
pub struct Prepared {
    /// The connection that prepared it (closing it closes the statement).
    pub connection: Option<u64>,
    /// The role of the token that prepared it (only that role runs it).
    pub role: Role,
    /// The connection's session, where it runs.
    pub session: Arc<Session>,
    pub statement: PreparedStatement,
    /// Its metrics label.
    pub label: &'static str,
    /// The values last bound to its parameters.
    pub values: Mutex<Vec<ScalarValue>>,
}

/// Values bounded in number, found by handle, the oldest dropped first.
pub struct Handles<V> {
    entries: Mutex<VecDeque<(Vec<u8>, V)>>,
    most: usize,
    /// Follows how many entries there are, when given.
    gauge: Option<Gauge>,
}

impl<V: Clone> Handles<V> {
    /// At most `most` entries.
    pub fn new(most: usize) -> Self {
        Handles {
            entries: Mutex::new(VecDeque::new()),
            most,
            gauge: None,
        }
    }

    /// At most `most` entries, counted by `gauge`.
    pub fn counted(most: usize, gauge: Gauge) -> Self {
        Handles {
            gauge: Some(gauge),
            ..Handles::new(most)
        }
    }

    fn count(&self, entries: &VecDeque<(Vec<u8>, V)>) {
        if let Some(gauge) = &self.gauge {
            gauge.set(entries.len() as i64);
        }
    }

    /// Keeps `value` under a new handle, which it returns.
    pub fn insert(&self, value: V) -> Vec<u8> {
        let handle = new_handle();
        let mut entries = lock(&self.entries);
        if entries.len() >= self.most {
            entries.pop_front();
        }
        entries.push_back((handle.clone(), value));
        self.count(&entries);
        handle
    }

    /// The value under `handle`.
    pub fn get(&self, handle: &[u8]) -> Option<V> {
        lock(&self.entries)
            .iter()
            .find(|(h, _)| h == handle)
            .map(|(_, v)| v.clone())
    }

    /// Removes the value under `handle`; returns it.
    pub fn remove(&self, handle: &[u8]) -> Option<V> {
        let mut entries = lock(&self.entries);
        let at = entries.iter().position(|(h, _)| h == handle)?;
        let removed = entries.remove(at).map(|(_, v)| v);
        self.count(&entries);
        removed
    }

    /// Keeps only the values for which `keep` is true.
    pub fn retain(&self, keep: impl Fn(&V) -> bool) {
        let mut entries = lock(&self.entries);
        entries.retain(|(_, v)| keep(v));
        self.count(&entries);
    }
}

/// A result waiting for its `DoGet`.
pub struct Waiting {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The batches' memory.
    pub bytes: usize,
}

/// The results waiting for their `DoGet`: at most [`MAX_WAITING`] of them, holding at most
/// [`MAX_WAITING_BYTES`]; each is fetched once.
#[derive(Default)]
pub struct WaitingResults(Mutex<VecDeque<(Vec<u8>, Waiting)>>);

impl WaitingResults {
    /// Keeps `result` under a new handle (which it returns), dropping the oldest results past
    /// the bounds.
    pub fn wait(&self, result: Waiting) -> Vec<u8> {
        let handle = new_handle();
        let mut waiting = lock(&self.0);
        let mut bytes: usize = waiting.iter().map(|(_, w)| w.bytes).sum();
        while waiting.len() == MAX_WAITING || (!waiting.is_empty() && bytes + result.bytes > MAX_WAITING_BYTES) {
            bytes -= waiting.pop_front().map_or(0, |(_, w)| w.bytes);
        }
        waiting.push_back((handle.clone(), result));
        handle
    }

    /// The result under `handle`, no longer waiting.
    pub fn take(&self, handle: &[u8]) -> Option<Waiting> {
        let mut waiting = lock(&self.0);
        let at = waiting.iter().position(|(h, _)| h == handle)?;
        waiting.remove(at).map(|(_, w)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unguessable_and_the_oldest_entry_goes_first() {
        assert_ne!(new_handle(), new_handle());
        let handles = Handles::new(2);
        let first = handles.insert("a");
        let second = handles.insert("b");
        assert_eq!(handles.get(&first), Some("a"));
        let third = handles.insert("c");
        assert_eq!(handles.get(&first), None, "dropped past the bound");
        assert_eq!(handles.remove(&second), Some("b"));
        assert_eq!(handles.remove(&second), None);
        assert_eq!(handles.get(&third), Some("c"));
    }

    #[test]
    fn waiting_results_are_taken_once_and_bounded_in_number() {
        let waiting = WaitingResults::default();
        let result = || Waiting {
            schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            batches: Vec::new(),
            bytes: 10,
        };
        let first = waiting.wait(result());
        for _ in 0..MAX_WAITING {
            waiting.wait(result());
        }
        assert!(waiting.take(&first).is_none(), "the oldest went first");
        let last = waiting.wait(result());
        assert!(waiting.take(&last).is_some());
        assert!(waiting.take(&last).is_none(), "taken once");
    }

    #[test]
    fn no_session_opens_before_the_engine_is_loaded() {
        let sessions = Sessions::new(Arc::new(OnceLock::new()));
        assert!(matches!(sessions.of(Some(7), Role::Read), Err(QueryFailure::Loading)));
        assert!(lock(&sessions.open).is_empty());
    }
}
