//! Live ingest over WebSocket: `GET /v1/stream`.
//!
//! The client is authenticated before the upgrade (an `Authorization` or `X-API-Key` header, or
//! for browsers a `Sec-WebSocket-Protocol` list `flagstream, key.<client key>`). Each client
//! message `{"seq": n, "sent_at"?: …, "events": [ … ]}` (or `"event": { … }`) is answered
//! `{"type": "ack", "seq": n, "results": [ … ]}` only once its events are durable. Messages are
//! handled one at a time, so a client that does not read its acks stops being read: memory per
//! connection stays bounded. The server pings, closes idle connections, and pushes
//! `{"type": "config_changed", "etag": …}` when the flags change.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::ingest::{EventResult, answer, decode_limits, event_ids, store_error};
use crate::config::Role;
use crate::http::AppState;
use crate::http::auth::Principal;
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::metrics::{STREAM_MESSAGES_TOTAL, STREAM_SESSIONS};
use crate::ingest::Transport;
use crate::ingest::decode::{StreamMessage, StreamRefusal, decode_message};
use crate::ingest::now_ms;

/// The subprotocol a browser names, with its key as `key.<client key>`.
const PROTOCOL: &str = "flagstream";

/// One live session's place under `stream.max_sessions`, taken before the upgrade (so that
/// concurrent handshakes cannot overshoot the limit) and given back when dropped: at the
/// session's end, or with the upgrade when it never happens.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let mut current = count.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Self(count.clone())),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Read and write buffer of each session, in bytes.
const SESSION_BUFFER: usize = 8 * 1024;

/// Upgrades to a live ingest session.
#[utoipa::path(get, path = "/v1/stream", tag = "ingest",
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = "Not a WebSocket upgrade request.", body = ErrorBody),
        (status = 401, description = "Missing or unknown client key.", body = ErrorBody),
        (status = 403, description = "Not a client key, or a browser Origin not in server.allowed_origins.", body = ErrorBody),
        (status = 503, description = "Too many sessions.", body = ErrorBody)))]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let from_protocol = headers
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|list| {
            list.split(',')
                .map(str::trim)
                .find_map(|p| p.strip_prefix("key."))
        })
        .map(|key| format!("Bearer {key}"));
    let from_header = crate::http::auth::presented_key(&headers);
    let presented = from_header.as_deref().or(from_protocol.as_deref());
    let caller = state.gate.authorize(presented, &[Role::Client]).await?;
    // A browser page may open a session only from an allowed origin, so another site cannot
    // ride on a child's browser (cross-site WebSocket hijacking). Native apps send no Origin.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = &state.config.server.allowed_origins;
        if !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "this origin may not open a session; see server.allowed_origins",
            ));
        }
    }
    let upgrade = upgrade
        .map_err(|rejection| ApiError::new(ErrorCode::InvalidRequest, rejection.body_text()))?;
    let limits = &state.config.stream;
    let Some(slot) = Slot::take(&state.sessions, limits.max_sessions) else {
        return Err(
            ApiError::new(ErrorCode::Overloaded, "too many live sessions")
                .retry_after(Duration::from_secs(5)),
        );
    };
    // Small I/O buffers: tungstenite's 128 KiB defaults cost ~140 KB per idle session.
    let upgrade = upgrade
        .read_buffer_size(SESSION_BUFFER)
        .write_buffer_size(SESSION_BUFFER)
        .max_message_size(limits.max_message.as_usize())
        .max_frame_size(limits.max_frame.as_usize())
        .protocols([PROTOCOL]);
    Ok(upgrade
        .on_upgrade(move |socket| session(socket, state, caller, slot))
        .into_response())
}

