//! Validation of what no single value can check: each section's own combinations and limits
//! (`<Section>::validate`), those across sections (`Config::validate_across`), and the
//! state of the file system. Every problem is collected; none stops the others.

use std::collections::HashSet;
use std::time::Duration;

use super::{
    AuthConfig, ByteSize, Config, ConfigProblem, CountersConfig, FlagsConfig, IngestConfig,
    PipelineConfig, PrivacyConfig, ServerConfig, SqlConfig, StorageConfig, StreamConfig,
    TelemetryConfig, check_project,
};

/// The problems found so far.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<ConfigProblem>);

impl Problems {
    /// Records that the setting `at` is wrong, and why.
    fn add(&mut self, at: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            at: at.into(),
            message: message.into(),
        });
    }

    /// A duration that must not be zero.
    fn nonzero(&mut self, at: &str, value: Duration) {
        if value.is_zero() {
            self.add(at, "must be greater than zero");
        }
    }

    /// A count that must be at least 1.
    fn at_least_one(&mut self, at: &str, value: usize) {
        if value == 0 {
            self.add(at, "must be at least 1");
        }
    }

    /// A path that, when it exists, must be a directory.
    fn directory_if_present(&mut self, at: &str, dir: &std::path::Path, what: &str) {
        if dir.exists() && !dir.is_dir() {
            self.add(at, format!("{} {what}", dir.display()));
        }
    }

    pub(super) fn into_vec(self) -> Vec<ConfigProblem> {
        self.0
    }
}

impl Config {
    pub(super) fn validate_into(&self, problems: &mut Problems) {
        self.server.validate(problems);
        self.storage.validate(problems);
        self.ingest.validate(problems);
        self.stream.validate(problems);
        self.privacy.validate(problems);
        self.flags.validate(problems);
        self.sql.validate(problems);
        self.counters.validate(problems);
        self.pipeline.validate(problems);
        // experiments: every value is valid on its own.
        self.auth.validate(problems);
        self.telemetry.validate(problems);
        self.validate_across(problems);
    }

    /// The checks that involve more than one section.
    fn validate_across(&self, problems: &mut Problems) {
        let listen = self.server.listen;
        if self.auth.tokens.is_empty() && self.auth.oidc.is_empty() && !listen.ip().is_loopback() {
            problems.add(
                "server.listen",
                format!(
                    "{listen} is not a loopback address and no auth.tokens are configured; \
                     add tokens or listen on 127.0.0.1"
                ),
            );
        }
        if !self.pipeline.peers.is_empty() && self.counters.redis_url.is_none() {
            problems.add(
                "pipeline.peers",
                "a multi-process pipeline needs a shared counter store: set counters.redis_url",
            );
        }
    }
}

impl ServerConfig {
    fn validate(&self, problems: &mut Problems) {
        if let Some(metrics) = self.metrics_listen
            && metrics == self.listen
            && metrics.port() != 0
        {
            problems.add("server.metrics_listen", "must differ from server.listen");
        }
        problems.nonzero("server.header_read_timeout", self.header_read_timeout);
        problems.nonzero("server.request_timeout", self.request_timeout);
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problems.add(
                "server.tls_cert",
                "set both server.tls_cert and server.tls_key, or neither",
            );
        }
        for origin in &self.allowed_origins {
            if let Err(why) = check_origin(origin) {
                problems.add("server.allowed_origins", format!("{origin:?} {why}"));
            }
        }
        problems.at_least_one(
            "server.max_concurrent_requests",
            self.max_concurrent_requests,
        );
        if self.max_body.0 < 1024 {
            problems.add("server.max_body", "must be at least 1KiB");
        }
    }
}

impl StorageConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.directory_if_present(
            "storage.data_dir",
            &self.data_dir,
            "exists and is not a directory",
        );
    }
}

impl IngestConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.max_event.0 < 256 {
            problems.add("ingest.max_event", "must be at least 256B");
        }
        if self.max_decompressed < self.max_event {
            problems.add(
                "ingest.max_decompressed",
                "must be at least ingest.max_event",
            );
        }
        problems.at_least_one("ingest.max_batch_events", self.max_batch_events);
        problems.at_least_one("ingest.wal_queue", self.wal_queue);
        problems.at_least_one("ingest.dedup_event_ids", self.dedup_event_ids);
        if self.rate_limit > 0 && self.rate_burst < self.max_batch_events {
            problems.add(
                "ingest.rate_burst",
                "must be at least ingest.max_batch_events, or no batch could pass",
            );
        }
        if self.dedup_snapshot_interval < Duration::from_millis(100) {
            problems.add("ingest.dedup_snapshot_interval", "must be at least 100ms");
        }
        if self.wal_commit_delay > Duration::from_millis(100) {
            problems.add(
                "ingest.wal_commit_delay",
                "must be at most 100ms: every acknowledgement under load waits for it",
            );
        }
        if self.wal_commit_siblings == 0 {
            problems.add(
                "ingest.wal_commit_siblings",
                "must be at least 1 (a lone client never waits)",
            );
        }
        if self.wal_segment_size < ByteSize::mib(1) {
            problems.add("ingest.wal_segment_size", "must be at least 1MiB");
        }
        if let Some(path) = &self.schema_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(err) = crate::events::Schema::parse(&text) {
                        problems.add("ingest.schema_file", err.to_string());
                    }
                }
                Err(err) => problems.add(
                    "ingest.schema_file",
                    format!("cannot read {}: {err}", path.display()),
                ),
            }
        }
    }
}

