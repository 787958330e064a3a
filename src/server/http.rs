//! The HTTP API of `mkflow serve`:
//! - `POST /v1/sql`: SQL in the body (plain text, or JSON `{"sql": "…"}`, with `"params": […]`
//!   binding one statement's `$1`, `$2`, … as [`super::params`] says); the result of the
//!   last statement as JSON, or as an Arrow IPC stream when `Accept:
//!   application/vnd.apache.arrow.stream`. Errors are JSON `{"error": {"message", "status"}}`
//!   with 400 for a bad query, 401 without the bearer token, 408 past the time limit, 413 for an
//!   oversized body, 503 while starting (or, on a cluster coordinator, when a shard cannot be
//!   reached), 500 for failures of the engine itself. On a coordinator, `"allow_partial": true`
//!   in the JSON body (or the header `Mkflow-Allow-Partial: true`) answers from the shards that
//!   are reachable: the JSON result then has `"partial": {"missing_shards": [...]}` and the
//!   response the header `Mkflow-Partial` naming them.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: the process is up. `GET /readyz`: indexes loaded and every pipeline
//!   consuming (or done); on a coordinator, also each shard's state (not part of readiness).

use std::sync::{Arc, OnceLock};

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
use datafusion::common::ScalarValue;
use serde_json::json;

use super::config::ServerSettings;
use super::params::bound_values;
use super::query::{ALLOW_PARTIAL_HEADER, Answer, PARTIAL_HEADER, allow_partial_flag, role_of, run_query};
use crate::Engine;
use crate::metrics;
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

/// What a request asks: its SQL, the values bound to its parameters, and whether it allows a
/// partial answer (`None`: as the server's shard map says).
struct SqlRequest {
    sql: String,
    params: Option<Vec<ScalarValue>>,
    allow_partial: Option<bool>,
}

/// The request a body makes: JSON `{"sql": "…", "params": […], "allow_partial": bool}` when the
/// content type says JSON, else the body itself is the SQL; otherwise the message of a 400.
fn sql_request(headers: &HeaderMap, body: &[u8]) -> Result<SqlRequest, String> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut allow_partial = allow_partial_flag(headers.get(ALLOW_PARTIAL_HEADER).map(HeaderValue::as_bytes))
        .map_err(|e| format!("header {e}"))?;
    let mut params = None;
    let sql = if is_json {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
        match value.get("allow_partial") {
            None => {}
            Some(serde_json::Value::Bool(allowed)) => allow_partial = Some(*allowed),
            Some(_) => return Err("\"allow_partial\" must be true or false".into()),
        }
        if let Some(values) = value.get("params").filter(|v| !v.is_null()) {
            params = Some(bound_values(values)?);
        }
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
    Ok(SqlRequest {
        sql,
        params,
        allow_partial,
    })
}

async fn sql(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(role) = role_of(&state.settings, authorization) else {
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
    let request = match sql_request(&headers, &body) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let answer = match run_query(
        &state.engine,
        &state.settings,
        role,
        &request.sql,
        request.params,
        request.allow_partial,
    )
    .await
    {
        Ok(answer) => answer,
        Err(failure) => return error(failure.status(), failure.to_string()),
    };
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    let encoded = if wants_arrow {
        arrow_stream(&answer.batches).map(|bytes| ([(header::CONTENT_TYPE, ARROW_STREAM)], bytes).into_response())
    } else {
        json_result(&answer).map(|text| ([(header::CONTENT_TYPE, "application/json")], text).into_response())
    };
    let mut response = encoded.unwrap_or_else(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the result: {e}"),
        )
    });
    if let Some(Ok(value)) = answer.missing_shard_names().map(|names| HeaderValue::from_str(&names)) {
        response.headers_mut().insert(PARTIAL_HEADER, value);
    }
    response
}

