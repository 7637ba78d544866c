//! Privacy's metrics: guardians' consent decisions, data-subject requests, retention, the
//! audit log and the data keys.

use super::ConsentScope;
use super::requests::RequestKind;

crate::telemetry::catalog! {
    /// Guardians' consent decisions recorded, by scope and decision (grant, revoke).
    counter CONSENT_DECISIONS_TOTAL = "flagstream_consent_decisions_total";
    /// Subjects with consent records.
    gauge CONSENT_SUBJECTS = "flagstream_consent_subjects";
    /// Data-subject requests by type and outcome (received, completed, failed).
    counter PRIVACY_REQUESTS_TOTAL = "flagstream_privacy_requests_total";
    /// Items deleted by the retention task, by kind of data (raw_events: log segments,
    /// exposures: assignment records, consent_records: subjects).
    counter RETENTION_DELETED_TOTAL = "flagstream_retention_deleted_total";
    /// Retention task runs, by outcome (ok, failed).
    counter RETENTION_RUNS_TOTAL = "flagstream_retention_runs_total";
    /// The version of the data key new records and segments are sealed with.
    gauge DATA_KEY_VERSION = "flagstream_data_key_version";
    /// Audit log entries that could not be written or synced.
    counter AUDIT_WRITE_ERRORS_TOTAL = "flagstream_audit_write_errors_total";
    /// Data key file reloads that changed something, by outcome (rotated, refused).
    counter DATA_KEY_RELOADS_TOTAL = "flagstream_data_key_reloads_total";
}

/// Counts a guardian's decision and sets the number of subjects with consent records.
pub fn consent_decided(scope: ConsentScope, granted: bool, subjects: usize) {
    let decision = if granted { "grant" } else { "revoke" };
    metrics::counter!(CONSENT_DECISIONS_TOTAL, "scope" => scope.as_str(), "decision" => decision)
        .increment(1);
    metrics::gauge!(CONSENT_SUBJECTS).set(subjects as f64);
}

/// Where a data-subject request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Recorded, to be carried out.
    Received,
    /// Carried out.
    Completed,
    /// Could not be carried out (retried at the next start).
    Failed,
}

/// Counts one data-subject request reaching `outcome`.
pub fn request(kind: RequestKind, outcome: RequestOutcome) {
    let outcome = match outcome {
        RequestOutcome::Received => "received",
        RequestOutcome::Completed => "completed",
        RequestOutcome::Failed => "failed",
    };
    metrics::counter!(PRIVACY_REQUESTS_TOTAL, "type" => kind.as_str(), "outcome" => outcome)
        .increment(1);
}

/// The kinds of data the retention task deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    /// Log segments of raw events.
    RawEvents,
    /// The pipeline's experiment assignment records.
    Exposures,
    /// Subjects' consent records.
    ConsentRecords,
}

/// Counts `count` items of `data` deleted by retention.
pub fn retention_deleted(data: Retained, count: usize) {
    let data = match data {
        Retained::RawEvents => "raw_events",
        Retained::Exposures => "exposures",
        Retained::ConsentRecords => "consent_records",
    };
    if count > 0 {
        metrics::counter!(RETENTION_DELETED_TOTAL, "data" => data).increment(count as u64);
    }
}

/// Counts one retention run.
pub fn retention_ran(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(RETENTION_RUNS_TOTAL, "outcome" => outcome).increment(1);
}

/// Sets the data key version in force.
pub fn data_key_in_force(version: u32) {
    metrics::gauge!(DATA_KEY_VERSION).set(f64::from(version));
}

/// Counts a data key file reload that rotated the key (`true`) or was refused.
pub fn data_key_reloaded(rotated: bool) {
    let outcome = if rotated { "rotated" } else { "refused" };
    metrics::counter!(DATA_KEY_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}
