//! `POST /v1/privacy/requests`, `GET /v1/privacy/requests` (the caller's own),
//! `GET /v1/privacy/requests/{id}` and its export: data-subject requests, filed by a privacy
//! officer for any child or by a signed-in guardian for the children their token names (who
//! then sees only the requests they filed), carried out in the background.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::events::time::format_rfc3339;
use crate::http::audit::Audited;
use crate::http::auth::{Authorized, Principal, RequestFiler};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::{AppState, audit};
use crate::ingest::now_ms;
use crate::privacy::erasure::{is_reference, reference};
use crate::privacy::metrics::{self as privacy_metrics, RequestOutcome};
use crate::privacy::requests::{Request, RequestKind, Status};

/// The largest body of `POST /v1/privacy/requests`.
pub const MAX_BODY: usize = 16 * 1024;

/// The body of `POST /v1/privacy/requests`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    /// `access` or `erasure`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: RequestKind,
    /// The child's user id, or its pseudonym.
    pub subject: String,
}

/// A request as answered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequestView {
    /// Its id.
    pub id: String,
    /// `access` or `erasure`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: RequestKind,
    /// The child's pseudonym.
    pub subject: String,
    /// `pending`, `completed` or `failed` (retried after a restart).
    #[schema(value_type = String)]
    pub status: Status,
    /// When it was received.
    pub received_at: String,
    /// When it must be answered: one calendar month after it was received.
    pub due: String,
    /// When it was carried out or last failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Events found, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where to download the export, once an access request is completed and until it
    /// expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download: Option<String>,
    /// When the export is (or was) deleted: `privacy.export_retention` after completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_expires_at: Option<String>,
}

/// When the export of a completed access request expires.
fn export_expiry(state: &AppState, request: &Request) -> Option<i64> {
    let keep = state.config.privacy.export_retention.as_millis() as i64;
    (request.kind == RequestKind::Access && request.status == Status::Completed)
        .then_some(request.updated_at?.saturating_add(keep))
}

impl RequestView {
    fn of(state: &AppState, request: Request) -> Self {
        let expires = export_expiry(state, &request);
        let download = expires
            .filter(|at| *at > now_ms() && !request.erased())
            .map(|_| format!("/v1/privacy/requests/{}/export", request.id));
        Self {
            subject: request.subjects[0].clone(),
            id: request.id,
            kind: request.kind,
            status: request.status,
            received_at: format_rfc3339(request.received_at),
            due: format_rfc3339(request.due),
            updated_at: request.updated_at.map(format_rfc3339),
            events: request.events,
            reason: request.reason,
            download,
            export_expires_at: expires.map(format_rfc3339),
        }
    }
}

/// Receives a data-subject request, carried out in the background (poll its status). An
/// access request's export holds every stored event of the child, its flag assignments and
/// its consent history, as NDJSON. An erasure hides the child at once (its events are
/// refused and leave the SQL answers), then removes its events from the write-ahead log, the
/// SQL window and segments, the dedup state and the experiment assignments.
#[utoipa::path(post, path = "/v1/privacy/requests", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    request_body = RequestBody,
    responses(
        (status = 202, description = "Received; carried out in the background.", body = RequestView),
        (status = 400, description = "A malformed body, an unknown type or a bad subject.", body = ErrorBody),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Not a privacy officer, guardian or school admin, or a guardian naming a child their sign-in does not name, or a school admin naming a child not seen at their school.", body = ErrorBody),
        (status = 503, description = "The request could not be recorded; nothing was received.", body = ErrorBody)))]
pub async fn submit(
    caller: Authorized<RequestFiler>,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RequestView>), ApiError> {
    let result = receive(&state, &caller.principal, body).await;
    let (detail, status) = match &result {
        Ok((status, Json(view))) => (
            format!(
                "{} {} {}",
                view.id,
                view.kind.as_str(),
                as_reference(&view.subject)
            ),
            status.as_u16(),
        ),
        Err(refusal) => (
            refusal
                .other_child
                .as_deref()
                .map(|child| as_reference(&state.consent.pseudonym_of(child)))
                .unwrap_or_default(),
            refusal.error.code().status().as_u16(),
        ),
    };
    state
        .audit
        .record(&caller.principal, "privacy.request", &detail, status);
    result.map_err(|refusal| refusal.error)
}

