//! Arrow Flight SQL on `mkflow serve --flight-listen`: the real binary, queried with the
//! arrow-flight Flight SQL client over gRPC, answers as `POST /v1/sql` does (the same batches,
//! the same tokens and roles, the same refusals).

mod common;
#[path = "common/server.rs"]
mod server;

use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::ipc::reader::StreamReader;
use futures::TryStreamExt;
use server::{Server, free_port, mkflow};
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
    let response = server
        .client
        .post(format!("{}/v1/sql", server.base))
        .bearer_auth(token)
        .header("accept", "application/vnd.apache.arrow.stream")
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{sql}: {}", response.status());
    let bytes = response.bytes().await.unwrap();
    StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn one_batch(batches: &[RecordBatch]) -> RecordBatch {
    concat_batches(&batches[0].schema(), batches).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_answers_as_http_does_with_the_same_tokens_and_roles() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let docs = work.path().join("docs.jsonl");
    std::fs::copy(common::sample_corpus(), &docs).unwrap();
    let pipeline = work.path().join("load.sql");
    std::fs::write(
        &pipeline,
        format!(
            "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}';
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, embed(title) FROM docs;",
            docs.display()
        ),
    )
    .unwrap();
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
