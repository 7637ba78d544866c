//! Ingest: from decoded events to durable, acknowledged ones.
//!
//! Per event: validate against the schema and correct the clock, pseudonymize the user id,
//! deduplicate, then append every new event of the request to the write-ahead log in one go and
//! answer only once it is durable. Every event gets its own [`Outcome`]; one bad event never
//! loses the others. The HTTP and WebSocket endpoints (in `server`) call [`Ingestor::ingest`].

pub mod decode;
pub mod dedup;
pub mod exposure;
pub mod metrics;
pub mod rate;
pub mod snapshot;
pub mod stored_keys;

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::events::RejectReason;
use crate::events::schema::EXPOSURE_TYPE;
use crate::events::time::Millis;
use crate::events::{Event, Limits, Properties, RawEvent, Rejection, Schema, validate};
use crate::flags::exposure::Exposure;
use crate::privacy::erasure::Suppressions;
use crate::privacy::{ConsentLedger, ConsentScope, Pepper};
use crate::wal::{Batch, Epoch, Recovery, Wal, WalError, WalOptions};
use dedup::{Dedup, Seen};
use metrics::{
    DEDUP_DEVICES, DEDUP_EVENT_IDS, ExposureOutcome, FIELDS_DROPPED_TOTAL,
    INGEST_ACK_DURATION_SECONDS, INGEST_BATCH_EVENTS, INGEST_CLOCK_SKEW_SECONDS,
    INGEST_LATENESS_SECONDS, TIMESTAMPS_CLAMPED_TOTAL,
};

/// Milliseconds since the Unix epoch, now: the receive clock, and every job's "now".
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What happened to one event of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the write-ahead log.
    Ok,
    /// Seen before; not stored again.
    Duplicate,
    /// Not stored, for this reason.
    Rejected(Rejection),
}

impl Outcome {
    /// Returns the status as answered to clients.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(_) => "rejected",
        }
    }
}

/// Which endpoint events came through, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `POST /v1/batch`.
    Http,
    /// `/v1/stream`.
    WebSocket,
    /// Exposures recorded by the flag endpoints.
    Exposure,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::WebSocket => "websocket",
            Transport::Exposure => "exposure",
        }
    }
}

/// Everything ingest needs, built once at start.
pub struct IngestOptions {
    /// The declared event types.
    pub schema: Schema,
    /// Time limits per event.
    pub limits: Limits,
    /// The pseudonymization key.
    pub pepper: Pepper,
    /// The write-ahead log.
    pub wal: WalOptions,
    /// Event ids remembered for dedup.
    pub dedup_ids: usize,
    /// Missing sequence numbers remembered per device.
    pub dedup_gaps: usize,
    /// Where the dedup state is saved (see [`snapshot`]).
    pub dedup_snapshot: std::path::PathBuf,
    /// The consent ledger the gate reads.
    pub consent: Arc<ConsentLedger>,
    /// Which projects' events need a grant: events of a subject without a grant in force
    /// for the scope they need are then not stored (rejected `no_consent`, and counted).
    pub consent_policy: ConsentPolicy,
    /// The subjects under erasure, whose events are refused.
    pub suppressions: Arc<Suppressions>,
}

/// Which projects' events need a guardian's grant in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsentPolicy {
    all: bool,
    projects: std::collections::HashSet<String>,
}

impl ConsentPolicy {
    /// Every project when `all`, else those listed.
    pub fn new(all: bool, projects: &[String]) -> Self {
        Self {
            all,
            projects: projects.iter().cloned().collect(),
        }
    }

    /// Returns whether events of `project` need a grant (`None`: the open API, which is the
    /// `default` project).
    pub fn requires(&self, project: Option<&str>) -> bool {
        self.all
            || self
                .projects
                .contains(project.unwrap_or(crate::config::DEFAULT_PROJECT))
    }
}

/// The ingest path.
pub struct Ingestor {
    schema: Schema,
    limits: Limits,
    pepper: Pepper,
    consent: Arc<ConsentLedger>,
    consent_policy: ConsentPolicy,
    suppressions: Arc<Suppressions>,
    dedup: Mutex<Dedup>,
    wal: Wal,
    /// The dedup state as the log held it on start, and where to save it, for the snapshot
    /// thread.
    seed: Mutex<Option<(Dedup, Epoch, std::path::PathBuf)>>,
    /// Event ids erased since, for the snapshots to drop.
    forgotten: snapshot::Forgotten,
}

/// Why a whole request could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The write-ahead log refused or failed.
    #[error(transparent)]
    Wal(#[from] WalError),
}

