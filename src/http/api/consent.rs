//! `POST /v1/consent` and `GET /v1/consent/{subject}`: guardians' grants and revocations.
//! A signed-in guardian decides for the children their token names (any other child: 403,
//! audited), and the ledger's guardian is their verified identity; a privacy officer records
//! decisions on a guardian's behalf. Raw ids come in and are pseudonymized at once; answers
//! name subjects and guardians by pseudonym only.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::events::time::{format_rfc3339, parse_rfc3339};
use crate::http::AppState;
use crate::http::audit::Audited;
use crate::http::auth::{Authorized, Custodian, Principal};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::ingest::now_ms;
use crate::privacy::ConsentScope;
use crate::privacy::consent::{ConsentMethod, ConsentRecord};
use crate::privacy::ledger::Decision;

/// The largest body of `POST /v1/consent`.
pub const MAX_BODY: usize = 16 * 1024;

/// The longest subject or guardian id.
const MAX_ID_LENGTH: usize = 256;

/// The body of `POST /v1/consent`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentRequest {
    /// The child's user id, as the app sends it in events (pseudonymized at once).
    pub subject: String,
    /// `analytics` (events are kept) or `experiments` (exposures are kept).
    #[schema(value_type = String)]
    pub scope: ConsentScope,
    /// `true` grants, `false` revokes.
    pub granted: bool,
    /// The guardian who decided (pseudonymized at once): required from a privacy officer,
    /// refused from a signed-in guardian (who is the guardian).
    #[serde(default)]
    pub guardian_id: Option<String>,
    /// When the guardian decided (RFC 3339); default: now.
    #[serde(default)]
    pub at: Option<String>,
    /// The version of the consent text the guardian was shown; default:
    /// `privacy.consent_text_version`.
    #[serde(default)]
    pub text_version: Option<String>,
}

/// A recorded decision.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsentEntry {
    /// Its position in the ledger.
    pub seq: u64,
    /// The child's pseudonym.
    pub subject: String,
    /// `analytics` or `experiments`.
    pub scope: &'static str,
    /// Grant or revocation.
    pub granted: bool,
    /// The guardian's pseudonym.
    pub guardian: String,
    /// When the guardian decided.
    pub at: String,
    /// When the service recorded it.
    pub recorded_at: String,
    /// `oidc` (the guardian signed in and decided) or `operator` (a privacy officer
    /// recorded it); absent for records older than methods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    /// The identity provider that verified the guardian.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The version of the consent text the guardian was shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_version: Option<String>,
}

impl From<ConsentRecord> for ConsentEntry {
    fn from(record: ConsentRecord) -> Self {
        Self {
            seq: record.seq,
            subject: record.subject,
            scope: record.scope.as_str(),
            granted: record.granted,
            guardian: record.guardian,
            at: format_rfc3339(record.at),
            recorded_at: format_rfc3339(record.recorded_at),
            method: record.method.map(ConsentMethod::as_str),
            issuer: record.issuer,
            text_version: record.text_version,
        }
    }
}

/// The decision in force for one scope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InForce {
    /// Whether a grant is in force.
    pub granted: bool,
    /// When the guardian made that decision.
    pub since: String,
}

/// The decisions in force; `null` where the guardian never decided (no consent).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Consents {
    /// Whether the child's events may be kept.
    pub analytics: Option<InForce>,
    /// Whether the child may take part in experiments.
    pub experiments: Option<InForce>,
}

/// The answer of `GET /v1/consent/{subject}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubjectConsent {
    /// The child's pseudonym.
    pub subject: String,
    /// Per scope, the decision in force.
    pub consents: Consents,
    /// Every decision, in ledger order.
    pub history: Vec<ConsentEntry>,
}