async fn session(mut socket: WebSocket, state: AppState, caller: Principal, slot: Slot) {
    metrics::gauge!(STREAM_SESSIONS).increment(1.0);
    let limits = state.config.stream.clone();
    let mut changes = state.flag_changes.clone();
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let close = loop {
        tokio::select! {
            message = socket.recv() => {
                let Some(Ok(message)) = message else { break None };
                last_heard = Instant::now();
                let reply = match message {
                    Message::Text(text) => handle(&state, &caller, text.as_bytes()).await,
                    Message::Binary(bytes) => handle(&state, &caller, &bytes).await,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => break None,
                };
                if socket.send(Message::Text(reply.into())).await.is_err() {
                    break None;
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                let etag = format!("\"{:016x}\"", *changes.borrow_and_update());
                let push = json!({"type": "config_changed", "etag": etag});
                if socket.send(Message::Text(push.to_string().into())).await.is_err() {
                    break None;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > limits.idle_timeout {
                    break Some(CloseFrame { code: close_code::AWAY, reason: "idle".into() });
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some(frame) = close {
        let _ = socket.send(Message::Close(Some(frame))).await;
    }
    drop(slot);
    metrics::gauge!(STREAM_SESSIONS).decrement(1.0);
}

/// The reply to a refused message, with the error code of the HTTP error model.
fn error_reply(seq: Option<u64>, error: ErrorCode, description: impl Into<String>) -> Value {
    metrics::counter!(STREAM_MESSAGES_TOTAL, "outcome" => "error").increment(1);
    json!({"type": "error", "seq": seq, "error": error.as_str(), "error_description": description.into()})
}

/// The error code a refused message is answered with.
fn code_of(refusal: StreamRefusal) -> ErrorCode {
    match refusal {
        StreamRefusal::Invalid => ErrorCode::InvalidRequest,
        StreamRefusal::TooLarge => ErrorCode::PayloadTooLarge,
    }
}

/// The reply to a stored message.
#[derive(Serialize)]
struct Ack {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    results: Vec<EventResult>,
}

/// Handles one client message and returns the reply.
async fn handle(state: &AppState, caller: &Principal, bytes: &[u8]) -> String {
    match reply(state, caller, bytes).await {
        Ok(ack) => serde_json::to_string(&ack).expect("acks serialize"),
        Err(error) => error.to_string(),
    }
}

/// Stores one client message: its ack, or the error reply.
async fn reply(state: &AppState, caller: &Principal, bytes: &[u8]) -> Result<Ack, Value> {
    let received_at = now_ms();
    let limits = decode_limits(&state.config.ingest);
    let StreamMessage {
        seq: seq_number,
        sent_at,
        events,
    } = decode_message(bytes, &limits)
        .map_err(|err| error_reply(err.seq, code_of(err.code), err.description))?;
    let seq = Some(seq_number);
    if let Err(wait) = state.rate.admit(&caller.name, events.len().max(1)) {
        crate::ingest::metrics::rate_limited();
        let mut reply = error_reply(
            seq,
            ErrorCode::RateLimited,
            "this key sends more events than its rate limit",
        );
        reply["retry_after"] = json!(wait.as_secs().max(1));
        return Err(reply);
    }
    let ids = event_ids(&events);
    match state
        .ingest
        .ingest(
            events,
            sent_at,
            received_at,
            Transport::WebSocket,
            caller.project.as_deref(),
        )
        .await
    {
        Ok(outcomes) => {
            metrics::counter!(STREAM_MESSAGES_TOTAL, "outcome" => "ack").increment(1);
            let answer = answer(ids, outcomes);
            Ok(Ack {
                kind: "ack",
                seq: seq_number,
                accepted: answer.accepted,
                duplicates: answer.duplicates,
                rejected: answer.rejected,
                results: answer.results,
            })
        }
        Err(err) => {
            let api = store_error(err);
            let mut reply = error_reply(seq, api.code(), api.description().to_owned());
            reply["retry_after"] = json!(1);
            Err(reply)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_answered_with_the_error_model_codes_they_name() {
        for refusal in [StreamRefusal::Invalid, StreamRefusal::TooLarge] {
            assert_eq!(refusal.as_str(), code_of(refusal).as_str());
        }
    }
}
