//! The state every handler can reach, opened from the configuration: the write-ahead log
//! recovered, the stores opened, the flags and saved queries read and checked.

use std::sync::Arc;

use axum::extract::FromRef;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use super::{RunError, audit, auth};
use crate::config::Config;
use crate::counters::{CounterStore, Retention};
use crate::crypto::{KeyRing, Sealer};
use crate::events::{Limits, Schema};
use crate::flags::{FlagStore, Snapshot};
use crate::ingest::exposure::{Exposures, IngestExposureSink};
use crate::ingest::rate::RateLimiter;
use crate::ingest::{ConsentPolicy, IngestOptions, Ingestor};
use crate::privacy::erasure::Suppressions;
use crate::privacy::{ConsentLedger, Pepper};
use crate::sql::table::RecentEvents;
use crate::sql::{SqlEngine, SqlOptions};
use crate::wal::WalOptions;

/// What every handler can reach; each extracts the slice it needs.
#[derive(Clone)]
pub struct AppState {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// Static tokens and trusted issuers.
    pub gate: auth::Gate,
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
    /// Live WebSocket sessions (under `stream.max_sessions`).
    pub sessions: Arc<std::sync::atomic::AtomicUsize>,
}

impl AppState {
    /// Builds the state from the configuration: recovers the write-ahead log, opens stores and
    /// reads the flag directory. Runs inside the runtime (it starts background tasks).
    pub fn new(config: &Config) -> Result<Self, RunError> {
        // First, so that what recovery and the first flag load record is kept.
        let metrics = crate::telemetry::install()?;
        let peppers = peppers(config)?;
        let data_keys = data_keys(config)?;
        // The audit log, the consent ledger, the request journal and the access exports:
        // sealed always.
        let records = Arc::new(Sealer::new(&data_keys));
        let audit_dir = config.storage.data_dir.join("audit");
        let audit = audit::AuditLog::open(&audit_dir, records.clone()).map_err(|source| {
            RunError::Audit {
                path: audit_dir.display().to_string(),
                source,
            }
        })?;
        let consent = ConsentLedger::open(
            &config.storage.data_dir.join("consent"),
            &peppers,
            records.clone(),
        )?;
        let policy = ConsentPolicy::new(
            config.privacy.consent_required,
            &config.privacy.consent_required_projects,
        );
        let requests = crate::privacy::requests::Requests::open(
            &config.storage.data_dir.join("privacy"),
            &peppers,
            records,
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
        let audit = Arc::new(audit);
        let verifier = if config.auth.oidc.is_empty() {
            None
        } else {
            Some(Arc::new(crate::identity::Verifier::new(&config.auth.oidc)?))
        };
        let gate = auth::Gate::new(&config.auth.tokens).with_identity(
            verifier,
            audit.clone(),
            crate::privacy::pseudonym::Pepper::from_ring(&peppers),
        );
        Ok(Self {
            config: Arc::new(config.clone()),
            gate,
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
            audit,
            requests,
            request_worker: Arc::new(tokio::sync::Notify::new()),
            sessions: Arc::default(),
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
    let segments = crate::sql::segments::list(&data_dir.join("sql"))?;
    let (saved, problems) = crate::sql::saved::read_dir(&config.sql.queries_dir);
    let events = Arc::new(RecentEvents::new(segments, keys).hiding(suppressions));
    let engine = SqlEngine::new(events, saved, sql_options(config))?;
    let problems: Vec<String> = problems
        .iter()
        .map(ToString::to_string)
        .chain(plan_saved(&engine))
        .collect();
    if !problems.is_empty() {
        return Err(RunError::SavedQueries(problems));
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

/// The data key file in force.
pub(super) fn data_key_file(config: &Config) -> std::path::PathBuf {
    config
        .privacy
        .data_key_file
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("keys").join("data"))
}

/// The data keys, from the configuration or the data dir (created on first use).
pub fn data_keys(config: &Config) -> Result<KeyRing, RunError> {
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

/// Opens the ingest path: schema, pepper, and the write-ahead log (replayed into dedup).
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

impl FromRef<AppState> for auth::Gate {
    fn from_ref(state: &AppState) -> Self {
        state.gate.clone()
    }
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
