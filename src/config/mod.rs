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

// Long file: about a third of it is the unit tests of loading and precedence, kept beside it.

mod auth;
mod docs;
mod oidc;
mod validate;
mod value;

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Value;

pub use auth::{
    DEFAULT_PROJECT, Role, SCOPE_KEYS, TokenConfig, TokenHash, TokenScope, check_project,
};
pub use docs::render_markdown;
pub use oidc::{ALGORITHMS, ClaimNames, MAX_LEEWAY, OidcIssuerConfig};
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

mod sections;
pub use sections::*;

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

    /// Checks what no single value can: each section's own combinations and limits, those
    /// across sections, and the state of the file system; returns every problem found.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = validate::Problems::default();
        self.validate_into(&mut problems);
        problems.into_vec()
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
            assert_eq!(super::validate::check_origin(good), Ok(()), "{good}");
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
            assert!(super::validate::check_origin(bad).is_err(), "{bad}");
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
        assert_eq!(
            config.server.request_timeout,
            std::time::Duration::from_secs(3)
        );
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
