//! The HTTP API of `mkflow serve`:
//! - `POST /v1/sql`: SQL in the body (plain text, or JSON `{"sql": "…"}`); the result of the
//!   last statement as JSON, or as an Arrow IPC stream when `Accept:
//!   application/vnd.apache.arrow.stream`. Errors are JSON `{"error": {"message", "status"}}`
//!   with 400 for a bad query, 401 without the bearer token, 408 past the time limit, 413 for an
//!   oversized body, 503 while starting, 500 for failures of the engine itself.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: the process is up. `GET /readyz`: indexes loaded and every pipeline
//!   consuming (or done).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::writer::{JsonArray, WriterBuilder};
use datafusion::common::DataFusionError;
use datafusion::sql::parser::DFParser;
use futures::FutureExt;
use serde_json::json;

use super::config::ServerSettings;
use crate::Engine;
use crate::access::{Refusal, Role};
use crate::metrics;
use crate::statement::{StatementKind, search_function};
use crate::streaming::PipelineState;

/// The media type of Arrow IPC streams.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The engine, once loaded.
    pub engine: Arc<OnceLock<Arc<Engine>>>,
    /// HTTP settings.
    pub settings: Arc<ServerSettings>,
    /// Names of the configured pipelines (all must be consuming or done to be ready).
    pub pipelines: Arc<Vec<String>>,
}

/// The routes.
pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_request_bytes;
    Router::new()
        .route("/v1/sql", post(sql))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A JSON error response.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "status": status.as_u16() } });
    (status, axum::Json(body)).into_response()
}

/// The status that fits an engine error: the caller's mistake (bad SQL, unknown table, wrong
/// types, a refused vector, a limit exceeded by what was asked) is a 400, and so is a statement
/// DataFusion reports an internal error for (some functions answer bad arguments that way: the
/// statement cannot run, and retrying will not help); a statement the caller's role does not
/// allow is a 403, a result or memory use past its limit a 413; a failure of the server's own
/// parts (disk, model, a panic) a 500.
pub fn status_of(error: &DataFusionError) -> StatusCode {
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
pub fn query_function(sql: &str) -> &'static str {
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

/// The role of a request: its bearer token's, `None` (a 401) when tokens are configured and it
/// holds none of them; with no token configured every request reads.
fn role_of(settings: &ServerSettings, headers: &HeaderMap) -> Option<Role> {
    if settings.tokens.is_empty() {
        return Some(Role::Read);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare with every token, without an early exit, so timing reveals neither a matching
    // prefix nor which token matched.
    settings.tokens.iter().fold(None, |found, (token, role)| {
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same { Some(*role) } else { found }
    })
}

/// The SQL text of a request body: JSON `{"sql": "…"}` when the content type says JSON, else
/// the body itself; otherwise the message of a 400.
fn sql_text(headers: &HeaderMap, body: &[u8]) -> Result<String, String> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let sql = if is_json {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
        value
            .get("sql")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| "JSON body needs a string field \"sql\"".to_string())?
    } else {
        String::from_utf8(body.to_vec()).map_err(|_| "request body is not UTF-8 text".to_string())?
    };
    if sql.trim().is_empty() {
        return Err("empty query: send SQL in the body, e.g. SELECT count(*) FROM kb".into());
    }
    Ok(sql)
}

