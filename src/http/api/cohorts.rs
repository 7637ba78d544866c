//! `GET /v1/cohorts`: per-cohort time series from the counter store, and the live
//! per-variant gauges exported for Grafana.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use crate::config::TokenScope;
use crate::counters::{CohortKey, SESSIONS_FIELD, TIME_SPENT_FIELD, Window, WindowStart};
use crate::counters::{CounterStore, WindowCounts};
use crate::events::time::{format_rfc3339, parse_rfc3339};
use crate::http::AppState;
use crate::http::auth::{Authorized, SchoolAggregates};
use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::extract::{Params, QueryParams};

/// The most windows one answer may hold.
const MAX_POINTS: i64 = 1440;

/// One window of one cohort.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Point {
    /// The window's start (RFC 3339).
    pub start: String,
    /// Events by type.
    pub events: BTreeMap<String, i64>,
    /// Sessions started.
    pub sessions: i64,
    /// Time spent in ended sessions, in milliseconds.
    pub time_spent_ms: i64,
    /// Distinct active subjects (HyperLogLog estimate, standard error 0.81%).
    pub active_subjects: u64,
    /// Distinct subjects with at least one event of each type (an experiment's goals are
    /// event types), estimated like `active_subjects`.
    pub converted: BTreeMap<String, u64>,
    /// For a token scoped to a school or class: the window had fewer children than
    /// `auth.min_group_size`, so its counts are left out (zero and empty).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
}

/// One cohort's series.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Series {
    /// The cohort's name (`exp:<experiment>:<variant>`, `seg:<dimension>:<value>` or `all`).
    pub cohort: String,
    /// The variant, for experiment cohorts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The segment value, for segment cohorts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// One point per window, oldest first.
    pub points: Vec<Point>,
}

/// The answer of `GET /v1/cohorts`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Cohorts {
    /// `1m`, `1h` or `1d`.
    pub window: &'static str,
    /// The first window's start.
    pub from: String,
    /// The end of the range (exclusive).
    pub to: String,
    /// A series per cohort.
    pub series: Vec<Series>,
}

/// The parameters of `GET /v1/cohorts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CohortsParams {
    /// An experiment's flag key.
    pub experiment: Option<String>,
    /// A segment dimension, such as platform.
    pub segment: Option<String>,
    /// 1m, 1h or 1d.
    pub window: Option<String>,
    /// RFC 3339 start.
    pub from: Option<String>,
    /// RFC 3339 end (exclusive).
    pub to: Option<String>,
}

impl QueryParams for CohortsParams {}

/// Which cohorts a request selects.
enum Selection {
    Experiment(String),
    Segment(String),
    All,
}

/// Returns per-window counters of an experiment's variants (`experiment=`), of a segment
/// dimension's values (`segment=`), or of all events (neither). `window` is `1m`, `1h` or `1d`
/// (default `1h`); `from` and `to` are RFC 3339 (default: the last 24 windows); at most 1440
/// windows per answer.
#[utoipa::path(get, path = "/v1/cohorts", tag = "cohorts",
    security(("bearer" = []), ("oidc" = [])),
    params(CohortsParams),
    responses(
        (status = 200, description = "A time series per cohort.", body = Cohorts),
        (status = 400, description = "A bad parameter.", body = ErrorBody),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "Neither an analyst nor a school admin, or a scoped caller asking for more than its own school's or class's segment.", body = ErrorBody),
        (status = 503, description = "The counter store is unavailable.", body = ErrorBody)))]
