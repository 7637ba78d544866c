//! Configuration: every setting of every component, typed, defaulted and validated at start.
//!
//! Sources, lowest precedence first (this is the one place the order is written):
//!
//! 1. the defaults below, enough for `flagstream serve` with no file at all;
//! 2. the TOML file named by `--config` or `FLAGSTREAM_CONFIG`;
//! 3. environment variables `FLAGSTREAM_<SECTION>__<KEY>` (for example
//!    `FLAGSTREAM_SERVER__REQUEST_TIMEOUT=5s`);
//! 4. command-line flags and their shorthand environment variables (`--listen` /
//!    `FLAGSTREAM_LISTEN`, `--data-dir`, `--flags-dir`, `--queries-dir`, `--redis-url`).
//!
//! Loading never stops at the first mistake: every problem is collected and reported together.
//! No other module reads the environment.

mod auth;
mod docs;
mod value;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

pub use auth::{
    DEFAULT_PROJECT, Role, SCOPE_KEYS, TokenConfig, TokenHash, TokenScope, check_project,
};
pub use docs::render_markdown;
pub use value::{ByteSize, ConfigValue, RedisUrl, Secret};

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: a key such as `server.listen`, an environment variable or a file.
    pub at: String,
    /// What is wrong, in lowercase words.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Every problem found while loading, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order they were found.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.problems.len())?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

/// Documentation of one setting, for `docs/config.md`.
#[derive(Debug, Clone)]
pub struct FieldDoc {
    /// The key inside its section.
    pub key: &'static str,
    /// The type as the docs name it.
    pub kind: &'static str,
    /// The default, as the file would spell it.
    pub default: Value,
    /// The `///` text of the field.
    pub doc: &'static str,
}

/// A section of the configuration file.
pub trait Section: Default {
    /// The section's table name.
    const KEY: &'static str;
    /// The section's `///` text.
    const DOC: &'static str;
    /// Every setting, for the docs.
    fn fields() -> Vec<FieldDoc>;
    /// Applies the keys of `table` over `self`, recording every problem.
    fn apply(&mut self, table: &toml::Table, origin: &Origin, problems: &mut Vec<ConfigProblem>);
    /// Shows the section as `flagstream config` prints it.
    fn render(&self) -> toml::Table;
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub enum Origin {
    /// The TOML file.
    File,
    /// An environment variable.
    Env(String),
}

impl Origin {
    fn at(&self, section: &str, key: &str) -> String {
        match self {
            Origin::File => format!("{section}.{key}"),
            Origin::Env(var) => format!("{var} ({section}.{key})"),
        }
    }
}

macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident = $key:literal {
            $(
                $(#[doc = $fdoc:literal])*
                pub $field:ident : $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl Section for $name {
            const KEY: &'static str = $key;
            const DOC: &'static str = concat!($($sdoc, "\n",)*);

            fn fields() -> Vec<FieldDoc> {
                let defaults = Self::default();
                vec![$(
                    FieldDoc {
                        key: stringify!($field),
                        kind: <$ty as ConfigValue>::KIND,
                        default: ConfigValue::render(&defaults.$field),
                        doc: concat!($($fdoc, "\n",)*),
                    },
                )*]
            }

            fn apply(
                &mut self,
                table: &toml::Table,
                origin: &Origin,
                problems: &mut Vec<ConfigProblem>,
            ) {
                for (key, value) in table {
                    let at = origin.at($key, key);
                    let parsed: Result<(), String> = match key.as_str() {
                        $(
                            stringify!($field) => <$ty as ConfigValue>::parse(value)
                                .map(|parsed| self.$field = parsed),
                        )*
                        _ => Err("unknown key".to_string()),
                    };
                    if let Err(message) = parsed {
                        problems.push(ConfigProblem { at, message });
                    }
                }
            }

            fn render(&self) -> toml::Table {
                let mut table = toml::Table::new();
                $( table.insert(stringify!($field).into(), ConfigValue::render(&self.$field)); )*
                table
            }
        }
    };
}

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

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// HTTP listener and request limits.
    pub server: ServerConfig,
    /// Durable state.
    pub storage: StorageConfig,
    /// Event intake.
    pub ingest: IngestConfig,
    /// Live sessions.
    pub stream: StreamConfig,
    /// Privacy.
    pub privacy: PrivacyConfig,
    /// Flag definitions.
    pub flags: FlagsConfig,
    /// SQL.
    pub sql: SqlConfig,
    /// Counter store.
    pub counters: CountersConfig,
    /// The dataflow.
    pub pipeline: PipelineConfig,
    /// Experiment results.
    pub experiments: ExperimentsConfig,
    /// Tokens and roles.
    pub auth: AuthConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
}

/// Calls `$visit!(field, Type)` for every section, so the list is written once.
macro_rules! for_each_section {
    ($visit:ident) => {
        $visit!(server, ServerConfig);
        $visit!(storage, StorageConfig);
        $visit!(ingest, IngestConfig);
        $visit!(stream, StreamConfig);
        $visit!(privacy, PrivacyConfig);
        $visit!(flags, FlagsConfig);
        $visit!(sql, SqlConfig);
        $visit!(counters, CountersConfig);
        $visit!(pipeline, PipelineConfig);
        $visit!(experiments, ExperimentsConfig);
        $visit!(auth, AuthConfig);
        $visit!(telemetry, TelemetryConfig);
    };
}
pub(crate) use for_each_section;

/// Checks that `origin` is a web origin as browsers send it: `http` or `https`, a host, an
/// optional port, nothing else (no path, no trailing slash, no wildcard).
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    if host.is_empty() || host.contains(['/', '*', '?', '#', '@', ' ']) {
        return Err("must be scheme://host[:port], without a path or a wildcard");
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err("has a port that is not a number");
    }
    Ok(())
}

