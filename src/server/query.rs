//! Running one request's SQL, whatever protocol brought it (HTTP, Flight SQL): who is asking
//! (bearer token → role), a session of its own, the time limit, a panic in the engine failing
//! only that request, the query metrics, and the status that fits each failure.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::sql::parser::DFParser;
use futures::FutureExt;

use super::config::ServerSettings;
use crate::Engine;
use crate::access::{Refusal, Role};
use crate::cluster::client::{TableUnreachable, WorkerUnreachable};
use crate::cluster::{MissingShard, PartialAnswers};
use crate::engine::{PreparedStatement, Session};
use crate::metrics;
use crate::statement::{StatementKind, search_function};

/// Why a request's SQL gave no result.
#[derive(Debug, thiserror::Error)]
pub enum QueryFailure {
    /// The engine is still loading its indexes.
    #[error("mkflow is still loading its indexes; retry shortly")]
    Loading,
    /// No session could be opened.
    #[error("cannot open a session: {0}")]
    Session(DataFusionError),
    /// The query ran past `query_timeout`.
    #[error("query exceeded the {} s limit (query_timeout_secs)", .0.as_secs())]
    Timeout(Duration),
    /// The statement failed.
    #[error("{0}")]
    Failed(DataFusionError),
    /// A cluster worker could not be reached; `shards` names what it serves.
    #[error("{} cannot be reached: {error} (hint: retry once the worker is back, or allow a partial answer: allow_partial)", shards.join(", "))]
    ShardsDown {
        /// The shards of the worker, e.g. "shard kb-1 of kb (http://10.0.0.2:50051/)".
        shards: Vec<String>,
        /// What failed.
        error: DataFusionError,
    },
}