/// `{"columns": [{"name", "type"}], "rows": [{…}], "row_count": n, "elapsed_ms": t}`, and
/// `"partial": {"missing_shards": [{"shard", "table", "worker", "error"}]}` when the answer
/// leaves shards out.
fn json_result(answer: &Answer) -> Result<String, ArrowError> {
    let batches = &answer.batches;
    let elapsed_ms = answer.elapsed.as_secs_f64() * 1e3;
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
    let partial = match answer.missing_shards.is_empty() {
        true => String::new(),
        false => format!(",\"partial\":{}", json!({ "missing_shards": answer.missing_shards })),
    };
    Ok(format!(
        "{{\"columns\":{},\"rows\":{rows},\"row_count\":{row_count},\"elapsed_ms\":{elapsed_ms:.3}{partial}}}",
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
    let mut body = json!({ "ready": ready, "pipelines": pipelines });
    // A coordinator tells how its shards are, without depending on them (a request may allow a
    // partial answer).
    if let Some(cluster) = engine.cluster() {
        let shards: serde_json::Map<String, serde_json::Value> = cluster
            .shard_states()
            .await
            .into_iter()
            .map(|(_, shard, state)| {
                let text = state.map_or_else(|why| format!("unreachable: {why}"), |()| "ready".to_string());
                (shard.name.clone(), json!(text))
            })
            .collect();
        body["shards"] = serde_json::Value::Object(shards);
    }
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let answer = |batches: Vec<RecordBatch>| Answer {
            batches,
            elapsed: std::time::Duration::from_micros(1500),
            missing_shards: Vec::new(),
        };
        let text = json_result(&answer(vec![batch.clone()])).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["row_count"], 2);
        assert_eq!(value["columns"][0]["name"], "doc_id");
        assert_eq!(value["rows"][1]["doc_id"], "b");
        assert!(value["rows"][1]["n"].is_null());
        let empty: serde_json::Value = serde_json::from_str(&json_result(&answer(Vec::new())).unwrap()).unwrap();
        assert_eq!(empty["rows"], json!([]));
        assert!(value.get("partial").is_none(), "a whole answer is not flagged");

        let mut partial = answer(vec![batch]);
        partial.missing_shards.push(crate::cluster::MissingShard {
            shard: "kb-1".into(),
            table: "kb".into(),
            worker: "http://127.0.0.1:7001/".into(),
            error: "cannot reach the worker".into(),
        });
        let flagged: serde_json::Value = serde_json::from_str(&json_result(&partial).unwrap()).unwrap();
        assert_eq!(flagged["partial"]["missing_shards"][0]["shard"], "kb-1");
        assert_eq!(flagged["row_count"], 2);
    }

    #[test]
    fn a_request_allows_partial_answers_by_header_or_json_field() {
        let mut headers = HeaderMap::new();
        assert_eq!(sql_request(&headers, b"SELECT 1").unwrap().allow_partial, None);
        headers.insert(ALLOW_PARTIAL_HEADER, HeaderValue::from_static("TRUE"));
        assert_eq!(sql_request(&headers, b"SELECT 1").unwrap().allow_partial, Some(true));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = br#"{"sql": "SELECT 1", "allow_partial": false}"#;
        assert_eq!(
            sql_request(&headers, body).unwrap().allow_partial,
            Some(false),
            "the body wins"
        );
        let wrong = sql_request(&headers, br#"{"sql": "SELECT 1", "allow_partial": "yes"}"#);
        assert!(wrong.err().unwrap().contains("allow_partial"));
        headers.insert(ALLOW_PARTIAL_HEADER, HeaderValue::from_static("maybe"));
        assert!(
            sql_request(&headers, b"x")
                .err()
                .unwrap()
                .contains(ALLOW_PARTIAL_HEADER)
        );
    }

    #[test]
    fn a_json_request_binds_its_params_and_a_plain_one_binds_none() {
        let mut headers = HeaderMap::new();
        assert_eq!(sql_request(&headers, b"SELECT $1").unwrap().params, None);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let bound = sql_request(&headers, br#"{"sql": "SELECT $1, $2", "params": ["x", 2]}"#).unwrap();
        assert_eq!(
            bound.params,
            Some(vec![ScalarValue::Utf8(Some("x".into())), ScalarValue::Int64(Some(2))])
        );
        let null = sql_request(&headers, br#"{"sql": "SELECT 1", "params": null}"#).unwrap();
        assert_eq!(null.params, None, "null is no params");
        let wrong = sql_request(&headers, br#"{"sql": "SELECT $1", "params": "x"}"#);
        assert!(wrong.err().unwrap().contains("\"params\" must be an array"));
    }
}
