//! Authentication and roles. A handler states the roles it admits in its signature
//! (`_: Authorized<Analyst>`); the caller is checked before the handler runs, and the handler
//! asks the [`Principal`] about relations ("may act for this child?").
//!
//! A bearer token is a static token (its SHA-256 is configured: app installations and
//! operators) or an OpenID Connect access token of a configured issuer (parents, teachers,
//! schools, researchers), verified by `identity::oidc`. Refusals answer 401 with an RFC 6750
//! `WWW-Authenticate` challenge (403 for a valid caller without the role), and refused
//! tokens are audited.
//!
//! With no tokens and no issuers configured the API is open (configuration allows that only
//! on a loopback listener) and every caller acts as `admin`.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::audit::AuditLog;
use super::error::{ApiError, ErrorCode};
use crate::config::{Role, TokenConfig, TokenHash, TokenScope};
pub use crate::identity::Principal;
use crate::identity::{Identity, TokenError, Verifier};
use crate::ingest::now_ms;
use crate::privacy::erasure::reference;
use crate::privacy::pseudonym::Pepper;

/// Checks callers: the static tokens, the trusted issuers, and where refusals are audited.
#[derive(Clone)]
pub struct Gate {
    tokens: Arc<[TokenConfig]>,
    oidc: Option<Arc<Verifier>>,
    audit: Option<Arc<AuditLog>>,
    /// Names signed-in callers in logs and the audit trail (by reference, never by `sub`).
    pepper: Option<Pepper>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("tokens", &self.tokens.len())
            .field(
                "issuers",
                &self.oidc.as_ref().map_or(0, |v| v.issuers().len()),
            )
            .finish()
    }
}

/// How a 401 challenges the client (RFC 6750, section 3).
fn challenge(error: Option<&str>, description: &str) -> String {
    // A quoted-string: no quotes or backslashes inside.
    let description: String = description
        .chars()
        .map(|c| if c == '"' || c == '\\' { '\'' } else { c })
        .collect();
    match error {
        None => "Bearer realm=\"flagstream\"".to_owned(),
        Some(error) => format!(
            "Bearer realm=\"flagstream\", error=\"{error}\", error_description=\"{description}\""
        ),
    }
}

fn unauthorized(error: Option<&str>, description: impl Into<String>) -> ApiError {
    let description = description.into();
    let header = challenge(error, &description);
    ApiError::new(ErrorCode::Unauthorized, description).challenge(header)
}

impl Gate {
    /// Static tokens only (unit tests, tools).
    pub fn new(tokens: &[TokenConfig]) -> Self {
        Self {
            tokens: tokens.into(),
            oidc: None,
            audit: None,
            pepper: None,
        }
    }

    /// Adds the trusted issuers, the audit log refusals go to, and the pepper that names
    /// signed-in callers.
    pub fn with_identity(
        mut self,
        oidc: Option<Arc<Verifier>>,
        audit: Arc<AuditLog>,
        pepper: Pepper,
    ) -> Self {
        self.oidc = oidc;
        self.audit = Some(audit);
        self.pepper = Some(pepper);
        self
    }

    /// The trusted issuers, if any are configured.
    pub fn verifier(&self) -> Option<&Arc<Verifier>> {
        self.oidc.as_ref()
    }

    fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.oidc.is_none()
    }

    /// Returns who presented `authorization`, if it is a configured token or a valid access
    /// token of a trusted issuer, and may act in one of `admitted` (admins always may).
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        admitted: &[Role],
    ) -> Result<Principal, ApiError> {
        // Who a refusal is recorded under: the caller, once identified.
        let (who, result): (Option<(Arc<str>, Role)>, _) = match self.identify(authorization).await
        {
            Ok(principal)
                if principal.role == Role::Admin || admitted.contains(&principal.role) =>
            {
                return Ok(principal);
            }
            Ok(principal) => {
                let names: Vec<&str> = admitted.iter().map(|r| r.as_str()).collect();
                let description = format!("this needs the {} role", names.join(" or "));
                let header = challenge(Some("insufficient_scope"), &description);
                let refused = ApiError::new(ErrorCode::Forbidden, description).challenge(header);
                (Some((principal.name, principal.role)), Err(refused))
            }
            Err(err) => (None, Err(err)),
        };
        if let (Err(err), Some(audit)) = (&result, &self.audit)
            && authorization.is_some()
        {
            let (name, role) = match &who {
                Some((name, role)) => (&**name, role.as_str()),
                None => ("unauthenticated", "none"),
            };
            audit.append(
                now_ms(),
                name,
                role,
                "auth.refused",
                err.description(),
                err.code().status().as_u16(),
            );
        }
        result
    }

    async fn identify(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal::anonymous());
        }
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                unauthorized(None, "send the token as `Authorization: Bearer <token>`")
            })?;
        if let Some(principal) = self.static_token(token) {
            return Ok(principal);
        }
        let Some(verifier) = &self.oidc else {
            return Err(unauthorized(Some("invalid_token"), "unknown token"));
        };
        // A static token never has two dots; anything else that is not a JWT is unknown.
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(unauthorized(Some("invalid_token"), "unknown token"));
        }
        match verifier.verify(token).await {
            Ok(verified) => {
                let mut identity = Identity {
                    issuer: verified.issuer,
                    subject: verified.subject,
                    relations: verified.relations,
                    reference: String::new(),
                };
                let pepper = self
                    .pepper
                    .as_ref()
                    .expect("a gate with issuers has a pepper");
                identity.reference = reference(&pepper.pseudonymize(&identity.account()).0);
                let name = format!("{}:{}", verified.role.as_str(), identity.reference);
                // A school admin sees their school, as a scoped token of school staff does.
                let scope = match (&verified.role, &identity.relations.school) {
                    (Role::SchoolAdmin, Some(school)) => Some(TokenScope {
                        key: "school_id",
                        value: school.clone(),
                    }),
                    _ => None,
                };
                Ok(Principal {
                    name: name.into(),
                    role: verified.role,
                    scope,
                    project: None,
                    identity: Some(Arc::new(identity)),
                })
            }
            Err(TokenError::Claims(err)) => {
                Err(ApiError::new(ErrorCode::Forbidden, err.to_string())
                    .challenge(challenge(Some("insufficient_scope"), &err.to_string())))
            }
            Err(err) => Err(unauthorized(Some("invalid_token"), err.to_string())),
        }
    }

    fn static_token(&self, token: &str) -> Option<Principal> {
        let presented = TokenHash::of(token);
        // Compare with every token, in constant time, so timing reveals nothing.
        let mut found = None;
        for candidate in self.tokens.iter() {
            if bool::from(candidate.sha256.0.ct_eq(&presented.0)) {
                found = Some(candidate);
            }
        }
        let token = found?;
        Some(Principal {
            name: token.name.as_str().into(),
            role: token.role,
            scope: token.scope.clone(),
            project: Some(
                token
                    .project
                    .as_deref()
                    .unwrap_or(crate::config::DEFAULT_PROJECT)
                    .into(),
            ),
            identity: None,
        })
    }
}

/// Returns the key a request presents, as an `Authorization` value: the `Authorization` header
/// itself, or `Bearer <key>` from `X-API-Key` (which OFREP clients may send instead).
pub fn presented_key(headers: &axum::http::HeaderMap) -> Option<String> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    text(AUTHORIZATION.as_str())
        .map(str::to_owned)
        .or_else(|| text("x-api-key").map(|key| format!("Bearer {key}")))
}

/// The roles a handler admits, at the type level (admins are always admitted).
pub trait RequiredRole: Send + Sync + 'static {
    /// The roles.
    const ROLES: &'static [Role];
}

/// Marker for [`Role::Client`].
pub struct Client;
/// Marker for [`Role::Analyst`].
pub struct Analyst;
/// Marker for [`Role::Privacy`].
pub struct Privacy;
/// Marker for [`Role::Admin`].
pub struct Admin;
/// Those who may act for a child: privacy officers (any child) and guardians (their own);
/// the handler asks [`Principal::may_act_for`].
pub struct Custodian;
/// Anyone signed in or holding a token.
pub struct Anyone;
/// Those who file data-subject requests: privacy officers (any child), guardians (their
/// own) and school admins (the children of their school); the handler checks the relation.
pub struct RequestFiler;
/// Those who read aggregates by SQL: analysts (everything), school admins (their school) and
/// researchers (every school), the last two in groups of enough children only.
pub struct Aggregates;
/// Those who read the live cohort counters: analysts, and school admins (their school's
/// segment, in groups of enough children).
pub struct SchoolAggregates;

