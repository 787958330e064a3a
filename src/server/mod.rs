//! `mkflow serve`: runs the configured pipelines (streaming ones keep consuming) and serves SQL,
//! metrics and health over HTTP until SIGTERM or SIGINT, then lets every stream finish and
//! commit its in-flight micro-batch and exits cleanly.
//!
//! - [`config`]: the TOML file and its environment overrides;
//! - [`http`]: the routes;
//! - [`flight`]: Arrow Flight SQL;
//! - [`query`]: running one request's SQL, for either protocol;
//! - [`worker`]: serving as a cluster worker (`--worker`, see [`crate::cluster`]).

pub mod config;
pub mod flight;
pub mod http;
pub mod params;
pub mod query;
pub mod worker;

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion_distributed::Worker;

use crate::streaming::PipelineState;
use crate::{Engine, EngineConfig};
use config::{PipelineSpec, ServerSettings};
use worker::WorkerSessions;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The engine's configuration.
    pub engine: EngineConfig,
    /// HTTP settings.
    pub server: ServerSettings,
    /// Pipelines to run, in order of start (they run concurrently).
    pub pipelines: Vec<PipelineSpec>,
}

/// Serves until a shutdown signal; returns once pipelines have committed and stopped.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&options.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.server.listen))?;
    let address = listener.local_addr()?;
    eprintln!(
        "mkflow serving on http://{address} (POST /v1/sql, GET /metrics, /healthz, /readyz){}",
        if options.server.tokens.is_empty() {
            "; no token configured: /v1/sql is open and read-only"
        } else {
            "; /v1/sql needs a bearer token (read or admin)"
        }
    );
    let slot: Arc<OnceLock<Arc<Engine>>> = Arc::new(OnceLock::new());
    let state = http::AppState {
        engine: slot.clone(),
        settings: Arc::new(options.server.clone()),
        pipelines: Arc::new(options.pipelines.iter().map(|p| p.name.clone()).collect()),
    };
    let server = axum::serve(listener, http::router(state)).with_graceful_shutdown(shutdown_signal());
    let server = tokio::spawn(async move { server.await });
    let flight = match &options.server.flight_listen {
        Some(address) => Some(serve_flight(address, slot.clone(), Arc::new(options.server.clone())).await?),
        None => None,
    };

    let engine = Arc::new(Engine::new(options.engine.clone()).await?);
    let _ = slot.set(engine.clone());
    let mut running = Vec::new();
    for pipeline in options.pipelines {
        engine.streams().set_state(&pipeline.name, PipelineState::Starting);
        let engine = engine.clone();
        running.push(tokio::spawn(async move {
            // Each pipeline runs in a session of its own: its SETs and sources are its own.
            let result = match engine.local_session() {
                Ok(session) => session.run_file(&pipeline.name, &pipeline.file, |_| {}).await,
                Err(e) => Err(e),
            };
            let state = match &result {
                Ok(_) => PipelineState::Finished,
                Err(e) => {
                    log::error!("pipeline {}: {e}", pipeline.name);
                    eprintln!("error: pipeline {} failed: {e}", pipeline.name);
                    PipelineState::Failed(e.to_string())
                }
            };
            engine.streams().set_state(&pipeline.name, state);
        }));
    }
    server.await.context("HTTP server task")?.context("HTTP server")?;
    if let Some(flight) = flight {
        flight
            .await
            .context("Flight SQL server task")?
            .context("Flight SQL server")?;
    }
    eprintln!("shutting down: finishing in-flight micro-batches");
    engine.streams().stop();
    for task in running {
        let _ = task.await;
    }
    eprintln!("mkflow stopped cleanly");
    Ok(())
}

/// Starts serving Arrow Flight SQL on `address` (until a shutdown signal).
async fn serve_flight(
    address: &str,
    engine: Arc<OnceLock<Arc<Engine>>>,
    settings: Arc<ServerSettings>,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for Flight SQL"))?;
    eprintln!(
        "mkflow serving Arrow Flight SQL on grpc://{} (the same tokens and roles as /v1/sql){}",
        listener.local_addr()?,
        if settings.worker {
            ", and as a cluster worker"
        } else {
            ""
        }
    );
    Ok(tokio::spawn(serve_flight_on(
        listener,
        engine,
        settings,
        shutdown_signal(),
    )))
}

/// Serves Arrow Flight SQL on `listener` until `shutdown` resolves (a session per connection,
/// see [`flight::Connection`]).
async fn serve_flight_on(
    listener: tokio::net::TcpListener,
    engine: Arc<OnceLock<Arc<Engine>>>,
    settings: Arc<ServerSettings>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let worker = settings.worker.then(|| {
        Worker::from_session_builder(WorkerSessions::new(engine.clone(), settings.clone())).into_worker_server()
    });
    let service = flight::FlightSql::new(engine, settings);
    let incoming = service.accept(listener);
    tonic::transport::Server::builder()
        .add_service(FlightServiceServer::new(service))
        .add_optional_service(worker)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}
