//! The coordinator's questions to workers, outside query execution: Flight actions about a
//! shard call (its columns, its BM25 statistics, whether the shard is ready), over one kept
//! gRPC channel per worker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use arrow_flight::Action;
use arrow_flight::flight_service_client::FlightServiceClient;
use datafusion::common::{DataFusionError, Result};
use tonic::transport::{Channel, Endpoint};
use url::Url;

use super::codec::encode_call;
use super::exec::ShardCall;

/// The Flight action a worker answers with the schema of a shard call (its body: the call).
pub const SHARD_SCHEMA_ACTION: &str = "mkflow.shard_schema";

/// The Flight action a worker answers with the BM25 statistics of a shard call's text searches
/// (JSON `TextStatistics`; its body: the call).
pub const SHARD_TEXT_STATISTICS_ACTION: &str = "mkflow.shard_text_statistics";

/// The Flight action a worker answers (with an empty body) when it can run calls on a shard:
/// it is started, accepts the token and has the shard's table (its body: a scan call).
pub const SHARD_READY_ACTION: &str = "mkflow.shard_ready";

/// How long a coordinator waits to connect to a worker, and for its answer to a question.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks workers about shard calls, with the cluster's token.
#[derive(Debug)]
pub struct WorkerClient {
    token: Option<String>,
    /// One gRPC channel per worker (it reconnects by itself once a worker is back).
    channels: Mutex<HashMap<Url, Channel>>,
}

impl WorkerClient {
    /// A client sending `token` (as `authorization: Bearer …`) when given.
    pub fn new(token: Option<String>) -> Self {
        WorkerClient {
            token,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to `worker`: the one kept for it (opened on first use) when `connection`
    /// is [`Connection::Kept`]. A channel's background task lives on the runtime that opened
    /// it, so only the server's runtime keeps one.
    fn channel(&self, worker: &Url, connection: Connection) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if connection == Connection::Kept
            && let Some(channel) = channels.get(worker)
        {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(worker.to_string())
            .map_err(|e| DataFusionError::Configuration(format!("worker {worker}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ASK_TIMEOUT)
            .connect_lazy();
        if connection == Connection::Kept {
            channels.insert(worker.clone(), channel.clone());
        }
        Ok(channel)
    }

    /// Asks `call`'s worker the Flight action `action` about it; the answer's body.
    pub async fn ask(&self, action: &str, call: &ShardCall) -> Result<prost::bytes::Bytes> {
        self.ask_over(Connection::Kept, action, call).await
    }

    /// [`WorkerClient::ask`] over `connection`.
    pub async fn ask_over(
        &self,
        connection: Connection,
        action: &str,
        call: &ShardCall,
    ) -> Result<prost::bytes::Bytes> {
        let failed =
            |what: String| DataFusionError::Execution(format!("shard {} on {}: {what}", call.shard, call.worker));
        let mut client = FlightServiceClient::new(self.channel(&call.worker, connection)?);
        let mut request = tonic::Request::new(Action {
            r#type: action.into(),
            body: encode_call(call).into(),
        });
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| failed("the cluster token is not a valid header value".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let unreachable = |status: tonic::Status| {
            if status.code() == tonic::Code::Unavailable {
                DataFusionError::External(Box::new(WorkerUnreachable {
                    shard: call.shard.clone(),
                    worker: call.worker.to_string(),
                    message: status.message().to_string(),
                }))
            } else {
                failed(status.message().to_string())
            }
        };
        let mut answers = client.do_action(request).await.map_err(unreachable)?.into_inner();
        let answer = answers
            .message()
            .await
            .map_err(unreachable)?
            .ok_or_else(|| failed(format!("no answer to {action}")))?;
        Ok(answer.body)
    }
}

/// A worker that did not answer a question about one of its shards (it is down, or not
/// listening there).
#[derive(Debug, thiserror::Error)]
#[error("shard {shard} on {worker}: cannot reach the worker ({message}); is `mkflow serve --worker` running there?")]
pub struct WorkerUnreachable {
    /// The shard asked about.
    pub shard: String,
    /// The worker's address.
    pub worker: String,
    /// What the connection said.
    pub message: String,
}

/// No shard of a table could be reached (each one's failure is a [`WorkerUnreachable`] or a
/// timeout).
#[derive(Debug, thiserror::Error)]
#[error("no shard of '{table}' is reachable: {}", failures.join("; "))]
pub struct TableUnreachable {
    /// The sharded table.
    pub table: String,
    /// Why each shard could not be reached.
    pub failures: Vec<String>,
}

/// Which connection a question to a worker goes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// The channel the cluster keeps for the worker.
    Kept,
    /// A channel of its own (a question asked on a runtime of its own).
    Fresh,
}
