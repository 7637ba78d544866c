//! Open-model HTTP traffic: app launches fetching their config, and tablets syncing week-old
//! batches. Arrivals come on a fixed schedule whatever the answers; a pool of workers, each
//! with its own keep-alive connection, takes them in order, and latency counts from each
//! arrival's scheduled time (so a slow server cannot hide its queue: no coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Mutex, mpsc};

use crate::events::Device;
use crate::http::{Client, cause};
use crate::ledger::Ledger;
use crate::live::take_one;
use crate::report::Recorder;

/// Arrivals waiting for a free worker beyond this many are counted as `client_saturated`
/// errors (the generator itself cannot keep up) rather than queued without bound.
const QUEUE: usize = 100_000;

/// A request timeout.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends arrival numbers and their scheduled times at `rate` per second from `start` until
/// `end` or the shared budget runs out.
pub async fn arrivals(
    rate: f64,
    start: Instant,
    end: Instant,
    budget: Arc<AtomicU64>,
    queue: mpsc::Sender<(u64, Instant)>,
    recorder: Arc<Recorder>,
    operation: &'static str,
) {
    let mut k = 0u64;
    loop {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        if at >= end {
            return;
        }
        tokio::time::sleep_until(at.into()).await;
        if !take_one(&budget) {
            return;
        }
        if queue.try_send((k, at)).is_err() {
            recorder.error(operation, "client_saturated");
        }
        k += 1;
    }
}

/// Arrivals waiting for a worker: their numbers and scheduled times.
pub type Queue = Arc<Mutex<mpsc::Receiver<(u64, Instant)>>>;

/// A bounded queue of arrivals, shared by the workers that serve it.
pub fn queue() -> (mpsc::Sender<(u64, Instant)>, Queue) {
    let (sender, receiver) = mpsc::channel(QUEUE);
    (sender, Arc::new(Mutex::new(receiver)))
}

async fn next(queue: &Mutex<mpsc::Receiver<(u64, Instant)>>) -> Option<(u64, Instant)> {
    queue.lock().await.recv().await
}

/// What the launch workers fetch.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The server.
    pub addr: SocketAddr,
    /// `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// Children to draw from.
    pub children: u64,
}

/// Serves launch arrivals: `GET /v1/config` for a child, checking the answer holds flags.
pub async fn launch_worker(plan: Launch, queue: Queue, recorder: Arc<Recorder>) {
    let mut client = Client::new(plan.addr, plan.authorization.clone());
    while let Some((n, scheduled)) = next(&queue).await {
        let child = n.wrapping_mul(2_654_435_761) % plan.children.max(1);
        let platform = ["ios", "android", "web"][(child % 3) as usize];
        let path = format!(
            "/v1/config?targetingKey=child-{child}&app_version=3.2.0&platform={platform}&locale=fr-FR&country=FR"
        );
        match client.call("GET", &path, "", TIMEOUT).await {
            Ok(response) if response.status == 200 => {
                let flags = serde_json::from_slice::<Value>(&response.body)
                    .ok()
                    .is_some_and(|body| body["flags"].is_object());
                if flags {
                    recorder.ok("launch", scheduled, 0);
                } else {
                    recorder.error("launch", "no_flags_in_answer");
                }
            }
            Ok(response) => recorder.error("launch", response.status.to_string()),
            Err(err) => recorder.error("launch", cause(&err)),
        }
    }
}

/// What a syncing tablet sends.
#[derive(Debug, Clone)]
pub struct Sync {
    /// The server.
    pub addr: SocketAddr,
    /// `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// The run's tag.
    pub tag: String,
    /// Children to draw from.
    pub children: u64,
    /// Batches each tablet posts, one after the other.
    pub batches: u64,
    /// Events per batch.
    pub events: u64,
    /// How many days the tablet was offline: its events spread over them.
    pub days: u64,
    /// Unacknowledged batches are given up after this.
    pub drain_until: Instant,
}

/// Serves sync arrivals: each is a tablet back online posting its backlog in batches, each
/// batch retried (as the app does) until it is acknowledged.
pub async fn sync_worker(plan: Sync, queue: Queue, recorder: Arc<Recorder>, ledger: Arc<Ledger>) {
    let mut client = Client::new(plan.addr, plan.authorization.clone());
    while let Some((n, scheduled)) = next(&queue).await {
        let device = Device::new(&plan.tag, "sync", n, plan.children);
        let total = plan.batches * plan.events;
        let now = crate::clock::now_ms();
        let offline_ms = plan.days as i64 * 86_400_000;
        // The backlog spreads over the days offline, oldest first, ending an hour ago.
        let at = |seq: u64| now - 3_600_000 - offline_ms + offline_ms * seq as i64 / total as i64;
        let mut since = scheduled;
        for batch in 0..plan.batches {
            let first = batch * plan.events + 1;
            ledger.sent(&device.id, first, plan.events);
            if !post(
                &mut client,
                &plan,
                &device,
                first,
                at,
                since,
                &recorder,
                &ledger,
            )
            .await
            {
                break;
            }
            since = Instant::now();
        }
    }
}

/// Posts one batch until it is answered; returns whether the tablet goes on.
#[allow(clippy::too_many_arguments)]
async fn post(
    client: &mut Client,
    plan: &Sync,
    device: &Device,
    first: u64,
    at: impl Fn(u64) -> i64 + Copy,
    since: Instant,
    recorder: &Recorder,
    ledger: &Ledger,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        if Instant::now() >= plan.drain_until {
            recorder.error("sync", "unacknowledged");
            return false;
        }
        let body = format!(
            r#"{{"sent_at":"{}","batch":[{}]}}"#,
            crate::clock::rfc3339_now(),
            device.events(first, plan.events, at)
        );
        let wait = match client.call("POST", "/v1/batch", &body, TIMEOUT).await {
            Ok(response) if response.status == 200 => {
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or_default();
                ledger.acknowledge(
                    &device.id,
                    first,
                    plan.events,
                    &answer,
                    recorder,
                    "sync",
                    since,
                );
                return true;
            }
            Ok(response) if matches!(response.status, 429 | 503) => {
                recorder.error("sync", response.status.to_string());
                Duration::from_secs(response.retry_after.unwrap_or(1))
            }
            Ok(response) => {
                // Refused for good (a client error): the tablet drops the batch.
                recorder.error("sync", response.status.to_string());
                let refused = vec!["rejected"; plan.events as usize];
                ledger.answered(&device.id, first, refused.into_iter());
                return false;
            }
            Err(err) => {
                recorder.error("sync", cause(&err));
                backoff = (backoff * 2).min(Duration::from_secs(1));
                backoff
            }
        };
        let left = plan.drain_until.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait.min(left)).await;
    }
}
