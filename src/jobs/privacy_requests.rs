//! The data-subject request worker: carries out access and erasure requests as they arrive
//! (and, at start, those left unfinished), in the background of `POST /v1/privacy/requests`.
//!
//! Access writes the child's export; erasure removes the child from every store (the log,
//! the SQL window and segments, the pipeline's assignments, the requests journal) while the
//! suppression list hides it from the moment the request was received.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Notify;

use super::Stop;
use crate::counters::subject_hash;
use crate::events::Event;
use crate::ingest::{Ingestor, now_ms};
use crate::pipeline::Forgetter;
use crate::privacy::ConsentLedger;
use crate::privacy::journal::JournalError;
use crate::privacy::metrics::{self as privacy_metrics, RequestOutcome};
use crate::privacy::requests::{Request, RequestKind, Requests, write_access_export};
use crate::sql::segments::SegmentError;
use crate::sql::table::RecentEvents;
use crate::wal::WalError;

/// Why a request's state could not be recorded (the request itself failing is an outcome,
/// recorded in the journal, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The requests journal could not be written.
    #[error("requests journal: {0}")]
    Journal(#[from] JournalError),
    /// The blocking task carrying it out ended without an answer (shutdown or a panic).
    #[error("request task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why an erasure could not be completed; the child stays hidden and it is retried at the
/// next start.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    /// The write-ahead log could not be rotated or rewritten.
    #[error("write-ahead log: {0}")]
    Log(#[from] WalError),
    /// The SQL window or its segments could not be rewritten.
    #[error("sql window: {0}")]
    Sql(#[from] SegmentError),
    /// The pipeline's assignments could not be rewritten.
    #[error("experiment assignments: {0}")]
    Assignments(std::io::Error),
    /// The requests journal could not be rewritten.
    #[error("requests journal: {0}")]
    Journal(#[from] JournalError),
}

/// What carrying out requests needs.
pub struct Workshop {
    /// The journal.
    pub requests: Arc<Requests>,
    /// The consent ledger (access exports show the history).
    pub consent: Arc<ConsentLedger>,
    /// The ingest path: its log, dedup state and suppression list.
    pub ingest: Arc<Ingestor>,
    /// The SQL window and segments.
    pub events: Arc<RecentEvents>,
    /// The pipeline's experiment assignments.
    pub pipeline: Forgetter,
}

/// Carries out unfinished requests: those found at start, then each one as it arrives
/// (`wake` is notified), until `stop`. A request being carried out is finished first.
pub async fn work(shop: Workshop, wake: Arc<Notify>, mut stop: Stop) {
    let shop = Arc::new(shop);
    // At start, failed requests are retried too; after that, each new one once.
    let mut batch = shop.requests.unfinished();
    loop {
        for request in batch {
            if stop.is_stopped() {
                return;
            }
            let kind = request.kind;
            let outcome = match kind {
                RequestKind::Access => access(&shop, request).await,
                RequestKind::Erasure => erasure(&shop, request).await,
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(err) => {
                    tracing::error!(error = %err, "data-subject request state not recorded");
                    RequestOutcome::Failed
                }
            };
            privacy_metrics::request(kind, outcome);
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = stop.stopped() => return,
        }
        batch = shop.requests.pending();
    }
}

async fn access(shop: &Arc<Workshop>, request: Request) -> Result<RequestOutcome, RequestError> {
    let shop = shop.clone();
    tokio::task::spawn_blocking(move || {
        let out = shop.requests.export_path(&request.id);
        let now = now_ms();
        let wal = shop.ingest.wal();
        match write_access_export(
            &request,
            wal,
            &shop.consent,
            &out,
            shop.requests.sealer(),
            now,
        ) {
            Ok(events) => shop
                .requests
                .complete(&request.id, events, now_ms())
                .map(|()| RequestOutcome::Completed),
            Err(err) => {
                tracing::warn!(id = %request.id, error = %err, "access export failed");
                shop.requests
                    .fail(&request.id, err.to_string(), now_ms())
                    .map(|()| RequestOutcome::Failed)
            }
        }
    })
    .await?
    .map_err(RequestError::from)
}

async fn erasure(shop: &Arc<Workshop>, request: Request) -> Result<RequestOutcome, RequestError> {
    // Hidden since it was received (or since the start, from the journal); the segment
    // being written is closed so that every one can be rewritten.
    let rotated = shop.ingest.wal().rotate().await;
    let job = shop.clone();
    let id = request.id.clone();
    let erased = tokio::task::spawn_blocking(move || {
        rotated?;
        erase_everywhere(&job, &request)
    })
    .await?;
    let now = now_ms();
    match erased {
        Ok(events) => {
            shop.requests.complete(&id, events, now)?;
            if let Some(request) = shop.requests.get(&id) {
                for reference in &request.subjects {
                    shop.ingest
                        .suppressions()
                        .settle(reference, request.received_at);
                }
            }
            tracing::info!(id = %id, events, "erasure carried out");
            Ok(RequestOutcome::Completed)
        }
        Err(reason) => {
            tracing::error!(id = %id, error = %reason, "erasure failed; the child stays hidden and it is retried at the next start");
            shop.requests.fail(&id, reason.to_string(), now)?;
            Ok(RequestOutcome::Failed)
        }
    }
}

/// Removes what the suppression list hides from every store; returns the events removed
/// from the write-ahead log (which holds everything stored). Blocks on the disk.
fn erase_everywhere(shop: &Workshop, request: &Request) -> Result<u64, ErasureError> {
    let suppressions = shop.ingest.suppressions().clone();
    let wal = shop.ingest.wal();
    let mut removed_events = Vec::new();
    let mut names: HashSet<String> = shop
        .requests
        .pseudonyms_of(&request.id)
        .into_iter()
        .collect();
    let erased = crate::wal::erase::rewrite(
        wal.dir(),
        wal.sealer().map(|s| s.as_ref()),
        |stored| suppressions.hides_stored(stored),
        |stored| {
            if let Ok(event) = serde_json::from_slice::<Event<'_>>(stored) {
                if let Some(subject) = &event.subject {
                    names.insert(subject.to_string());
                }
                removed_events.push(event.into_owned());
            }
        },
    )?;
    shop.ingest.forget_erased(&removed_events);
    let rows = shop.events.erase()?;
    let hashes: Vec<u64> = names.iter().map(|n| subject_hash(n)).collect();
    let lines = shop
        .pipeline
        .forget(&hashes)
        .map_err(ErasureError::Assignments)?;
    let references: HashSet<String> = request.subjects.iter().cloned().collect();
    let requests = shop.requests.forget(&references)?;
    tracing::info!(
        id = %request.id,
        log_events = erased.events,
        log_segments = erased.segments,
        sql_rows = rows,
        assignments = lines,
        access_requests = requests,
        "erased"
    );
    Ok(erased.events)
}
