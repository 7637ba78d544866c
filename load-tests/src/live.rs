//! The `live` scenario: WebSocket sessions that stream a child's events as the app does.
//!
//! A session keeps every message until the server acknowledges it (the app's offline buffer):
//! when the connection breaks or the server answers a retryable error, it connects again and
//! sends what is unacknowledged, with the same sequence numbers, so a server that restarts
//! must deduplicate. In the open model a session sends on its own fixed schedule whatever the
//! answers, and latency counts from the scheduled time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::events::Device;
use crate::ledger::Ledger;
use crate::report::Recorder;

/// An unanswered acknowledgement this old means the connection is dead.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// A session's read buffer. tungstenite's 128 KiB default is zeroed before every read, which
/// made that zeroing a fifth of the generator's CPU: acks are well under 8 KiB, and a larger
/// message still fits (the buffer grows to a frame's length).
const READ_BUFFER: usize = 8 * 1024;

/// When a session sends its messages.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// The next message once the previous one is acknowledged.
    Closed,
    /// Message k at `start + k × every`, whatever the answers.
    Open {
        /// The first message's time.
        start: Instant,
        /// Time between messages.
        every: Duration,
    },
}

/// What one session does.
pub struct Plan {
    /// The server.
    pub addr: SocketAddr,
    /// The `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// The device (and child) of this session.
    pub device: Device,
    /// Events per message.
    pub per_message: u64,
    /// When messages are sent.
    pub pace: Pace,
    /// No new message after this.
    pub end: Instant,
    /// Unacknowledged messages are given up after this.
    pub drain_until: Instant,
    /// How long to stay connected after the last acknowledgement, as an idle app does.
    pub hold: Duration,
    /// Messages left to send over all sessions.
    pub budget: Arc<AtomicU64>,
}

/// A message not acknowledged yet.
struct Pending {
    first: u64,
    count: u64,
    text: Utf8Bytes,
    scheduled: Instant,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Runs one session to its end.
pub async fn session(plan: Plan, recorder: Arc<Recorder>, ledger: Arc<Ledger>) {
    let mut socket: Option<Socket> = None;
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    // Pending messages not yet written to the current connection.
    let mut unsent: Vec<u64> = Vec::new();
    let mut next_message = 0u64;
    let mut next_seq = 1u64;
    let mut exhausted = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if Instant::now() >= plan.drain_until {
            break;
        }
        // Queue every message that is due.
        let next_at = loop {
            let now = Instant::now();
            let due = match plan.pace {
                _ if exhausted || now >= plan.end => None,
                Pace::Closed if pending.is_empty() => Some(now),
                Pace::Closed => None,
                Pace::Open { start, every } => Some(start + every * next_message as u32),
            }
            .filter(|at| *at < plan.end);
            match due {
                Some(at) if at <= now => {
                    if !take_one(&plan.budget) {
                        exhausted = true;
                        break None;
                    }
                    let message = compose(&plan, next_message, next_seq, at, &ledger);
                    next_seq += message.count;
                    pending.insert(next_message, message);
                    unsent.push(next_message);
                    next_message += 1;
                }
                other => break other,
            }
        };
        if next_at.is_none() && pending.is_empty() {
            break;
        }
        if socket.is_none() {
            match connect(&plan).await {
                Ok(fresh) => {
                    backoff = Duration::from_millis(100);
                    socket = Some(fresh);
                    unsent = pending.keys().copied().collect();
                }
                Err(cause) => {
                    recorder.error("live", cause);
                    let left = plan.drain_until.saturating_duration_since(Instant::now());
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let live = socket.as_mut().expect("connected");
        let mut broken = false;
        for number in unsent.drain(..) {
            let Some(message) = pending.get(&number) else {
                continue;
            };
            if live
                .send(Message::Text(message.text.clone()))
                .await
                .is_err()
            {
                broken = true;
                break;
            }
        }
        if broken {
            recorder.error("live", "closed");
            socket = None;
            continue;
        }
        let wake = next_at.unwrap_or(plan.drain_until).min(plan.drain_until);
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            reply = tokio::time::timeout(ACK_TIMEOUT, live.next()) => {
                match reply {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        if let Some(wait) = answer(&text, &plan, &mut pending, &recorder, &ledger) {
                            // Send what is unacknowledged again once the server asks to.
                            let left = plan.drain_until.saturating_duration_since(Instant::now());
                            tokio::time::sleep(wait.min(left)).await;
                            socket = None;
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => {
                        recorder.error("live", "closed");
                        socket = None;
                    }
                    Err(_) if pending.is_empty() => {}
                    Err(_) => {
                        recorder.error("live", "timeout");
                        socket = None;
                    }
                }
            }
        }
    }
    for _ in pending.values() {
        recorder.error("live", "unacknowledged");
    }
    if let Some(mut live) = socket {
        if !plan.hold.is_zero() {
            // Stay connected and answer pings, as an idle app does.
            let _ = tokio::time::timeout(plan.hold, async {
                while let Some(Ok(_)) = live.next().await {}
            })
            .await;
        }
        let _ = live.close(None).await;
    }
}

async fn connect(plan: &Plan) -> Result<Socket, &'static str> {
    let mut request = format!("ws://{}/v1/stream", plan.addr)
        .into_client_request()
        .map_err(|_| "request")?;
    if let Some(value) = plan.authorization.as_ref().and_then(|v| v.parse().ok()) {
        request.headers_mut().insert("authorization", value);
    }
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async_with_config(request, Some(config), false),
    )
    .await
    {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            Err(match response.status().as_u16() {
                401 => "401",
                403 => "403",
                429 => "429",
                503 => "503",
                _ => "upgrade",
            })
        }
        Ok(Err(_)) => Err("connect"),
        Err(_) => Err("timeout"),
    }
}

