//! Flag endpoints: the OpenFeature Remote Evaluation Protocol (single and bulk) and
//! `/v1/config`, every flag's value for app launch.
//!
//! Answers are written straight into a buffer from pre-serialized variant values, so the hot
//! path does not re-encode flag definitions. OFREP routes answer errors in OFREP's shape.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::flags::metrics::{self as flag_metrics, Endpoint};
use crate::flags::{ErrorCode, Flag, Reason, Resolution, Snapshot, evaluate};
use crate::http::AppState;
use crate::http::auth::{Authorized, Client};
use crate::http::error::{ApiError, ErrorBody, ErrorCode as ApiCode};
use crate::ingest::now_ms;

/// The body of an evaluation request.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EvaluationRequest {
    /// The evaluation context: `targetingKey` and any attributes targeting rules read.
    #[schema(value_type = Object)]
    context: Map<String, Value>,
}

/// A successful OFREP evaluation; `value` and `variant` are absent when the caller's code
/// default applies (reason `DISABLED`, or `DEFAULT` for a flag without a default variant).
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct EvaluationSuccess {
    key: String,
    /// STATIC, TARGETING_MATCH, DEFAULT or DISABLED.
    reason: String,
    variant: Option<String>,
    /// The variant's value: any JSON value (a boolean, string, number or object).
    #[schema(value_type = Option<Value>)]
    value: Option<Value>,
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// A failed OFREP evaluation.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationFailure {
    key: Option<String>,
    /// FLAG_NOT_FOUND, PARSE_ERROR, TARGETING_KEY_MISSING, INVALID_CONTEXT or GENERAL.
    error_code: String,
    error_details: Option<String>,
}

/// The answer of the bulk OFREP evaluation: every flag, success or failure.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BulkEvaluation {
    #[schema(value_type = Vec<Object>)]
    flags: Vec<Value>,
}

/// The answer of `/v1/config`: every flag's value and variant for the context. Flags that
/// defer to the app's code default are absent.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct AppConfig {
    #[schema(value_type = Object)]
    flags: Map<String, Value>,
    #[schema(value_type = Object)]
    variants: Map<String, Value>,
}

/// An OFREP-shaped error: `{"key"?, "errorCode"?, "errorDetails"}`.
pub struct OfrepError {
    status: StatusCode,
    key: Option<String>,
    code: Option<ErrorCode>,
    details: String,
}

impl OfrepError {
    fn invalid_context(key: Option<&str>, details: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            key: key.map(str::to_owned),
            code: Some(ErrorCode::InvalidContext),
            details,
        }
    }
}

impl From<ApiError> for OfrepError {
    fn from(err: ApiError) -> Self {
        let response = err.clone().into_response();
        Self {
            status: response.status(),
            key: None,
            code: None,
            details: err.description().to_owned(),
        }
    }
}

impl From<BytesRejection> for OfrepError {
    fn from(rejection: BytesRejection) -> Self {
        Self {
            status: rejection.status(),
            key: None,
            code: None,
            details: rejection.body_text(),
        }
    }
}

impl IntoResponse for OfrepError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        if let Some(key) = self.key {
            body.insert("key".into(), Value::String(key));
        }
        if let Some(code) = self.code {
            body.insert("errorCode".into(), Value::String(code.as_str().into()));
        }
        body.insert("errorDetails".into(), Value::String(self.details));
        (self.status, axum::Json(Value::Object(body))).into_response()
    }
}

/// Reads `{"context": {...}}`; an empty body or a missing context is an empty context.
fn context_from_body(body: &[u8]) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let request: Value =
        serde_json::from_slice(body).map_err(|err| format!("the body is not valid JSON: {err}"))?;
    let Value::Object(mut request) = request else {
        return Err("the body must be a JSON object {\"context\": {...}}".into());
    };
    let context = request
        .remove("context")
        .unwrap_or_else(|| Value::Object(Map::new()));
    check_context(context)
}

