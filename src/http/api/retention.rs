//! `GET /v1/privacy/retention-policy`: how long each kind of data is kept, in plain words.

use axum::Json;
use axum::extract::State;

use crate::http::AppState;
use crate::privacy::retention::{RetentionPolicy, policy};

/// How long each kind of data is kept, in plain words. Public: families and schools may read
/// it without a token.
#[utoipa::path(get, path = "/v1/privacy/retention-policy", tag = "privacy",
    responses((status = 200, description = "The retention policy.", body = RetentionPolicy)))]
pub async fn retention_policy(State(state): State<AppState>) -> Json<RetentionPolicy> {
    Json(policy(&state.config))
}
