//! The retention job: deletes what is past its retention (`privacy::retention` says how long
//! each kind of data is kept), at start and then every `privacy.retention_check`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::Stop;
use crate::config::Config;
use crate::ingest::{Ingestor, now_ms};
use crate::pipeline::state::AssignmentLog;
use crate::privacy::ConsentLedger;
use crate::privacy::metrics::{self as privacy_metrics, Retained};

/// What one run deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// Write-ahead log segments.
    pub log_segments: usize,
    /// Assignment records.
    pub assignments: usize,
    /// Subjects whose consent records lapsed.
    pub consent_subjects: usize,
}

/// What the retention task works on.
pub struct Enforcer {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// The write-ahead log and the suppression list.
    pub ingest: Arc<Ingestor>,
    /// The consent ledger.
    pub consent: Arc<ConsentLedger>,
    /// The pipeline's assignment logs.
    pub assignments: PathBuf,
}

impl Enforcer {
    /// Deletes what is past its retention at `now` (ms). Blocks on the disk.
    pub fn run_once(&self, now: i64) -> std::io::Result<Deleted> {
        let ago = |d: Duration| now.saturating_sub(d.as_millis() as i64).max(0);
        let privacy = &self.config.privacy;
        self.ingest
            .suppressions()
            .expire(ago(self.config.ingest.late_horizon));
        let log_segments = crate::wal::expire(
            self.ingest.wal().dir(),
            ago(self.config.sql.retention) as u64,
        )?;
        let assignments =
            AssignmentLog::expire(&self.assignments, ago(privacy.exposure_retention) as u64)?;
        let consent_subjects = self
            .consent
            .expire(ago(privacy.consent_retention))
            .map_err(std::io::Error::other)?;
        privacy_metrics::retention_deleted(Retained::RawEvents, log_segments);
        privacy_metrics::retention_deleted(Retained::Exposures, assignments);
        privacy_metrics::retention_deleted(Retained::ConsentRecords, consent_subjects);
        Ok(Deleted {
            log_segments,
            assignments,
            consent_subjects,
        })
    }

    /// Runs at start, then every `privacy.retention_check`, until `stop`.
    pub async fn run(self, mut stop: Stop) {
        let enforcer = Arc::new(self);
        let mut tick = tokio::time::interval(enforcer.config.privacy.retention_check);
        loop {
            if !stop.tick(&mut tick).await {
                return;
            }
            let job = enforcer.clone();
            let outcome = tokio::task::spawn_blocking(move || job.run_once(now_ms())).await;
            let outcome = match outcome {
                Ok(Ok(deleted)) => {
                    if deleted != Deleted::default() {
                        tracing::info!(
                            log_segments = deleted.log_segments,
                            assignments = deleted.assignments,
                            consent_subjects = deleted.consent_subjects,
                            "retention: deleted what was past its time"
                        );
                    }
                    true
                }
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "retention run failed; retried at the next check");
                    false
                }
                // The runtime is shutting down.
                Err(err) if err.is_cancelled() => return,
                Err(err) => {
                    tracing::error!(error = %err, "retention run panicked");
                    false
                }
            };
            privacy_metrics::retention_ran(outcome);
        }
    }
}
