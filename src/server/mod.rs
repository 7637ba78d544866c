//! The server: wires every component to HTTP and runs until shutdown.
//!
//! `run(config, listeners, shutdown)` takes listeners that are already bound, so tests serve
//! on `127.0.0.1:0` through the very same code as production.

pub mod auth;
pub mod error;
pub mod metrics;
pub mod ops;
mod routes;
mod serve;
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
use crate::flags::files::DirReport;

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
    /// A listener failed.
    #[error("serving failed: {0}")]
    Serve(#[from] io::Error),
}

/// What the flag directory held at start.
#[derive(Debug)]
pub struct FlagsStatus {
    /// Flags loaded.
    pub flags: usize,
    /// Files loaded.
    pub files: usize,
    /// Problems found, as `file:line: reason`.
    pub problems: Vec<String>,
}

impl FlagsStatus {
    fn from_report(report: &DirReport) -> Self {
        Self {
            flags: report.flag_count(),
            files: report.files.len(),
            problems: report.problems.iter().map(ToString::to_string).collect(),
        }
    }

    /// Describes the status in one line.
    pub fn summary(&self) -> String {
        if self.problems.is_empty() {
            format!("{} flags from {} files", self.flags, self.files)
        } else {
            format!(
                "{} problem(s): {}",
                self.problems.len(),
                self.problems.join("; ")
            )
        }
    }
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
    /// The flags loaded at start.
    pub flags: Arc<FlagsStatus>,
}

impl AppState {
    /// Builds the state from the configuration: opens stores and reads the flag directory.
    pub fn new(config: &Config) -> Result<Self, RunError> {
        let flags = crate::flags::files::read_dir(&config.flags.dir);
        for problem in &flags.problems {
            tracing::error!(%problem, "flag file rejected");
        }
        Ok(Self {
            config: Arc::new(config.clone()),
            tokens: auth::Tokens::new(&config.auth.tokens),
            metrics: metrics::install()?,
            counters: CounterStore::open(&config.counters)?,
            flags: Arc::new(FlagsStatus::from_report(&flags)),
        })
    }
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
    let serve_metrics_on_api = listeners.metrics.is_none();
    let app = router(state.clone(), serve_metrics_on_api);

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
    tracing::info!("stopped");
    Ok(())
}

/// Checks the configuration's flag files and saved queries; returns every problem found.
pub fn check(config: &Config) -> Vec<String> {
    let flags = crate::flags::files::read_dir(&config.flags.dir);
    let (_, queries) = crate::sql::saved::read_dir(&config.sql.queries_dir);
    flags
        .problems
        .iter()
        .map(ToString::to_string)
        .chain(queries.iter().map(ToString::to_string))
        .collect()
}
