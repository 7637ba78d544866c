//! The server: wires every component to HTTP and runs until shutdown.
//!
//! `run(config, listeners, shutdown)` takes listeners that are already bound, so tests serve
//! on `127.0.0.1:0` through the very same code as production.

pub mod auth;
pub mod cohorts_api;
pub mod error;
pub mod flags_api;
pub mod ingest_api;
pub mod metrics;
pub mod ops;
mod routes;
mod serve;
pub mod stream_api;
pub mod telemetry;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRef;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use routes::{api_doc, router};

use crate::config::Config;
use crate::counters::{CounterStore, RedisError};
use crate::events::{Limits, Schema};
use crate::flags::{FlagStore, Snapshot};
use crate::ingest::{IngestExposureSink, IngestOptions, Ingestor};
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::privacy::Pepper;
use crate::wal::{Checkpoints, WalOptions};

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
    /// The pseudonymization pepper could not be loaded.
    #[error(transparent)]
    Pepper(#[from] crate::privacy::PepperError),
    /// The event schema file is invalid.
    #[error(transparent)]
    Schema(#[from] crate::events::schema::SchemaError),
    /// The write-ahead log could not be opened.
    #[error("cannot open the write-ahead log: {0}")]
    Ingest(#[from] crate::ingest::IngestError),
    /// The pipeline could not start.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// A listener failed.
    #[error("serving failed: {0}")]
    Serve(#[from] io::Error),
}

/// What every handler can reach; each extracts the slice it needs.
#[derive(Clone)]
pub struct AppState {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// Access tokens.
    pub tokens: auth::Tokens,
    /// The metrics registry.
    pub metrics: PrometheusHandle,
    /// The counter store.
    pub counters: CounterStore,
    /// The flags in force.
    pub flags: Arc<FlagStore>,
    /// Experiment exposures on their way to ingest.
    pub exposures: Arc<flags_api::Exposures>,
    /// The ingest path.
    pub ingest: Arc<Ingestor>,
    /// Per-key event rate limits.
    pub rate: Arc<ingest_api::RateLimiter>,
}

impl AppState {
    /// Builds the state from the configuration: recovers the write-ahead log, opens stores and
    /// reads the flag directory. Runs inside the runtime (it starts background tasks).
    pub fn new(config: &Config) -> Result<Self, RunError> {
        // First, so that what recovery and the first flag load record is kept.
        let metrics = metrics::install()?;
        let ingest = Arc::new(open_ingest(config)?);
        let flags = FlagStore::load(config.flags.dir.clone());
        let exposures = flags_api::Exposures::new(
            config.flags.exposure_dedup_capacity,
            Arc::new(IngestExposureSink::start(ingest.clone(), 65_536)),
        );
        Ok(Self {
            config: Arc::new(config.clone()),
            tokens: auth::Tokens::new(&config.auth.tokens),
            metrics,
            counters: CounterStore::open(&config.counters)?,
            flags,
            exposures: Arc::new(exposures),
            ingest,
            rate: Arc::new(ingest_api::RateLimiter::new(
                config.ingest.rate_limit,
                config.ingest.rate_burst,
            )),
        })
    }
}

/// Opens the ingest path: schema, pepper, and the write-ahead log (replayed into dedup).
fn open_ingest(config: &Config) -> Result<Ingestor, RunError> {
    let ingest = &config.ingest;
    let schema = match &ingest.schema_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            Schema::parse(&text)?
        }
        None => Schema::reading_app(),
    };
    let data_dir = &config.storage.data_dir;
    let pepper_file = config
        .privacy
        .pepper_file
        .clone()
        .unwrap_or_else(|| data_dir.join("keys").join("pepper"));
    let started = std::time::Instant::now();
    let (ingestor, recovery) = Ingestor::open(IngestOptions {
        schema,
        limits: Limits {
            late_horizon: ingest.late_horizon.as_millis() as i64,
            future_tolerance: ingest.future_tolerance.as_millis() as i64,
        },
        pepper: match &config.privacy.pepper {
            Some(secret) => Pepper::parse(secret.expose()).map_err(|line| {
                crate::privacy::PepperError::Format {
                    path: "privacy.pepper".into(),
                    line,
                }
            })?,
            None => Pepper::load_or_create(&pepper_file)?,
        },
        wal: WalOptions {
            dir: data_dir.join("wal"),
            segment_bytes: ingest.wal_segment_size.0,
            queue: ingest.wal_queue,
            group_bytes: ingest.wal_group_size.as_usize(),
        },
        dedup_ids: ingest.dedup_event_ids,
        dedup_gaps: ingest.dedup_gaps_per_device,
    })?;
    tracing::info!(
        epochs = recovery.epochs,
        events = recovery.events,
        truncated_bytes = recovery.truncated_bytes,
        damaged = recovery.damaged.len(),
        seconds = started.elapsed().as_secs_f64(),
        "write-ahead log recovered"
    );
    for damage in &recovery.damaged {
        tracing::error!(%damage, "write-ahead log damage found during recovery");
    }
    Ok(ingestor)
}

impl FromRef<AppState> for auth::Tokens {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
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
    let state = AppState::new(&config)?;
    state.flags.watch(config.flags.reload_interval)?;
    let pipeline = start_pipeline(&config, &state)?;
    let serve_metrics_on_api = listeners.metrics.is_none();
    let app = router(state.clone(), serve_metrics_on_api);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Histograms hold their samples until upkeep drains them: without it, a node nobody
    // scrapes would grow without bound.
    let handle = state.metrics.clone();
    let mut stopping = stop_rx.clone();
    let counters = state.counters.clone();
    let gauge_cap = config.pipeline.experiment_gauges;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = stopping.wait_for(|stopped| *stopped) => true,
            };
            if stop {
                break;
            }
            handle.run_upkeep();
            if let CounterStore::Embedded(store) = &counters {
                store.expire(ingest_api::now_ms());
            }
            cohorts_api::publish_gauges(&counters, gauge_cap).await;
        }
    });
    let limits = serve::Limits {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
    };
    tracing::info!(addr = %listeners.api.local_addr()?, counters = state.counters.kind(), "serving the api");
    let api = serve::serve(listeners.api, app, limits, stop_rx.clone());
    match listeners.metrics {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving metrics");
            let metrics_app = routes::metrics_router(state);
            let metrics = serve::serve(listener, metrics_app, limits, stop_rx);
            let (api, metrics) = tokio::join!(api, metrics);
            api?;
            metrics?;
        }
        None => api.await?,
    }
    // Requests are done: write what the pipeline read and checkpoint it.
    let _ = tokio::task::spawn_blocking(move || pipeline.stop()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the dataflow from the write-ahead log to the counter store.
fn start_pipeline(config: &Config, state: &AppState) -> Result<Pipeline, RunError> {
    let wal = state.ingest.wal().clone();
    let checkpoints = Arc::new(
        Checkpoints::load(wal.dir())
            .map_err(|e| RunError::Pipeline(crate::pipeline::PipelineError::Wal(e)))?,
    );
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

/// Checks the configuration's flag files and saved queries; returns every problem found.
pub fn check(config: &Config) -> Vec<String> {
    let flags = match crate::flags::files::read_dir(&config.flags.dir) {
        Ok(contents) => Snapshot::build(contents, None).problems,
        Err(problem) => vec![problem],
    };
    let (_, queries) = crate::sql::saved::read_dir(&config.sql.queries_dir);
    flags
        .iter()
        .map(ToString::to_string)
        .chain(queries.iter().map(ToString::to_string))
        .collect()
}
