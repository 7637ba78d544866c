//! The configuration's sections: one typed struct per component, each setting with its
//! documentation and its default (`docs/config.md` is rendered from them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use super::{
    ByteSize, ConfigProblem, ConfigValue, FieldDoc, OidcIssuerConfig, Origin, RedisUrl, Secret,
    Section, TokenConfig,
};

section! {
    /// The HTTP listener and the limits every request shares.
    pub struct ServerConfig = "server" {
        /// Address of the HTTP and WebSocket API. Without tokens it must be a loopback address.
        pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        /// Separate address for `/metrics`; `none` serves it on the API listener.
        pub metrics_listen: Option<SocketAddr> = None,
        /// A client must send its request headers within this time or is disconnected.
        pub header_read_timeout: Duration = Duration::from_secs(10),
        /// Longest time a request may take before it is answered 503.
        pub request_timeout: Duration = Duration::from_secs(30),
        /// Requests served at once; more are shed with 503 and `Retry-After`.
        pub max_concurrent_requests: usize = 4096,
        /// Largest request body any route accepts (routes may set a smaller limit).
        pub max_body: ByteSize = ByteSize::mib(4),
        /// Time given to open connections to finish after SIGTERM or SIGINT.
        pub shutdown_grace: Duration = Duration::from_secs(10),
        /// Web origins (`https://app.example.org`) whose pages may call the API (CORS) and
        /// open `/v1/stream`. Empty: no browser page of another origin may. Native apps send
        /// no `Origin` and are not affected.
        pub allowed_origins: Vec<String> = Vec::new(),
        /// PEM certificate chain: with `tls_key`, the API listener speaks only HTTPS (and
        /// answers with HSTS). The metrics listener stays plain HTTP for the scraper.
        pub tls_cert: Option<PathBuf> = None,
        /// PEM private key of `tls_cert`.
        pub tls_key: Option<PathBuf> = None,
    }
}

section! {
    /// Where durable state lives.
    pub struct StorageConfig = "storage" {
        /// Directory for the write-ahead log, Parquet segments, keys and dedup state.
        pub data_dir: PathBuf = PathBuf::from("./data"),
    }
}

section! {
    /// Event intake: limits, late arrivals, deduplication and the write-ahead log.
    pub struct IngestConfig = "ingest" {
        /// Largest request body as sent (possibly compressed).
        pub max_body: ByteSize = ByteSize::mib(2),
        /// Largest request body after decompression.
        pub max_decompressed: ByteSize = ByteSize::mib(2),
        /// Largest single event.
        pub max_event: ByteSize = ByteSize::kib(32),
        /// Most events in one batch or WebSocket message.
        pub max_batch_events: usize = 2000,
        /// Events older than this (after clock-skew correction) are rejected as too_old.
        pub late_horizon: Duration = Duration::from_secs(30 * 86_400),
        /// Event times further in the future than this are clamped to the receive time.
        pub future_tolerance: Duration = Duration::from_secs(60),
        /// Events per second each client key may send; 0 turns the limit off.
        pub rate_limit: usize = 50_000,
        /// Events a client key may send in a burst above its rate.
        pub rate_burst: usize = 100_000,
        /// Event ids remembered to deduplicate events without device_id + seq.
        pub dedup_event_ids: usize = 1_000_000,
        /// Missing sequence numbers remembered per device.
        pub dedup_gaps_per_device: usize = 4096,
        /// How often the dedup state is written to `<data_dir>/dedup.snapshot`, so that
        /// duplicates are recognised after a restart even once the log's older segments are
        /// deleted (they are kept until a snapshot covers them).
        pub dedup_snapshot_interval: Duration = Duration::from_secs(60),
        /// A write-ahead log segment is closed at this size.
        pub wal_segment_size: ByteSize = ByteSize::mib(64),
        /// Requests that may wait for the write-ahead log; more are answered 503.
        pub wal_queue: usize = 4096,
        /// Most bytes one group commit gathers.
        pub wal_group_size: ByteSize = ByteSize::mib(8),
        /// How long a group commit waits for more requests before its fsync when the
        /// previous one held at least `wal_commit_siblings` requests: fewer, fuller fsyncs
        /// under load; a lone client never waits. `0s` turns it off.
        pub wal_commit_delay: Duration = Duration::from_millis(1),
        /// Requests in the previous group commit that make the next one wait.
        pub wal_commit_siblings: usize = 8,
        /// Declared event types (JSON); `none` uses the reading app's schema.
        pub schema_file: Option<PathBuf> = None,
    }
}

section! {
    /// Live sessions on the `/v1/stream` WebSocket.
    pub struct StreamConfig = "stream" {
        /// Largest client message.
        pub max_message: ByteSize = ByteSize::mib(1),
        /// Largest WebSocket frame.
        pub max_frame: ByteSize = ByteSize::kib(256),
        /// A session that sends nothing (not even a pong) for this long is closed.
        pub idle_timeout: Duration = Duration::from_secs(60),
        /// How often the server pings each session.
        pub ping_interval: Duration = Duration::from_secs(20),
        /// Sessions open at once; more are refused with 503.
        pub max_sessions: usize = 10_000,
    }
}

