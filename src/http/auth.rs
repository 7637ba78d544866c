//! Authentication and roles. A handler states the role it needs in its signature
//! (`_: Authorized<Analyst>`); the token is checked before the handler runs.
//!
//! With no tokens configured the API is open (configuration allows that only on a loopback
//! listener) and every caller acts as `admin`.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorCode};
use crate::config::{Role, TokenConfig, TokenHash, TokenScope};

/// The configured tokens, shared by every request.
#[derive(Clone, Debug)]
pub struct Tokens(Arc<[TokenConfig]>);

impl Tokens {
    /// Wraps the configured tokens.
    pub fn new(tokens: &[TokenConfig]) -> Self {
        Self(tokens.into())
    }

    /// Returns who presented `authorization`, if it names a configured token and may act as
    /// `required`.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        required: Role,
    ) -> Result<Principal, ApiError> {
        if self.0.is_empty() {
            return Ok(Principal {
                name: "anonymous".into(),
                role: Role::Admin,
                scope: None,
                project: None,
            });
        }
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "send the token as `Authorization: Bearer <token>`",
                )
            })?;
        let presented = TokenHash::of(token);
        // Compare with every token, in constant time, so timing reveals nothing.
        let mut found = None;
        for candidate in self.0.iter() {
            if bool::from(candidate.sha256.0.ct_eq(&presented.0)) {
                found = Some(candidate);
            }
        }
        let token = found.ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown token"))?;
        if !token.role.permits(required) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this needs the {} role", required.as_str()),
            ));
        }
        Ok(Principal {
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

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name (`anonymous` when the API is open).
    pub name: Arc<str>,
    /// The token's role.
    pub role: Role,
    /// The school or class a scoped token is limited to.
    pub scope: Option<TokenScope>,
    /// The project of a token (`default` when its key names none); none when the API is
    /// open.
    pub project: Option<Arc<str>>,
}

/// A role a handler can require at the type level.
pub trait RequiredRole: Send + Sync + 'static {
    /// The role.
    const ROLE: Role;
}

/// Marker for [`Role::Client`].
pub struct Client;
/// Marker for [`Role::Analyst`].
pub struct Analyst;
/// Marker for [`Role::Privacy`].
pub struct Privacy;
/// Marker for [`Role::Admin`].
pub struct Admin;

impl RequiredRole for Client {
    const ROLE: Role = Role::Client;
}
impl RequiredRole for Analyst {
    const ROLE: Role = Role::Analyst;
}
impl RequiredRole for Privacy {
    const ROLE: Role = Role::Privacy;
}
impl RequiredRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// Extracts the caller, rejecting the request with 401 or 403 unless it may act as `R`.
pub struct Authorized<R: RequiredRole> {
    /// Who called.
    pub principal: Principal,
    _role: PhantomData<R>,
}

impl<S, R> FromRequestParts<S> for Authorized<R>
where
    Tokens: FromRef<S>,
    S: Send + Sync,
    R: RequiredRole,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let presented = presented_key(&parts.headers);
        let principal = Tokens::from_ref(state).authorize(presented.as_deref(), R::ROLE)?;
        Ok(Self {
            principal,
            _role: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&[
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

    #[test]
    fn open_api_treats_everyone_as_admin() {
        let open = Tokens::new(&[]);
        assert_eq!(open.authorize(None, Role::Admin).unwrap().role, Role::Admin);
    }

    #[test]
    fn tokens_are_checked_for_presence_identity_and_role() {
        let tokens = tokens();
        let code = |header: Option<&str>, role| tokens.authorize(header, role).unwrap_err().code();
        assert_eq!(code(None, Role::Client), ErrorCode::Unauthorized);
        assert_eq!(code(Some("Basic x"), Role::Client), ErrorCode::Unauthorized);
        assert_eq!(
            code(Some("Bearer nope"), Role::Client),
            ErrorCode::Unauthorized
        );
        assert_eq!(
            code(Some("Bearer app-key"), Role::Analyst),
            ErrorCode::Forbidden
        );
        let app = tokens
            .authorize(Some("Bearer app-key"), Role::Client)
            .unwrap();
        assert_eq!(&*app.name, "app");
        let ops = tokens
            .authorize(Some("Bearer ops-key"), Role::Privacy)
            .unwrap();
        assert_eq!(ops.role, Role::Admin);
    }
}
