//! The flags' metrics: reloads of the flag directory and evaluations.

use std::time::Duration;

use super::store::ReloadOutcome;

crate::telemetry::catalog! {
    /// Flag directory reloads, by outcome (applied, unchanged, failed).
    counter FLAG_RELOADS_TOTAL = "flagstream_flag_reloads_total";
    /// Problems in the flag files as last loaded; the last good flags keep serving.
    gauge FLAG_PROBLEMS = "flagstream_flag_problems" from zero;
    /// Flags in the snapshot in force.
    gauge FLAGS_LOADED = "flagstream_flags_loaded";
    /// Flag evaluations, by endpoint (ofrep, ofrep_bulk, config) and reason.
    counter FLAG_EVALUATIONS_TOTAL = "flagstream_flag_evaluations_total";
    /// Time to evaluate the flags of one request, by endpoint.
    histogram FLAG_EVALUATION_DURATION_SECONDS = "flagstream_flag_evaluation_duration_seconds" in Seconds;
}

/// Counts one reload of the flag directory.
pub fn reloaded(outcome: ReloadOutcome) {
    let outcome = match outcome {
        ReloadOutcome::Applied => "applied",
        ReloadOutcome::Unchanged => "unchanged",
        ReloadOutcome::Failed => "failed",
    };
    metrics::counter!(FLAG_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}

/// Sets the flags in force and the problems found in their files.
pub fn loaded(flags: usize, problems: usize) {
    metrics::gauge!(FLAG_PROBLEMS).set(problems as f64);
    metrics::gauge!(FLAGS_LOADED).set(flags as f64);
}

/// The endpoints that evaluate flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// One flag through OFREP.
    Ofrep,
    /// Every flag through OFREP.
    OfrepBulk,
    /// `/v1/config`.
    Config,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Self::Ofrep => "ofrep",
            Self::OfrepBulk => "ofrep_bulk",
            Self::Config => "config",
        }
    }
}

/// Records one request's evaluations: how many ended with each reason, and how long the
/// request's evaluation took.
pub fn evaluated(endpoint: Endpoint, by_reason: &[(&'static str, u64)], took: Duration) {
    let endpoint = endpoint.label();
    for &(reason, count) in by_reason {
        if count > 0 {
            metrics::counter!(FLAG_EVALUATIONS_TOTAL, "endpoint" => endpoint, "reason" => reason)
                .increment(count);
        }
    }
    metrics::histogram!(FLAG_EVALUATION_DURATION_SECONDS, "endpoint" => endpoint)
        .record(took.as_secs_f64());
}
