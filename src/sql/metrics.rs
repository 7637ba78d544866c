//! The SQL engine's metrics: queries by kind and outcome, and the recent window's size.

use std::time::Duration;

crate::telemetry::catalog! {
    /// SQL queries by kind (adhoc, saved, experiment, experiment_gauges) and outcome (ok,
    /// truncated, invalid, forbidden, timeout, resources, busy, unavailable, failed).
    counter SQL_QUERIES_TOTAL = "flagstream_sql_queries_total";
    /// Time to run one SQL query, planning included, by kind.
    histogram SQL_QUERY_DURATION_SECONDS = "flagstream_sql_query_duration_seconds" in Seconds;
    /// SQL queries running.
    gauge SQL_QUERIES_RUNNING = "flagstream_sql_queries_running" from zero;
    /// Events in the SQL window's memory.
    gauge SQL_MEMORY_EVENTS = "flagstream_sql_memory_events" from zero;
    /// Bytes of Arrow memory held by the SQL window's sealed batches.
    gauge SQL_MEMORY_BYTES = "flagstream_sql_memory_bytes" in Bytes from zero;
    /// Parquet segments of the events table.
    gauge SQL_SEGMENTS = "flagstream_sql_segments" from zero;
    /// Failed rolls of the SQL window into a Parquet segment; each is retried.
    counter SQL_ROLL_ERRORS_TOTAL = "flagstream_sql_roll_errors_total" from zero;
    /// Stored events the SQL window could not read; counted, then skipped.
    counter SQL_UNREADABLE_EVENTS_TOTAL = "flagstream_sql_unreadable_events_total" from zero;
}

/// Who asked a query, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// `POST /v1/sql`.
    Adhoc,
    /// A saved query of `queries/`.
    Saved,
    /// An experiment's results asked for.
    Experiment,
    /// The experiment results recomputed for the gauges.
    ExperimentGauges,
}

impl QueryKind {
    fn label(self) -> &'static str {
        match self {
            Self::Adhoc => "adhoc",
            Self::Saved => "saved",
            Self::Experiment => "experiment",
            Self::ExperimentGauges => "experiment_gauges",
        }
    }
}

/// Records one query's duration and outcome.
pub fn query_finished(kind: QueryKind, outcome: &'static str, took: Duration) {
    let kind = kind.label();
    metrics::histogram!(SQL_QUERY_DURATION_SECONDS, "kind" => kind).record(took.as_secs_f64());
    metrics::counter!(SQL_QUERIES_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
}