async fn receive(
    state: &AppState,
    caller: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RequestView>), super::consent::Refusal> {
    let body = body?;
    let request: RequestBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the body must be {{\"type\": \"access\" | \"erasure\", \"subject\"}}: {e}"),
        )
    })?;
    super::consent::check_id("subject", &request.subject)?;
    match caller.school() {
        Some(school) => of_the_school(state, school, &request.subject).await?,
        None => super::consent::may_act_for(caller, &request.subject)?,
    }
    let requests = state.requests.clone();
    let requester = requester_of(caller).map(str::to_owned);
    let received = tokio::task::spawn_blocking(move || {
        requests.submit(
            request.kind,
            &request.subject,
            requester.as_deref(),
            now_ms(),
        )
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|err| {
        tracing::error!(error = %err, "data-subject request not recorded");
        ApiError::new(
            ErrorCode::Overloaded,
            "the request could not be recorded; nothing was received, try again",
        )
        .retry_after(std::time::Duration::from_secs(5))
    })?;
    if received.kind == RequestKind::Erasure {
        // In force before the answer: from now on nothing of the child is taken in or shown.
        for reference in &received.subjects {
            state
                .ingest
                .suppressions()
                .suppress(reference, received.received_at);
        }
    }
    privacy_metrics::request(received.kind, RequestOutcome::Received);
    state.request_worker.notify_one();
    Ok((StatusCode::ACCEPTED, Json(RequestView::of(state, received))))
}

/// A data-subject request and where it stands.
#[utoipa::path(get, path = "/v1/privacy/requests/{id}", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    params(("id" = String, Path, description = "The request's id.")),
    responses(
        (status = 200, description = "The request.", body = RequestView),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Not a privacy officer, guardian or school admin.", body = ErrorBody),
        (status = 404, description = "No request of that id (that the caller filed, for a guardian).", body = ErrorBody)))]
pub async fn show(
    caller: Authorized<RequestFiler>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ApiError> {
    let result = find(&state, &caller.principal, &id).map(|r| Json(RequestView::of(&state, r)));
    let status = audit::status_of(&result);
    let detail = if status == 200 { id.as_str() } else { "" };
    state
        .audit
        .record(&caller.principal, "privacy.request.read", detail, status);
    result
}

/// Downloads the export of a completed access request: a zip of `export.ndjson` (a header
/// line, then lines of kind `event`, `assignment` and `consent`) and `summary.txt` (what is
/// held, in plain words); with `Accept: application/x-ndjson`, the NDJSON alone.
#[utoipa::path(get, path = "/v1/privacy/requests/{id}/export", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    params(("id" = String, Path, description = "The request's id.")),
    responses(
        (status = 200, description = "The export: a zip of export.ndjson and summary.txt, or the NDJSON alone when asked for.", content(
            (Vec<u8> = "application/zip"),
            (String = "application/x-ndjson"))),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Not a privacy officer, guardian or school admin.", body = ErrorBody),
        (status = 404, description = "No access request of that id (that the caller filed, for a guardian).", body = ErrorBody),
        (status = 409, description = "The request is not completed yet.", body = ErrorBody),
        (status = 410, description = "The export expired, or the child was erased since, and it was deleted.", body = ErrorBody)))]
pub async fn export(
    caller: Authorized<RequestFiler>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let result = open_export(&state, &caller.principal, &id, &headers).await;
    let status = audit::status_of(&result);
    let detail = if status == 200 { id.as_str() } else { "" };
    state
        .audit
        .record(&caller.principal, "privacy.export", detail, status);
    result
}

