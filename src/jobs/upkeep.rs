//! The upkeep job, every 5 s: drains the metric histograms (without it, a node nobody scrapes
//! would grow them without bound), makes the audit log durable, deletes access exports past
//! `privacy.export_retention`, and expires the embedded counter store's windows.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use super::Stop;
use crate::counters::CounterStore;
use crate::ingest::now_ms;
use crate::privacy::audit::AuditLog;
use crate::privacy::requests::Requests;

/// How often upkeep runs.
pub const EVERY: Duration = Duration::from_secs(5);

/// What upkeep keeps in order.
pub struct Upkeep {
    /// The metrics recorder.
    pub metrics: PrometheusHandle,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// The data-subject requests, whose exports expire.
    pub requests: Arc<Requests>,
    /// How long an access export is kept.
    pub export_retention: Duration,
    /// The counter store (the embedded one expires here; Redis by itself).
    pub counters: CounterStore,
}

impl Upkeep {
    /// Runs every [`EVERY`] until `stop`, then makes the audit log durable a last time.
    pub async fn run(self, mut stop: Stop) {
        let mut tick = tokio::time::interval(EVERY);
        while stop.tick(&mut tick).await {
            self.metrics.run_upkeep();
            let (audit, requests) = (self.audit.clone(), self.requests.clone());
            let horizon = now_ms() - self.export_retention.as_millis() as i64;
            let _ = tokio::task::spawn_blocking(move || {
                audit.sync();
                requests.expire_exports(horizon);
            })
            .await;
            if let CounterStore::Embedded(store) = &self.counters {
                store.expire(now_ms());
            }
        }
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.sync()).await;
    }
}
