//! `GET /v1/experiments` and `GET /v1/experiments/{key}/results`: the experiments of the
//! flag definitions and their results.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::cohorts::time_param;
use super::sql::api_error;
use crate::experiments::results::Results;
use crate::experiments::{Experiment, catalog, compute};
use crate::http::auth::{Analyst, Authorized};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::extract::{Params, QueryParams};
use crate::http::{AppState, audit};
use crate::ingest::now_ms;
use crate::sql::metrics::QueryKind;

/// The parameters of `GET /v1/experiments/{key}/results`.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsParams {
    /// RFC 3339 start (default: now − sql.retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// RFC 3339 end, exclusive (default: now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// json or csv; overrides Accept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

impl QueryParams for ResultsParams {}

/// The answer of `GET /v1/experiments`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Experiments {
    /// Every flag marked as an experiment, by key.
    pub experiments: Vec<Experiment>,
}

/// Lists the experiments the flag definitions declare: key, variants, allocation, goals and
/// status.
#[utoipa::path(get, path = "/v1/experiments", tag = "experiments",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The experiments.", body = Experiments),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Not an analyst token.", body = ErrorBody)))]
pub async fn list(
    _caller: Authorized<Analyst>,
    State(state): State<AppState>,
) -> Json<Experiments> {
    Json(Experiments {
        experiments: catalog(&state.flags.snapshot()),
    })
}

/// An experiment's results over `[from, to)` (RFC 3339; default: the SQL retention up to
/// now), per variant: exposed subjects, per goal the subjects converted, the rate and its
/// lift over the control (absolute and relative, 95% delta-method intervals, two-proportion
/// z-test), time spent per subject (Welch's t-test), and the sample-ratio-mismatch check.
/// Exact counts over the raw events. JSON, or CSV by `format=csv` or `Accept: text/csv`.
#[utoipa::path(get, path = "/v1/experiments/{key}/results", tag = "experiments",
    security(("bearer" = [])),
    params(
        ("key" = String, Path, description = "The experiment's flag key."),
        ResultsParams),
    responses(
        (status = 200, description = "The results, as JSON or CSV.", body = Results),
        (status = 400, description = "A bad parameter.", body = ErrorBody),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Not an analyst token, or a token scoped to a school or class.", body = ErrorBody),
        (status = 404, description = "No experiment of that key.", body = ErrorBody),
        (status = 406, description = "An Accept header naming neither JSON nor CSV.", body = ErrorBody),
        (status = 422, description = "query_timeout or query_resources_exhausted.", body = ErrorBody),
        (status = 503, description = "As many SQL queries running as allowed; Retry-After.", body = ErrorBody)))]
pub async fn results(
    caller: Authorized<Analyst>,
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    query: Result<Params<ResultsParams>, ApiError>,
) -> Result<Response, ApiError> {
    let detail = match &query {
        Ok(Params(params)) => format!("{key} {}", serde_json::json!(params)),
        Err(_) => key.clone(),
    };
    let result = if caller.principal.scope.is_some() {
        // Per-child first exposures over the whole population: not for a school's view.
        Err(ApiError::new(
            ErrorCode::Forbidden,
            "experiment results cover every school; a token scoped to a school or class cannot read them",
        ))
    } else {
        answer_results(&state, &key, &headers, query).await
    };
    audit::audited(
        &state.audit,
        &caller.principal,
        "experiments.results",
        &detail,
        result,
    )
}

async fn answer_results(
    state: &AppState,
    key: &str,
    headers: &HeaderMap,
    query: Result<Params<ResultsParams>, ApiError>,
) -> Result<Response, ApiError> {
    let Params(params) = query?;
    let invalid = |text: String| ApiError::new(ErrorCode::InvalidRequest, text);
    let csv = wants_csv(headers, params.format.as_ref())?;
    let to = time_param("to", params.to.as_ref())?.unwrap_or_else(|| now_ms() + 1);
    let from = time_param("from", params.from.as_ref())?
        .unwrap_or(to - state.config.sql.retention.as_millis() as i64);
    if from >= to {
        return Err(invalid("from must be before to".into()));
    }
    let snapshot = state.flags.snapshot();
    let Some(experiment) = snapshot.get(key).and_then(Experiment::of) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "no experiment of that key; GET /v1/experiments lists them",
        ));
    };
    let results = compute(&state.sql, &experiment, from, to, QueryKind::Experiment)
        .await
        .map_err(api_error)?;
    Ok(if csv {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            )],
            results.to_csv(),
        )
            .into_response()
    } else {
        Json(results).into_response()
    })
}

/// Whether the answer is CSV: `format` decides, else `Accept`.
fn wants_csv(headers: &HeaderMap, format: Option<&String>) -> Result<bool, ApiError> {
    if let Some(format) = format {
        return match format.as_str() {
            "json" => Ok(false),
            "csv" => Ok(true),
            other => Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("format must be json or csv, not {other:?}"),
            )),
        };
    }
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(false);
    };
    let accept = accept.to_str().unwrap_or("").to_ascii_lowercase();
    let types: Vec<&str> = accept
        .split(',')
        .map(|part| part.split(';').next().unwrap_or("").trim())
        .collect();
    if types
        .iter()
        .any(|t| ["application/json", "application/*", "*/*", ""].contains(t))
    {
        Ok(false)
    } else if types.iter().any(|t| ["text/csv", "text/*"].contains(t)) {
        Ok(true)
    } else {
        Err(ApiError::new(
            ErrorCode::NotAcceptable,
            "results are application/json or text/csv",
        ))
    }
}
