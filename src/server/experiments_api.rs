//! `GET /v1/experiments` and `GET /v1/experiments/{key}/results`: the experiments of the
//! flag definitions and their results, and the task that keeps the results' gauges fresh for
//! the Experiments dashboard.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::{Analyst, Authorized};
use super::cohorts_api::time_param;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::ingest_api::now_ms;
use super::metrics::{
    EXPERIMENT_CONVERSION_RATE, EXPERIMENT_EXPOSED_SUBJECTS, EXPERIMENT_P_VALUE,
    EXPERIMENT_REFRESHES_TOTAL, EXPERIMENT_RELATIVE_LIFT, EXPERIMENT_SRM_P_VALUE,
};
use super::sql_api::{api_error, run_counted};
use super::{AppState, audit};
use crate::experiments::results::{Results, analyze};
use crate::experiments::{Experiment, catalog, query};
use crate::sql::SqlError;

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
        ("from" = Option<String>, Query, description = "RFC 3339 start (default: now − sql.retention)."),
        ("to" = Option<String>, Query, description = "RFC 3339 end, exclusive (default: now)."),
        ("format" = Option<String>, Query, description = "json or csv; overrides Accept.")),
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
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let detail = match &query {
        Ok(Query(params)) => format!("{key} {}", serde_json::json!(params)),
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
    let status = audit::status_of(&result);
    state
        .audit
        .record(&caller.principal, "experiments.results", &detail, status);
    result
}

async fn answer_results(
    state: &AppState,
    key: &str,
    headers: &HeaderMap,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let invalid = |text: String| ApiError::new(ErrorCode::InvalidRequest, text);
    if let Some(key) = params
        .keys()
        .find(|k| !["from", "to", "format"].contains(&k.as_str()))
    {
        return Err(invalid(format!(
            "unknown parameter {key:?}; the parameters are from, to and format"
        )));
    }
    let csv = wants_csv(headers, params.get("format"))?;
    let time = |name: &str| time_param(name, params.get(name));
    let to = time("to")?.unwrap_or_else(|| now_ms() + 1);
    let from = time("from")?.unwrap_or(to - state.config.sql.retention.as_millis() as i64);
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
    let results = compute(state, &experiment, from, to, "experiment")
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

/// Counts `experiment`'s variants over `[from, to)` with one SQL query and analyzes them.
async fn compute(
    state: &AppState,
    experiment: &Experiment,
    from: i64,
    to: i64,
    kind: &'static str,
) -> Result<Results, SqlError> {
    let goals = experiment.goals.len();
    let sql = query::sql(goals);
    let params = query::params(&experiment.key, &experiment.goals, from, to);
    let (_, counts) = run_counted(state, kind, &sql, &params, None, |result| {
        query::counts(result, goals).map_err(SqlError::Internal)
    })
    .await?;
    Ok(analyze(experiment, from, to, &counts))
}

/// Recomputes every running experiment's results every `every` over the SQL retention and
/// publishes them as gauges, for at most `cap` experiment × variant pairs; ends when `stop`
/// turns true.
pub async fn publish_results(
    state: AppState,
    every: Duration,
    cap: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let mut published = 0;
        for experiment in catalog(&state.flags.snapshot()) {
            if experiment.status != "running" || published + experiment.variants.len() > cap {
                continue;
            }
            let to = now_ms() + 1;
            let from = to - state.config.sql.retention.as_millis() as i64;
            let outcome = match compute(&state, &experiment, from, to, "experiment_gauges").await {
                Ok(results) => {
                    published += results.variants.len();
                    set_gauges(&results);
                    "ok"
                }
                Err(SqlError::Busy(_)) => "busy",
                Err(err) => {
                    tracing::warn!(experiment = %experiment.key, error = %err, "experiment results failed");
                    "failed"
                }
            };
            metrics::counter!(EXPERIMENT_REFRESHES_TOTAL, "outcome" => outcome).increment(1);
        }
    }
}

fn set_gauges(results: &Results) {
    let experiment = results.experiment.clone();
    if let Some(check) = &results.sample_ratio {
        metrics::gauge!(EXPERIMENT_SRM_P_VALUE, "experiment" => experiment.clone())
            .set(check.p_value);
    }
    for variant in &results.variants {
        let labels = [
            ("experiment", experiment.clone()),
            ("variant", variant.variant.clone()),
        ];
        metrics::gauge!(EXPERIMENT_EXPOSED_SUBJECTS, &labels).set(variant.exposed_subjects as f64);
        for goal in &variant.goals {
            let labels = [
                ("experiment", experiment.clone()),
                ("variant", variant.variant.clone()),
                ("goal", goal.goal.clone()),
            ];
            if let Some(rate) = goal.rate {
                metrics::gauge!(EXPERIMENT_CONVERSION_RATE, &labels).set(rate);
            }
            let Some(lift) = &goal.lift else {
                continue;
            };
            if let Some(p) = lift.p_value {
                metrics::gauge!(EXPERIMENT_P_VALUE, &labels).set(p);
            }
            if let (Some(value), Some([low, high])) = (lift.relative, lift.relative_ci) {
                for (bound, v) in [("estimate", value), ("low", low), ("high", high)] {
                    let mut labels = labels.to_vec();
                    labels.push(("bound", bound.to_owned()));
                    metrics::gauge!(EXPERIMENT_RELATIVE_LIFT, &labels).set(v);
                }
            }
        }
    }
}