impl StreamConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("stream.idle_timeout", self.idle_timeout);
        problems.nonzero("stream.ping_interval", self.ping_interval);
        if self.max_frame > self.max_message {
            problems.add("stream.max_frame", "must not exceed stream.max_message");
        }
        if self.ping_interval >= self.idle_timeout {
            problems.add(
                "stream.ping_interval",
                "must be shorter than stream.idle_timeout",
            );
        }
    }
}

impl PrivacyConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("privacy.retention_check", self.retention_check);
        problems.nonzero("privacy.exposure_retention", self.exposure_retention);
        problems.nonzero("privacy.consent_retention", self.consent_retention);
        for project in &self.consent_required_projects {
            if let Err(why) = check_project(project) {
                problems.add("privacy.consent_required_projects", why);
            }
        }
        for (key, secret) in [
            ("privacy.pepper", &self.pepper),
            ("privacy.data_key", &self.data_key),
        ] {
            if let Some(secret) = secret
                && let Err(line) = crate::crypto::KeyRing::parse(secret.expose())
            {
                problems.add(
                    key,
                    format!("entry {line} is not `<version> <64 hex characters>`"),
                );
            }
        }
    }
}

impl FlagsConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("flags.reload_interval", self.reload_interval);
        if self.max_request_body.0 < 1024 {
            problems.add("flags.max_request_body", "must be at least 1KiB");
        }
        problems.directory_if_present("flags.dir", &self.dir, "is not a directory");
    }
}

impl SqlConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("sql.memory_window", self.memory_window);
        problems.nonzero("sql.timeout", self.timeout);
        problems.nonzero("sql.retention", self.retention);
        if self.retention < self.memory_window {
            problems.add(
                "sql.retention",
                format!(
                    "must be at least sql.memory_window ({:?}): events in memory are kept until they roll",
                    self.memory_window
                ),
            );
        }
        problems.at_least_one("sql.max_concurrent", self.max_concurrent);
        problems.at_least_one("sql.max_rows", self.max_rows);
        problems.at_least_one("sql.memory_events", self.memory_events);
        if self.max_sql_length.0 < 64 {
            problems.add("sql.max_sql_length", "must be at least 64 B");
        }
        if self.memory_limit.0 < 1 << 20 {
            problems.add("sql.memory_limit", "must be at least 1 MiB");
        }
        problems.directory_if_present("sql.queries_dir", &self.queries_dir, "is not a directory");
    }
}

impl CountersConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("counters.redis_timeout", self.redis_timeout);
    }
}

impl PipelineConfig {
    fn validate(&self, problems: &mut Problems) {
        problems.nonzero("pipeline.flush_interval", self.flush_interval);
        let context_keys = crate::events::schema::CONTEXT_KEYS;
        for dimension in &self.segments {
            if !context_keys.contains(&dimension.as_str()) {
                problems.add(
                    "pipeline.segments",
                    format!(
                        "{dimension:?} is not a context key (one of {})",
                        context_keys.join(", ")
                    ),
                );
            }
        }
        if self.peers.is_empty() {
            return;
        }
        if self.process >= self.peers.len() {
            problems.add(
                "pipeline.process",
                format!("must be below the number of peers ({})", self.peers.len()),
            );
        }
        for peer in &self.peers {
            if peer
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                problems.add("pipeline.peers", format!("{peer:?} is not host:port"));
            }
        }
    }
}

impl AuthConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.min_group_size == 0 {
            problems.add(
                "auth.min_group_size",
                "must be at least 1 (a group of one child is the smallest)",
            );
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for token in &self.tokens {
            if !names.insert(token.name.as_str()) {
                problems.add(
                    "auth.tokens",
                    format!("duplicate token name {:?}", token.name),
                );
            }
            if !hashes.insert(token.sha256.0) {
                problems.add(
                    "auth.tokens",
                    format!("token {:?} repeats another token's sha256", token.name),
                );
            }
        }
        let mut issuers = HashSet::new();
        for issuer in &self.oidc {
            if !issuers.insert(issuer.issuer.as_str()) {
                problems.add(
                    "auth.oidc",
                    format!("issuer {:?} is listed twice", issuer.issuer),
                );
            }
        }
    }
}

impl TelemetryConfig {
    fn validate(&self, problems: &mut Problems) {
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            problems.add("telemetry.log_filter", format!("invalid filter: {err}"));
        }
    }
}

/// Checks that `origin` is a web origin as browsers send it: `http` or `https`, a host, an
/// optional port, nothing else (no path, no trailing slash, no wildcard).
pub(super) fn check_origin(origin: &str) -> Result<(), &'static str> {
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