async fn sql(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let Some(role) = role_of(&state.settings, &headers) else {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (send Authorization: Bearer <token>)",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body exceeds max_request_bytes ({} bytes)",
                    state.settings.max_request_bytes
                )
            } else {
                rejection.body_text()
            };
            return error(status, message);
        }
    };
    let sql = match sql_text(&headers, &body) {
        Ok(sql) => sql,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(engine) = state.engine.get().cloned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "mkflow is still loading its indexes; retry shortly",
        );
    };
    // The label comes from the parsed statement: parse only what the session will accept (a
    // too deeply nested statement is refused by it before parsing).
    let nested_too_deeply =
        crate::statement::expression_depth(&sql).is_ok_and(|depth| depth > engine.config().limits.max_expression_depth);
    let function = if nested_too_deeply {
        "invalid"
    } else {
        query_function(&sql)
    };
    let started = Instant::now();
    let timeout = state.settings.query_timeout;
    // Each request runs in a session of its own: its SETs and tables end with it.
    let session = match engine.network_session(role) {
        Ok(session) => session,
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot open a session: {e}"));
        }
    };
    // A panic in the engine (a bug some input reaches) fails this request only.
    let guarded = std::panic::AssertUnwindSafe(session.sql(&sql)).catch_unwind();
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
    let batches = match outcome {
        Err(_) => {
            metrics::global().observe_query(function, "timeout", elapsed);
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("query exceeded the {} s limit (query_timeout_secs)", timeout.as_secs()),
            );
        }
        Ok(Err(e)) => {
            metrics::global().observe_query(function, "error", elapsed);
            return error(status_of(&e), e.to_string());
        }
        Ok(Ok(batches)) => batches,
    };
    metrics::global().observe_query(function, "ok", elapsed);
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    let encoded = if wants_arrow {
        arrow_stream(&batches).map(|bytes| ([(header::CONTENT_TYPE, ARROW_STREAM)], bytes).into_response())
    } else {
        json_result(&batches, elapsed.as_secs_f64() * 1e3)
            .map(|text| ([(header::CONTENT_TYPE, "application/json")], text).into_response())
    };
    encoded.unwrap_or_else(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the result: {e}"),
        )
    })
}

/// `{"columns": [{"name", "type"}], "rows": [{…}], "row_count": n, "elapsed_ms": t}`.
fn json_result(batches: &[RecordBatch], elapsed_ms: f64) -> Result<String, ArrowError> {
    let columns: Vec<serde_json::Value> = batches
        .first()
        .map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| json!({ "name": f.name(), "type": f.data_type().to_string() }))
                .collect()
        })
        .unwrap_or_default();
    let row_count: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut rows = Vec::new();
    if row_count > 0 {
        let mut writer = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, JsonArray>(&mut rows);
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    } else {
        rows.extend_from_slice(b"[]");
    }
    let rows = String::from_utf8(rows).map_err(|e| ArrowError::JsonError(e.to_string()))?;
    Ok(format!(
        "{{\"columns\":{},\"rows\":{rows},\"row_count\":{row_count},\"elapsed_ms\":{elapsed_ms:.3}}}",
        serde_json::Value::Array(columns)
    ))
}

fn arrow_stream(batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(datafusion::arrow::datatypes::Schema::empty()),
    };
    let mut writer = StreamWriter::try_new(Vec::new(), &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(engine) = state.engine.get().cloned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "mkflow is still loading its indexes");
    };
    let text = tokio::task::spawn_blocking(move || metrics::global().render(engine.as_ref()))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let Some(engine) = state.engine.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "reason": "loading indexes" })),
        )
            .into_response();
    };
    let states = engine.streams().states();
    let mut pipelines = serde_json::Map::new();
    let mut ready = true;
    for name in state.pipelines.iter() {
        let (text, ok) = match states.get(name) {
            Some(PipelineState::Streaming) => ("streaming".to_string(), true),
            Some(PipelineState::Finished) => ("finished".to_string(), true),
            Some(PipelineState::Failed(e)) => (format!("failed: {e}"), false),
            Some(PipelineState::Stalled(e)) => (format!("stalled: {e}"), false),
            Some(PipelineState::Starting) | None => ("starting".to_string(), false),
        };
        ready &= ok;
        pipelines.insert(name.clone(), json!(text));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({ "ready": ready, "pipelines": pipelines }))).into_response()
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

    #[test]
    fn json_result_lists_columns_and_rows() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Int64Array::from(vec![Some(1), None])),
            ],
        )
        .unwrap();
        let text = json_result(&[batch], 1.5).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["row_count"], 2);
        assert_eq!(value["columns"][0]["name"], "doc_id");
        assert_eq!(value["rows"][1]["doc_id"], "b");
        assert!(value["rows"][1]["n"].is_null());
        let empty: serde_json::Value = serde_json::from_str(&json_result(&[], 0.0).unwrap()).unwrap();
        assert_eq!(empty["rows"], json!([]));
    }
}