fn check_context(context: Value) -> Result<Value, String> {
    if !context.is_object() {
        return Err("context must be a JSON object".into());
    }
    match context.get("targetingKey") {
        None | Some(Value::String(_)) => Ok(context),
        Some(_) => Err("targetingKey must be a string".into()),
    }
}

/// Returns the ETag of the answer for this snapshot and context.
fn etag_of(snapshot: &Snapshot, context: &Value) -> String {
    let text = context.to_string();
    let context_hash = murmur3::murmur3_x64_128(&mut text.as_bytes(), 0).unwrap_or(0) as u64;
    format!("\"{:016x}{:016x}\"", snapshot.content_hash, context_hash)
}

fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|candidate| {
            candidate == etag || candidate == "*" || candidate.strip_prefix("W/") == Some(etag)
        })
}

fn not_modified(etag: &str) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn json_response(
    status: StatusCode,
    body: String,
    extra: &[(header::HeaderName, String)],
) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), value);
        }
    }
    response
}

/// One request's evaluations: each flag evaluated for the context, counted by reason and,
/// for experiments, recorded as an exposure; the metrics are written once, at the end.
struct Evaluations<'a> {
    state: &'a AppState,
    context: &'a Value,
    project: Option<&'a str>,
    endpoint: Endpoint,
    started: Instant,
    seconds: i64,
    millis: i64,
    by_reason: [u64; 6],
}

impl<'a> Evaluations<'a> {
    const REASONS: [&'static str; 6] = [
        "STATIC",
        "TARGETING_MATCH",
        "DEFAULT",
        "DISABLED",
        "ERROR",
        "FLAG_NOT_FOUND",
    ];

    fn new(
        state: &'a AppState,
        context: &'a Value,
        project: Option<&'a str>,
        endpoint: Endpoint,
    ) -> Self {
        let millis = now_ms();
        Self {
            state,
            context,
            project,
            endpoint,
            started: Instant::now(),
            seconds: millis.div_euclid(1000),
            millis,
            by_reason: [0; 6],
        }
    }

    /// Evaluates `flag`, counts the answer and records the exposure of an experiment.
    fn evaluate<'f>(&mut self, flag: &'f Flag) -> Resolution<'f> {
        let resolution = evaluate(flag, self.context, self.seconds);
        let slot = match &resolution {
            Resolution::Variant(_, Reason::Static) => 0,
            Resolution::Variant(_, Reason::TargetingMatch) => 1,
            Resolution::Variant(_, _) | Resolution::CodeDefault(Reason::Default) => 2,
            Resolution::CodeDefault(_) => 3,
            Resolution::Error(_, _) => 4,
        };
        self.by_reason[slot] += 1;
        if let Resolution::Variant(variant, _) = &resolution {
            self.state
                .exposures
                .record(flag, variant, self.context, self.millis, self.project);
        }
        resolution
    }

    fn not_found(&mut self) {
        self.by_reason[5] += 1;
    }
}

impl Drop for Evaluations<'_> {
    fn drop(&mut self) {
        let mut by_reason = [("", 0); 6];
        for (slot, (reason, count)) in by_reason.iter_mut().enumerate() {
            *reason = Self::REASONS[slot];
            *count = self.by_reason[slot];
        }
        flag_metrics::evaluated(self.endpoint, &by_reason, self.started.elapsed());
    }
}

/// Writes one OFREP evaluation object; returns whether it is a failure.
fn write_evaluation(out: &mut String, flag: &Flag, resolution: &Resolution<'_>) -> bool {
    out.push_str("{\"key\":");
    out.push_str(&flag.key_json);
    let failed = match resolution {
        Resolution::Variant(variant, reason) => {
            let _ = write!(
                out,
                ",\"reason\":\"{}\",\"variant\":{},\"value\":{}",
                reason.as_str(),
                variant.name_json,
                variant.json
            );
            false
        }
        Resolution::CodeDefault(reason) => {
            let _ = write!(out, ",\"reason\":\"{}\"", reason.as_str());
            false
        }
        Resolution::Error(code, details) => {
            let _ = write!(
                out,
                ",\"errorCode\":\"{}\",\"errorDetails\":{}",
                code.as_str(),
                Value::String(details.to_string())
            );
            true
        }
    };
    out.push_str(",\"metadata\":");
    out.push_str(&flag.metadata_json);
    out.push('}');
    failed
}

