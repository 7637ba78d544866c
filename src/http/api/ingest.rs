//! Event intake over HTTP: `POST /v1/batch` (JSON or NDJSON, gzip or zstd) and the published
//! event schema at `GET /v1/schema`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, header};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::config::IngestConfig;
use crate::http::AppState;
use crate::http::auth::{Authorized, Client};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::ingest::decode::{self, BodyFormat, DecodeError, DecodeLimits, Encoding};
use crate::ingest::{IngestError, Outcome, Transport, now_ms};
use crate::wal::WalError;

/// The decode limits of the configuration.
pub fn decode_limits(config: &IngestConfig) -> DecodeLimits {
    DecodeLimits {
        max_decompressed: config.max_decompressed.as_usize(),
        max_event: config.max_event.as_usize(),
        max_events: config.max_batch_events,
    }
}

/// One event's result.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventResult {
    /// The event's position in the batch, from 0.
    pub index: usize,
    /// Its `event_id`, when it had a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// `ok` (durable), `duplicate` (seen before, not stored again) or `rejected`.
    pub status: &'static str,
    /// Why it was rejected: malformed, too_large, missing_field, invalid_field, wrong_type,
    /// unknown_type, invalid_timestamp, too_old, no_consent or erased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Which field, and what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The answer to a batch: counts and one result per event, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAnswer {
    /// Events now durable.
    pub accepted: usize,
    /// Events seen before.
    pub duplicates: usize,
    /// Events refused.
    pub rejected: usize,
    /// Every event's result.
    pub results: Vec<EventResult>,
}

/// Builds the per-event answer.
pub fn answer(ids: Vec<Option<String>>, outcomes: Vec<Outcome>) -> BatchAnswer {
    let mut counts = [0usize; 3];
    let results = ids
        .into_iter()
        .zip(outcomes)
        .enumerate()
        .map(|(index, (event_id, outcome))| {
            let status = outcome.status();
            let (slot, reason, detail) = match outcome {
                Outcome::Ok => (0, None, None),
                Outcome::Duplicate => (1, None, None),
                Outcome::Rejected(r) => (2, Some(r.reason.as_str()), Some(r.detail)),
            };
            counts[slot] += 1;
            EventResult {
                index,
                event_id,
                status,
                reason,
                detail,
            }
        })
        .collect();
    BatchAnswer {
        accepted: counts[0],
        duplicates: counts[1],
        rejected: counts[2],
        results,
    }
}

/// Returns each event's `event_id`, for the answer.
pub fn event_ids(
    events: &[Result<crate::events::RawEvent<'_>, crate::events::Rejection>],
) -> Vec<Option<String>> {
    events
        .iter()
        .map(|e| {
            e.as_ref()
                .ok()
                .and_then(|raw| raw.event_id())
                .filter(|id| id.len() <= 128)
                .map(|id| id.into_owned())
        })
        .collect()
}

/// Maps a failure to store into the HTTP answer: never a false acknowledgement.
pub fn store_error(err: IngestError) -> ApiError {
    match err {
        IngestError::Wal(WalError::Overloaded) => ApiError::new(
            ErrorCode::Overloaded,
            "ingest is at capacity; retry shortly",
        )
        .retry_after(Duration::from_secs(1)),
        IngestError::Wal(err) => {
            tracing::error!(error = %err, "events not stored");
            ApiError::new(
                ErrorCode::Overloaded,
                "events cannot be stored right now; nothing was acknowledged",
            )
            .retry_after(Duration::from_secs(30))
        }
    }
}

fn decode_error(err: DecodeError) -> ApiError {
    let code = match err {
        DecodeError::TooLarge(_) | DecodeError::TooManyEvents(_) => ErrorCode::PayloadTooLarge,
        DecodeError::Corrupt(_) | DecodeError::Malformed(_) => ErrorCode::InvalidRequest,
    };
    ApiError::new(code, err.to_string())
}

/// Ingests a batch of events; every event gets its own result.
#[utoipa::path(post, path = "/v1/batch", tag = "ingest",
    security(("bearer" = [])),
    request_body(content = Object, description = "`{\"sent_at\": …, \"batch\": [events]}` as application/json, or one event a line as application/x-ndjson; optionally gzip or zstd (Content-Encoding). See /v1/schema."),
    responses(
        (status = 200, description = "Every event's result; `ok` events are durable.", body = BatchAnswer),
        (status = 400, description = "The body is not a batch.", body = ErrorBody),
        (status = 401, description = "Missing or unknown client key.", body = ErrorBody),
        (status = 403, description = "Not a client key.", body = ErrorBody),
        (status = 413, description = "Body, decompressed body or batch too large.", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Type or Content-Encoding.", body = ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After.", body = ErrorBody),
        (status = 503, description = "Overloaded or unable to store; nothing was acknowledged. See Retry-After.", body = ErrorBody)))]
pub async fn batch(
    caller: Authorized<Client>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchAnswer>, ApiError> {
    let received_at = now_ms();
    let body = body?;
    let header_text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    let encoding =
        Encoding::from_header(header_text(header::CONTENT_ENCODING)).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "Content-Encoding must be identity, gzip or zstd",
            )
        })?;
    let format = BodyFormat::from_header(header_text(header::CONTENT_TYPE)).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json or application/x-ndjson",
        )
    })?;
    let limits = decode_limits(&state.config.ingest);
    let bytes =
        decode::decompress(&body, encoding, limits.max_decompressed).map_err(decode_error)?;
    let decoded = decode::decode(&bytes, format, &limits).map_err(decode_error)?;
    if let Err(wait) = state
        .rate
        .admit(&caller.principal.name, decoded.events.len().max(1))
    {
        crate::ingest::metrics::rate_limited();
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "this key sends more events than its rate limit",
        )
        .retry_after(wait));
    }
    let ids = event_ids(&decoded.events);
    let outcomes = state
        .ingest
        .ingest(
            decoded.events,
            decoded.sent_at,
            received_at,
            Transport::Http,
            caller.principal.project.as_deref(),
        )
        .await
        .map_err(store_error)?;
    Ok(Json(answer(ids, outcomes)))
}

/// Publishes the declared event types as JSON Schema, to validate events before sending.
#[utoipa::path(get, path = "/v1/schema", tag = "ingest",
    responses((status = 200, description = "JSON Schema (draft 2020-12) of an event.", body = Object)))]
pub async fn schema(State(state): State<AppState>) -> Json<Value> {
    Json(state.ingest.schema().to_json_schema())
}
