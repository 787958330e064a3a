//! Arrow Flight SQL on `mkflow serve` (`flight_listen`): the SQL of `POST /v1/sql`, with the
//! same bearer tokens and roles, limits and time limit, for clients that speak Flight SQL (the
//! ADBC and JDBC drivers, and the tools built on them) and get Arrow batches without JSON.
//!
//! - Statements (`CommandStatementQuery`) run when their `GetFlightInfo` arrives, so a bad query
//!   fails there, with the message `/v1/sql` gives; the result waits under an unguessable ticket
//!   for the `DoGet` that fetches it, once ([`sessions::WaitingResults`]).
//! - Prepared statements: `CreatePreparedStatement` parses, checks and (for a query) plans
//!   once; `DoPut` binds one row of values to `$1`, `$2`, … (a text or a vector for a search
//!   function's query, any value elsewhere); `GetFlightInfo` runs it with them.
//! - Each connection has a session of its own: its `SET`s stay for its later statements, and
//!   it ends when the connection closes ([`connection`]).
//! - Catalog metadata ([`catalog`]): `GetCatalogs`, `GetDbSchemas`, `GetTables` (with schemas),
//!   `GetTableTypes`, `GetSqlInfo`.
//!
//! Other commands (updates by `DoPut`, transactions, Substrait) are answered "unimplemented";
//! statements that write run as queries that return their count.

mod catalog;
mod connection;
mod sessions;

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use axum::http::StatusCode;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ScalarValue;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use super::config::ServerSettings;
use super::query::{
    ALLOW_PARTIAL_HEADER, Answer, PARTIAL_HEADER, QueryFailure, allow_partial_flag, metrics_label, role_of,
    run_in_session, run_prepared,
};
use super::worker::EngineShards;
use crate::Engine;
use crate::access::Role;
use crate::cluster::client::{SHARD_READY_ACTION, SHARD_SCHEMA_ACTION, SHARD_TEXT_STATISTICS_ACTION};
use crate::cluster::codec::{decode_call, encode_schema};
use sessions::{MAX_PREPARED, Prepared, Sessions, Waiting, WaitingResults};

pub use connection::{Connection, ConnectionInfo};
pub use sessions::{MAX_SESSIONS, MAX_WAITING, MAX_WAITING_BYTES};

/// The Flight SQL service.
pub struct FlightSql {
    settings: Arc<ServerSettings>,
    sessions: Arc<Sessions>,
    waiting: WaitingResults,
}

impl FlightSql {
    /// A service running statements on `engine` (once loaded) under `settings`.
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>, settings: Arc<ServerSettings>) -> Self {
        FlightSql {
            settings,
            sessions: Arc::new(Sessions::new(engine)),
            waiting: WaitingResults::default(),
        }
    }

    /// The connections `listener` accepts, for this service (see [`connection::accept`]).
    pub fn accept(&self, listener: tokio::net::TcpListener) -> impl Stream<Item = std::io::Result<Connection>> + use<> {
        connection::accept(listener, self.sessions.clone())
    }

    /// The caller's role, from its `authorization: Bearer <token>` metadata.
    fn role<T>(&self, request: &Request<T>) -> Result<Role, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        role_of(&self.settings, authorization).ok_or_else(|| {
            Status::unauthenticated("missing or wrong bearer token (send authorization: Bearer <token>)")
        })
    }

    /// The caller's role and its connection's session.
    fn session<T>(&self, request: &Request<T>) -> Result<(Role, Arc<crate::engine::Session>), Status> {
        let role = self.role(request)?;
        let session = self.sessions.of(connection_of(request), role).map_err(status_of)?;
        Ok((role, session))
    }

    /// Refuses SQL longer than `max_request_bytes`, as `/v1/sql` does.
    fn check_size(&self, sql: &str) -> Result<(), Status> {
        if sql.len() > self.settings.max_request_bytes {
            return Err(Status::resource_exhausted(format!(
                "statement exceeds max_request_bytes ({} bytes)",
                self.settings.max_request_bytes
            )));
        }
        Ok(())
    }

    /// The statement prepared under `handle`, if the caller's role prepared it.
    fn prepared_for<T>(&self, request: &Request<T>, handle: &[u8]) -> Result<Arc<Prepared>, Status> {
        let role = self.role(request)?;
        let prepared = self.sessions.prepared().get(handle).ok_or_else(|| {
            Status::not_found(format!(
                "no prepared statement has this handle (closed, or dropped past {MAX_PREPARED} open ones); prepare it again"
            ))
        })?;
        if prepared.role != role {
            return Err(Status::permission_denied(
                "the prepared statement belongs to another token's role",
            ));
        }
        Ok(prepared)
    }

    /// The flight info of a metadata `command` whose result has `schema`: its ticket is the
    /// command itself (its `DoGet` answers it).
    fn metadata_info(
        &self,
        request: Request<FlightDescriptor>,
        command: &impl ProstMessageExt,
        schema: SchemaRef,
    ) -> Result<Response<FlightInfo>, Status> {
        self.role(&request)?;
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(internal_status("cannot encode a schema"))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.as_any().encode_to_vec())))
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }

    /// Keeps the answer's batches for their `DoGet`; the flight info that names them (and the
    /// shards a partial answer leaves out).
    fn result_info(&self, answer: Answer, descriptor: FlightDescriptor) -> Result<Response<FlightInfo>, Status> {
        let missing = answer.missing_shard_names();
        let batches = answer.batches;
        let schema = batches
            .first()
            .map_or_else(|| Arc::new(Schema::empty()), RecordBatch::schema);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(internal_status("cannot encode the result's schema"))?
            .with_descriptor(descriptor)
            .with_total_records(rows as i64)
            .with_total_bytes(bytes as i64);
        let handle = self.waiting.wait(Waiting { schema, batches, bytes });
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        };
        let info = info.with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())));
        let Some(names) = missing else {
            return Ok(Response::new(info));
        };
        // A partial answer (cluster): the shards left out, in the info's app metadata and a
        // response header.
        let partial = serde_json::json!({ "partial": { "missing_shards": answer.missing_shards } });
        let mut response = Response::new(info.with_app_metadata(partial.to_string().into_bytes()));
        if let Ok(value) = names.parse() {
            response.metadata_mut().insert(PARTIAL_HEADER, value);
        }
        Ok(response)
    }

    /// Whether the caller allows a partial answer (its `mkflow-allow-partial` metadata; `None`:
    /// as the shard map says).
    fn allow_partial<T>(&self, request: &Request<T>) -> Result<Option<bool>, Status> {
        allow_partial_flag(request.metadata().get(ALLOW_PARTIAL_HEADER).map(|v| v.as_bytes()))
            .map_err(Status::invalid_argument)
    }
}

