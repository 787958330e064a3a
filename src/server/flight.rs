//! Arrow Flight SQL on `mkflow serve` (`flight_listen`): the SQL of `POST /v1/sql`, with the
//! same bearer tokens and roles, limits and time limit, for clients that speak Flight SQL (the
//! ADBC and JDBC drivers, and the tools built on them) and get Arrow batches without JSON.
//!
//! A statement (`CommandStatementQuery`) runs when its `GetFlightInfo` arrives, so a bad query
//! fails there, with the message `/v1/sql` gives; its result waits under an unguessable ticket
//! for the `DoGet` that fetches it, once ([`MAX_WAITING`] results and [`MAX_WAITING_BYTES`] wait
//! at most; the oldest is dropped first). Other Flight SQL commands are answered "unimplemented".

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use axum::http::StatusCode;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use super::config::ServerSettings;
use super::query::{QueryFailure, role_of, run_query};
use crate::Engine;
use crate::access::Role;

/// Results that wait for their `DoGet` at most.
pub const MAX_WAITING: usize = 64;

/// Bytes the waiting results hold at most (each is bounded by `max_result_bytes` on its own;
/// clients that never fetch must not pile up 64 of them).
pub const MAX_WAITING_BYTES: usize = 1 << 30;

/// A result waiting for its `DoGet`.
struct Waiting {
    handle: Vec<u8>,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// The batches' memory.
    bytes: usize,
}

/// The Flight SQL service.
pub struct FlightSql {
    engine: Arc<OnceLock<Arc<Engine>>>,
    settings: Arc<ServerSettings>,
    waiting: Mutex<VecDeque<Waiting>>,
}

impl FlightSql {
    /// A service running statements on `engine` (once loaded) under `settings`.
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>, settings: Arc<ServerSettings>) -> Self {
        FlightSql {
            engine,
            settings,
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    /// The caller's role, from its `authorization: Bearer <token>` metadata.
    fn role<T>(&self, request: &Request<T>) -> Result<Role, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        role_of(&self.settings, authorization).ok_or_else(|| {
            Status::unauthenticated("missing or wrong bearer token (send authorization: Bearer <token>)")
        })
    }

    /// Keeps `result` for its `DoGet`, dropping the oldest waiting results past
    /// [`MAX_WAITING`] results or [`MAX_WAITING_BYTES`].
    fn wait(&self, result: Waiting) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes: usize = waiting.iter().map(|w| w.bytes).sum();
        while waiting.len() == MAX_WAITING || (!waiting.is_empty() && bytes + result.bytes > MAX_WAITING_BYTES) {
            bytes -= waiting.pop_front().map_or(0, |w| w.bytes);
        }
        waiting.push_back(result);
    }

    fn take(&self, handle: &[u8]) -> Option<Waiting> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let at = waiting.iter().position(|w| w.handle == handle)?;
        waiting.remove(at)
    }
}

/// The Flight status that fits a failed query (the HTTP status `/v1/sql` would give, mapped).
fn status_of(failure: QueryFailure) -> Status {
    let message = failure.to_string();
    match failure.status() {
        StatusCode::BAD_REQUEST => Status::invalid_argument(message),
        StatusCode::FORBIDDEN => Status::permission_denied(message),
        StatusCode::PAYLOAD_TOO_LARGE => Status::resource_exhausted(message),
        StatusCode::REQUEST_TIMEOUT => Status::deadline_exceeded(message),
        StatusCode::SERVICE_UNAVAILABLE => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// 16 bytes another client cannot guess: two SipHash values under the process's random keys
/// (a fresh key pair for each handle).
fn new_handle() -> Vec<u8> {
    let keys = RandomState::new();
    [keys.hash_one(1u8), keys.hash_one(2u8)]
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect()
}

type DataStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let role = self.role(&request)?;
        if query.query.len() > self.settings.max_request_bytes {
            return Err(Status::resource_exhausted(format!(
                "statement exceeds max_request_bytes ({} bytes)",
                self.settings.max_request_bytes
            )));
        }
        let (batches, _) = run_query(&self.engine, &self.settings, role, &query.query)
            .await
            .map_err(status_of)?;
        let schema = batches
            .first()
            .map_or_else(|| Arc::new(Schema::empty()), RecordBatch::schema);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        let handle = new_handle();
        let ticket = TicketStatementQuery {
            statement_handle: handle.clone().into(),
        };
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(format!("cannot encode the result's schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(request.into_inner())
            .with_total_records(rows as i64)
            .with_total_bytes(bytes as i64);
        self.wait(Waiting {
            handle,
            schema,
            batches,
            bytes,
        });
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.role(&request)?;
        let result = self.take(&ticket.statement_handle).ok_or_else(|| {
            Status::not_found("no result waits under this ticket (each is fetched once; run the statement again)")
        })?;
        let batches = futures::stream::iter(result.batches.into_iter().map(Ok));
        let stream: DataStream = FlightDataEncoderBuilder::new()
            .with_schema(result.schema)
            .build(batches)
            .map_err(Status::from)
            .boxed();
        Ok(Response::new(stream))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
