//! Counters: where the pipeline's per-(cohort, window) aggregates live.
//!
//! Two stores with the same semantics: Redis (shared, multi-node, the production choice) and an
//! embedded in-process store (single node, the zero-config default). Writes are idempotent per
//! cell — a stretch of the log that always aggregates to the same values — because every
//! cohort remembers the last cell applied to it. A replay after a crash or an outage therefore
//! leaves every counter equal to a recount.

pub mod cell;
mod embedded;
pub mod hll;
pub mod keys;
pub mod metrics;
mod redis_store;
pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use cell::{
    CohortKey, SESSIONS_FIELD, SubjectHasher, SubjectSet, TIME_SPENT_FIELD, WindowDelta,
    events_field, subject_hash,
};
pub use embedded::Embedded;
pub use redis_store::{RedisError, RedisStore, RedisWriter};
pub use window::{Window, WindowStart};

use crate::config::CountersConfig;

/// Everything one cell of the log adds to one cohort.
#[derive(Debug, Clone)]
pub struct CohortUpdate {
    /// The cohort.
    pub cohort: CohortKey,
    /// The cell: applied once, and only after every earlier cell of this cohort.
    pub cell: u64,
    /// What each window gained.
    pub windows: Vec<(Window, WindowStart, WindowDelta)>,
}

/// One window's counters as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WindowCounts {
    /// Additive counters by field (`events:<type>`, `sessions`, `time_spent_ms`).
    pub counts: BTreeMap<String, i64>,
    /// Estimated distinct subjects.
    pub subjects: u64,
    /// Estimated distinct subjects per event type.
    pub converted: BTreeMap<String, u64>,
}

/// How long counters of each window length are kept after their window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Minute windows.
    pub minute: Duration,
    /// Hour windows.
    pub hour: Duration,
    /// Day windows.
    pub day: Duration,
}

impl Retention {
    /// Reads the policy from the configuration.
    pub fn of(config: &CountersConfig) -> Self {
        Self {
            minute: config.minute_retention,
            hour: config.hour_retention,
            day: config.day_retention,
        }
    }

    /// Returns when a window's counters expire, in ms since the Unix epoch.
    /// How long counters of `window`'s length are kept after the window ends.
    pub fn kept(&self, window: Window) -> Duration {
        match window {
            Window::Minute => self.minute,
            Window::Hour => self.hour,
            Window::Day => self.day,
        }
    }

    pub fn expires_at(&self, window: Window, start: WindowStart) -> i64 {
        let keep = match window {
            Window::Minute => self.minute,
            Window::Hour => self.hour,
            Window::Day => self.day,
        };
        start.0 + window.millis() + keep.as_millis() as i64
    }
}

/// Why counters could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl CounterError {
    /// Returns whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CounterError::Redis(err) => err.is_retryable(),
        }
    }
}

/// Applies cohort updates; one per pipeline worker, used from its own thread.
pub trait CounterWriter: Send {
    /// Applies `updates` (each at most once per cohort and cell) and returns once they are
    /// durable in the store.
    fn apply(&mut self, updates: &[CohortUpdate]) -> Result<(), CounterError>;
}

/// The configured counter store.
#[derive(Clone)]
pub enum CounterStore {
    /// In-process, rebuilt from the write-ahead log on start.
    Embedded(Arc<Embedded>),
    /// A Redis server or cluster.
    Redis(Box<RedisStore>),
}

impl CounterStore {
    /// Opens the store the configuration names; Redis is connected lazily, so a Redis that is
    /// down at start does not stop the service.
    pub fn open(config: &CountersConfig) -> Result<Self, RedisError> {
        let retention = Retention::of(config);
        match &config.redis_url {
            None => Ok(CounterStore::Embedded(Arc::new(Embedded::new(retention)))),
            Some(url) => RedisStore::open(url, config.redis_timeout, retention)
                .map(|s| CounterStore::Redis(Box::new(s))),
        }
    }

    /// Returns the store's name for logs and readiness.
    pub fn kind(&self) -> &'static str {
        match self {
            CounterStore::Embedded(_) => "embedded",
            CounterStore::Redis(_) => "redis",
        }
    }

    /// Returns whether the store outlives the process (so the pipeline resumes from its
    /// checkpoint instead of replaying the whole log).
    pub fn is_durable(&self) -> bool {
        matches!(self, CounterStore::Redis(_))
    }

    /// Returns a writer for one pipeline worker.
    pub fn writer(&self) -> Box<dyn CounterWriter> {
        match self {
            CounterStore::Embedded(store) => Box::new(store.clone()),
            CounterStore::Redis(store) => Box::new(store.writer()),
        }
    }

    /// Returns every cohort that has counters.
    pub async fn cohorts(&self) -> Result<Vec<CohortKey>, CounterError> {
        match self {
            CounterStore::Embedded(store) => Ok(store.cohorts()),
            CounterStore::Redis(store) => Ok(store.cohorts().await?),
        }
    }

    /// Reads the counters of `cohort` for the windows starting at `starts`.
    pub async fn read(
        &self,
        cohort: &CohortKey,
        window: Window,
        starts: &[WindowStart],
    ) -> Result<Vec<WindowCounts>, CounterError> {
        match self {
            CounterStore::Embedded(store) => Ok(store.read(cohort, window, starts)),
            CounterStore::Redis(store) => Ok(store.read(cohort, window, starts).await?),
        }
    }
}
