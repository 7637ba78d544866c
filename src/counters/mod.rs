//! Counters: where the pipeline's per-(cohort, window) aggregates live.
//!
//! Two stores with the same semantics: Redis (shared, multi-node, the production choice) and an
//! embedded in-process store (single node, the zero-config default). Writes are idempotent per
//! epoch, so a replay after a crash or an outage leaves every counter equal to a recount.

mod redis_store;

pub use redis_store::{RedisError, RedisStore};

use crate::config::CountersConfig;

/// The configured counter store.
#[derive(Clone)]
pub enum CounterStore {
    /// In-process, rebuilt from the write-ahead log on start.
    Embedded,
    /// A Redis server or cluster.
    Redis(RedisStore),
}

impl CounterStore {
    /// Opens the store the configuration names; Redis is connected lazily, so a Redis that is
    /// down at start does not stop the service.
    pub fn open(config: &CountersConfig) -> Result<Self, RedisError> {
        match &config.redis_url {
            None => Ok(CounterStore::Embedded),
            Some(url) => RedisStore::open(url, config.redis_timeout).map(CounterStore::Redis),
        }
    }

    /// Returns the store's name for logs and readiness.
    pub fn kind(&self) -> &'static str {
        match self {
            CounterStore::Embedded => "embedded",
            CounterStore::Redis(_) => "redis",
        }
    }
}
