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
pub mod metrics;
mod routes;
mod serve;
pub mod tls;

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
use crate::counters::{CounterStore, RedisError, Retention};
use crate::crypto::KeyRing;
use crate::crypto::Sealer;
use crate::events::{Limits, Schema};
use crate::flags::{FlagStore, Snapshot};
use crate::ingest::exposure::{Exposures, IngestExposureSink};
use crate::ingest::rate::RateLimiter;
use crate::ingest::{ConsentPolicy, IngestOptions, Ingestor};
use crate::jobs::Supervisor;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::privacy::erasure::Suppressions;
use crate::privacy::{ConsentLedger, Pepper};
use crate::sql::feed::{FeedOptions, Feeder};
use crate::sql::table::RecentEvents;
use crate::sql::{SqlEngine, SqlOptions};
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
    /// The pseudonymization pepper or the data key could not be loaded.
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    /// The event schema file is invalid.
    #[error(transparent)]
    Schema(#[from] crate::events::schema::SchemaError),
    /// The SQL engine could not start.
    #[error("cannot start sql: {0}")]
    Sql(String),
    /// Saved queries are invalid.
    #[error("invalid saved queries: {0}")]
    SavedQueries(String),
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
    pub exposures: Arc<Exposures>,
    /// The content hash of the flags in force, changed on every applied reload.
    pub flag_changes: watch::Receiver<u64>,
    /// The ingest path.
    pub ingest: Arc<Ingestor>,
    /// Per-key event rate limits.
    pub rate: Arc<RateLimiter>,
    /// SQL over the recent window.
    pub sql: Arc<SqlEngine>,
    /// Guardians' consents.
    pub consent: Arc<ConsentLedger>,
    /// Who did what.
    pub audit: Arc<audit::AuditLog>,
    /// Data-subject requests.
    pub requests: Arc<crate::privacy::requests::Requests>,
    /// Wakes the worker that carries out data-subject requests.
    pub request_worker: Arc<tokio::sync::Notify>,
}

impl AppState {
    /// Builds the state from the configuration: recovers the write-ahead log, opens stores and
    /// reads the flag directory. Runs inside the runtime (it starts background tasks).
    pub fn new(config: &Config) -> Result<Self, RunError> {
        // First, so that what recovery and the first flag load record is kept.
        let metrics = crate::telemetry::install()?;
        let audit_dir = config.storage.data_dir.join("audit");
        let audit = audit::AuditLog::open(&audit_dir).map_err(|source| RunError::Audit {
            path: audit_dir.display().to_string(),
            source,
        })?;
        let peppers = peppers(config)?;
        let data_keys = data_keys(config)?;
        let consent = ConsentLedger::open(&config.storage.data_dir.join("consent"), &peppers)?;
        let policy = ConsentPolicy::new(
            config.privacy.consent_required,
            &config.privacy.consent_required_projects,
        );
        let requests = crate::privacy::requests::Requests::open(
            &config.storage.data_dir.join("privacy"),
            &peppers,
        )?;
        let sealer = config
            .privacy
            .encrypt_wal
            .then(|| Arc::new(Sealer::new(&data_keys)));
        let suppressions = Arc::new(Suppressions::from_requests(
            &requests.all(),
            crate::ingest::now_ms(),
            config.ingest.late_horizon.as_millis() as i64,
        ));
        let ingest = Arc::new(open_ingest(
            config,
            &peppers,
            sealer,
            (consent.clone(), policy.clone()),
            suppressions.clone(),
        )?);
        let flags = FlagStore::load(config.flags.dir.clone());
        let (changed, flag_changes) = watch::channel(flags.snapshot().content_hash);
        flags.on_change(move |hash| {
            changed.send_replace(hash);
        });
        let exposures = Exposures::new(
            config.flags.exposure_dedup_capacity,
            Arc::new(IngestExposureSink::start(ingest.clone(), 65_536)),
            consent.clone(),
            policy,
        );
        let wal = ingest.wal().clone();
        let counters = CounterStore::open(&config.counters)?;
        let sql = open_sql(config, data_keys, suppressions)?
            .read_your_writes(move || wal.last_epoch().0)
            .counters(counters.clone(), Retention::of(&config.counters));
        Ok(Self {
            config: Arc::new(config.clone()),
            tokens: auth::Tokens::new(&config.auth.tokens),
            metrics,
            counters,
            flags,
            exposures: Arc::new(exposures),
            flag_changes,
            ingest,
            rate: Arc::new(RateLimiter::new(
                config.ingest.rate_limit,
                config.ingest.rate_burst,
            )),
            sql: Arc::new(sql),
            consent,
            audit: Arc::new(audit),
            requests,
            request_worker: Arc::new(tokio::sync::Notify::new()),
        })
    }
}

/// Opens the SQL engine: data keys, the segments on disk, the saved queries (every one must
/// plan against the tables).
fn open_sql(
    config: &Config,
    keys: KeyRing,
    suppressions: Arc<Suppressions>,
) -> Result<SqlEngine, RunError> {
    let data_dir = &config.storage.data_dir;
    let segments = crate::sql::segments::list(&data_dir.join("sql"))
        .map_err(|e| RunError::Sql(e.to_string()))?;
    let (saved, problems) = crate::sql::saved::read_dir(&config.sql.queries_dir);
    let events = Arc::new(RecentEvents::new(segments, keys).hiding(suppressions));
    let engine = SqlEngine::new(events, saved, sql_options(config))
        .map_err(|e| RunError::Sql(e.to_string()))?;
    let problems: Vec<String> = problems
        .iter()
        .map(ToString::to_string)
        .chain(plan_saved(&engine))
        .collect();
    if !problems.is_empty() {
        return Err(RunError::SavedQueries(problems.join("; ")));
    }
    Ok(engine)
}