impl QueryFailure {
    /// The HTTP status that fits (Flight maps it to its own codes).
    pub fn status(&self) -> StatusCode {
        match self {
            QueryFailure::Loading => StatusCode::SERVICE_UNAVAILABLE,
            QueryFailure::Session(_) => StatusCode::INTERNAL_SERVER_ERROR,
            QueryFailure::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            QueryFailure::Failed(e) => status_of(e),
            QueryFailure::ShardsDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A statement's result.
#[derive(Debug)]
pub struct Answer {
    /// Its rows.
    pub batches: Vec<RecordBatch>,
    /// How long it took.
    pub elapsed: Duration,
    /// The shards of a cluster it leaves out: only when the request allowed a partial answer
    /// and some shard could not be reached.
    pub missing_shards: Vec<MissingShard>,
}

impl Answer {
    /// The names of the shards the answer leaves out, comma-separated (the `mkflow-partial`
    /// header), if it leaves any out.
    pub fn missing_shard_names(&self) -> Option<String> {
        let names: Vec<&str> = self.missing_shards.iter().map(|m| m.shard.as_str()).collect();
        (!names.is_empty()).then(|| names.join(","))
    }
}

/// The request header (HTTP) or metadata (Flight) that allows (`true`) or refuses (`false`) a
/// partial answer from a cluster coordinator.
pub const ALLOW_PARTIAL_HEADER: &str = "mkflow-allow-partial";

/// The response header (HTTP) or metadata (Flight) naming the shards a partial answer leaves out.
pub const PARTIAL_HEADER: &str = "mkflow-partial";

/// What the [`ALLOW_PARTIAL_HEADER`] value of a request says (`None`: it has none); otherwise
/// the message of a refusal.
pub fn allow_partial_flag(value: Option<&[u8]>) -> Result<Option<bool>, String> {
    match value {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case(b"true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case(b"false") => Ok(Some(false)),
        Some(_) => Err(format!("{ALLOW_PARTIAL_HEADER} must be true or false")),
    }
}

/// Whether a request allows a partial answer: as it says (`requested`), else as the shard map
/// says.
fn allows_partial(engine: &Engine, requested: Option<bool>) -> bool {
    requested.unwrap_or_else(|| engine.cluster().is_some_and(|c| c.map().allow_partial()))
}

/// The engine, once it has loaded its indexes.
pub fn loaded(engine: &OnceLock<Arc<Engine>>) -> Result<Arc<Engine>, QueryFailure> {
    engine.get().cloned().ok_or(QueryFailure::Loading)
}

/// Runs `sql` for `role` in a session of its own (its `SET`s and tables end with it), within
/// the settings' time limit, and records it in the query metrics; returns the last statement's
/// result and how long it took.
///
/// With `params`, `sql` is one statement and they are the values of its `$1`, `$2`, … (see
/// [`Session::sql_with_params`]).
///
/// On a coordinator, `allow_partial` (else the shard map's `allow_partial`) says whether shards
/// that cannot be reached are left out of the answer rather than failing it.
pub async fn run_query(
    engine: &OnceLock<Arc<Engine>>,
    settings: &ServerSettings,
    role: Role,
    sql: &str,
    params: Option<Vec<ScalarValue>>,
    allow_partial: Option<bool>,
) -> Result<Answer, QueryFailure> {
    let engine = loaded(engine)?;
    let session = engine.network_session(role).map_err(QueryFailure::Session)?;
    run_in_session(&engine, &session, settings, sql, params, allow_partial).await
}

/// Runs `sql` in `session` (a connection's: its `SET`s stay), as [`run_query`] does.
pub async fn run_in_session(
    engine: &Engine,
    session: &Session,
    settings: &ServerSettings,
    sql: &str,
    params: Option<Vec<ScalarValue>>,
    allow_partial: Option<bool>,
) -> Result<Answer, QueryFailure> {
    let function = metrics_label(engine, sql);
    let partial = install_partial(engine, session, allow_partial);
    let ran = match params {
        Some(values) => guarded(session.sql_with_params(sql, values), function, settings.query_timeout).await,
        None => guarded(session.sql(sql), function, settings.query_timeout).await,
    };
    answer(engine, ran, partial).await
}

/// Runs a statement `session` prepared, with `values` for its parameters, as [`run_query`]
/// runs SQL; `function` labels its metrics (the [`metrics_label`] of its SQL).
pub async fn run_prepared(
    engine: &Engine,
    session: &Session,
    settings: &ServerSettings,
    prepared: &PreparedStatement,
    values: Vec<ScalarValue>,
    function: &'static str,
    allow_partial: Option<bool>,
) -> Result<Answer, QueryFailure> {
    let partial = install_partial(engine, session, allow_partial);
    let ran = guarded(session.run_prepared(prepared, values), function, settings.query_timeout).await;
    answer(engine, ran, partial).await
}

/// On a coordinator, gives `session` a fresh partial-answer policy for its next statement.
fn install_partial(engine: &Engine, session: &Session, allow_partial: Option<bool>) -> Option<Arc<PartialAnswers>> {
    engine.cluster()?;
    let partial = Arc::new(PartialAnswers::new(allows_partial(engine, allow_partial)));
    session
        .context()
        .state_ref()
        .write()
        .config_mut()
        .set_extension(partial.clone());
    Some(partial)
}

/// The answer of a statement that `ran`, with the shards it left out; a failure to reach a
/// worker names that worker's shards (those the error names, else those not ready now).
async fn answer(
    engine: &Engine,
    ran: Result<(Vec<RecordBatch>, Duration), QueryFailure>,
    partial: Option<Arc<PartialAnswers>>,
) -> Result<Answer, QueryFailure> {
    match ran {
        Ok((batches, elapsed)) => Ok(Answer {
            batches,
            elapsed,
            missing_shards: partial.map(|p| p.missing()).unwrap_or_default(),
        }),
        Err(QueryFailure::Failed(error)) if unreachable_worker(&error) => {
            let Some(cluster) = engine.cluster() else {
                return Err(QueryFailure::Failed(error));
            };
            let mut shards = cluster.shards_named_in(&error.to_string());
            if shards.is_empty() {
                shards = cluster.shards_down().await;
            }
            Err(match shards.is_empty() {
                true => QueryFailure::Failed(error),
                false => QueryFailure::ShardsDown { shards, error },
            })
        }
        Err(failure) => Err(failure),
    }
}

/// The metrics label of `sql` (see [`query_function`]): `invalid` for a statement nested too
/// deeply to be parsed.
pub fn metrics_label(engine: &Engine, sql: &str) -> &'static str {
    // The label comes from the parsed statement: parse only what the session will accept (a
    // too deeply nested statement is refused by it before parsing).
    let nested_too_deeply =
        crate::statement::expression_depth(sql).is_ok_and(|depth| depth > engine.config().limits.max_expression_depth);
    if nested_too_deeply {
        "invalid"
    } else {
        query_function(sql)
    }
}

/// Runs `statement` within `timeout`, a panic in it failing only this request, and records it
/// in the query metrics under `function`.
async fn guarded(
    statement: impl Future<Output = datafusion::common::Result<Vec<RecordBatch>>>,
    function: &'static str,
    timeout: Duration,
) -> Result<(Vec<RecordBatch>, Duration), QueryFailure> {
    let started = Instant::now();
    // A panic in the engine (a bug some input reaches) fails this request only.
    let guarded = std::panic::AssertUnwindSafe(statement).catch_unwind();
    let outcome = tokio::time::timeout(timeout, guarded).await.map(|ran| {
        ran.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(DataFusionError::External(Box::new(EnginePanic(message))))
        })
    });
    let elapsed = started.elapsed();
    let (outcome, result) = match outcome {
        Err(_) => ("timeout", Err(QueryFailure::Timeout(timeout))),
        Ok(Err(e)) => ("error", Err(QueryFailure::Failed(e))),
        Ok(Ok(batches)) => ("ok", Ok((batches, elapsed))),
    };
    metrics::global().observe_query(function, outcome, elapsed);
    result
}

/// The status that fits an engine error: the caller's mistake (bad SQL, unknown table, wrong
/// types, a refused vector, a limit exceeded by what was asked) is a 400, and so is a statement
/// DataFusion reports an internal error for (some functions answer bad arguments that way: the
/// statement cannot run, and retrying will not help); a statement the caller's role does not
/// allow is a 403, a result or memory use past its limit a 413; a failure of the server's own
/// parts (disk, model, a panic) a 500.
pub(super) fn status_of(error: &DataFusionError) -> StatusCode {
    if unreachable_worker(error) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match error.find_root() {
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Configuration(_)
        | DataFusionError::Execution(_)
        | DataFusionError::Internal(_) => StatusCode::BAD_REQUEST,
        DataFusionError::ResourcesExhausted(_) => StatusCode::PAYLOAD_TOO_LARGE,
        // Arrow's errors while evaluating a query come from its values (a cast, an overflow),
        // except for I/O and memory.
        DataFusionError::ArrowError(e, _) => match e.as_ref() {
            ArrowError::IoError(..) | ArrowError::IpcError(_) | ArrowError::CDataInterface(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ArrowError::MemoryError(_) | ArrowError::OffsetOverflowError(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ArrowError::ExternalError(inner) => external_status(inner.as_ref()),
            _ => StatusCode::BAD_REQUEST,
        },
        DataFusionError::External(e) => external_status(e.as_ref()),
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Whether `error` is a cluster worker that could not be reached, or whose connection broke
/// (the query may succeed once it is back): a transport error, or a connection that was
/// refused, reset or cut, anywhere in its chain.
fn unreachable_worker(error: &DataFusionError) -> bool {
    use std::io::ErrorKind;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        let connection_lost = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            )
        });
        if connection_lost
            || e.is::<tonic::transport::Error>()
            || e.is::<WorkerUnreachable>()
            || e.is::<TableUnreachable>()
            || ["Error connecting to Distributed DataFusion worker", "h2 protocol error"]
                .iter()
                .any(|sign| e.to_string().contains(sign))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A panic while running a statement (a bug some input reaches): that request fails with a 500,
/// the server goes on.
#[derive(Debug, thiserror::Error)]
#[error("the engine failed on this statement ({0}); the server goes on")]
struct EnginePanic(String);

/// The status of an error raised outside DataFusion: a refusal says its own; the failures of
/// the server's own parts (disk, model, a crashed task) are 500s; anything else was raised by a
/// function over the request's own data (a regex that does not compile, a malformed value) and
/// is a 400.
fn external_status(error: &(dyn std::error::Error + Send + Sync + 'static)) -> StatusCode {
    use mkflow_index::IndexError;
    if let Some(refusal) = error.downcast_ref::<Refusal>() {
        return match refusal {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Limit(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
    }
    if error.downcast_ref::<mkflow_udfs::bounded::ValueTooLarge>().is_some() {
        return StatusCode::PAYLOAD_TOO_LARGE;
    }

    let failed = match error.downcast_ref::<IndexError>() {
        Some(e) => matches!(
            e,
            IndexError::Io { .. } | IndexError::Ann(_) | IndexError::Arrow(_) | IndexError::FullText(_)
        ),
        None => {
            error.is::<mkflow_udfs::embedding::EmbedError>()
                || error.is::<EnginePanic>()
                || error.is::<std::io::Error>()
                || error.is::<tokio::task::JoinError>()
        }
    };
    if failed {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// The metrics label of a query: the search function it calls (`mk_search`, `qa_search`,
/// `vector_search`) anywhere in any of its statements, else the kind of its first statement
/// (`select`, `insert`, `delete`, `ddl`, `other`); `invalid` when it does not parse.
pub(super) fn query_function(sql: &str) -> &'static str {
    let Ok(statements) = DFParser::parse_sql(sql) else {
        return "invalid";
    };
    if let Some(function) = statements.iter().find_map(search_function) {
        return function.name();
    }
    match statements.front().map(StatementKind::of) {
        Some(StatementKind::Query | StatementKind::Explain { .. } | StatementKind::Show) => "select",
        Some(StatementKind::Insert) => "insert",
        Some(StatementKind::Delete) => "delete",
        Some(StatementKind::CreateExternalTable | StatementKind::Ddl | StatementKind::Set { .. }) => "ddl",
        Some(StatementKind::Update | StatementKind::Copy | StatementKind::Other) | None => "other",
    }
}

/// The role of a request whose `Authorization` header (HTTP) or metadata (Flight) is
/// `authorization`: its bearer token's, `None` (unauthenticated) when tokens are configured and
/// it holds none of them; with no token configured every request reads.
pub fn role_of(settings: &ServerSettings, authorization: Option<&str>) -> Option<Role> {
    if settings.tokens.is_empty() {
        return Some(Role::Read);
    }
    let given = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    // Compare with every token, without an early exit, so timing reveals neither a matching
    // prefix nor which token matched.
    settings.tokens.iter().fold(None, |found, (token, role)| {
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same { Some(*role) } else { found }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_labelled_by_function() {
        assert_eq!(query_function("SELECT * FROM mk_search(kb, 'x', 3)"), "mk_search");
        assert_eq!(
            query_function("select doc_id from VECTOR_SEARCH(kb, 'x')"),
            "vector_search"
        );
        assert_eq!(
            query_function("WITH hits AS (SELECT * FROM qa_search(kb, 'x', 5)) SELECT * FROM hits"),
            "qa_search"
        );
        assert_eq!(
            query_function("SELECT * FROM kb WHERE doc_id IN (SELECT doc_id FROM vector_search(kb, 'x', 5))"),
            "vector_search"
        );
        assert_eq!(
            query_function("SELECT 1; SELECT * FROM (SELECT * FROM mk_search(kb, 'x', 3)) s"),
            "mk_search"
        );
        // Text is not a call.
        assert_eq!(query_function("SELECT 'vector_search(kb, x)' AS s FROM kb"), "select");
        assert_eq!(
            query_function("INSERT INTO kb VALUES ('a', 'see vector_search(kb)')"),
            "insert"
        );
        assert_eq!(query_function("  SELECT count(*) FROM kb"), "select");
        assert_eq!(query_function("EXPLAIN SELECT count(*) FROM kb"), "select");
        assert_eq!(query_function("SHOW TABLES"), "select");
        assert_eq!(query_function("INSERT INTO kb SELECT 1"), "insert");
        assert_eq!(query_function("DELETE FROM kb WHERE doc_id = 'a'"), "delete");
        assert_eq!(
            query_function("CREATE EXTERNAL TABLE t STORED AS KB LOCATION 't'"),
            "ddl"
        );
        assert_eq!(query_function("DROP TABLE t"), "ddl");
        assert_eq!(query_function("SET mkflow.x = 1"), "ddl");
        assert_eq!(query_function("SET datafusion.x = 1"), "ddl");
        assert_eq!(query_function("UPDATE kb SET text = 'x'"), "other");
        assert_eq!(query_function("SELEC * FROM kb"), "invalid");
        assert_eq!(query_function("vector_search(kb, 'x')"), "invalid");
    }

    #[test]
    fn caller_mistakes_are_400_and_engine_failures_500() {
        assert_eq!(status_of(&DataFusionError::Plan("x".into())), StatusCode::BAD_REQUEST);
        let wrapped = DataFusionError::Plan("no table".into()).context("statement 2 of 3");
        assert_eq!(status_of(&wrapped), StatusCode::BAD_REQUEST);
        let refused = DataFusionError::External(Box::new(mkflow_index::IndexError::DimensionMismatch {
            expected: 384,
            found: 3,
        }));
        assert_eq!(status_of(&refused), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_of(&DataFusionError::Internal("size to usize".into())),
            StatusCode::BAD_REQUEST
        );
        let worker_down = DataFusionError::External(Box::new(WorkerUnreachable {
            shard: "kb-1".into(),
            worker: "http://127.0.0.1:1/".into(),
            message: "connection refused".into(),
        }));
        assert_eq!(status_of(&worker_down), StatusCode::SERVICE_UNAVAILABLE);
        let table_down = DataFusionError::External(Box::new(TableUnreachable {
            table: "kb".into(),
            failures: vec!["connection refused".into()],
        }));
        assert_eq!(
            status_of(&table_down.context("planning")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let panic = DataFusionError::External(Box::new(EnginePanic("capacity overflow".into())));
        assert_eq!(status_of(&panic), StatusCode::INTERNAL_SERVER_ERROR);
        let io = mkflow_index::IndexError::Io {
            path: "x".into(),
            source: std::io::Error::other("disk"),
        };
        assert_eq!(
            status_of(&DataFusionError::External(Box::new(io))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        for (refusal, status) in [
            (Refusal::Forbidden("x".into()), StatusCode::FORBIDDEN),
            (Refusal::Limit("x".into()), StatusCode::BAD_REQUEST),
            (Refusal::TooLarge("x".into()), StatusCode::PAYLOAD_TOO_LARGE),
        ] {
            let wrapped = refusal.into_error().context("statement 1 of 2");
            assert_eq!(status_of(&wrapped), status);
        }
        assert_eq!(
            status_of(&DataFusionError::ResourcesExhausted("pool".into())),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