impl Ingestor {
    /// Opens the write-ahead log, rebuilding the dedup state from it.
    pub fn open(options: IngestOptions) -> Result<(Self, Recovery), IngestError> {
        let mut dedup = Dedup::new(options.dedup_ids, options.dedup_gaps);
        snapshot::load(
            &options.dedup_snapshot,
            options.wal.sealer.as_deref(),
            &mut dedup,
        );
        let (wal, recovery) = Wal::open(options.wal, |_, events| {
            for bytes in events {
                snapshot::replay(&mut dedup, bytes);
            }
        })?;
        publish_dedup(&dedup);
        let seed = Mutex::new(Some((
            dedup.clone(),
            wal.last_epoch(),
            options.dedup_snapshot.clone(),
        )));
        Ok((
            Self {
                schema: options.schema,
                limits: options.limits,
                pepper: options.pepper,
                consent: options.consent,
                consent_policy: options.consent_policy,
                suppressions: options.suppressions,
                dedup: Mutex::new(dedup),
                wal,
                seed,
                forgotten: snapshot::Forgotten::default(),
            },
            recovery,
        ))
    }

    /// Returns the declared schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Returns the write-ahead log.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Returns the subjects under erasure.
    pub fn suppressions(&self) -> &Arc<Suppressions> {
        &self.suppressions
    }