/// Records a guardian's grant or revocation, durably, before answering. It is in force for
/// ingest and exposures as soon as the answer is sent. The decision that counts is the latest
/// by `at`, so a grant that arrives after a later revocation does not undo it.
#[utoipa::path(post, path = "/v1/consent", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    request_body = ConsentRequest,
    responses(
        (status = 201, description = "Recorded and in force.", body = ConsentEntry),
        (status = 400, description = "A malformed body, an empty or overlong id, an unknown scope or a time in the future.", body = ErrorBody),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Neither a privacy officer nor a guardian, or a guardian deciding for a child their sign-in does not name.", body = ErrorBody),
        (status = 503, description = "The ledger could not be written; nothing was recorded.", body = ErrorBody)))]
pub async fn record(
    caller: Authorized<Custodian>,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ConsentEntry>), ApiError> {
    let result = record_decision(&state, &caller.principal, body).await;
    let (detail, status) = match &result {
        Ok((status, Json(entry))) => {
            let decision = if entry.granted { "grant" } else { "revoke" };
            (
                format!(
                    "{} {} {decision} seq {}",
                    super::requests::as_reference(&entry.subject),
                    entry.scope,
                    entry.seq
                ),
                status.as_u16(),
            )
        }
        Err(err) => (
            err.child()
                .map(|child| super::requests::as_reference(&state.consent.pseudonym_of(child)))
                .unwrap_or_default(),
            err.error.code().status().as_u16(),
        ),
    };
    state
        .audit
        .record(&caller.principal, "consent.record", &detail, status);
    result.map_err(|refusal| refusal.error)
}

/// A refused request, with the child it named when the caller may not act for it (for the
/// audit trail: who tried to reach another family's child).
pub(super) struct Refusal {
    pub(super) error: ApiError,
    pub(super) other_child: Option<String>,
}

impl Refusal {
    fn child(&self) -> Option<&str> {
        self.other_child.as_deref()
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            other_child: None,
        }
    }
}

impl From<BytesRejection> for Refusal {
    fn from(rejection: BytesRejection) -> Self {
        ApiError::from(rejection).into()
    }
}

/// Refuses a caller who may not act for `subject` (a guardian naming another family's child)
/// with 403, keeping the child for the audit trail.
pub(super) fn may_act_for(caller: &Principal, subject: &str) -> Result<(), Refusal> {
    if caller.may_act_for(subject) {
        return Ok(());
    }
    Err(Refusal {
        error: ApiError::new(
            ErrorCode::Forbidden,
            "your sign-in does not name this child; see GET /v1/me for the children you act for",
        ),
        other_child: Some(subject.to_owned()),
    })
}