/// The id of the connection `request` came on.
fn connection_of<T>(request: &Request<T>) -> Option<u64> {
    request.extensions().get::<ConnectionInfo>().map(|c| c.id)
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

/// An internal error while answering, with what was being done.
fn internal_status<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> Status + '_ {
    move |e| Status::internal(format!("{context}: {e}"))
}

/// `schema` as the IPC message Flight SQL carries schemas in.
fn schema_bytes(schema: &Schema) -> Result<Vec<u8>, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(internal_status("cannot encode a schema"))?;
    Ok(bytes.to_vec())
}

type DataStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

/// The one batch a metadata command answers (built by arrow-flight's builders), as a `DoGet`
/// stream; `what` names it in an error.
fn metadata_stream(batch: Result<RecordBatch, FlightError>, what: &str) -> Result<Response<DataStream>, Status> {
    let batch = batch.map_err(internal_status(what))?;
    Ok(data_stream(batch.schema(), vec![batch]))
}

/// `batches` as a `DoGet` stream.
fn data_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> Response<DataStream> {
    let batches = futures::stream::iter(batches.into_iter().map(Ok));
    Response::new(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from)
            .boxed(),
    )
}

/// The values of one row of bound parameters, in column order (`$1`, `$2`, …).
fn parameter_values(batches: &[RecordBatch]) -> Result<Vec<ScalarValue>, Status> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows > 1 {
        return Err(Status::invalid_argument(format!(
            "{rows} rows of parameters are bound: a prepared query runs with one row of values"
        )));
    }
    let Some(batch) = batches.iter().find(|b| b.num_rows() == 1) else {
        return Ok(Vec::new());
    };
    batch
        .columns()
        .iter()
        .map(|column| ScalarValue::try_from_array(column, 0))
        .collect::<Result<_, _>>()
        .map_err(|e| Status::invalid_argument(format!("cannot read a bound value: {e}")))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (_, session) = self.session(&request)?;
        self.check_size(&query.query)?;
        let engine = self.sessions.engine().map_err(status_of)?;
        let allow_partial = self.allow_partial(&request)?;
        let answer = run_in_session(&engine, &session, &self.settings, &query.query, None, allow_partial)
            .await
            .map_err(status_of)?;
        self.result_info(answer, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.role(&request)?;
        let result = self.waiting.take(&ticket.statement_handle).ok_or_else(|| {
            Status::not_found("no result waits under this ticket (each is fetched once; run the statement again)")
        })?;
        Ok(data_stream(result.schema, result.batches))
    }

    /// The cluster's questions, on a worker: the columns a shard call answers, without running
    /// it ([`SHARD_SCHEMA_ACTION`]); the BM25 statistics of its text searches over this shard
    /// ([`SHARD_TEXT_STATISTICS_ACTION`]).
    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let kind = request.get_ref().r#type.clone();
        let cluster_action =
            [SHARD_SCHEMA_ACTION, SHARD_TEXT_STATISTICS_ACTION, SHARD_READY_ACTION].contains(&kind.as_str());
        if !cluster_action || !self.settings.worker {
            return Err(Status::invalid_argument(format!(
                "unknown action '{kind}'{}",
                if cluster_action {
                    " (this server is not a cluster worker: start it with --worker)"
                } else {
                    ""
                }
            )));
        }
        let role = self.role(&request)?;
        let engine = self.sessions.engine().map_err(status_of)?;
        let call = decode_call(&request.get_ref().body).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let shards = EngineShards::new(engine, role);
        let refused = |e: datafusion::error::DataFusionError| Status::invalid_argument(e.to_string());
        let body = if kind == SHARD_SCHEMA_ACTION {
            encode_schema(shards.schema(&call).await.map_err(refused)?.as_ref())
                .map_err(|e| Status::internal(e.to_string()))?
        } else if kind == SHARD_READY_ACTION {
            shards.ready(&call).await.map_err(refused)?;
            Vec::new()
        } else {
            let statistics = shards.text_statistics(&call).await.map_err(refused)?;
            serde_json::to_vec(&statistics).map_err(|e| Status::internal(e.to_string()))?
        };
        let answer = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(futures::stream::once(
            async move { Ok(answer) },
        ))))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (role, session) = self.session(&request)?;
        self.check_size(&query.query)?;
        let statement = session
            .prepare(&query.query)
            .await
            .map_err(|e| status_of(QueryFailure::Failed(e)))?;
        let engine = self.sessions.engine().map_err(status_of)?;
        let dataset_schema = match &statement.schema {
            Some(schema) => schema_bytes(schema)?,
            None => Vec::new(),
        };
        // Their types are known once bound (a search's query may be a text or a vector).
        let parameters: Vec<Field> = statement
            .parameters
            .iter()
            .map(|id| Field::new(id, DataType::Null, true))
            .collect();
        let parameter_schema = schema_bytes(&Schema::new(parameters))?;
        let handle = self.sessions.prepared().insert(Arc::new(Prepared {
            connection: connection_of(&request),
            role,
            session,
            label: metrics_label(&engine, &query.query),
            statement,
            values: Mutex::new(Vec::new()),
        }));
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: dataset_schema.into(),
            parameter_schema: parameter_schema.into(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.prepared_for(&request, &query.prepared_statement_handle)?;
        self.sessions.prepared().remove(&query.prepared_statement_handle);
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let prepared = self.prepared_for(&request, &query.prepared_statement_handle)?;
        let limit = self.settings.max_request_bytes;
        let mut stream = FlightRecordBatchStream::new_from_flight_data(request.into_inner().map_err(FlightError::from));
        let (mut batches, mut bytes) = (Vec::new(), 0usize);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| Status::invalid_argument(format!("cannot read the bound values: {e}")))?;
            bytes += batch.get_array_memory_size();
            if bytes > limit {
                return Err(Status::resource_exhausted(format!(
                    "the bound values exceed max_request_bytes ({limit} bytes)"
                )));
            }
            batches.push(batch);
        }
        *prepared.values.lock().unwrap_or_else(|e| e.into_inner()) = parameter_values(&batches)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let prepared = self.prepared_for(&request, &query.prepared_statement_handle)?;
        let values = prepared.values.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let engine = self.sessions.engine().map_err(status_of)?;
        let allow_partial = self.allow_partial(&request)?;
        let answer = run_prepared(
            &engine,
            &prepared.session,
            &self.settings,
            &prepared.statement,
            values,
            prepared.label,
            allow_partial,
        )
        .await
        .map_err(status_of)?;
        self.result_info(answer, request.into_inner())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, &query, schema)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (_, session) = self.session(&request)?;
        metadata_stream(catalog::catalogs(session.context(), query.into_builder()), "catalogs")
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, &query, schema)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (_, session) = self.session(&request)?;
        metadata_stream(catalog::schemas(session.context(), query.into_builder()), "schemas")
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, &query, schema)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (_, session) = self.session(&request)?;
        metadata_stream(catalog::tables(session.context(), query.into_builder()).await, "tables")
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, &query, schema)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.role(&request)?;
        let mut builder = query.into_builder();
        for table_type in catalog::TABLE_TYPES {
            builder.append(table_type);
        }
        metadata_stream(builder.build(), "table types")
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&catalog::SQL_INFO).schema();
        self.metadata_info(request, &query, schema)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.role(&request)?;
        metadata_stream(query.into_builder(&catalog::SQL_INFO).build(), "sql info")
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