section! {
    /// Children's data: pseudonyms, keys, consent.
    pub struct PrivacyConfig = "privacy" {
        /// File of versioned pseudonymization peppers (`<version> <64 hex>` lines); `none` uses
        /// `<data_dir>/keys/pepper`, created with a random pepper on first start.
        pub pepper_file: Option<PathBuf> = None,
        /// The peppers themselves (`<version> <64 hex>`, several separated by `;`), for
        /// deployments that pass secrets in the environment; overrides `pepper_file`.
        pub pepper: Option<Secret> = None,
        /// File of versioned data keys (`<version> <64 hex>` lines) that encrypt storage at
        /// rest (AES-256-GCM); `none` uses `<data_dir>/keys/data`, created with a random key
        /// on first start. Keep it apart from backups of the data it protects.
        pub data_key_file: Option<PathBuf> = None,
        /// The data keys themselves (`<version> <64 hex>`, several separated by `;`);
        /// overrides `data_key_file`.
        pub data_key: Option<Secret> = None,
        /// Keep a child's events only with a guardian's grant in force (`POST /v1/consent`):
        /// scope `analytics` for events, `experiments` for exposures. Other events are
        /// answered `rejected` (`no_consent`) and only counted. Events without a `user_id`
        /// are not tied to a child and pass.
        pub consent_required: bool = false,
        /// Projects (the `project` of client keys; `default` for keys without one) whose
        /// events and exposures need a guardian's grant, as with `consent_required`, which
        /// covers every project.
        pub consent_required_projects: Vec<String> = Vec::new(),
        /// The version of the consent text guardians are shown, kept with each decision a
        /// guardian makes (a request may name the version it showed instead).
        pub consent_text_version: String = "1".to_string(),
        /// Encrypt new write-ahead log records with the data keys (AES-256-GCM). Records
        /// written either way stay readable while the data keys that sealed them are kept.
        pub encrypt_wal: bool = true,
        /// An access request's export can be downloaded for this long after it is made, then
        /// it is deleted (a new request makes a new one).
        pub export_retention: Duration = Duration::from_secs(7 * 86_400),
        /// How long the pipeline keeps a child's experiment assignment (its first exposure to
        /// an experiment) after the exposure. Exposure events themselves are raw events
        /// (`sql.retention`).
        pub exposure_retention: Duration = Duration::from_secs(180 * 86_400),
        /// How long a child's consent records are kept once no grant of it is in force and
        /// its guardian decided nothing more. A grant in force is always kept.
        pub consent_retention: Duration = Duration::from_secs(3 * 365 * 86_400),
        /// How often the retention task deletes what is past its retention.
        pub retention_check: Duration = Duration::from_secs(600),
        /// How often the data key file is read again: a key added to it (a rotation) is used
        /// for new records and segments from then on, without a restart. 0 turns it off; keys
        /// given inline (`data_key`) are never reloaded.
        pub key_reload_interval: Duration = Duration::from_secs(10),
    }
}

section! {
    /// Flag definitions in flagd's format.
    pub struct FlagsConfig = "flags" {
        /// Directory of `*.json` and `*.yaml` flag files.
        pub dir: PathBuf = PathBuf::from("./flags"),
        /// How often the directory is checked for changes; a change is live within this time.
        pub reload_interval: Duration = Duration::from_millis(500),
        /// Largest evaluation request body (the context) on OFREP and `/v1/config`.
        pub max_request_body: ByteSize = ByteSize::kib(64),
        /// `Cache-Control: max-age` of `/v1/config` answers.
        pub config_max_age: Duration = Duration::from_secs(60),
        /// Exposures remembered per day for deduplication; past this, repeats pass through.
        pub exposure_dedup_capacity: usize = 1_000_000,
    }
}

