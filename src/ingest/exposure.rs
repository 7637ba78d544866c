//! Server-side experiment exposures: the first exposure of a subject to a flag's variant each
//! day, when the subject's guardian allows experiments, is stored through the ingest path
//! like any event (`$exposure`). Flag evaluation never waits for it: exposures are queued,
//! and dropped and counted when the queue is full.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

use super::metrics::{self, ExposureOutcome};
use super::{ConsentPolicy, Ingestor, Transport};
use crate::events::Event;
use crate::flags::exposure::{DailyDedup, Exposure};
use crate::flags::{Flag, Variant};
use crate::privacy::{ConsentLedger, ConsentScope};

/// Deduplicates experiment exposures and hands them to ingest.
pub struct Exposures {
    dedup: Mutex<DailyDedup>,
    sink: Arc<dyn ExposureSink>,
    consent: Arc<ConsentLedger>,
    policy: ConsentPolicy,
}

impl Exposures {
    /// Remembers up to `capacity` exposures a day and submits first ones to `sink`; for the
    /// projects whose `policy` requires consent, only those of subjects with an
    /// `experiments` grant in force.
    pub fn new(
        capacity: usize,
        sink: Arc<dyn ExposureSink>,
        consent: Arc<ConsentLedger>,
        policy: ConsentPolicy,
    ) -> Self {
        Self {
            dedup: Mutex::new(DailyDedup::new(capacity)),
            sink,
            consent,
            policy,
        }
    }

    /// Records that `subject` (the context's `targetingKey`) was served `variant` of an
    /// experiment's `flag`; the first such exposure of the day goes to the sink.
    pub fn record(
        &self,
        flag: &Flag,
        variant: &Variant,
        context: &Value,
        now_ms: i64,
        project: Option<&str>,
    ) {
        if flag.experiment.is_none() {
            return;
        }
        let Some(subject) = context.get("targetingKey").and_then(Value::as_str) else {
            return;
        };
        if self.policy.requires(project)
            && !self.consent.allows_user(subject, ConsentScope::Experiments)
        {
            metrics::exposures(ExposureOutcome::NoConsent, 1);
            return;
        }
        let exposure = Exposure {
            flag: flag.key.clone(),
            variant: variant.name.clone(),
            subject: subject.to_owned(),
            at_ms: now_ms,
        };
        let first = self
            .dedup
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .first_today(&exposure);
        if first {
            self.sink.submit(exposure);
        }
    }
}

/// Where server-side exposure records go.
pub trait ExposureSink: Send + Sync + 'static {
    /// Takes one exposure (already deduplicated per subject, flag and variant per day).
    fn submit(&self, exposure: Exposure);
}

/// Hands exposures to a task that stores them through the ingest path, in batches. When the
/// queue is full, exposures are dropped and counted rather than slowing flag evaluation.
pub struct IngestExposureSink {
    tx: mpsc::Sender<Exposure>,
}

impl IngestExposureSink {
    /// Starts the storing task on the current runtime.
    pub fn start(ingestor: Arc<Ingestor>, queue: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Exposure>(queue.max(1));
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 1024).await > 0 {
                let events: Vec<Event<'_>> = batch
                    .drain(..)
                    .map(|e| ingestor.exposure_event(&e))
                    .collect();
                let count = events.len() as u64;
                match ingestor.store_internal(events, Transport::Exposure).await {
                    Ok(_) => metrics::exposures(ExposureOutcome::Stored, count),
                    Err(err) => {
                        tracing::warn!(error = %err, count, "exposures not stored");
                        metrics::exposures(ExposureOutcome::Failed, count);
                    }
                }
            }
        });
        Self { tx }
    }
}

impl ExposureSink for IngestExposureSink {
    fn submit(&self, exposure: Exposure) {
        if self.tx.try_send(exposure).is_err() {
            metrics::exposures(ExposureOutcome::Dropped, 1);
        }
    }
}
