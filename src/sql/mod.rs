//! SQL: DataFusion over the recent window of raw events and older Parquet segments.
//!
//! Data flow: the write-ahead log → [`feed`] (a thread) → [`table::RecentEvents`] (Arrow
//! batches in memory) → rolled into encrypted [`segments`] → read together as the `events`
//! table (and the `exposures` view over it) by [`engine::SqlEngine`].
//!
//! Read-only and bounded: no DDL, DML, statements or file access; limits on text length,
//! time, memory (no spilling), concurrency (on its own runtime, below ingest's priority) and
//! result size. Saved queries in `queries/*.sql` are named and parameterized ([`saved`]).

pub mod client;
pub mod columns;
pub mod counters_table;
pub mod engine;
pub mod erase;
pub mod feed;
pub mod membership;
pub mod metrics;
pub mod output;
pub mod saved;
pub mod scope;
pub mod segments;
pub mod table;

pub use engine::{QueryResult, SqlEngine, SqlOptions};

use datafusion::error::DataFusionError;

/// Why a query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL text is over its length limit.
    #[error("the SQL text is {length} bytes; the limit is {limit}")]
    TooLong {
        /// The text's length.
        length: usize,
        /// The limit.
        limit: usize,
    },
    /// As many queries as allowed are running.
    #[error("{0} queries are running, the most allowed; try again shortly")]
    Busy(usize),
    /// The query is not valid, not allowed, or failed on its data (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// The caller's token may not run this query (a scoped token's limits).
    #[error("{0}")]
    Forbidden(String),
    /// The query ran out of time.
    #[error("the query did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The query needed more memory than one query may hold.
    #[error("the query needs more memory than a query may hold: {0}")]
    Resources(String),
    /// The counter store, which the `counters` table reads, cannot be reached.
    #[error("the counter store is unavailable; try again shortly")]
    CountersUnavailable,
    /// Something failed inside the service (the detail is for the log only).
    #[error("{context}: {source}")]
    Internal {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SqlError {
    /// Something failed inside the service while doing `context`.
    pub fn internal(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SqlError::Internal {
            context,
            source: source.into(),
        }
    }

    /// Returns the outcome label of the error for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            SqlError::TooLong { .. } | SqlError::Invalid(_) => "invalid",
            SqlError::Forbidden(_) => "forbidden",
            SqlError::Busy(_) => "busy",
            SqlError::Timeout(_) => "timeout",
            SqlError::Resources(_) => "resources",
            SqlError::CountersUnavailable => "unavailable",
            SqlError::Internal { .. } => "failed",
        }
    }
}

impl From<DataFusionError> for SqlError {
    fn from(err: DataFusionError) -> Self {
        let root = err.find_root();
        match root {
            DataFusionError::SQL(parse, _) => SqlError::Invalid(format!("syntax error: {parse}")),
            DataFusionError::Plan(message) => SqlError::Invalid(allowed(message)),
            DataFusionError::SchemaError(schema, _) => SqlError::Invalid(schema.to_string()),
            DataFusionError::NotImplemented(message) => {
                SqlError::Invalid(format!("not supported: {message}"))
            }
            DataFusionError::Execution(message) => {
                SqlError::Invalid(format!("the query failed: {message}"))
            }
            DataFusionError::ArrowError(arrow, _) => {
                SqlError::Invalid(format!("the query failed: {arrow}"))
            }
            DataFusionError::External(inner)
                if inner
                    .downcast_ref::<crate::counters::CounterError>()
                    .is_some() =>
            {
                tracing::warn!(error = %inner, "counter store read failed in a query");
                SqlError::CountersUnavailable
            }
            DataFusionError::ResourcesExhausted(message) => {
                SqlError::Resources(first_line(message))
            }
            other => SqlError::internal("the query engine", other.to_string()),
        }
    }
}

/// Rewrites DataFusion's refusals of DDL, DML and statements into one clear sentence.
fn allowed(message: &str) -> String {
    for kind in ["DDL", "DML", "Statement"] {
        if message.starts_with(&format!("{kind} not supported")) {
            return format!(
                "only read-only queries (SELECT, WITH, EXPLAIN) are allowed: {}",
                message.to_lowercase()
            );
        }
    }
    message.to_owned()
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_owned()
}
