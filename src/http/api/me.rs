//! `GET /v1/me`: who the caller is, their role and their relations (ids only, nothing about
//! anyone else), so an app knows which children a signed-in guardian acts for.

use axum::Json;
use serde::Serialize;

use crate::http::auth::{Anyone, Authorized};

/// The answer of `GET /v1/me`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    /// The role: client, analyst, privacy, admin (static tokens), or guardian, teacher,
    /// school_admin, researcher (and analyst, privacy, admin) for a signed-in person.
    pub role: &'static str,
    /// How the audit trail names the caller: the token's name, or `<role>:<reference>` for a
    /// signed-in person.
    pub name: String,
    /// The identity provider, for a signed-in person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The subject at that provider, for a signed-in person (it is their own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A guardian's children (user ids, as their token names them).
    pub children: Vec<String>,
    /// A teacher's classes.
    pub classes: Vec<String>,
    /// The children on a teacher's roster.
    pub roster: Vec<String>,
    /// A school admin's school.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub school: Option<String>,
}

/// Who the caller is.
#[utoipa::path(get, path = "/v1/me", tag = "identity",
    security(("bearer" = []), ("oidc" = [])),
    responses(
        (status = 200, description = "The caller.", body = Me),
        (status = 401, description = "Missing, unknown or invalid token.", body = crate::http::error::ErrorBody),
        (status = 403, description = "A valid token that carries no usable role.", body = crate::http::error::ErrorBody)))]
pub async fn me(caller: Authorized<Anyone>) -> Json<Me> {
    let principal = caller.principal;
    let identity = principal.identity.as_deref();
    let list = |pick: fn(&crate::identity::Relations) -> &std::collections::BTreeSet<String>| {
        identity
            .map(|identity| pick(&identity.relations).iter().cloned().collect())
            .unwrap_or_default()
    };
    Json(Me {
        role: principal.role.as_str(),
        name: principal.name.to_string(),
        issuer: identity.map(|identity| identity.issuer.to_string()),
        subject: identity.map(|identity| identity.subject.clone()),
        children: list(|relations| &relations.children),
        classes: list(|relations| &relations.classes),
        roster: list(|relations| &relations.roster),
        school: identity.and_then(|identity| identity.relations.school.clone()),
    })
}