pub async fn cohorts(
    caller: Authorized<SchoolAggregates>,
    State(state): State<AppState>,
    Params(params): Params<CohortsParams>,
) -> Result<Json<Cohorts>, ApiError> {
    let invalid = |text: String| ApiError::new(ErrorCode::InvalidRequest, text);
    let selection = match (&params.experiment, &params.segment) {
        (Some(_), Some(_)) => return Err(invalid("give experiment or segment, not both".into())),
        (Some(experiment), None) => Selection::Experiment(experiment.clone()),
        (None, Some(segment)) => Selection::Segment(segment.clone()),
        (None, None) => Selection::All,
    };
    // A school's staff read their own school's (or class's) segment, in groups large enough.
    let scope = caller.principal.scope.as_ref();
    if let Some(scope) = scope {
        check_scope(&state, scope, &selection)?;
    }
    let min_group = state.config.auth.min_group_size as u64;
    let window = match &params.window {
        None => Window::Hour,
        Some(name) => Window::from_name(name)
            .ok_or_else(|| invalid(format!("window must be 1m, 1h or 1d, not {name:?}")))?,
    };
    let to = time_param("to", params.to.as_ref())?.unwrap_or_else(crate::ingest::now_ms);
    let from = time_param("from", params.from.as_ref())?;
    let first = window.start_of(from.unwrap_or(to - 24 * window.millis()));
    let last = window.start_of(to - 1);
    if last.0 < first.0 {
        return Err(invalid("from must be before to".into()));
    }
    let count = (last.0 - first.0) / window.millis() + 1;
    if count > MAX_POINTS {
        return Err(invalid(format!(
            "{count} windows asked for; at most {MAX_POINTS} per request: narrow from/to or use a longer window"
        )));
    }
    let starts: Vec<WindowStart> = (0..count)
        .map(|i| WindowStart(first.0 + i * window.millis()))
        .collect();
    let mut cohorts = selected(&state.counters, &selection).await?;
    if let Some(scope) = scope {
        cohorts.retain(|c| matches!(c, CohortKey::Segment { value, .. } if *value == scope.value));
    }
    let mut series = Vec::with_capacity(cohorts.len());
    for cohort in cohorts {
        let counts = state
            .counters
            .read(&cohort, window, &starts)
            .await
            .map_err(unavailable)?;
        let (variant, value) = match &cohort {
            CohortKey::Variant { variant, .. } => (Some(variant.clone()), None),
            CohortKey::Segment { value, .. } => (None, Some(value.clone())),
            CohortKey::All => (None, None),
        };
        series.push(Series {
            cohort: cohort.tag(),
            variant,
            value,
            points: starts
                .iter()
                .zip(counts)
                .map(|(s, c)| {
                    let mut point = point(*s, c);
                    if scope.is_some() && point.active_subjects < min_group {
                        point.suppress();
                    }
                    point
                })
                .collect(),
        });
    }
    Ok(Json(Cohorts {
        window: window.name(),
        from: format_rfc3339(first.0),
        to: format_rfc3339(last.0 + window.millis()),
        series,
    }))
}

/// Refuses a scoped token anything but its own segment, and a segment the counters do not
/// keep.
fn check_scope(
    state: &AppState,
    scope: &TokenScope,
    selection: &Selection,
) -> Result<(), ApiError> {
    let own = matches!(selection, Selection::Segment(d) if d == scope.key);
    if !own {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "a token scoped to a school or class reads segment={} only",
                scope.key
            ),
        ));
    }
    if !state
        .config
        .pipeline
        .segments
        .iter()
        .any(|d| d == scope.key)
    {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "counters are not kept per {}: add it to pipeline.segments, or use SQL",
                scope.key
            ),
        ));
    }
    Ok(())
}

/// Reads query parameter `name` as an RFC 3339 time, if it is given.
pub(super) fn time_param(name: &str, value: Option<&String>) -> Result<Option<i64>, ApiError> {
    value
        .map(|text| {
            parse_rfc3339(text).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("{name} is not an RFC 3339 time such as 2026-11-24T09:00:00Z"),
                )
            })
        })
        .transpose()
}

async fn selected(store: &CounterStore, selection: &Selection) -> Result<Vec<CohortKey>, ApiError> {
    if let Selection::All = selection {
        return Ok(vec![CohortKey::All]);
    }
    let all = store.cohorts().await.map_err(unavailable)?;
    Ok(all
        .into_iter()
        .filter(|cohort| match (selection, cohort) {
            (Selection::Experiment(e), CohortKey::Variant { experiment, .. }) => e == experiment,
            (Selection::Segment(d), CohortKey::Segment { dimension, .. }) => d == dimension,
            _ => false,
        })
        .collect())
}

fn point(start: WindowStart, counts: WindowCounts) -> Point {
    let mut events = BTreeMap::new();
    for (field, value) in &counts.counts {
        if let Some(kind) = field.strip_prefix("events:") {
            events.insert(kind.to_owned(), *value);
        }
    }
    Point {
        start: format_rfc3339(start.0),
        sessions: counts.counts.get(SESSIONS_FIELD).copied().unwrap_or(0),
        time_spent_ms: counts.counts.get(TIME_SPENT_FIELD).copied().unwrap_or(0),
        events,
        active_subjects: counts.subjects,
        converted: counts.converted,
        suppressed: false,
    }
}

impl Point {
    /// Leaves the counts out: too few children to show.
    fn suppress(&mut self) {
        self.events.clear();
        self.converted.clear();
        self.sessions = 0;
        self.time_spent_ms = 0;
        self.active_subjects = 0;
        self.suppressed = true;
    }
}

fn unavailable(err: crate::counters::CounterError) -> ApiError {
    tracing::warn!(error = %err, "counter store read failed");
    ApiError::new(
        ErrorCode::Overloaded,
        "the counter store is unavailable; try again shortly",
    )
    .retry_after(std::time::Duration::from_secs(5))
}