/// Builds message `number` holding the events from `first`, as due at `at`.
fn compose(plan: &Plan, number: u64, first: u64, at: Instant, ledger: &Ledger) -> Pending {
    let now = crate::clock::now_ms();
    let events = plan.device.events(first, plan.per_message, |_| now);
    ledger.sent(&plan.device.id, first, plan.per_message);
    Pending {
        first,
        count: plan.per_message,
        text: format!(
            r#"{{"seq":{number},"sent_at":"{}","events":[{events}]}}"#,
            crate::clock::rfc3339(now)
        )
        .into(),
        scheduled: at,
    }
}

/// Handles one reply; returns how long to wait before sending the unacknowledged messages
/// again when the server asked for a retry.
fn answer(
    text: &str,
    plan: &Plan,
    pending: &mut BTreeMap<u64, Pending>,
    recorder: &Recorder,
    ledger: &Ledger,
) -> Option<Duration> {
    let Ok(reply) = serde_json::from_str::<Value>(text) else {
        recorder.error("live", "unreadable_reply");
        return None;
    };
    let number = reply["seq"].as_u64();
    match reply["type"].as_str() {
        Some("ack") => {
            let message = number.and_then(|n| pending.remove(&n))?;
            ledger.acknowledge(
                &plan.device.id,
                message.first,
                message.count,
                &reply,
                recorder,
                "live",
                message.scheduled,
            );
            None
        }
        Some("error") => {
            let code = reply["error"].as_str().unwrap_or("error").to_owned();
            let retryable = matches!(
                code.as_str(),
                "rate_limited" | "overloaded" | "unavailable" | "storage_unavailable"
            ) || reply.get("retry_after").is_some();
            recorder.error("live", code);
            if retryable {
                Some(Duration::from_secs(
                    reply["retry_after"].as_u64().unwrap_or(1),
                ))
            } else {
                // Refused for good: its events will never be stored.
                if let Some(message) = number.and_then(|n| pending.remove(&n)) {
                    let refused = vec!["rejected"; message.count as usize];
                    ledger.answered(&plan.device.id, message.first, refused.into_iter());
                }
                None
            }
        }
        _ => None,
    }
}

/// Takes one message from the shared budget.
pub fn take_one(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |left| left.checked_sub(1),
        )
        .is_ok()
}
