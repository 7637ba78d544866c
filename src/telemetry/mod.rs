//! Telemetry: the log subscriber ([`logs`]) and the metrics recorder.
//!
//! Each component declares its own metrics in its `metrics.rs` with [`catalog!`]; this
//! module installs the Prometheus recorder, sets the histogram buckets, and calls every
//! component's `describe()`. See ARCHITECTURE.md, "Adding a metric".

pub mod catalog;
pub mod logs;

pub(crate) use catalog::catalog;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{counters, experiments, flags, http, identity, ingest, pipeline, privacy, sql, wal};

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

/// Installs the process-wide recorder once and returns its handle; later calls (several
/// servers in one test process) share it.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(flags::metrics::FLAG_EVALUATION_DURATION_SECONDS.into()),
            EVALUATION_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ingest::metrics::INGEST_CLOCK_SKEW_SECONDS.into()),
            DELAY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ingest::metrics::INGEST_LATENESS_SECONDS.into()),
            DELAY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ingest::metrics::INGEST_BATCH_EVENTS.into()),
            BATCH_BUCKETS,
        )?
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

/// Describes every component's metrics, in the order of the data flow.
fn describe() {
    http::metrics::describe();
    http::metrics::build_info();
    flags::metrics::describe();
    ingest::metrics::describe();
    wal::metrics::describe();
    pipeline::metrics::describe();
    counters::metrics::describe();
    counters::metrics::start_at_zero();
    experiments::metrics::describe();
    privacy::metrics::describe();
    identity::metrics::describe();
    sql::metrics::describe();
}