fn sql_options(config: &Config) -> SqlOptions {
    let sql = &config.sql;
    SqlOptions {
        max_sql_length: sql.max_sql_length.as_usize(),
        timeout: sql.timeout.min(config.server.request_timeout.mul_f64(0.9)),
        memory_limit: sql.memory_limit.as_usize(),
        max_concurrent: sql.max_concurrent,
        threads: match sql.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
        max_rows: sql.max_rows,
        max_result_bytes: sql.max_result.as_usize(),
    }
}

/// Plans every saved query; returns the problems (unknown columns, undeclared or unused
/// parameters).
fn plan_saved(engine: &SqlEngine) -> Vec<String> {
    let mut problems = Vec::new();
    for query in engine.saved().values() {
        let name = &query.name;
        match engine.plan_only(&query.sql) {
            Err(err) => problems.push(format!("saved query {name}: {err}")),
            Ok(used) => {
                for param in &used {
                    if !query.params.iter().any(|p| &p.name == param) {
                        problems.push(format!(
                            "saved query {name}: ${param} is used but not declared (-- @param {param}=default text)"
                        ));
                    }
                }
                for param in &query.params {
                    if !used.contains(&param.name) {
                        problems.push(format!(
                            "saved query {name}: @param {} is declared but not used",
                            param.name
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// Opens the ingest path: schema, pepper, and the write-ahead log (replayed into dedup).
/// The data keys that encrypt storage at rest, from the configuration or the data dir.
/// The data key file in force.
fn data_key_file(config: &Config) -> std::path::PathBuf {
    config
        .privacy
        .data_key_file
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("keys").join("data"))
}

/// The data keys, from the configuration or the data dir.
fn data_keys(config: &Config) -> Result<KeyRing, RunError> {
    let privacy = &config.privacy;
    let file = data_key_file(config);
    Ok(KeyRing::from_config(
        privacy.data_key.as_ref().map(|s| s.expose()),
        "privacy.data_key",
        &file,
    )?)
}

/// The pseudonymization peppers, from the configuration or the data dir.
fn peppers(config: &Config) -> Result<KeyRing, RunError> {
    let file = config
        .privacy
        .pepper_file
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("keys").join("pepper"));
    Ok(KeyRing::from_config(
        config.privacy.pepper.as_ref().map(|s| s.expose()),
        "privacy.pepper",
        &file,
    )?)
}

fn open_ingest(
    config: &Config,
    peppers: &KeyRing,
    sealer: Option<Arc<Sealer>>,
    (consent, consent_policy): (Arc<ConsentLedger>, ConsentPolicy),
    suppressions: Arc<Suppressions>,
) -> Result<Ingestor, RunError> {
    let ingest = &config.ingest;
    let schema = match &ingest.schema_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            Schema::parse(&text)?
        }
        None => Schema::reading_app(),
    };
    let data_dir = &config.storage.data_dir;
    let started = std::time::Instant::now();
    let (ingestor, recovery) = Ingestor::open(IngestOptions {
        schema,
        limits: Limits {
            late_horizon: ingest.late_horizon.as_millis() as i64,
            future_tolerance: ingest.future_tolerance.as_millis() as i64,
        },
        pepper: Pepper::from_ring(peppers),
        wal: WalOptions {
            dir: data_dir.join("wal"),
            segment_bytes: ingest.wal_segment_size.0,
            queue: ingest.wal_queue,
            group_bytes: ingest.wal_group_size.as_usize(),
            commit_delay: ingest.wal_commit_delay,
            commit_siblings: ingest.wal_commit_siblings,
            sealer,
        },
        dedup_ids: ingest.dedup_event_ids,
        dedup_gaps: ingest.dedup_gaps_per_device,
        dedup_snapshot: data_dir.join("dedup.snapshot"),
        consent,
        consent_policy,
        suppressions,
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
    .map_err(|e| RunError::Sql(e.to_string()))
}

/// Checks the configuration's flag files and saved queries; returns every problem found.
pub fn check(config: &Config) -> Vec<String> {
    let flags = match crate::flags::files::read_dir(&config.flags.dir) {
        Ok(contents) => Snapshot::build(contents, None).problems,
        Err(problem) => vec![problem],
    };
    let (saved, queries) = crate::sql::saved::read_dir(&config.sql.queries_dir);
    let keys = KeyRing::single(1, [0; 32]);
    let events = Arc::new(RecentEvents::new(Vec::new(), keys));
    let planned = match SqlEngine::new(events, saved, sql_options(config)) {
        Ok(engine) => plan_saved(&engine),
        Err(err) => vec![format!("sql: {err}")],
    };
    flags
        .iter()
        .map(ToString::to_string)
        .chain(queries.iter().map(ToString::to_string))
        .chain(planned)
        .collect()
}