/// Command-line flags that override the file (shorthand environment variables included).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "FLAGSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, global = true, env = "FLAGSTREAM_LISTEN")]
    pub listen: Option<String>,
    /// Directory for durable state.
    #[arg(long, global = true, env = "FLAGSTREAM_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Directory of flag files.
    #[arg(long, global = true, env = "FLAGSTREAM_FLAGS_DIR")]
    pub flags_dir: Option<String>,
    /// Directory of saved queries.
    #[arg(long, global = true, env = "FLAGSTREAM_QUERIES_DIR")]
    pub queries_dir: Option<String>,
    /// Redis URL; unset means the embedded counter store.
    #[arg(long, global = true, env = "FLAGSTREAM_REDIS_URL")]
    pub redis_url: Option<String>,
}

impl Overrides {
    fn as_tables(&self) -> Vec<(&'static str, &'static str, &'static str, &String)> {
        [
            ("server", "listen", "--listen", &self.listen),
            ("storage", "data_dir", "--data-dir", &self.data_dir),
            ("flags", "dir", "--flags-dir", &self.flags_dir),
            ("sql", "queries_dir", "--queries-dir", &self.queries_dir),
            ("counters", "redis_url", "--redis-url", &self.redis_url),
        ]
        .into_iter()
        .filter_map(|(section, key, flag, value)| value.as_ref().map(|v| (section, key, flag, v)))
        .collect()
    }
}

const ENV_PREFIX: &str = "FLAGSTREAM_";

impl Config {
    /// Loads the configuration from the process's own file, environment and flags.
    pub fn from_process(overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load(overrides, std::env::vars())
    }

