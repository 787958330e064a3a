//! Arrow Flight SQL on `mkflow serve --flight-listen`: the real binary, queried with the
//! arrow-flight Flight SQL client over gRPC, answers as `POST /v1/sql` does (the same batches,
//! the same tokens and roles, the same refusals).

mod common;
#[path = "common/server.rs"]
mod server;

use std::sync::Arc;
use std::time::Duration;

use arrow_flight::sql::CommandGetTables;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightInfo, IpcMessage};
use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{Float32Type, Schema};
use futures::TryStreamExt;
use server::{Server, free_port, mkflow, write_title_pipeline};
use tonic::Code;
use tonic::transport::Channel;

const READER: &str = "flight-reader-token";
const ADMIN: &str = "flight-admin-token";

/// A Flight SQL client of `address`, sending `token` when given.
async fn client(address: &str, token: Option<&str>) -> FlightSqlServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    if let Some(token) = token {
        client.set_token(token.to_string());
    }
    client
}

/// Runs `sql` through Flight SQL: `GetFlightInfo`, then `DoGet` on each endpoint.
async fn flight(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Vec<RecordBatch>, tonic::Status> {
    let info = client.execute(sql.to_string(), None).await.map_err(status)?;
    fetch(client, info).await
}

/// Prepares `sql`, binds `values` (one row) if given, runs it and fetches its result.
async fn prepared(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
    values: Option<RecordBatch>,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    let mut statement = client.prepare(sql.to_string(), None).await.map_err(status)?;
    if let Some(values) = values {
        statement.set_parameters(values).map_err(status)?;
    }
    let info = statement.execute().await.map_err(status)?;
    fetch(client, info).await
}

/// The batches of every endpoint of `info`.
async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.map_err(status)?;
        batches.extend(
            stream
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?,
        );
    }
    Ok(batches)
}

fn status(error: arrow_flight::error::FlightError) -> tonic::Status {
    match error {
        arrow_flight::error::FlightError::Tonic(status) => *status,
        other => tonic::Status::unknown(other.to_string()),
    }
}

