//! Every metric the service exports, named in one place (Prometheus style: `flagstream_`
//! prefix, unit suffixes, `_total` counters, explicit histogram buckets, bounded labels), the
//! recorder, and the HTTP middleware that labels requests by matched route.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests answered, by matched route, method and status class.
pub const HTTP_REQUESTS_TOTAL: &str = "flagstream_http_requests_total";
/// HTTP request latency, by matched route and method.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "flagstream_http_request_duration_seconds";
/// Requests in flight.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "flagstream_http_requests_in_flight";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "flagstream_build_info";
/// 1 when the last readiness check passed, by check.
pub const READY: &str = "flagstream_ready";

/// Flag directory reloads, by outcome (applied, unchanged, failed).
pub const FLAG_RELOADS_TOTAL: &str = "flagstream_flag_reloads_total";
/// Problems in the flag files as last loaded (rejected files, broken rules, duplicates).
pub const FLAG_PROBLEMS: &str = "flagstream_flag_problems";
/// Flags in the snapshot in force.
pub const FLAGS_LOADED: &str = "flagstream_flags_loaded";
/// Flag evaluations, by endpoint (ofrep, ofrep_bulk, config) and reason.
pub const FLAG_EVALUATIONS_TOTAL: &str = "flagstream_flag_evaluations_total";
/// Time to evaluate the flags of one request, by endpoint.
pub const FLAG_EVALUATION_DURATION_SECONDS: &str = "flagstream_flag_evaluation_duration_seconds";
/// Server-side experiment exposures (first per subject, flag and variant per day), by outcome
/// (stored, failed, dropped).
pub const EXPOSURES_TOTAL: &str = "flagstream_exposures_total";
/// Events received, by transport, outcome (ok, duplicate, rejected) and rejection reason.
pub const EVENTS_TOTAL: &str = "flagstream_events_total";
/// Undeclared properties, context keys and fields dropped from accepted events.
pub const FIELDS_DROPPED_TOTAL: &str = "flagstream_event_fields_dropped_total";
/// Event times in the future, clamped to the receive time.
pub const TIMESTAMPS_CLAMPED_TOTAL: &str = "flagstream_event_timestamps_clamped_total";
/// How far device clocks were off (absolute), per event.
pub const INGEST_CLOCK_SKEW_SECONDS: &str = "flagstream_ingest_clock_skew_seconds";
/// How long after it happened an event arrived.
pub const INGEST_LATENESS_SECONDS: &str = "flagstream_ingest_lateness_seconds";
/// From receiving a request's events to their durable acknowledgement, by transport.
pub const INGEST_ACK_DURATION_SECONDS: &str = "flagstream_ingest_ack_duration_seconds";
/// Events per request, by transport.
pub const INGEST_BATCH_EVENTS: &str = "flagstream_ingest_batch_events";
/// Devices in the dedup state.
pub const DEDUP_DEVICES: &str = "flagstream_dedup_devices";
/// Event ids in the dedup state.
pub const DEDUP_EVENT_IDS: &str = "flagstream_dedup_event_ids";
/// Live WebSocket sessions.
pub const STREAM_SESSIONS: &str = "flagstream_stream_sessions";
/// WebSocket client messages, by outcome (ack, error).
pub const STREAM_MESSAGES_TOTAL: &str = "flagstream_stream_messages_total";
/// Requests refused by the per-key rate limit.
pub const RATE_LIMITED_TOTAL: &str = "flagstream_rate_limited_total";

/// Epochs (group commits) written to the write-ahead log.
pub const WAL_EPOCHS_TOTAL: &str = "flagstream_wal_epochs_total";
/// Bytes written to the write-ahead log.
pub const WAL_BYTES_TOTAL: &str = "flagstream_wal_bytes_total";
/// Appends waiting for the write-ahead log writer.
pub const WAL_QUEUE_DEPTH: &str = "flagstream_wal_queue_depth";
/// Time of each fsync of the write-ahead log.
pub const WAL_FSYNC_DURATION_SECONDS: &str = "flagstream_wal_fsync_duration_seconds";
/// Write or sync failures of the write-ahead log (after one, ingest stops acknowledging).
pub const WAL_ERRORS_TOTAL: &str = "flagstream_wal_errors_total";
/// Damaged records found by recovery.
pub const WAL_CORRUPT_RECORDS_TOTAL: &str = "flagstream_wal_corrupt_records_total";
/// Bytes of torn tails cut off by recovery.
pub const WAL_TRUNCATED_BYTES_TOTAL: &str = "flagstream_wal_truncated_bytes_total";