    /// Loads the configuration from the given sources, collecting every problem.
    pub fn load(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        let mut problems = Vec::new();

        if let Some(path) = &overrides.config {
            match read_file(path) {
                Ok(table) => config.apply_table(&table, &Origin::File, &mut problems),
                Err(problem) => problems.push(problem),
            }
        }
        config.apply_env(env, &mut problems);
        for (section, key, flag, value) in overrides.as_tables() {
            let mut inner = toml::Table::new();
            inner.insert(key.into(), Value::String(value.clone()));
            let mut outer = toml::Table::new();
            outer.insert(section.into(), Value::Table(inner));
            config.apply_table(&outer, &Origin::Env(flag.into()), &mut problems);
        }
        problems.extend(config.validate());

        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    fn apply_table(
        &mut self,
        table: &toml::Table,
        origin: &Origin,
        problems: &mut Vec<ConfigProblem>,
    ) {
        for (name, value) in table {
            let Some(inner) = value.as_table() else {
                problems.push(ConfigProblem {
                    at: name.clone(),
                    message: "expected a [section] table".into(),
                });
                continue;
            };
            macro_rules! visit {
                ($field:ident, $ty:ty) => {
                    if name == <$ty as Section>::KEY {
                        self.$field.apply(inner, origin, problems);
                        continue;
                    }
                };
            }
            for_each_section!(visit);
            problems.push(ConfigProblem {
                at: name.clone(),
                message: "unknown section".into(),
            });
        }
    }

    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
        problems: &mut Vec<ConfigProblem>,
    ) {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name.contains("__"))
            .collect();
        vars.sort();
        for (name, value) in vars {
            let rest = &name[ENV_PREFIX.len()..];
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let mut inner = toml::Table::new();
            inner.insert(key.to_ascii_lowercase(), Value::String(value));
            let mut outer = toml::Table::new();
            outer.insert(section.to_ascii_lowercase(), Value::Table(inner));
            self.apply_table(&outer, &Origin::Env(name.clone()), problems);
        }
    }

    /// Checks what no single value can: combinations and the state of the file system.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |at: &str, message: String| {
            problems.push(ConfigProblem {
                at: at.into(),
                message,
            })
        };
        let server = &self.server;
        if self.auth.tokens.is_empty() && !server.listen.ip().is_loopback() {
            problem(
                "server.listen",
                format!(
                    "{} is not a loopback address and no auth.tokens are configured; \
                     add tokens or listen on 127.0.0.1",
                    server.listen
                ),
            );
        }
        if let Some(metrics) = server.metrics_listen
            && metrics == server.listen
            && metrics.port() != 0
        {
            problem(
                "server.metrics_listen",
                "must differ from server.listen".into(),
            );
        }
        for (key, value) in [
            ("flags.reload_interval", self.flags.reload_interval),
            ("stream.idle_timeout", self.stream.idle_timeout),
            ("stream.ping_interval", self.stream.ping_interval),
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.request_timeout", server.request_timeout),
            ("counters.redis_timeout", self.counters.redis_timeout),
            ("pipeline.flush_interval", self.pipeline.flush_interval),
            ("sql.memory_window", self.sql.memory_window),
            ("sql.timeout", self.sql.timeout),
            ("sql.retention", self.sql.retention),
            ("privacy.retention_check", self.privacy.retention_check),
            (
                "privacy.exposure_retention",
                self.privacy.exposure_retention,
            ),
            ("privacy.consent_retention", self.privacy.consent_retention),
        ] {
            if value.is_zero() {
                problem(key, "must be greater than zero".into());
            }
        }
        if self.auth.min_group_size == 0 {
            problem(
                "auth.min_group_size",
                "must be at least 1 (a group of one child is the smallest)".into(),
            );
        }
        for project in &self.privacy.consent_required_projects {
            if let Err(why) = check_project(project) {
                problem("privacy.consent_required_projects", why);
            }
        }
        if self.sql.retention < self.sql.memory_window {
            problem(
                "sql.retention",
                format!(
                    "must be at least sql.memory_window ({:?}): events in memory are kept until they roll",
                    self.sql.memory_window
                ),
            );
        }
        if server.tls_cert.is_some() != server.tls_key.is_some() {
            problem(
                "server.tls_cert",
                "set both server.tls_cert and server.tls_key, or neither".into(),
            );
        }
        for origin in &server.allowed_origins {
            if let Err(why) = check_origin(origin) {
                problem("server.allowed_origins", format!("{origin:?} {why}"));
            }
        }
        let pipeline = &self.pipeline;
        for dimension in &pipeline.segments {
            if !crate::events::schema::CONTEXT_KEYS.contains(&dimension.as_str()) {
                problem(
                    "pipeline.segments",
                    format!(
                        "{dimension:?} is not a context key (one of {})",
                        crate::events::schema::CONTEXT_KEYS.join(", ")
                    ),
                );
            }
        }
        if !pipeline.peers.is_empty() {
            if pipeline.process >= pipeline.peers.len() {
                problem(
                    "pipeline.process",
                    format!(
                        "must be below the number of peers ({})",
                        pipeline.peers.len()
                    ),
                );
            }
            if self.counters.redis_url.is_none() {
                problem(
                    "pipeline.peers",
                    "a multi-process pipeline needs a shared counter store: set counters.redis_url"
                        .into(),
                );
            }
            for peer in &pipeline.peers {
                if peer
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    problem("pipeline.peers", format!("{peer:?} is not host:port"));
                }
            }
        }
        let sql = &self.sql;
        for (key, value) in [
            ("sql.max_concurrent", sql.max_concurrent),
            ("sql.max_rows", sql.max_rows),
            ("sql.memory_events", sql.memory_events),
        ] {
            if value == 0 {
                problem(key, "must be at least 1".into());
            }
        }
        if sql.max_sql_length.0 < 64 {
            problem("sql.max_sql_length", "must be at least 64 B".into());
        }
        if sql.memory_limit.0 < 1 << 20 {
            problem("sql.memory_limit", "must be at least 1 MiB".into());
        }
        if server.max_concurrent_requests == 0 {
            problem(
                "server.max_concurrent_requests",
                "must be at least 1".into(),
            );
        }
        let ingest = &self.ingest;
        if ingest.max_event.0 < 256 {
            problem("ingest.max_event", "must be at least 256B".into());
        }
        if ingest.max_decompressed < ingest.max_event {
            problem(
                "ingest.max_decompressed",
                "must be at least ingest.max_event".into(),
            );
        }
        for (key, value) in [
            ("ingest.max_batch_events", ingest.max_batch_events),
            ("ingest.wal_queue", ingest.wal_queue),
            ("ingest.dedup_event_ids", ingest.dedup_event_ids),
        ] {
            if value == 0 {
                problem(key, "must be at least 1".into());
            }
        }
        if ingest.rate_limit > 0 && ingest.rate_burst < ingest.max_batch_events {
            problem(
                "ingest.rate_burst",
                "must be at least ingest.max_batch_events, or no batch could pass".into(),
            );
        }
        if self.stream.max_frame > self.stream.max_message {
            problem(
                "stream.max_frame",
                "must not exceed stream.max_message".into(),
            );
        }
        if self.stream.ping_interval >= self.stream.idle_timeout {
            problem(
                "stream.ping_interval",
                "must be shorter than stream.idle_timeout".into(),
            );
        }
        if ingest.dedup_snapshot_interval < Duration::from_millis(100) {
            problem(
                "ingest.dedup_snapshot_interval",
                "must be at least 100ms".into(),
            );
        }
        if ingest.wal_commit_delay > Duration::from_millis(100) {
            problem(
                "ingest.wal_commit_delay",
                "must be at most 100ms: every acknowledgement under load waits for it".into(),
            );
        }
        if ingest.wal_commit_siblings == 0 {
            problem(
                "ingest.wal_commit_siblings",
                "must be at least 1 (a lone client never waits)".into(),
            );
        }
        if ingest.wal_segment_size < ByteSize::mib(1) {
            problem("ingest.wal_segment_size", "must be at least 1MiB".into());
        }
        if let Some(path) = &ingest.schema_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(err) = crate::events::Schema::parse(&text) {
                        problem("ingest.schema_file", err.to_string());
                    }
                }
                Err(err) => problem(
                    "ingest.schema_file",
                    format!("cannot read {}: {err}", path.display()),
                ),
            }
        }
        for (key, secret) in [
            ("privacy.pepper", &self.privacy.pepper),
            ("privacy.data_key", &self.privacy.data_key),
        ] {
            if let Some(secret) = secret
                && let Err(line) = crate::crypto::KeyRing::parse(secret.expose())
            {
                problem(
                    key,
                    format!("entry {line} is not `<version> <64 hex characters>`"),
                );
            }
        }
        if self.flags.max_request_body.0 < 1024 {
            problem("flags.max_request_body", "must be at least 1KiB".into());
        }
        if server.max_body.0 < 1024 {
            problem("server.max_body", "must be at least 1KiB".into());
        }
        let data_dir = &self.storage.data_dir;
        if data_dir.exists() && !data_dir.is_dir() {
            problem(
                "storage.data_dir",
                format!("{} exists and is not a directory", data_dir.display()),
            );
        }
        for (key, dir) in [
            ("flags.dir", &self.flags.dir),
            ("sql.queries_dir", &self.sql.queries_dir),
        ] {
            if dir.exists() && !dir.is_dir() {
                problem(key, format!("{} is not a directory", dir.display()));
            }
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_filter) {
            problem("telemetry.log_filter", format!("invalid filter: {err}"));
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for token in &self.auth.tokens {
            if !names.insert(token.name.as_str()) {
                problem(
                    "auth.tokens",
                    format!("duplicate token name {:?}", token.name),
                );
            }
            if !hashes.insert(token.sha256.0) {
                problem(
                    "auth.tokens",
                    format!("token {:?} repeats another token's sha256", token.name),
                );
            }
        }
        problems
    }

    /// Shows the effective configuration as TOML, secrets redacted.
    pub fn render(&self) -> String {
        let mut table = toml::Table::new();
        macro_rules! visit {
            ($field:ident, $ty:ty) => {
                table.insert(
                    <$ty as Section>::KEY.into(),
                    Value::Table(self.$field.render()),
                );
            };
        }
        for_each_section!(visit);
        toml::to_string_pretty(&table).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }

    /// Returns whether the API is open to callers without a token.
    pub fn is_open(&self) -> bool {
        self.auth.tokens.is_empty()
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigProblem> {
    let at = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigProblem {
        at: at.clone(),
        message: format!("cannot read: {err}"),
    })?;
    toml::from_str(&text).map_err(|err| {
        let line = err
            .span()
            .map(|span| text[..span.start].matches('\n').count() + 1);
        ConfigProblem {
            at: match line {
                Some(line) => format!("{at}:{line}"),
                None => at,
            },
            message: err.message().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_needs_both_files() {
        let mut config = super::Config::default();
        config.server.tls_cert = Some("cert.pem".into());
        let problems = config.validate();
        assert!(
            problems.iter().any(|p| p.at == "server.tls_cert"),
            "{problems:?}"
        );
        config.server.tls_key = Some("key.pem".into());
        assert!(config.validate().is_empty());
    }

    #[test]
    fn origins_are_checked() {
        for good in [
            "https://app.example.org",
            "http://localhost:3000",
            "https://[::1]:8443",
            "https://[::1]",
        ] {
            assert_eq!(super::check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "app.example.org",
            "https://app.example.org/",
            "https://*.example.org",
            "*",
            "https://",
            "https://a.org:http",
            "ftp://a.org",
        ] {
            assert!(super::check_origin(bad).is_err(), "{bad}");
        }
    }

    use super::*;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flagstream.toml");
        std::fs::write(&path, file).unwrap();
        let overrides = Overrides {
            config: Some(path),
            ..Overrides::default()
        };
        Config::load(
            &overrides,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(&Overrides::default(), []).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(config.counters.redis_url, None);
        assert!(config.is_open());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(
            r#"
            [server]
            listen = "0.0.0.0:80"
            request_timeout = "soon"
            max_concurrent_requests = 0
            lisen = "x"
            [counters]
            redis_url = "http://redis"
            [nonsense]
            a = 1
            "#,
            &[("FLAGSTREAM_SERVER__MAX_BODY", "huge")],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "server.request_timeout: invalid duration",
            "server.lisen: unknown key",
            "counters.redis_url: invalid Redis URL",
            "nonsense: unknown section",
            "FLAGSTREAM_SERVER__MAX_BODY (server.max_body)",
            "server.listen: 0.0.0.0:80 is not a loopback address",
            "server.max_concurrent_requests: must be at least 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 7, "{text}");
    }

    #[test]
    fn a_group_commit_wait_that_would_stall_every_ack_is_refused() {
        let err = load(
            r#"
            [ingest]
            wal_commit_delay = "1s"
            wal_commit_siblings = 0
            "#,
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "ingest.wal_commit_delay: must be at most 100ms",
            "ingest.wal_commit_siblings: must be at least 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let config = load("[ingest]\nwal_commit_delay = \"0s\"\n", &[]).unwrap();
        assert!(config.ingest.wal_commit_delay.is_zero(), "0s turns it off");
    }

    #[test]
    fn privacy_settings_that_would_defeat_themselves_are_refused() {
        let err = load(
            r#"
            [auth]
            min_group_size = 0
            [privacy]
            consent_retention = "0s"
            consent_required_projects = ["Reading App"]
            [sql]
            retention = "10m"
            memory_window = "1h"
            "#,
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "auth.min_group_size: must be at least 1",
            "privacy.consent_retention: must be greater than zero",
            "privacy.consent_required_projects: project \"Reading App\"",
            "sql.retention: must be at least sql.memory_window",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:1000\"\nrequest_timeout = \"3s\"\n[storage]\ndata_dir = \"/file\"\n",
        )
        .unwrap();
        let overrides = Overrides {
            config: Some(path),
            listen: Some("127.0.0.1:3000".into()),
            ..Overrides::default()
        };
        let env = [
            ("FLAGSTREAM_SERVER__LISTEN", "127.0.0.1:2000"),
            ("FLAGSTREAM_STORAGE__DATA_DIR", "/env"),
        ];
        let config = Config::load(
            &overrides,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 3000);
        assert_eq!(config.storage.data_dir, PathBuf::from("/env"));
        assert_eq!(config.server.request_timeout, Duration::from_secs(3));
    }

    #[test]
    fn peppers_from_the_environment_are_checked_and_never_shown() {
        let good = format!("1 {}", "ab".repeat(32));
        let config = load("", &[("FLAGSTREAM_PRIVACY__PEPPER", &good)]).unwrap();
        assert!(!config.render().contains("abab"));
        assert!(!format!("{config:?}").contains("abab"));
        let err = load("", &[("FLAGSTREAM_PRIVACY__PEPPER", "1 zz")]).unwrap_err();
        assert!(err.to_string().contains("privacy.pepper"), "{err}");
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let err = load("[server]\nlisten = \"127.0.0.1:1\"\nbroken = = 3\n", &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].at.ends_with(":3"), "{err}");
    }

    #[test]
    fn tokens_allow_a_public_listener_and_render_without_secrets() {
        let hash = TokenHash::of("app-key").to_hex();
        let config = load(
            &format!(
                "[server]\nlisten = \"0.0.0.0:8080\"\n[counters]\nredis_url = \"redis://:pw@r:6379\"\n\
                 [[auth.tokens]]\nname = \"app\"\nrole = \"client\"\nsha256 = \"{hash}\"\n"
            ),
            &[],
        )
        .unwrap();
        assert!(!config.is_open());
        let shown = config.render();
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        // What `flagstream config` prints loads back to the same configuration, passwords aside.
        let reparsed = load(&shown, &[]).unwrap();
        assert_eq!(reparsed.auth, config.auth);
        assert_eq!(reparsed.server, config.server);
    }
}
