//! The dashboard gauges: today's live counts per experiment variant from the counter store
//! (every 5 s), and every running experiment's results recomputed over the SQL retention
//! (every `experiments.refresh`), for at most `pipeline.experiment_gauges` variants each.

use std::sync::Arc;
use std::time::Duration;

use super::Stop;
use crate::counters::{CohortKey, CounterStore, Window};
use crate::experiments::metrics::{self as experiment_metrics, Refresh};
use crate::experiments::{catalog, compute};
use crate::flags::FlagStore;
use crate::ingest::now_ms;
use crate::sql::metrics::QueryKind;
use crate::sql::{SqlEngine, SqlError};

/// How often today's per-variant gauges are read from the counter store.
pub const VARIANTS_EVERY: Duration = Duration::from_secs(5);

/// Publishes today's per-variant gauges every [`VARIANTS_EVERY`] until `stop`.
pub async fn variants_today(store: CounterStore, cap: usize, mut stop: Stop) {
    let mut tick = tokio::time::interval(VARIANTS_EVERY);
    while stop.tick(&mut tick).await {
        publish_variants_today(&store, cap).await;
    }
}

/// Publishes today's per-variant gauges once, for at most `cap` experiment variants.
async fn publish_variants_today(store: &CounterStore, cap: usize) {
    let Ok(cohorts) = store.cohorts().await else {
        return;
    };
    let today = [Window::Day.start_of(now_ms())];
    for cohort in cohorts
        .into_iter()
        .filter(|c| matches!(c, CohortKey::Variant { .. }))
        .take(cap)
    {
        let CohortKey::Variant {
            experiment,
            variant,
        } = &cohort
        else {
            continue;
        };
        let Ok(counts) = store.read(&cohort, Window::Day, &today).await else {
            return;
        };
        let counts = counts.into_iter().next().unwrap_or_default();
        let events: i64 = counts
            .counts
            .iter()
            .filter(|(f, _)| f.starts_with("events:"))
            .map(|(_, v)| v)
            .sum();
        experiment_metrics::variant_today(experiment, variant, counts.subjects, events);
    }
}

/// What the experiment results job reads.
pub struct ExperimentResults {
    /// The flags, whose metadata declares the experiments.
    pub flags: Arc<FlagStore>,
    /// The SQL engine that counts them.
    pub sql: Arc<SqlEngine>,
    /// How far back results reach (the SQL retention).
    pub retention: Duration,
    /// How often they are recomputed.
    pub every: Duration,
    /// At most this many experiment × variant pairs are published.
    pub cap: usize,
}

impl ExperimentResults {
    /// Recomputes every running experiment's results every `every` and publishes them as
    /// gauges, until `stop`.
    pub async fn run(self, mut stop: Stop) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.tick(&mut tick).await {
            let mut published = 0;
            for experiment in catalog(&self.flags.snapshot()) {
                if experiment.status != "running"
                    || published + experiment.variants.len() > self.cap
                {
                    continue;
                }
                let to = now_ms() + 1;
                let from = to - self.retention.as_millis() as i64;
                let kind = QueryKind::ExperimentGauges;
                let outcome = match compute(&self.sql, &experiment, from, to, kind).await {
                    Ok(results) => {
                        published += results.variants.len();
                        experiment_metrics::publish(&results);
                        Refresh::Ok
                    }
                    Err(SqlError::Busy(_)) => Refresh::Busy,
                    Err(err) => {
                        tracing::warn!(experiment = %experiment.key, error = %err, "experiment results failed");
                        Refresh::Failed
                    }
                };
                experiment_metrics::refreshed(outcome);
            }
        }
    }
}