/// Events the pipeline read from the write-ahead log.
pub const PIPELINE_EVENTS_TOTAL: &str = "flagstream_pipeline_events_total";
/// Stored events the pipeline could not read (counted, then skipped).
pub const PIPELINE_UNREADABLE_EVENTS_TOTAL: &str = "flagstream_pipeline_unreadable_events_total";
/// Epochs read by the pipeline but not yet in the counter store.
pub const PIPELINE_PENDING_EPOCHS: &str = "flagstream_pipeline_pending_epochs";
/// How far the counters are behind the newest durable epoch.
pub const PIPELINE_LAG_SECONDS: &str = "flagstream_pipeline_lag_seconds";
/// From the end of a cell of the log to its counters being written, per cell and worker.
pub const PIPELINE_FLUSH_LAG_SECONDS: &str = "flagstream_pipeline_flush_lag_seconds";
/// The last epoch whose counters are in the store everywhere (the pipeline's checkpoint).
pub const PIPELINE_CHECKPOINT_EPOCH: &str = "flagstream_pipeline_checkpoint_epoch";
/// Whether the pipeline's dataflow is running (0 while it waits for cluster peers or restarts).
pub const PIPELINE_RUNNING: &str = "flagstream_pipeline_running";
/// Times the dataflow ended unexpectedly and started again from its checkpoint.
pub const PIPELINE_RESTARTS_TOTAL: &str = "flagstream_pipeline_restarts_total";
/// Subjects with an experiment assignment in the pipeline's state.
pub const PIPELINE_ASSIGNED_SUBJECTS: &str = "flagstream_pipeline_assigned_subjects";
/// Counter store writes that failed, by store and kind (retryable, permanent).
pub const COUNTER_ERRORS_TOTAL: &str = "flagstream_store_write_errors_total";
/// Commands sent to Redis by the pipeline (a Lua call counts once).
pub const REDIS_COMMANDS_TOTAL: &str = "flagstream_redis_commands_total";
/// Live per-variant gauges: distinct subjects today, by experiment and variant (capped).
pub const EXPERIMENT_SUBJECTS_TODAY: &str = "flagstream_experiment_subjects_today";
/// Live per-variant gauges: events today, by experiment and variant (capped).
pub const EXPERIMENT_EVENTS_TODAY: &str = "flagstream_experiment_events_today";
/// Experiment results (refreshed every `experiments.refresh`): exposed subjects by
/// experiment and variant.
pub const EXPERIMENT_EXPOSED_SUBJECTS: &str = "flagstream_experiment_exposed_subjects";
/// Experiment results: goal conversion rate by experiment, variant and goal.
pub const EXPERIMENT_CONVERSION_RATE: &str = "flagstream_experiment_conversion_rate";
/// Experiment results: relative lift of a goal's rate over the control, by experiment,
/// variant, goal and bound (`estimate`, `low`, `high` of the 95% interval).
pub const EXPERIMENT_RELATIVE_LIFT: &str = "flagstream_experiment_relative_lift";
/// Experiment results: the lift's two-sided p-value by experiment, variant and goal.
pub const EXPERIMENT_P_VALUE: &str = "flagstream_experiment_p_value";
/// Experiment results: the sample-ratio-mismatch p-value by experiment.
pub const EXPERIMENT_SRM_P_VALUE: &str = "flagstream_experiment_srm_p_value";
/// Experiment result refreshes, by outcome (ok, failed, busy).
pub const EXPERIMENT_REFRESHES_TOTAL: &str = "flagstream_experiment_refreshes_total";
/// Audit entries that could not be written or synced.
pub const AUDIT_WRITE_ERRORS_TOTAL: &str = "flagstream_audit_write_errors_total";
/// Data-subject requests, by type and outcome (received, completed, failed).
pub const PRIVACY_REQUESTS_TOTAL: &str = "flagstream_privacy_requests_total";
/// The version of the data key new records and segments are sealed with.
pub const DATA_KEY_VERSION: &str = "flagstream_data_key_version";
/// Data key file reloads, by outcome (rotated, unchanged, refused).
pub const DATA_KEY_RELOADS_TOTAL: &str = "flagstream_data_key_reloads_total";
/// Items deleted by the retention task, by kind of data.
pub const RETENTION_DELETED_TOTAL: &str = "flagstream_retention_deleted_total";
/// Retention task runs, by outcome (ok, failed).
pub const RETENTION_RUNS_TOTAL: &str = "flagstream_retention_runs_total";
/// Consent decisions recorded, by scope and decision (grant, revoke).
pub const CONSENT_DECISIONS_TOTAL: &str = "flagstream_consent_decisions_total";
/// Subjects with consent records.
pub const CONSENT_SUBJECTS: &str = "flagstream_consent_subjects";
/// SQL queries, by kind (adhoc, saved) and outcome (ok, truncated, invalid, timeout,
/// resources, busy, failed).
pub const SQL_QUERIES_TOTAL: &str = "flagstream_sql_queries_total";
/// Time to run one SQL query, planning included, by kind.
pub const SQL_QUERY_DURATION_SECONDS: &str = "flagstream_sql_query_duration_seconds";
/// SQL queries running.
pub const SQL_QUERIES_RUNNING: &str = "flagstream_sql_queries_running";
/// Events in the SQL window's memory.
pub const SQL_MEMORY_EVENTS: &str = "flagstream_sql_memory_events";
/// Bytes of Arrow memory the SQL window's sealed batches hold.
pub const SQL_MEMORY_BYTES: &str = "flagstream_sql_memory_bytes";
/// Parquet segments of the `events` table.
pub const SQL_SEGMENTS: &str = "flagstream_sql_segments";
/// Failed rolls of the SQL window into a segment (retried).
pub const SQL_ROLL_ERRORS_TOTAL: &str = "flagstream_sql_roll_errors_total";
/// Stored events the SQL window could not read; counted, then skipped.
pub const SQL_UNREADABLE_EVENTS_TOTAL: &str = "flagstream_sql_unreadable_events_total";