/// Evaluates one flag (OFREP).
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags/{key}", tag = "flags",
    security(("bearer" = [])),
    params(("key" = String, Path, description = "The flag key.")),
    request_body = EvaluationRequest,
    responses(
        (status = 200, description = "The flag's value, variant and reason.", body = EvaluationSuccess),
        (status = 400, description = "Invalid context, or the flag could not be evaluated.", body = EvaluationFailure),
        (status = 401, description = "Missing or unknown client key."),
        (status = 404, description = "No flag with that key.", body = EvaluationFailure),
        (status = 413, description = "The request body is too large.")))]
pub async fn ofrep_flag(
    caller: Result<Authorized<Client>, ApiError>,
    State(state): State<AppState>,
    Path(key): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OfrepError> {
    let caller = caller.map_err(OfrepError::from)?;
    let project = caller.principal.project.as_deref();
    let body = body.map_err(OfrepError::from)?;
    let context = context_from_body(&body)
        .map_err(|details| OfrepError::invalid_context(Some(&key), details))?;
    let snapshot = state.flags.snapshot();
    let mut evaluations = Evaluations::new(&state, &context, project, Endpoint::Ofrep);
    let Some(flag) = snapshot.get(&key) else {
        evaluations.not_found();
        return Err(OfrepError {
            status: StatusCode::NOT_FOUND,
            key: Some(key.clone()),
            code: Some(ErrorCode::FlagNotFound),
            details: format!("flag {key:?} was not found"),
        });
    };
    let resolution = evaluations.evaluate(flag);
    let mut out = String::with_capacity(256);
    let failed = write_evaluation(&mut out, flag, &resolution);
    let status = if failed {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, out, &[]))
}

/// Evaluates every flag for one context (OFREP bulk), with ETag and `If-None-Match`.
#[utoipa::path(post, path = "/ofrep/v1/evaluate/flags", tag = "flags",
    security(("bearer" = [])),
    request_body = EvaluationRequest,
    params(("If-None-Match" = Option<String>, Header, description = "ETag of a previous answer.")),
    responses(
        (status = 200, description = "Every flag's evaluation.", body = BulkEvaluation,
            headers(("ETag" = String, description = "Changes when the flags or the context change."))),
        (status = 304, description = "Nothing changed since the ETag sent."),
        (status = 400, description = "Invalid context.", body = EvaluationFailure),
        (status = 401, description = "Missing or unknown client key."),
        (status = 413, description = "The request body is too large.")))]
pub async fn ofrep_bulk(
    caller: Result<Authorized<Client>, ApiError>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OfrepError> {
    let caller = caller.map_err(OfrepError::from)?;
    let project = caller.principal.project.as_deref();
    let body = body.map_err(OfrepError::from)?;
    let context =
        context_from_body(&body).map_err(|details| OfrepError::invalid_context(None, details))?;
    let snapshot = state.flags.snapshot();
    let etag = etag_of(&snapshot, &context);
    if matches_etag(&headers, &etag) {
        return Ok(not_modified(&etag));
    }
    let mut evaluations = Evaluations::new(&state, &context, project, Endpoint::OfrepBulk);
    let mut out = String::with_capacity(128 + snapshot.len() * 160);
    out.push_str("{\"flags\":[");
    for (i, flag) in snapshot.flags().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let resolution = evaluations.evaluate(flag);
        write_evaluation(&mut out, flag, &resolution);
    }
    out.push_str("]}");
    drop(evaluations);
    Ok(json_response(StatusCode::OK, out, &[(header::ETAG, etag)]))
}

