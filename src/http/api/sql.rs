//! `POST /v1/sql`, `GET /v1/queries` and `GET /v1/queries/{name}`: ad-hoc and saved SQL for
//! analysts. The format follows `Accept` (or `format=`); every failure is the JSON error body.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::http::auth::{Aggregates, Authorized, Principal};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::extract::{Params, QueryParams};
use crate::http::{AppState, audit};
use crate::sql::SqlError;
use crate::sql::metrics::QueryKind;
use crate::sql::output::{Format, encode};
use crate::sql::saved::Param;
use crate::sql::scope::Scope;

/// The body of `POST /v1/sql`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One read-only statement: SELECT, WITH … SELECT or EXPLAIN.
    pub sql: String,
    /// Values of `$name` placeholders, as text (parsed as the type their use implies).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// A saved query as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SavedQueryInfo {
    /// Its name, as in `/v1/queries/{name}`.
    pub name: String,
    /// What it answers.
    pub description: String,
    /// Its parameters.
    #[schema(value_type = Vec<Object>)]
    pub params: Vec<Param>,
    /// The query text.
    pub sql: String,
}

/// The answer of `GET /v1/queries`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SavedQueries {
    /// The saved queries, by name.
    pub queries: Vec<SavedQueryInfo>,
}

/// The query parameters of `POST /v1/sql` (placeholders go in the body).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormatParam {
    /// json, csv or arrow; overrides Accept.
    pub format: Option<String>,
}

impl QueryParams for FormatParam {
    const HINT: &'static str = "; placeholders go in the body's \"params\"";
}

/// Runs one read-only SQL query over the `events` table (the recent window and older
/// segments) and the `exposures` view. JSON by default; `Accept: text/csv` or
/// `application/vnd.apache.arrow.stream` (or `?format=csv|arrow`) for the others. Answers
/// over the row or byte cap are cut and marked `truncated` (header `X-Truncated`).
#[utoipa::path(post, path = "/v1/sql", tag = "sql",
    security(("bearer" = []), ("oidc" = [])),
    request_body = SqlRequest,
    params(FormatParam),
    responses(
        (status = 200, description = "The answer: JSON {columns, rows, row_count, truncated, complete, elapsed_ms}, CSV or Arrow IPC."),
        (status = 400, description = "Malformed body, syntax error (with its position), unknown table or column, a statement that is not read-only, or a query that failed on its data.", body = ErrorBody),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Not an analyst, school admin or researcher, or a query a scoped caller (a school, a class, a researcher: aggregates only) may not run.", body = ErrorBody),
        (status = 406, description = "An Accept header naming no format the service gives.", body = ErrorBody),
        (status = 413, description = "SQL text over sql.max_sql_length.", body = ErrorBody),
        (status = 422, description = "query_timeout (over sql.timeout) or query_resources_exhausted (over sql.memory_limit).", body = ErrorBody),
        (status = 503, description = "As many queries running as allowed; Retry-After.", body = ErrorBody)))]
pub async fn sql(
    caller: Authorized<Aggregates>,
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Params<FormatParam>, ApiError>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let mut detail = String::new();
    let result = async {
        let Params(FormatParam { format }) = query?;
        let format = pick_format(&headers, &format)?;
        let body = body?;
        let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the body must be {{\"sql\": \"…\", \"params\": {{…}}}}: {e}"),
            )
        })?;
        detail = request.sql.clone();
        let scope = scope_of(&state, &caller.principal);
        answer(
            &state,
            QueryKind::Adhoc,
            &request.sql,
            &request.params,
            format,
            scope.as_ref(),
        )
        .await
    }
    .await;
    audit::audited(
        &state.audit,
        &caller.principal,
        "sql.adhoc",
        &detail,
        result,
    )
}

/// Lists the saved queries with their parameters.
#[utoipa::path(get, path = "/v1/queries", tag = "sql",
    security(("bearer" = []), ("oidc" = [])),
    responses(
        (status = 200, description = "The saved queries.", body = SavedQueries),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Not an analyst, school admin or researcher.", body = ErrorBody)))]
pub async fn list(
    _caller: Authorized<Aggregates>,
    State(state): State<AppState>,
) -> Json<SavedQueries> {
    let queries = state
        .sql
        .saved()
        .values()
        .map(|q| SavedQueryInfo {
            name: q.name.clone(),
            description: q.description.clone(),
            params: q.params.clone(),
            sql: q.sql.clone(),
        })
        .collect();
    Json(SavedQueries { queries })
}

/// Runs a saved query; its parameters come from the query string (`format=` picks the
/// answer's format, like `Accept`).
#[utoipa::path(get, path = "/v1/queries/{name}", tag = "sql",
    security(("bearer" = []), ("oidc" = [])),
    params(("name" = String, Path, description = "The saved query.")),
    responses(
        (status = 200, description = "The answer, as for POST /v1/sql."),
        (status = 400, description = "A missing, unknown or invalid parameter.", body = ErrorBody),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Not an analyst, school admin or researcher.", body = ErrorBody),
        (status = 404, description = "No saved query of that name.", body = ErrorBody),
        (status = 422, description = "query_timeout or query_resources_exhausted.", body = ErrorBody),
        (status = 503, description = "As many queries running as allowed; Retry-After.", body = ErrorBody)))]