impl RequiredRole for Client {
    const ROLES: &'static [Role] = &[Role::Client];
}
impl RequiredRole for Analyst {
    const ROLES: &'static [Role] = &[Role::Analyst];
}
impl RequiredRole for Privacy {
    const ROLES: &'static [Role] = &[Role::Privacy];
}
impl RequiredRole for Admin {
    const ROLES: &'static [Role] = &[Role::Admin];
}
impl RequiredRole for Custodian {
    const ROLES: &'static [Role] = &[Role::Privacy, Role::Guardian];
}
impl RequiredRole for Anyone {
    const ROLES: &'static [Role] = &Role::ALL;
}
impl RequiredRole for RequestFiler {
    const ROLES: &'static [Role] = &[Role::Privacy, Role::Guardian, Role::SchoolAdmin];
}
impl RequiredRole for Aggregates {
    const ROLES: &'static [Role] = &[Role::Analyst, Role::SchoolAdmin, Role::Researcher];
}
impl RequiredRole for SchoolAggregates {
    const ROLES: &'static [Role] = &[Role::Analyst, Role::SchoolAdmin];
}

/// Extracts the caller, rejecting the request with 401 or 403 unless it may act in one of
/// `R`'s roles.
pub struct Authorized<R: RequiredRole> {
    /// Who called.
    pub principal: Principal,
    _role: PhantomData<R>,
}

impl<S, R> FromRequestParts<S> for Authorized<R>
where
    Gate: FromRef<S>,
    S: Send + Sync,
    R: RequiredRole,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let presented = presented_key(&parts.headers);
        let principal = Gate::from_ref(state)
            .authorize(presented.as_deref(), R::ROLES)
            .await?;
        Ok(Self {
            principal,
            _role: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(&[
            TokenConfig {
                name: "app".into(),
                role: Role::Client,
                sha256: TokenHash::of("app-key"),
                scope: None,
                project: None,
            },
            TokenConfig {
                name: "ops".into(),
                role: Role::Admin,
                sha256: TokenHash::of("ops-key"),
                scope: None,
                project: None,
            },
        ])
    }

    #[tokio::test]
    async fn open_api_treats_everyone_as_admin() {
        let open = Gate::new(&[]);
        let principal = open.authorize(None, &[Role::Admin]).await.unwrap();
        assert_eq!(principal.role, Role::Admin);
    }

    #[tokio::test]
    async fn tokens_are_checked_for_presence_identity_and_role() {
        let gate = gate();
        let refused =
            async |header: Option<&str>, role| gate.authorize(header, &[role]).await.unwrap_err();
        let missing = refused(None, Role::Client).await;
        assert_eq!(missing.code(), ErrorCode::Unauthorized);
        assert_eq!(
            missing.www_authenticate(),
            Some("Bearer realm=\"flagstream\"")
        );
        assert_eq!(
            refused(Some("Basic x"), Role::Client).await.code(),
            ErrorCode::Unauthorized
        );
        let unknown = refused(Some("Bearer nope"), Role::Client).await;
        assert_eq!(unknown.code(), ErrorCode::Unauthorized);
        assert!(
            unknown
                .www_authenticate()
                .unwrap()
                .contains("error=\"invalid_token\""),
            "{unknown:?}"
        );
        let wrong_role = refused(Some("Bearer app-key"), Role::Analyst).await;
        assert_eq!(wrong_role.code(), ErrorCode::Forbidden);
        assert!(wrong_role.description().contains("analyst"));
        let app = gate
            .authorize(Some("Bearer app-key"), &[Role::Client])
            .await
            .unwrap();
        assert_eq!(&*app.name, "app");
        assert_eq!(app.project.as_deref(), Some("default"));
        let ops = gate
            .authorize(Some("Bearer ops-key"), &[Role::Privacy])
            .await
            .unwrap();
        assert_eq!(ops.role, Role::Admin);
    }

    #[test]
    fn challenges_keep_the_quoted_string_intact() {
        let header = challenge(Some("invalid_token"), r#"bad "quote" \ here"#);
        assert_eq!(
            header,
            "Bearer realm=\"flagstream\", error=\"invalid_token\", error_description=\"bad 'quote' ' here\""
        );
    }
}