/// Runs `sql` through `POST /v1/sql`, asking for an Arrow stream.
async fn http(server: &Server, token: &str, sql: &str) -> Vec<RecordBatch> {
    server
        .sql_arrow(token, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn one_batch(batches: &[RecordBatch]) -> RecordBatch {
    concat_batches(&batches[0].schema(), batches).unwrap()
}

/// `mkflow serve` over an index `kb` of the sample titles, with a reader and an admin token and
/// Flight SQL on; returns the server and the Flight SQL address.
async fn start(work: &std::path::Path) -> (Server, String) {
    let data = work.join("data");
    let docs = work.join("docs.jsonl");
    std::fs::copy(common::sample_corpus(), &docs).unwrap();
    let pipeline = work.join("load.sql");
    write_title_pipeline(&pipeline, &docs);
    let address = format!("127.0.0.1:{}", free_port());
    let mut command = mkflow(&data);
    command
        .env("MKFLOW_AUTH_TOKEN", READER)
        .env("MKFLOW_ADMIN_TOKEN", ADMIN);
    let server = Server::start(
        command,
        &["--flight-listen", &address, "--pipeline", pipeline.to_str().unwrap()],
    )
    .await;
    server.wait_for("/readyz", Duration::from_secs(120)).await;
    (server, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_answers_as_http_does_with_the_same_tokens_and_roles() {
    let work = tempfile::tempdir().unwrap();
    let (server, address) = start(work.path()).await;

    // The same query, the same batches: a search (a text query embedded), a scan, an aggregate.
    let mut reader = client(&address, Some(READER)).await;
    for sql in [
        "SELECT doc_id, title, score FROM vector_search(kb, 'protein folding in cells', 5)",
        "SELECT doc_id, title FROM kb ORDER BY doc_id LIMIT 7",
        "SELECT count(*) AS n FROM kb",
    ] {
        let over_flight = flight(&mut reader, sql).await.unwrap();
        let over_http = http(&server, READER, sql).await;
        assert_eq!(one_batch(&over_flight), one_batch(&over_http), "{sql}");
    }
    let count = one_batch(&flight(&mut reader, "SELECT count(*) AS n FROM kb").await.unwrap());
    assert!(count.num_rows() == 1);

    // A ticket is fetched once.
    let info = reader.execute("SELECT 1 AS one".to_string(), None).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let first: Vec<RecordBatch> = reader
        .do_get(ticket.clone())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(first[0].num_rows(), 1);
    let again = match reader.do_get(ticket).await {
        Ok(stream) => stream.try_collect::<Vec<_>>().await.err().map(|e| e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    assert!(again.is_some_and(|e| e.contains("no result waits")), "a second DoGet");

    // Refusals: no or a wrong token, a bad query, a write by a reader; an admin may write.
    for token in [None, Some("guess")] {
        let refused = flight(&mut client(&address, token).await, "SELECT 1")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{token:?}: {refused}");
        assert!(refused.message().contains("bearer token"), "{refused}");
    }
    let bad = flight(&mut reader, "SELECT nothing FROM nowhere").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("nowhere"), "{bad}");
    let huge = format!("SELECT '{}' AS s", "x".repeat(2 << 20));
    let too_large = flight(&mut reader, &huge).await.unwrap_err();
    assert_eq!(too_large.code(), Code::ResourceExhausted, "{too_large}");
    assert!(too_large.message().contains("max_request_bytes"), "{too_large}");
    let write = "DELETE FROM kb WHERE doc_id = 'missing'";
    let forbidden = flight(&mut reader, write).await.unwrap_err();
    assert_eq!(forbidden.code(), Code::PermissionDenied, "{forbidden}");
    let mut admin = client(&address, Some(ADMIN)).await;
    let deleted = one_batch(&flight(&mut admin, write).await.unwrap());
    assert_eq!(deleted.num_rows(), 1, "the DELETE's count");
}

/// The server's gauge `name` (without labels).
async fn gauge(server: &Server, name: &str) -> i64 {
    let text = server.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// One row of parameter values: `$1` = `value`.
fn values(value: ArrayRef) -> RecordBatch {
    RecordBatch::try_from_iter([("$1", value)]).unwrap()
}

fn text(value: &str) -> RecordBatch {
    values(Arc::new(StringArray::from(vec![value])))
}

/// Column `name` of `batch` as strings.
fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let column = datafusion::arrow::compute::cast(
        batch.column_by_name(name).unwrap(),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    column
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_catalogs_and_sessions_over_flight_sql_and_adbc() {
    let work = tempfile::tempdir().unwrap();
    let (server, address) = start(work.path()).await;
    let mut reader = client(&address, Some(READER)).await;

    // A text bound to a search's query gives the batches of the same search with the text inline.
    let inline = one_batch(
        &http(
            &server,
            READER,
            "SELECT doc_id, title, score FROM vector_search(kb, 'protein folding in cells', 5)",
        )
        .await,
    );
    let search = "SELECT doc_id, title, score FROM vector_search(kb, $1, 5)";
    let bound = one_batch(
        &prepared(&mut reader, search, Some(text("protein folding in cells")))
            .await
            .unwrap(),
    );
    assert_eq!(bound.columns(), inline.columns());

    // A vector bound as the query: a document's own vector finds it first, with the rows of the
    // same search written as a literal.
    let stored = one_batch(
        &http(
            &server,
            READER,
            "SELECT doc_id, embedding FROM kb ORDER BY doc_id LIMIT 1",
        )
        .await,
    );
    let doc_id = strings(&stored, "doc_id")[0].clone();
    let vector = stored
        .column_by_name("embedding")
        .unwrap()
        .as_fixed_size_list()
        .value(0);
    let literal: Vec<String> = vector
        .as_primitive::<Float32Type>()
        .values()
        .iter()
        .map(f32::to_string)
        .collect();
    let by_vector = one_batch(
        &prepared(&mut reader, search, Some(values(stored.column(1).clone())))
            .await
            .unwrap(),
    );
    assert_eq!(strings(&by_vector, "doc_id")[0], doc_id);
    let by_literal = one_batch(
        &http(
            &server,
            READER,
            &format!(
                "SELECT doc_id, title, score FROM vector_search(kb, [{}], 5)",
                literal.join(", ")
            ),
        )
        .await,
    );
    assert_eq!(by_vector.columns(), by_literal.columns());

    // The same two searches over HTTP, their values bound by the request's "params".
    let vector_json: Vec<f32> = vector.as_primitive::<Float32Type>().values().to_vec();
    let over_http = |params: serde_json::Value| {
        let (server, body) = (&server, serde_json::json!({ "sql": search, "params": params }));
        async move { server.sql_json_arrow(READER, &body).await }
    };
    let http_vector = one_batch(&over_http(serde_json::json!([vector_json])).await.unwrap());
    assert_eq!(http_vector.columns(), by_vector.columns());
    let http_text = one_batch(
        &over_http(serde_json::json!(["protein folding in cells"]))
            .await
            .unwrap(),
    );
    assert_eq!(http_text.columns(), inline.columns());
    let unbound_http = over_http(serde_json::json!([])).await.unwrap_err();
    assert!(
        unbound_http.starts_with("400") && unbound_http.contains("1 parameter(s) ($1), 0 value(s) are bound"),
        "{unbound_http}"
    );
    let object = over_http(serde_json::json!([{ "v": 1 }])).await.unwrap_err();
    assert!(
        object.starts_with("400") && object.contains("params[0] (bound to $1): an object cannot be bound"),
        "{object}"
    );

    // A parameter anywhere else, as DataFusion binds it.
    let one = one_batch(
        &prepared(
            &mut reader,
            "SELECT doc_id FROM kb WHERE doc_id = $1",
            Some(text(&doc_id)),
        )
        .await
        .unwrap(),
    );
    assert_eq!(strings(&one, "doc_id"), [doc_id.as_str()]);

    // Refusals: at prepare (bad SQL, a reader's write), at run (values missing or too many), and
    // a placeholder in a statement that was not prepared.
    let bad = prepared(&mut reader, "SELECT nothing FROM nowhere WHERE x = $1", None)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let write = prepared(&mut reader, "DELETE FROM kb WHERE doc_id = $1", None)
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied, "{write}");
    let unbound = prepared(&mut reader, search, None).await.unwrap_err();
    assert_eq!(unbound.code(), Code::InvalidArgument, "{unbound}");
    assert!(
        unbound.message().contains("1 parameter(s) ($1), 0 value(s) are bound"),
        "{unbound}"
    );
    let two_rows = values(Arc::new(StringArray::from(vec!["a", "b"])));
    let too_many = prepared(&mut reader, search, Some(two_rows)).await.unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument, "{too_many}");
    assert!(too_many.message().contains("2 rows of parameters"), "{too_many}");
    let not_prepared = flight(&mut reader, search).await.unwrap_err();
    assert_eq!(not_prepared.code(), Code::InvalidArgument, "{not_prepared}");
    assert!(
        not_prepared.message().contains("no value is bound to $1"),
        "{not_prepared}"
    );

    // Catalog metadata: the index, with its Arrow schema.
    let request = CommandGetTables {
        include_schema: true,
        ..Default::default()
    };
    let info = reader.get_tables(request).await.map_err(status).unwrap();
    let tables = one_batch(&fetch(&mut reader, info).await.unwrap());
    let names = strings(&tables, "table_name");
    let at = names.iter().position(|n| n == "kb").expect("kb is listed");
    let schema_column = tables.column_by_name("table_schema").unwrap().as_binary::<i32>();
    let kb_schema = Schema::try_from(IpcMessage(schema_column.value(at).to_vec().into())).unwrap();
    for column in ["doc_id", "title", "embedding"] {
        assert!(kb_schema.field_with_name(column).is_ok(), "{column} in {kb_schema:?}");
    }

    // One session per connection: a SET stays for the connection's later statements only.
    let show = "SHOW datafusion.explain.show_statistics";
    let mut first = client(&address, Some(ADMIN)).await;
    flight(&mut first, "SET datafusion.explain.show_statistics = true")
        .await
        .unwrap();
    assert_eq!(
        strings(&one_batch(&flight(&mut first, show).await.unwrap()), "value"),
        ["true"]
    );
    let mut second = client(&address, Some(ADMIN)).await;
    assert_ne!(
        strings(&one_batch(&flight(&mut second, show).await.unwrap()), "value"),
        ["true"]
    );
    // Each open connection holds a session (the reader's, the two admins'); closing one ends
    // its session and the statements it prepared and left open.
    assert_eq!(gauge(&server, "mkflow_flight_sessions").await, 3);
    let open = gauge(&server, "mkflow_flight_prepared_statements").await;
    let left_open = first.prepare("SELECT 1".to_string(), None).await.unwrap();
    assert_eq!(gauge(&server, "mkflow_flight_prepared_statements").await, open + 1);
    drop((left_open, first));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gauge(&server, "mkflow_flight_sessions").await != 2
        || gauge(&server, "mkflow_flight_prepared_statements").await != open
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed connection's session or prepared statement stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The ADBC driver from Python, as a user's notebook would query.
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flight_adbc.py");
    let uri = format!("grpc://{address}");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .args([uri.as_str(), READER, doc_id.as_str()])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{} failed (it needs: pip install adbc-driver-flightsql==1.13.0 adbc-driver-manager==1.13.0 pyarrow pandas, as .ci/run does):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let inline_ids = strings(&inline, "doc_id");
    assert_eq!(read["inline"]["doc_id"], serde_json::json!(inline_ids), "{read}");
    assert_eq!(read["text_parameter"], read["inline"], "{read}");
    let scores = inline.column_by_name("score").unwrap().as_primitive::<Float32Type>();
    let expected: Vec<f64> = scores.values().iter().map(|s| f64::from(*s)).collect();
    assert_eq!(read["inline"]["score"], serde_json::json!(expected), "{read}");
    assert_eq!(
        read["vector_parameter"]["doc_id"][0],
        serde_json::json!(doc_id),
        "{read}"
    );
    assert_eq!(read["pandas"]["rows"], 4, "{read}");
    assert_eq!(
        read["pandas"]["columns"],
        serde_json::json!(["doc_id", "title", "fused_score"]),
        "{read}"
    );
    assert!(
        read["tables"].as_array().unwrap().contains(&serde_json::json!("kb")),
        "{read}"
    );
    assert_eq!(
        read["kb_columns"],
        serde_json::json!(["doc_id", "title", "embedding"]),
        "{read}"
    );
    assert_eq!(read["vendor"], "mkflow", "{read}");
}
