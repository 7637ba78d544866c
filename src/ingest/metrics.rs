//! Ingest's metrics: events received and their outcomes, the dedup state, the rate limit and
//! server-side exposures.

use super::Transport;
use crate::events::RejectReason;

crate::telemetry::catalog! {
    /// Events received, by transport, outcome (ok, duplicate, rejected) and rejection reason.
    counter EVENTS_TOTAL = "flagstream_events_total";
    /// Undeclared properties, context keys and fields dropped from accepted events.
    counter FIELDS_DROPPED_TOTAL = "flagstream_event_fields_dropped_total";
    /// Event times in the future, clamped to the receive time.
    counter TIMESTAMPS_CLAMPED_TOTAL = "flagstream_event_timestamps_clamped_total";
    /// How far device clocks were off (absolute), per event.
    histogram INGEST_CLOCK_SKEW_SECONDS = "flagstream_ingest_clock_skew_seconds" in Seconds;
    /// How long after it happened an event arrived.
    histogram INGEST_LATENESS_SECONDS = "flagstream_ingest_lateness_seconds" in Seconds;
    /// From receiving a request's events to their durable acknowledgement, by transport.
    histogram INGEST_ACK_DURATION_SECONDS = "flagstream_ingest_ack_duration_seconds" in Seconds;
    /// Events per request, by transport.
    histogram INGEST_BATCH_EVENTS = "flagstream_ingest_batch_events";
    /// Devices in the dedup state.
    gauge DEDUP_DEVICES = "flagstream_dedup_devices";
    /// Event ids in the dedup state.
    gauge DEDUP_EVENT_IDS = "flagstream_dedup_event_ids";
    /// Requests refused by the per-key rate limit.
    counter RATE_LIMITED_TOTAL = "flagstream_rate_limited_total" from zero;
    /// Server-side experiment exposures (the first per subject, flag and variant a day), by
    /// outcome (stored, failed, dropped, no_consent, erased).
    counter EXPOSURES_TOTAL = "flagstream_exposures_total";
}

/// What became of server-side exposures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExposureOutcome {
    /// Durable in the log.
    Stored,
    /// The log refused them.
    Failed,
    /// The queue to the log was full.
    Dropped,
    /// The subject's guardian has not granted the `experiments` scope.
    NoConsent,
    /// The subject asked for erasure.
    Erased,
}

impl ExposureOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
            Self::NoConsent => "no_consent",
            Self::Erased => "erased",
        }
    }
}

/// Counts `count` exposures with that outcome.
pub fn exposures(outcome: ExposureOutcome, count: u64) {
    metrics::counter!(EXPOSURES_TOTAL, "outcome" => outcome.label()).increment(count);
}

/// Counts one request refused by the rate limit.
pub fn rate_limited() {
    metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
}

/// Counts one rejected event.
pub fn event_rejected(transport: Transport, reason: RejectReason) {
    metrics::counter!(EVENTS_TOTAL, "transport" => transport.as_str(), "outcome" => "rejected", "reason" => reason.as_str())
        .increment(1);
}

/// Counts a request's stored (`ok`) and `duplicate` events.
pub fn events_accepted(transport: Transport, ok: u64, duplicate: u64) {
    for (outcome, count) in [("ok", ok), ("duplicate", duplicate)] {
        if count > 0 {
            metrics::counter!(EVENTS_TOTAL, "transport" => transport.as_str(), "outcome" => outcome, "reason" => "")
                .increment(count);
        }
    }
}
