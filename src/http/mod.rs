//! The HTTP layer: the router ([`routes`]), the handlers ([`api`]), the error model
//! ([`error`]), authentication ([`auth`]), auditing, serving and TLS; and [`run`], which
//! opens every component, starts the background jobs under their supervisor and serves until
//! shutdown. Nothing below this layer imports it (ARCHITECTURE.md).
//!
//! `run(config, listeners, shutdown)` takes listeners that are already bound, so tests serve
//! on `127.0.0.1:0` through the very same code as production.

pub mod api;
pub mod audit;
pub mod auth;
pub mod error;
pub mod extract;
pub mod metrics;
mod routes;
mod serve;
mod state;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use routes::{api_doc, router};
pub use state::{AppState, check, data_keys};

use crate::config::Config;
use crate::counters::RedisError;
use crate::jobs::Supervisor;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::sql::feed::{FeedOptions, Feeder};
use crate::wal::Checkpoints;
use state::data_key_file;

/// The listeners the service answers on, bound before `run` is called.
#[derive(Debug)]
pub struct Listeners {
    /// The API (HTTP and WebSocket).
    pub api: TcpListener,
    /// `/metrics` on its own listener, when configured.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &Config) -> io::Result<Self> {
        let api = TcpListener::bind(config.server.listen).await?;
        let metrics = match config.server.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self { api, metrics })
    }

    /// Returns the API's bound address (the real port when 0 was asked for).
    pub fn api_addr(&self) -> io::Result<SocketAddr> {
        self.api.local_addr()
    }
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory could not be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The metrics recorder could not be built.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The counter store could not be opened.
    #[error("cannot open the counter store: {0}")]
    Counters(#[from] RedisError),
    /// The pseudonymization pepper or the data key could not be loaded.
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    /// The event schema file is invalid.
    #[error(transparent)]
    Schema(#[from] crate::events::schema::SchemaError),
    /// The SQL engine could not start.
    #[error("cannot start sql: {0}")]
    Sql(#[from] crate::sql::SqlError),
    /// The SQL segments on disk could not be listed.
    #[error("cannot start sql: {0}")]
    SqlSegments(#[from] crate::sql::segments::SegmentError),
    /// The SQL window could not start following the log.
    #[error("cannot start sql: {0}")]
    SqlWindow(#[source] crate::wal::WalError),
    /// Saved queries are invalid: every problem found.
    #[error("invalid saved queries: {}", .0.join("; "))]
    SavedQueries(Vec<String>),
    /// The write-ahead log could not be opened.
    #[error("cannot open the write-ahead log: {0}")]
    Ingest(#[from] crate::ingest::IngestError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log in {path}: {source}")]
    Audit {
        /// The directory.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The consent ledger or the data-subject requests journal could not be opened.
    #[error(transparent)]
    Consent(#[from] crate::privacy::LedgerError),
    /// The pipeline could not start.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// A listener failed.
    #[error("serving failed: {0}")]
    Serve(#[from] io::Error),
    /// The HTTP client for the identity providers could not be built.
    #[error("cannot set up the OpenID Connect client: {0}")]
    Identity(#[from] reqwest::Error),
}

/// Runs the service on the given listeners until `shutdown` completes, then lets open
/// requests finish within the configured grace period.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| RunError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    if config.is_open() {
        tracing::warn!(
            listen = %config.server.listen,
            "no auth.tokens configured: the API is open to anyone who can reach this loopback listener"
        );
    }
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let state = AppState::new(&config)?;
    let checkpoints = Arc::new(
        Checkpoints::load(state.ingest.wal().dir())
            .map_err(|e| RunError::Pipeline(crate::pipeline::PipelineError::Wal(e)))?,
    );
    let dedup_snapshots = state
        .ingest
        .dedup_snapshots(checkpoints.clone(), config.ingest.dedup_snapshot_interval)
        .map_err(|e| RunError::Pipeline(crate::pipeline::PipelineError::Wal(e)))?;
    let pipeline = start_pipeline(&config, &state, checkpoints.clone())?;
    let feeder = start_sql_feeder(&config, &state, checkpoints)?;
    let serve_metrics_on_api = listeners.metrics.is_none();
    let app = router(state.clone(), serve_metrics_on_api);

    let jobs = start_jobs(&config, &state, &pipeline);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let limits = serve::Limits {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
    };
    tracing::info!(addr = %listeners.api.local_addr()?, counters = state.counters.kind(), "serving the api");
    let api = serve::serve(listeners.api, app, limits, tls, stop_rx.clone());
    match listeners.metrics {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving metrics");
            let metrics_app = routes::metrics_router(state);
            let metrics = serve::serve(listener, metrics_app, limits, None, stop_rx);
            let (api, metrics) = tokio::join!(api, metrics);
            api?;
            metrics?;
        }
        None => api.await?,
    }
    // Requests are done: the jobs end (the upkeep syncs the audit log a last time), then
    // the pipeline writes what it read and checkpoints it.
    jobs.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || {
        pipeline.stop();
        feeder.stop();
        if let Some(snapshots) = dedup_snapshots {
            snapshots.stop();
        }
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts every background job under one supervisor.
fn start_jobs(config: &Config, state: &AppState, pipeline: &Pipeline) -> Supervisor {
    use crate::jobs::{flags, gauges, keys, privacy_requests, retention, upkeep};
    let mut jobs = Supervisor::new();
    let upkeep = upkeep::Upkeep {
        metrics: state.metrics.clone(),
        audit: state.audit.clone(),
        requests: state.requests.clone(),
        export_retention: config.privacy.export_retention,
        counters: state.counters.clone(),
    };
    jobs.start("upkeep", |stop| upkeep.run(stop));
    let (store, cap) = (state.counters.clone(), config.pipeline.experiment_gauges);
    jobs.start("variant gauges", move |stop| {
        gauges::variants_today(store, cap, stop)
    });
    if !config.experiments.refresh.is_zero() {
        let results = gauges::ExperimentResults {
            flags: state.flags.clone(),
            sql: state.sql.clone(),
            retention: config.sql.retention,
            every: config.experiments.refresh,
            cap,
        };
        jobs.start("experiment gauges", |stop| results.run(stop));
    }
    for issuer in state
        .gate
        .verifier()
        .map(|v| v.issuers())
        .unwrap_or_default()
    {
        let issuer = issuer.clone();
        jobs.start("issuer keys", move |stop| {
            crate::jobs::issuer_keys::refresh(issuer, stop)
        });
    }
    let (store, every) = (state.flags.clone(), config.flags.reload_interval);
    jobs.start("flag watcher", move |stop| flags::watch(store, every, stop));
    let data_keys = keys::DataKeys {
        file: data_key_file(config),
        // Keys given in the configuration are not read from a file.
        every: match config.privacy.data_key {
            Some(_) => std::time::Duration::ZERO,
            None => config.privacy.key_reload_interval,
        },
        sealer: state.ingest.wal().sealer().cloned(),
        records: state.requests.sealer_handle(),
        events: state.sql.events().clone(),
    };
    let ring = state.sql.events().keys();
    jobs.start("data keys", move |stop| keys::watch(data_keys, ring, stop));
    let enforcer = retention::Enforcer {
        config: state.config.clone(),
        ingest: state.ingest.clone(),
        consent: state.consent.clone(),
        assignments: config.storage.data_dir.join("pipeline"),
    };
    jobs.start("retention", |stop| enforcer.run(stop));
    let shop = privacy_requests::Workshop {
        requests: state.requests.clone(),
        consent: state.consent.clone(),
        ingest: state.ingest.clone(),
        events: state.sql.events().clone(),
        pipeline: pipeline.forgetter(),
    };
    let wake = state.request_worker.clone();
    jobs.start("privacy requests", move |stop| {
        privacy_requests::work(shop, wake, stop)
    });
    jobs
}

/// Starts the dataflow from the write-ahead log to the counter store.
fn start_pipeline(
    config: &Config,
    state: &AppState,
    checkpoints: Arc<Checkpoints>,
) -> Result<Pipeline, RunError> {
    let wal = state.ingest.wal().clone();
    let pipeline = &config.pipeline;
    let workers = match pipeline.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let options = PipelineOptions {
        workers,
        cell_ms: pipeline.flush_interval.as_millis().max(1) as u64,
        segments: pipeline.segments.clone(),
        max_pending_events: pipeline.max_pending_events,
        state_dir: config.storage.data_dir.join("pipeline"),
        cluster: (!pipeline.peers.is_empty()).then(|| (pipeline.process, pipeline.peers.clone())),
    };
    Ok(Pipeline::start(
        options,
        wal,
        state.counters.clone(),
        checkpoints,
    )?)
}

/// Starts the thread that follows the log into the SQL window.
fn start_sql_feeder(
    config: &Config,
    state: &AppState,
    checkpoints: Arc<Checkpoints>,
) -> Result<Feeder, RunError> {
    let sql = &config.sql;
    let options = FeedOptions {
        dir: config.storage.data_dir.join("sql"),
        memory_window_ms: sql.memory_window.as_millis() as u64,
        memory_events: sql.memory_events,
        retention_ms: sql.retention.as_millis() as u64,
    };
    Feeder::start(
        options,
        state.ingest.wal().clone(),
        checkpoints,
        state.sql.events().clone(),
    )
    .map_err(RunError::SqlWindow)
}