/// Returns every flag's value for the context given as query parameters (app launch).
#[utoipa::path(get, path = "/v1/config", tag = "flags",
    security(("bearer" = [])),
    params(
        ("targetingKey" = Option<String>, Query, description = "The subject (for example the child's id)."),
        ("If-None-Match" = Option<String>, Header, description = "ETag of a previous answer.")),
    responses(
        (status = 200, description = "Every flag's value and variant.", body = AppConfig,
            headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Nothing changed since the ETag sent."),
        (status = 400, description = "Invalid query.", body = ErrorBody),
        (status = 401, description = "Missing or unknown client key.", body = ErrorBody)))]
pub async fn config_get(
    caller: Authorized<Client>,
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|err| ApiError::new(ApiCode::InvalidRequest, err.body_text()))?;
    let context = Value::Object(
        query
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    );
    Ok(app_config(
        &state,
        &headers,
        &context,
        caller.principal.project.as_deref(),
    ))
}

/// Returns every flag's value for the context in the body (app launch).
#[utoipa::path(post, path = "/v1/config", tag = "flags",
    security(("bearer" = [])),
    request_body = EvaluationRequest,
    params(("If-None-Match" = Option<String>, Header, description = "ETag of a previous answer.")),
    responses(
        (status = 200, description = "Every flag's value and variant.", body = AppConfig,
            headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Nothing changed since the ETag sent."),
        (status = 400, description = "Invalid body or context.", body = ErrorBody),
        (status = 401, description = "Missing or unknown client key.", body = ErrorBody),
        (status = 413, description = "The request body is too large.", body = ErrorBody)))]
pub async fn config_post(
    caller: Authorized<Client>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let context =
        context_from_body(&body).map_err(|d| ApiError::new(ApiCode::InvalidRequest, d))?;
    Ok(app_config(
        &state,
        &headers,
        &context,
        caller.principal.project.as_deref(),
    ))
}

fn app_config(
    state: &AppState,
    headers: &HeaderMap,
    context: &Value,
    project: Option<&str>,
) -> Response {
    let snapshot = state.flags.snapshot();
    let etag = etag_of(&snapshot, context);
    let cache_control = format!(
        "private, max-age={}",
        state.config.flags.config_max_age.as_secs()
    );
    if matches_etag(headers, &etag) {
        let mut response = not_modified(&etag);
        if let Ok(value) = HeaderValue::from_str(&cache_control) {
            response.headers_mut().insert(header::CACHE_CONTROL, value);
        }
        return response;
    }
    let mut evaluations = Evaluations::new(state, context, project, Endpoint::Config);
    let mut values = String::with_capacity(64 + snapshot.len() * 64);
    let mut variants = String::with_capacity(32 + snapshot.len() * 32);
    for flag in snapshot.flags() {
        if let Resolution::Variant(variant, _) = evaluations.evaluate(flag) {
            for (out, item) in [
                (&mut values, &variant.json),
                (&mut variants, &variant.name_json),
            ] {
                out.push(if out.is_empty() { '{' } else { ',' });
                out.push_str(&flag.key_json);
                out.push(':');
                out.push_str(item);
            }
        }
    }
    for out in [&mut values, &mut variants] {
        if out.is_empty() {
            out.push('{');
        }
        out.push('}');
    }
    drop(evaluations);
    let body = format!("{{\"flags\":{values},\"variants\":{variants}}}");
    json_response(
        StatusCode::OK,
        body,
        &[
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache_control),
            (header::VARY, "Authorization, X-API-Key".into()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_read_leniently_but_checked() {
        assert_eq!(context_from_body(b"").unwrap(), serde_json::json!({}));
        assert_eq!(context_from_body(b"{}").unwrap(), serde_json::json!({}));
        assert!(context_from_body(b"{\"context\": 3}").is_err());
        assert!(context_from_body(b"{\"context\": {\"targetingKey\": 7}}").is_err());
        assert!(context_from_body(b"[1]").is_err());
        assert!(
            context_from_body(b"{\"context\": {")
                .unwrap_err()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(matches_etag(&headers, "\"b\""));
        assert!(!matches_etag(&headers, "\"c\""));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(matches_etag(&headers, "\"c\""));
    }
}