async fn record_decision(
    state: &AppState,
    caller: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ConsentEntry>), Refusal> {
    let body = body?;
    let invalid = |text: String| ApiError::new(ErrorCode::InvalidRequest, text);
    let request: ConsentRequest = serde_json::from_slice(&body).map_err(|e| {
        invalid(format!(
            "the body must be {{\"subject\", \"scope\", \"granted\", \"guardian_id\"?, \"at\"?, \"text_version\"?}}: {e}"
        ))
    })?;
    check_id("subject", &request.subject)?;
    may_act_for(caller, &request.subject)?;
    let (guardian_id, method, issuer) = match (&caller.identity, &request.guardian_id) {
        // A signed-in guardian is the guardian: the ledger keeps their verified identity.
        (Some(identity), None) if caller.role == crate::config::Role::Guardian => (
            identity.account(),
            ConsentMethod::Oidc,
            Some(identity.issuer.to_string()),
        ),
        (_, Some(_)) if caller.role == crate::config::Role::Guardian => {
            return Err(invalid(
                "leave guardian_id out: a signed-in guardian decides as themselves".into(),
            )
            .into());
        }
        (_, Some(guardian_id)) => {
            check_id("guardian_id", guardian_id)?;
            (guardian_id.clone(), ConsentMethod::Operator, None)
        }
        (_, None) => {
            return Err(
                invalid("guardian_id is required: name the guardian who decided".into()).into(),
            );
        }
    };
    let text_version = request
        .text_version
        .clone()
        .unwrap_or_else(|| state.config.privacy.consent_text_version.clone());
    check_id("text_version", &text_version)?;
    let now = now_ms();
    let at = match &request.at {
        None => now,
        Some(text) => parse_rfc3339(text)
            .ok_or_else(|| invalid(format!("at is not an RFC 3339 time: {text:?}")))?,
    };
    let tolerance = state.config.ingest.future_tolerance.as_millis() as i64;
    if at > now + tolerance {
        return Err(invalid("at is in the future".into()).into());
    }
    let decision = Decision {
        user_id: request.subject,
        guardian_id,
        scope: request.scope,
        granted: request.granted,
        at,
        method,
        issuer,
        text_version: Some(text_version),
    };
    let ledger = state.consent.clone();
    let record = tokio::task::spawn_blocking(move || ledger.record(&decision, now))
        .await
        .map_err(ApiError::internal)?
        .map_err(|err| {
            tracing::error!(error = %err, "consent not recorded");
            ApiError::new(
                ErrorCode::Overloaded,
                "the consent ledger could not be written; nothing was recorded, try again",
            )
            .retry_after(std::time::Duration::from_secs(5))
        })?;
    crate::privacy::metrics::consent_decided(
        record.scope,
        record.granted,
        state.consent.subjects(),
    );
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// A subject's consents: the decision in force per scope and the whole history. `subject` is
/// the child's user id or its pseudonym.
#[utoipa::path(get, path = "/v1/consent/{subject}", tag = "privacy",
    security(("bearer" = []), ("oidc" = [])),
    params(("subject" = String, Path, description = "The child's user id, or its pseudonym.")),
    responses(
        (status = 200, description = "The consents; scopes never decided are null.", body = SubjectConsent),
        (status = 400, description = "An empty or overlong id.", body = ErrorBody),
        (status = 401, description = "Missing, unknown or invalid token.", body = ErrorBody),
        (status = 403, description = "Neither a privacy officer nor a guardian, or a guardian asking about a child their sign-in does not name.", body = ErrorBody)))]
pub async fn show(
    caller: Authorized<Custodian>,
    State(state): State<AppState>,
    Path(subject): Path<String>,
) -> Result<Json<SubjectConsent>, ApiError> {
    if let Err(err) = check_id("subject", &subject) {
        let status = err.code().status().as_u16();
        state
            .audit
            .record(&caller.principal, "consent.read", "", status);
        return Err(err);
    }
    if let Err(refusal) = may_act_for(&caller.principal, &subject) {
        let child = super::requests::as_reference(&state.consent.pseudonym_of(&subject));
        state
            .audit
            .record(&caller.principal, "consent.read", &child, 403);
        return Err(refusal.error);
    }
    let found = state.consent.consents_of(&subject);
    state.audit.record(
        &caller.principal,
        "consent.read",
        &super::requests::as_reference(&found.subject),
        200,
    );
    let mut consents = Consents::default();
    for (scope, decision) in found.in_force {
        let in_force = decision.map(|(granted, at)| InForce {
            granted,
            since: format_rfc3339(at),
        });
        match scope {
            ConsentScope::Analytics => consents.analytics = in_force,
            ConsentScope::Experiments => consents.experiments = in_force,
        }
    }
    Ok(Json(SubjectConsent {
        subject: found.subject,
        consents,
        history: found.history.into_iter().map(ConsentEntry::from).collect(),
    }))
}

pub(super) fn check_id(name: &str, id: &str) -> Result<(), ApiError> {
    let problem = if id.trim().is_empty() {
        Some("is empty")
    } else if id.len() > MAX_ID_LENGTH {
        Some("is longer than 256 bytes")
    } else if id.chars().any(char::is_control) {
        Some("holds control characters")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{name} {problem}"),
        )),
        None => Ok(()),
    }
}