/// Latency buckets for request handling, 100 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Evaluation buckets, 1 µs to 10 ms: a request evaluates in microseconds.
const EVALUATION_BUCKETS_SECONDS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.0025, 0.01,
];

/// Clock skew and lateness, 1 s to 60 days: offline tablets come back after days.
const DELAY_BUCKETS_SECONDS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    600.0,
    3_600.0,
    21_600.0,
    86_400.0,
    259_200.0,
    604_800.0,
    2_592_000.0,
    5_184_000.0,
];

/// Events per request.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_000.0,
];

/// The route label of requests that matched no route, so raw paths never become labels.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Installs the process-wide recorder once and returns its handle; later calls (several
/// servers in one test process) share it.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(FLAG_EVALUATION_DURATION_SECONDS.into()),
            EVALUATION_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(INGEST_CLOCK_SKEW_SECONDS.into()),
            DELAY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(INGEST_LATENESS_SECONDS.into()),
            DELAY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(Matcher::Full(INGEST_BATCH_EVENTS.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)?
        .build_recorder();
    let handle = recorder.handle();
    // Losing the race means another server installed first; use its handle.
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
        let _ = HANDLE.set(handle.clone());
    }
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by matched route, method and status class."
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency by matched route and method."
    );
    metrics::describe_gauge!(HTTP_REQUESTS_IN_FLIGHT, "HTTP requests being handled.");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version is a label.");
    metrics::describe_gauge!(
        READY,
        "1 when the readiness check passed at its last run, by check."
    );
    metrics::describe_counter!(
        FLAG_RELOADS_TOTAL,
        "Flag directory reloads, by outcome (applied, unchanged, failed)."
    );
    metrics::describe_gauge!(
        FLAG_PROBLEMS,
        "Problems in the flag files as last loaded; the last good flags keep serving."
    );
    metrics::describe_gauge!(FLAGS_LOADED, "Flags in the snapshot in force.");
    metrics::describe_counter!(
        FLAG_EVALUATIONS_TOTAL,
        "Flag evaluations, by endpoint and reason."
    );
    metrics::describe_histogram!(
        FLAG_EVALUATION_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to evaluate the flags of one request, by endpoint."
    );
    metrics::describe_counter!(
        EXPOSURES_TOTAL,
        "Server-side experiment exposures by outcome (stored, failed, dropped, no_consent, erased)."
    );
    metrics::describe_counter!(
        EVENTS_TOTAL,
        "Events received, by transport, outcome (ok, duplicate, rejected) and rejection reason."
    );
    metrics::describe_counter!(
        FIELDS_DROPPED_TOTAL,
        "Undeclared properties, context keys and fields dropped from accepted events."
    );
    metrics::describe_counter!(
        TIMESTAMPS_CLAMPED_TOTAL,
        "Event times in the future, clamped to the receive time."
    );
    metrics::describe_histogram!(
        INGEST_CLOCK_SKEW_SECONDS,
        metrics::Unit::Seconds,
        "How far device clocks were off (absolute), per event."
    );
    metrics::describe_histogram!(
        INGEST_LATENESS_SECONDS,
        metrics::Unit::Seconds,
        "How long after it happened an event arrived."
    );
    metrics::describe_histogram!(
        INGEST_ACK_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "From receiving a request's events to their durable acknowledgement."
    );
    metrics::describe_histogram!(INGEST_BATCH_EVENTS, "Events per request, by transport.");
    metrics::describe_gauge!(DEDUP_DEVICES, "Devices in the dedup state.");
    metrics::describe_gauge!(DEDUP_EVENT_IDS, "Event ids in the dedup state.");
    metrics::describe_counter!(
        RATE_LIMITED_TOTAL,
        "Requests refused by the per-key rate limit."
    );
    metrics::describe_gauge!(STREAM_SESSIONS, "Live WebSocket sessions.");
    metrics::describe_counter!(
        STREAM_MESSAGES_TOTAL,
        "WebSocket client messages, by outcome (ack, error)."
    );
    metrics::describe_counter!(
        WAL_EPOCHS_TOTAL,
        "Epochs (group commits) written to the write-ahead log."
    );
    metrics::describe_counter!(
        WAL_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Bytes written to the write-ahead log."
    );
    metrics::describe_histogram!(
        WAL_FSYNC_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of each fsync of the write-ahead log."
    );
    metrics::describe_counter!(
        WAL_ERRORS_TOTAL,
        "Write or sync failures of the write-ahead log; after one, ingest stops acknowledging."
    );
    metrics::describe_counter!(
        WAL_CORRUPT_RECORDS_TOTAL,
        "Damaged write-ahead log records found by recovery."
    );
    metrics::describe_counter!(
        WAL_TRUNCATED_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Bytes of torn write-ahead log tails cut off by recovery."
    );
    metrics::describe_gauge!(
        WAL_QUEUE_DEPTH,
        "Appends waiting for the write-ahead log writer."
    );
    metrics::describe_counter!(
        PIPELINE_EVENTS_TOTAL,
        "Events the pipeline read from the write-ahead log."
    );
    metrics::describe_counter!(
        PIPELINE_UNREADABLE_EVENTS_TOTAL,
        "Stored events the pipeline could not read; counted, then skipped."
    );
    metrics::describe_gauge!(
        PIPELINE_PENDING_EPOCHS,
        "Epochs read by the pipeline whose counters are not in the store yet."
    );
    metrics::describe_gauge!(
        PIPELINE_LAG_SECONDS,
        metrics::Unit::Seconds,
        "How far the counters are behind the newest durable epoch."
    );
    metrics::describe_histogram!(
        PIPELINE_FLUSH_LAG_SECONDS,
        metrics::Unit::Seconds,
        "From the end of a cell of the log to its counters being written."
    );
    metrics::describe_gauge!(
        PIPELINE_CHECKPOINT_EPOCH,
        "The last epoch whose counters are in the store on every worker."
    );
    metrics::describe_gauge!(
        PIPELINE_RUNNING,
        "1 while the pipeline's dataflow runs; 0 while it waits for cluster peers or restarts."
    );
    metrics::describe_counter!(
        PIPELINE_RESTARTS_TOTAL,
        "Times the dataflow ended unexpectedly (in a cluster: a peer process was lost) and started again from its checkpoint."
    );
    metrics::describe_gauge!(
        PIPELINE_ASSIGNED_SUBJECTS,
        "Subjects with an experiment assignment in the pipeline's state."
    );
    metrics::describe_counter!(
        COUNTER_ERRORS_TOTAL,
        "Counter store writes that failed, by store and kind (retryable, permanent)."
    );
    metrics::describe_counter!(
        REDIS_COMMANDS_TOTAL,
        "Commands the pipeline sent to Redis; one Lua call counts once."
    );
    metrics::describe_gauge!(
        EXPERIMENT_SUBJECTS_TODAY,
        "Distinct subjects today (UTC) by experiment and variant; capped in number."
    );
    metrics::describe_gauge!(
        EXPERIMENT_EVENTS_TODAY,
        "Events today (UTC) by experiment and variant; capped in number."
    );
    metrics::describe_gauge!(
        EXPERIMENT_EXPOSED_SUBJECTS,
        "Subjects whose first exposure was to this variant, over the SQL retention."
    );
    metrics::describe_gauge!(
        EXPERIMENT_CONVERSION_RATE,
        "Share of a variant's exposed subjects with a goal event after exposure."
    );
    metrics::describe_gauge!(
        EXPERIMENT_RELATIVE_LIFT,
        "Relative lift of a goal's conversion rate over the control; bound is estimate, low or high (95% interval)."
    );
    metrics::describe_gauge!(
        EXPERIMENT_P_VALUE,
        "Two-sided p-value of a goal's lift over the control (two-proportion z-test)."
    );
    metrics::describe_gauge!(
        EXPERIMENT_SRM_P_VALUE,
        "Sample-ratio-mismatch chi-square p-value; below 0.001 the assignment is broken."
    );
    metrics::describe_counter!(
        EXPERIMENT_REFRESHES_TOTAL,
        "Recomputations of experiment results for the gauges, by outcome."
    );
    metrics::describe_counter!(
        AUDIT_WRITE_ERRORS_TOTAL,
        "Audit log entries that could not be written or synced."
    );
    metrics::describe_counter!(
        PRIVACY_REQUESTS_TOTAL,
        "Data-subject requests by type and outcome (received, completed, failed)."
    );
    metrics::describe_gauge!(
        DATA_KEY_VERSION,
        "The version of the data key new records and segments are sealed with."
    );
    metrics::describe_counter!(
        DATA_KEY_RELOADS_TOTAL,
        "Data key file reloads that changed something, by outcome (rotated, refused)."
    );
    metrics::describe_counter!(
        RETENTION_DELETED_TOTAL,
        "Items deleted by the retention task, by kind of data (raw_events: log segments, exposures: assignment records, consent_records: subjects, erasure_suppressions)."
    );
    metrics::describe_counter!(
        RETENTION_RUNS_TOTAL,
        "Retention task runs, by outcome (ok, failed)."
    );
    metrics::describe_counter!(
        CONSENT_DECISIONS_TOTAL,
        "Guardians' consent decisions recorded, by scope and decision (grant, revoke)."
    );
    metrics::describe_gauge!(CONSENT_SUBJECTS, "Subjects with consent records.");
    metrics::describe_counter!(
        SQL_QUERIES_TOTAL,
        "SQL queries by kind (adhoc, saved) and outcome."
    );
    metrics::describe_histogram!(
        SQL_QUERY_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to run one SQL query, planning included, by kind."
    );
    metrics::describe_gauge!(SQL_QUERIES_RUNNING, "SQL queries running.");
    metrics::describe_gauge!(SQL_MEMORY_EVENTS, "Events in the SQL window's memory.");
    metrics::describe_gauge!(
        SQL_MEMORY_BYTES,
        metrics::Unit::Bytes,
        "Bytes of Arrow memory held by the SQL window's sealed batches."
    );
    metrics::describe_gauge!(SQL_SEGMENTS, "Parquet segments of the events table.");
    metrics::describe_counter!(
        SQL_ROLL_ERRORS_TOTAL,
        "Failed rolls of the SQL window into a Parquet segment; each is retried."
    );
    metrics::describe_counter!(
        SQL_UNREADABLE_EVENTS_TOTAL,
        "Stored events the SQL window could not read; counted, then skipped."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Export the error counters and the gauges from the start, at zero: a dashboard or alert
    // can then tell "no errors" from "no data".
    for counter in [
        WAL_ERRORS_TOTAL,
        WAL_CORRUPT_RECORDS_TOTAL,
        WAL_TRUNCATED_BYTES_TOTAL,
        RATE_LIMITED_TOTAL,
        PIPELINE_EVENTS_TOTAL,
        PIPELINE_UNREADABLE_EVENTS_TOTAL,
        PIPELINE_RESTARTS_TOTAL,
        REDIS_COMMANDS_TOTAL,
        SQL_ROLL_ERRORS_TOTAL,
        SQL_UNREADABLE_EVENTS_TOTAL,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for store in ["redis", "embedded"] {
        for kind in ["retryable", "permanent"] {
            metrics::counter!(COUNTER_ERRORS_TOTAL, "store" => store, "kind" => kind).absolute(0);
        }
    }
    for gauge in [
        STREAM_SESSIONS,
        WAL_QUEUE_DEPTH,
        FLAG_PROBLEMS,
        PIPELINE_PENDING_EPOCHS,
        PIPELINE_LAG_SECONDS,
        PIPELINE_RUNNING,
        SQL_QUERIES_RUNNING,
        SQL_MEMORY_EVENTS,
        SQL_MEMORY_BYTES,
        SQL_SEGMENTS,
    ] {
        metrics::gauge!(gauge).increment(0.0);
    }
}

/// Counts and times every request by its matched route (never the raw path).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let in_flight = metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT);
    in_flight.increment(1.0);
    let response = next.run(request).await;
    in_flight.decrement(1.0);
    let status = status_class(response.status().as_u16());
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