async fn open_export(
    state: &AppState,
    caller: &Principal,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let request = find(state, caller, id)?;
    if request.kind != RequestKind::Access {
        return Err(not_found());
    }
    if request.status != Status::Completed {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the export is not ready: GET the request until its status is completed",
        ));
    }
    if request.erased() {
        return Err(ApiError::new(
            ErrorCode::Gone,
            "the export was deleted: the child's data was erased since",
        ));
    }
    if let Some(expired) = export_expiry(state, &request).filter(|at| *at <= now_ms()) {
        return Err(ApiError::new(
            ErrorCode::Gone,
            format!(
                "the export was deleted at {}; submit a new access request",
                format_rfc3339(expired)
            ),
        ));
    }
    // One child's export: read whole (bounded by what is held about one child), opened with
    // the data keys.
    let requests = state.requests.clone();
    let owned = id.to_owned();
    let bytes = tokio::task::spawn_blocking(move || requests.read_export(&owned))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Gone,
                "the export was deleted; submit a new access request",
            )
        })?;
    let (content_type, filename, body) = if wants_ndjson(headers) {
        ("application/x-ndjson", format!("{id}.ndjson"), bytes)
    } else {
        let expires = export_expiry(state, &request);
        let summary = crate::privacy::summary::summarize(&bytes, expires);
        let archive =
            crate::privacy::summary::archive(&bytes, &summary).map_err(ApiError::internal)?;
        ("application/zip", format!("{id}.zip"), archive)
    };
    let disposition = format!("attachment; filename=\"{filename}\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
            ),
        ],
        Body::from(body),
    )
        .into_response())
}

/// Whether the client asked for the bare NDJSON (`Accept: application/x-ndjson`) rather than
/// the zip with its summary.
fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/x-ndjson"))
}

/// The request `id`, if the caller may see it: a guardian sees only the requests they filed
/// (another family's request answers as if it did not exist).
fn find(state: &AppState, caller: &Principal, id: &str) -> Result<Request, ApiError> {
    let request = state.requests.get(id).ok_or_else(not_found)?;
    if caller.sees_own_requests_only() && request.requester.as_deref() != requester_of(caller) {
        return Err(not_found());
    }
    Ok(request)
}

/// Refuses a school admin's request about a child the SQL window holds no event of at their
/// school (the identity provider names the school, not its pupils; the recent events do).
async fn of_the_school(
    state: &AppState,
    school: &str,
    subject: &str,
) -> Result<(), super::consent::Refusal> {
    let pseudonyms = state.consent.pseudonyms(subject);
    let seen = state
        .sql
        .holds_subject_in(&pseudonyms, "school_id", school)
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "school membership not checked");
            ApiError::new(
                ErrorCode::Overloaded,
                "the school's pupils could not be checked; try again",
            )
            .retry_after(std::time::Duration::from_secs(5))
        })?;
    if seen {
        return Ok(());
    }
    Err(super::consent::Refusal {
        error: ApiError::new(
            ErrorCode::Forbidden,
            "no recent event places this child at your school; ask the privacy office (or the child's guardian) to file the request",
        ),
        other_child: Some(subject.to_owned()),
    })
}

/// How requests name the signed-in person who filed them.
fn requester_of(caller: &Principal) -> Option<&str> {
    caller
        .identity
        .as_deref()
        .map(|identity| identity.reference.as_str())
}

/// The requests the caller may see, oldest first: a guardian's own, or every request for a
/// privacy officer.
#[utoipa::path(get, path = "/v1/privacy/requests", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    responses(
        (status = 200, description = "The requests, oldest first.", body = RequestList),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Not a privacy officer, guardian or school admin.", body = ErrorBody)))]
pub async fn list(
    caller: Authorized<RequestFiler>,
    State(state): State<AppState>,
) -> Json<RequestList> {
    let requests = if caller.principal.sees_own_requests_only() {
        requester_of(&caller.principal)
            .map(|me| state.requests.filed_by(me))
            .unwrap_or_default()
    } else {
        state.requests.all()
    };
    state
        .audit
        .record(&caller.principal, "privacy.request.list", "", 200);
    Json(RequestList {
        requests: requests
            .into_iter()
            .map(|request| RequestView::of(&state, request))
            .collect(),
    })
}

/// The answer of `GET /v1/privacy/requests`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequestList {
    /// The requests, oldest first.
    pub requests: Vec<RequestView>,
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no data-subject request of that id")
}

/// A subject as the audit log names it: by reference, never by pseudonym.
pub(crate) fn as_reference(subject: &str) -> String {
    if is_reference(subject) {
        subject.to_owned()
    } else {
        reference(subject)
    }
}