pub async fn saved(
    caller: Authorized<Aggregates>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    // The query's name and its parameters as given.
    let detail = match &query {
        Ok(Query(params)) => format!("{name} {}", serde_json::json!(params)),
        Err(_) => name.clone(),
    };
    let scope = scope_of(&state, &caller.principal);
    let result = run_saved(&state, &name, &headers, query, scope.as_ref()).await;
    audit::audited(
        &state.audit,
        &caller.principal,
        "sql.saved",
        &detail,
        result,
    )
}

async fn run_saved(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    scope: Option<&Scope>,
) -> Result<Response, ApiError> {
    let Query(mut params) =
        query.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let format_name = params.remove("format");
    let format = pick_format(headers, &format_name)?;
    let Some(saved) = state.sql.saved().get(name) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no saved query {name:?}; GET /v1/queries lists them"),
        ));
    };
    let params = saved
        .bind(&params)
        .map_err(|text| ApiError::new(ErrorCode::InvalidRequest, text))?;
    answer(state, QueryKind::Saved, &saved.sql, &params, format, scope).await
}

/// The view of a scoped caller, if the caller is one: school staff (a scoped token, or a
/// signed-in school admin) see their school or class, researchers every school; both only in
/// aggregates over groups of enough children.
pub(super) fn scope_of(state: &AppState, principal: &Principal) -> Option<Scope> {
    let min_group = state.config.auth.min_group_size;
    if principal.role == crate::config::Role::Researcher {
        return Some(Scope {
            rows: None,
            min_group,
        });
    }
    principal.scope.as_ref().map(|scope| Scope {
        rows: Some((scope.key, scope.value.clone())),
        min_group,
    })
}

fn pick_format(headers: &HeaderMap, name: &Option<String>) -> Result<Format, ApiError> {
    if let Some(name) = name {
        return Format::from_name(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("format must be json, csv or arrow, not {name:?}"),
            )
        });
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    Format::from_accept(accept).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotAcceptable,
            "answers are application/json, text/csv or application/vnd.apache.arrow.stream",
        )
    })
}

async fn answer(
    state: &AppState,
    kind: QueryKind,
    sql: &str,
    params: &BTreeMap<String, String>,
    format: Format,
    scope: Option<&Scope>,
) -> Result<Response, ApiError> {
    let result = state
        .sql
        .run_counted(kind, sql, params, scope, |result| encode(result, format))
        .await;
    let (result, body) = result.map_err(api_error)?;
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        )],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    let truncated = if result.truncated { "true" } else { "false" };
    headers.insert("x-truncated", HeaderValue::from_static(truncated));
    let complete = if result.complete { "true" } else { "false" };
    headers.insert("x-complete", HeaderValue::from_static(complete));
    headers.insert("x-row-count", HeaderValue::from(result.rows));
    Ok(response)
}

/// The API error of a failed query.
pub(super) fn api_error(err: SqlError) -> ApiError {
    let text = err.to_string();
    match err {
        SqlError::TooLong { .. } => ApiError::new(ErrorCode::PayloadTooLarge, text),
        SqlError::Busy(_) => ApiError::new(ErrorCode::Overloaded, text)
            .retry_after(std::time::Duration::from_secs(1)),
        SqlError::Invalid(_) => ApiError::new(ErrorCode::InvalidRequest, text),
        SqlError::Forbidden(_) => ApiError::new(ErrorCode::Forbidden, text),
        SqlError::Timeout(_) => ApiError::new(ErrorCode::QueryTimeout, text),
        SqlError::Resources(_) => ApiError::new(ErrorCode::QueryResources, text),
        SqlError::CountersUnavailable => ApiError::new(ErrorCode::Overloaded, text)
            .retry_after(std::time::Duration::from_secs(5)),
        SqlError::Internal { .. } => ApiError::internal(text),
    }
}