    /// Forgets the event ids of erased events, so the dedup state keeps nothing of them.
    /// Per-device sequence marks stay: a device may be shared by several children, and its
    /// marks say nothing about one of them (a resend of an erased event is refused by the
    /// suppression list instead).
    pub fn forget_erased(&self, events: &[Event<'_>]) {
        let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
        let by_id: Vec<&Event<'_>> = events
            .iter()
            .filter(|e| e.device_id.is_none() || e.seq.is_none())
            .collect();
        for event in &by_id {
            dedup.forget(event);
        }
        publish_dedup(&dedup);
        self.forgotten
            .push(by_id.iter().map(|e| Dedup::id_key(&e.event_id)));
    }

    /// Starts writing dedup snapshots every `interval` (once only: later calls start none).
    pub fn dedup_snapshots(
        &self,
        checkpoints: Arc<crate::wal::Checkpoints>,
        interval: std::time::Duration,
    ) -> Result<Option<snapshot::Snapshots>, WalError> {
        let seed = self.seed.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((dedup, from, path)) = seed else {
            return Ok(None);
        };
        snapshot::Snapshots::start(
            path,
            self.wal.clone(),
            checkpoints,
            dedup,
            from,
            self.forgotten.clone(),
            interval,
        )
        .map(Some)
    }

    /// Validates, pseudonymizes, deduplicates and stores `events`; completes once the new
    /// ones are durable. `Err` means nothing of this request was stored.
    // Long: the per-event steps of the hot path in order, kept in one loop so each event is touched once.
    pub async fn ingest(
        &self,
        events: Vec<Result<RawEvent<'_>, Rejection>>,
        batch_sent_at: Option<Millis>,
        received_at: Millis,
        transport: Transport,
        project: Option<&str>,
    ) -> Result<Vec<Outcome>, IngestError> {
        let started = Instant::now();
        let gate = self
            .consent_policy
            .requires(project)
            .then_some(&self.consent);
        ::metrics::histogram!(INGEST_BATCH_EVENTS, "transport" => transport.as_str())
            .record(events.len() as f64);
        let mut outcomes = Vec::with_capacity(events.len());
        let mut accepted: Vec<Event<'_>> = Vec::new();
        let mut last_subject: Option<(Cow<'_, str>, String)> = None;
        // Metric handles looked up once a request, not once an event.
        let skew = ::metrics::histogram!(INGEST_CLOCK_SKEW_SECONDS);
        let lateness = ::metrics::histogram!(INGEST_LATENESS_SECONDS);
        let (mut dropped, mut clamped) = (0u64, 0u64);
        for raw in events {
            let checked = raw.and_then(|raw| {
                validate(&raw, batch_sent_at, received_at, &self.schema, &self.limits)
            });
            match checked {
                Ok(valid) => {
                    dropped += valid.dropped as u64;
                    clamped += u64::from(valid.correction.clamped);
                    skew.record((valid.correction.skew as f64 / 1000.0).abs());
                    lateness.record((received_at - valid.event.event_time).max(0) as f64 / 1000.0);
                    let mut event = valid.event;
                    if let Some(user_id) = valid.user_id {
                        // The events of a request are mostly one child's: pseudonymize once.
                        let subject = match &last_subject {
                            Some((last, subject)) if *last == user_id => subject.clone(),
                            _ => {
                                let subject = self.pepper.pseudonymize(&user_id).0;
                                last_subject = Some((user_id, subject.clone()));
                                subject
                            }
                        };
                        let user_id = &last_subject.as_ref().expect("set above").0;
                        if self.suppressions.hides(&subject, event.event_time) {
                            outcomes.push(Outcome::Rejected(Rejection::new(
                                RejectReason::Erased,
                                "this user's data was erased at the family's request; events from before the request are not kept",
                            )));
                            continue;
                        }
                        if let Some(gate) = gate {
                            let scope = ConsentScope::needed_by(&event.event_type);
                            if !gate.allows(user_id, &subject, scope) {
                                outcomes.push(Outcome::Rejected(Rejection::new(
                                    RejectReason::NoConsent,
                                    format!(
                                        "no {} consent in force for this user; the event is not kept",
                                        scope.as_str()
                                    ),
                                )));
                                continue;
                            }
                        }
                        event.subject = Some(Cow::Owned(subject));
                    }
                    outcomes.push(Outcome::Ok);
                    accepted.push(event);
                }
                Err(rejection) => outcomes.push(Outcome::Rejected(rejection)),
            }
        }
        if dropped > 0 {
            ::metrics::counter!(FIELDS_DROPPED_TOTAL).increment(dropped);
        }
        if clamped > 0 {
            ::metrics::counter!(TIMESTAMPS_CLAMPED_TOTAL).increment(clamped);
        }
        let stored = self.store(accepted, &mut outcomes).await?;
        count_outcomes(&outcomes, transport);
        if stored > 0 {
            ::metrics::histogram!(INGEST_ACK_DURATION_SECONDS, "transport" => transport.as_str())
                .record(started.elapsed().as_secs_f64());
        }
        Ok(outcomes)
    }

    /// Deduplicates `accepted` (whose outcomes are the `Ok`s of `outcomes`, in order) and
    /// appends the new ones; returns how many were stored.
    async fn store(
        &self,
        accepted: Vec<Event<'_>>,
        outcomes: &mut [Outcome],
    ) -> Result<usize, IngestError> {
        let mut new = Vec::with_capacity(accepted.len());
        {
            let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let mut slots = outcomes.iter_mut().filter(|o| matches!(o, Outcome::Ok));
            for event in accepted {
                let slot = slots.next().expect("one Ok per accepted event");
                match dedup.check(&event) {
                    Seen::New => new.push(event),
                    Seen::Duplicate => *slot = Outcome::Duplicate,
                }
            }
            publish_dedup(&dedup);
        }
        if new.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::with_capacity(new.len() * 512);
        for event in &new {
            batch
                .push_with(|out| serde_json::to_writer(out, event))
                .expect("events serialize");
        }
        match self.wal.append(batch).await {
            Ok(Epoch(_)) => Ok(new.len()),
            Err(err) => {
                let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
                for event in &new {
                    dedup.forget(event);
                }
                Err(err.into())
            }
        }
    }

    /// Builds the stored form of a server-side exposure: a `$exposure` event whose id is
    /// derived from (flag, variant, subject, day), so a replay never counts it twice.
    pub fn exposure_event(&self, exposure: &Exposure) -> Event<'static> {
        let subject = self.pepper.pseudonymize(&exposure.subject).0;
        let day = exposure.at_ms.div_euclid(86_400_000);
        let key = format!(
            "{}\u{0}{}\u{0}{subject}\u{0}{day}",
            exposure.flag.0, exposure.variant
        );
        let digest = murmur3::murmur3_x64_128(&mut key.as_bytes(), 0).unwrap_or(0);
        let mut properties = Properties::default();
        properties.insert_str("flag", &exposure.flag.0);
        properties.insert_str("variant", &exposure.variant);
        Event {
            event_id: format!("exposure-{digest:032x}").into(),
            device_id: None,
            seq: None,
            subject: Some(subject.into()),
            session_id: None,
            event_type: EXPOSURE_TYPE.into(),
            event_time: exposure.at_ms,
            device_time: exposure.at_ms,
            sent_at: None,
            received_at: exposure.at_ms,
            context: Default::default(),
            properties,
        }
    }

    /// Stores already-built events (server-side exposures), deduplicated like any other.
    pub async fn store_internal(
        &self,
        mut events: Vec<Event<'_>>,
        transport: Transport,
    ) -> Result<usize, IngestError> {
        events.retain(|e| {
            let hidden = e
                .subject
                .as_deref()
                .is_some_and(|s| self.suppressions.hides(s, e.event_time));
            if hidden {
                metrics::exposures(ExposureOutcome::Erased, 1);
            }
            !hidden
        });
        let mut outcomes = vec![Outcome::Ok; events.len()];
        let stored = self.store(events, &mut outcomes).await?;
        count_outcomes(&outcomes, transport);
        Ok(stored)
    }
}

fn publish_dedup(dedup: &Dedup) {
    ::metrics::gauge!(DEDUP_DEVICES).set(dedup.devices() as f64);
    ::metrics::gauge!(DEDUP_EVENT_IDS).set(dedup.ids() as f64);
}

fn count_outcomes(outcomes: &[Outcome], transport: Transport) {
    let mut ok = 0u64;
    let mut duplicate = 0u64;
    for outcome in outcomes {
        match outcome {
            Outcome::Ok => ok += 1,
            Outcome::Duplicate => duplicate += 1,
            Outcome::Rejected(rejection) => metrics::event_rejected(transport, rejection.reason),
        }
    }
    metrics::events_accepted(transport, ok, duplicate);
}