section! {
    /// Ad-hoc and saved SQL.
    pub struct SqlConfig = "sql" {
        /// Directory of saved, parameterized queries (`*.sql`).
        pub queries_dir: PathBuf = PathBuf::from("./queries"),
        /// Events stay in memory as Arrow batches for this span of ingest time, then roll into
        /// an encrypted Parquet segment in `<data_dir>/sql`.
        pub memory_window: Duration = Duration::from_secs(3600),
        /// A roll happens earlier when memory holds this many events.
        pub memory_events: usize = 10_000_000,
        /// Raw events (exposure events too) are kept this long after they were received: the
        /// Parquet segments and the write-ahead log segments older than this are deleted.
        pub retention: Duration = Duration::from_secs(30 * 86_400),
        /// Longest SQL text accepted.
        pub max_sql_length: ByteSize = ByteSize::kib(64),
        /// How long one query may run, planning included; capped at nine tenths of
        /// `server.request_timeout`, so a slow query gets its own answer.
        pub timeout: Duration = Duration::from_secs(10),
        /// Memory one query may hold for joins, sorts and aggregations; nothing spills to disk.
        pub memory_limit: ByteSize = ByteSize::mib(512),
        /// Queries running at once; more are answered 503.
        pub max_concurrent: usize = 2,
        /// Threads of the SQL runtime (run at a lower priority than ingest); 0 uses one per
        /// available core.
        pub threads: usize = 0,
        /// Most rows in one answer; past this the answer is cut and marked `truncated`.
        pub max_rows: usize = 10_000,
        /// Most bytes of Arrow data in one answer; past this it is cut and marked `truncated`.
        pub max_result: ByteSize = ByteSize::mib(16),
    }
}

section! {
    /// The counter store behind the live per-cohort counters.
    pub struct CountersConfig = "counters" {
        /// Redis URL (`redis://`, `rediss://`, `unix://`); `none` uses the embedded store.
        pub redis_url: Option<RedisUrl> = None,
        /// How long a Redis connection attempt, command or health check may take.
        pub redis_timeout: Duration = Duration::from_secs(1),
        /// How long minute-window counters are kept after their window ends.
        pub minute_retention: Duration = Duration::from_secs(2 * 86_400),
        /// How long hour-window counters are kept after their window ends.
        pub hour_retention: Duration = Duration::from_secs(35 * 86_400),
        /// How long day-window counters are kept after their window ends.
        pub day_retention: Duration = Duration::from_secs(400 * 86_400),
    }
}

section! {
    /// The timely dataflow from the write-ahead log to the counters.
    pub struct PipelineConfig = "pipeline" {
        /// Worker threads (per process); 0 uses one per available core.
        pub workers: usize = 0,
        /// Counters are written once per this stretch of the log (a cell); the flush lag is
        /// about this long.
        pub flush_interval: Duration = Duration::from_millis(250),
        /// Context keys that define segment cohorts.
        pub segments: Vec<String> = vec!["platform".into(), "app_version".into(), "country".into()],
        /// Events read but not yet in the counter store; past this the pipeline reads no more
        /// (the log keeps them) until the store catches up.
        pub max_pending_events: usize = 1_000_000,
        /// Addresses (`host:port`) of every process of a multi-process cluster, in process
        /// order; empty runs the dataflow in this process only.
        pub peers: Vec<String> = Vec::new(),
        /// This process's index in `peers`.
        pub process: usize = 0,
        /// The most experiment × variant pairs exported as live gauges in `/metrics`.
        pub experiment_gauges: usize = 100,
    }
}

section! {
    /// Experiment results.
    pub struct ExperimentsConfig = "experiments" {
        /// How often every running experiment's results are recomputed for the live gauges
        /// of `/metrics` (the Experiments dashboard); 0 turns the gauges off. Each refresh
        /// is one SQL query per experiment over the whole SQL retention.
        pub refresh: Duration = Duration::from_secs(60),
    }
}

section! {
    /// Who may call what.
    pub struct AuthConfig = "auth" {
        /// Access tokens as `{name, role, sha256}`; roles are client, analyst, privacy, admin.
        /// With none, the API is open, which is allowed only on a loopback listener.
        pub tokens: Vec<TokenConfig> = Vec::new(),
        /// OpenID Connect issuers whose access tokens are accepted (parents, teachers,
        /// schools, researchers): `{issuer, audience, algorithms, leeway, jwks_refresh,
        /// jwks_min_interval, claims, roles}`; see docs/identity.md.
        pub oidc: Vec<OidcIssuerConfig> = Vec::new(),
        /// Scoped tokens (school staff) see no aggregate over fewer children than this: such
        /// groups are left out of SQL answers and blanked in cohort answers.
        pub min_group_size: usize = 5,
    }
}

section! {
    /// Logs.
    pub struct TelemetryConfig = "telemetry" {
        /// `human` for terminals, `json` for log collectors.
        pub log_format: LogFormat = LogFormat::Human,
        /// A tracing filter such as `info` or `flagstream=debug,tower_http=info`.
        pub log_filter: String = "info".to_string(),
    }
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object a line.
    Json,
}

impl ConfigValue for LogFormat {
    const KIND: &'static str = "human | json";
    fn parse(value: &Value) -> Result<Self, String> {
        match value.as_str() {
            Some("human") => Ok(LogFormat::Human),
            Some("json") => Ok(LogFormat::Json),
            _ => Err(format!("expected \"human\" or \"json\", found {value}")),
        }
    }
    fn render(&self) -> Value {
        Value::String(
            match self {
                LogFormat::Human => "human",
                LogFormat::Json => "json",
            }
            .into(),
        )
    }
}
