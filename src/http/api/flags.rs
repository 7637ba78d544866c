//! Flag endpoints: the OpenFeature Remote Evaluation Protocol (single and bulk) and
//! `/v1/config`, every flag's value for app launch.
//!
//! Answers are written straight into a buffer from pre-serialized variant values, so the hot
//! path does not re-encode flag definitions. OFREP routes answer errors in OFREP's shape.

use std::borrow::Cow;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::flags::definition::RawJson;
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
pub struct EvaluationSuccess<'a> {
    #[schema(value_type = String)]
    key: &'a RawJson,
    /// STATIC, TARGETING_MATCH, DEFAULT or DISABLED.
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    variant: Option<&'a RawJson>,
    /// The variant's value: any JSON value (a boolean, string, number or object).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    value: Option<&'a RawJson>,
    #[schema(value_type = Object)]
    metadata: &'a RawJson,
}

/// A failed OFREP evaluation.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationFailure<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    /// FLAG_NOT_FOUND, PARSE_ERROR, TARGETING_KEY_MISSING, INVALID_CONTEXT or GENERAL;
    /// absent when the request itself was refused (authentication, size).
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'static str>,
    #[schema(value_type = String)]
    error_details: Cow<'a, str>,
    /// The flag's metadata, when a flag was evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    metadata: Option<&'a RawJson>,
}

/// One flag's evaluation in the bulk answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Evaluation<'a> {
    /// The flag was evaluated.
    Success(EvaluationSuccess<'a>),
    /// It could not be.
    Failure(EvaluationFailure<'a>),
}

impl<'a> Evaluation<'a> {
    /// The wire form of `flag`'s `resolution`.
    fn of(flag: &'a Flag, resolution: Resolution<'a>) -> Self {
        let key = &flag.key_json;
        let metadata = &flag.metadata_json;
        match resolution {
            Resolution::Variant(variant, reason) => Self::Success(EvaluationSuccess {
                key,
                reason: reason.as_str(),
                variant: Some(&variant.name_json),
                value: Some(&variant.json),
                metadata,
            }),
            Resolution::CodeDefault(reason) => Self::Success(EvaluationSuccess {
                key,
                reason: reason.as_str(),
                variant: None,
                value: None,
                metadata,
            }),
            Resolution::Error(code, details) => Self::Failure(EvaluationFailure {
                key: Some(&flag.key.0),
                error_code: Some(code.as_str()),
                error_details: details,
                metadata: Some(metadata),
            }),
        }
    }
}

/// The answer of the bulk OFREP evaluation: every flag, success or failure.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkEvaluation<'a> {
    flags: Vec<Evaluation<'a>>,
}

/// The answer of `/v1/config`: every flag's value and variant for the context. Flags that
/// defer to the app's code default are absent.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppConfig<'a> {
    /// Each flag's value, by key.
    #[schema(value_type = Object)]
    flags: Entries<'a, &'a RawJson>,
    /// Each flag's variant, by key.
    #[schema(value_type = Object)]
    variants: Entries<'a, &'a RawJson>,
}

/// A JSON object written from its entries in order (the snapshot's), without a map.
#[derive(Debug)]
pub struct Entries<'a, V>(Vec<(&'a str, V)>);

impl<V: Serialize> Serialize for Entries<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
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
        let failure = EvaluationFailure {
            key: self.key.as_deref(),
            error_code: self.code.map(ErrorCode::as_str),
            error_details: Cow::Borrowed(&self.details),
            metadata: None,
        };
        json_response(self.status, &failure, 256, &[])
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

/// Serializes `body` as the answer; the wire types are the types serialized here.
/// `capacity` is the expected size of the body, so that writing it does not grow the buffer.
fn json_response(
    status: StatusCode,
    answer: &impl Serialize,
    capacity: usize,
    extra: &[(header::HeaderName, String)],
) -> Response {
    let mut body = Vec::with_capacity(capacity);
    if let Err(err) = serde_json::to_writer(&mut body, answer) {
        return ApiError::internal(err).into_response();
    }
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
    let answer = Evaluation::of(flag, evaluations.evaluate(flag));
    let status = match answer {
        Evaluation::Success(_) => StatusCode::OK,
        Evaluation::Failure(_) => StatusCode::BAD_REQUEST,
    };
    Ok(json_response(status, &answer, 256, &[]))
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
    let answer = BulkEvaluation {
        flags: snapshot
            .flags()
            .map(|flag| Evaluation::of(flag, evaluations.evaluate(flag)))
            .collect(),
    };
    drop(evaluations);
    let capacity = 128 + snapshot.len() * 160;
    Ok(json_response(
        StatusCode::OK,
        &answer,
        capacity,
        &[(header::ETAG, etag)],
    ))
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
        (status = 400, description = "Invalid query, or an attribute given more than once.", body = ErrorBody),
        (status = 401, description = "Missing or unknown client key.", body = ErrorBody)))]
pub async fn config_get(
    caller: Authorized<Client>,
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|err| ApiError::new(ApiCode::InvalidRequest, err.body_text()))?;
    let mut context = serde_json::Map::with_capacity(query.len());
    for (key, value) in query {
        // One value per attribute: with two, which one the flags saw would be a guess.
        if context.contains_key(&key) {
            return Err(ApiError::new(
                ApiCode::InvalidRequest,
                format!("{key} is given more than once"),
            ));
        }
        context.insert(key, Value::String(value));
    }
    let context = Value::Object(context);
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
    let mut flags = Vec::with_capacity(snapshot.len());
    let mut variants = Vec::with_capacity(snapshot.len());
    for flag in snapshot.flags() {
        if let Resolution::Variant(variant, _) = evaluations.evaluate(flag) {
            flags.push((flag.key.0.as_str(), &variant.json));
            variants.push((flag.key.0.as_str(), &variant.name_json));
        }
    }
    drop(evaluations);
    let answer = AppConfig {
        flags: Entries(flags),
        variants: Entries(variants),
    };
    json_response(
        StatusCode::OK,
        &answer,
        64 + snapshot.len() * 96,
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
