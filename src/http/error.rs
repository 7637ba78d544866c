//! The HTTP error model: one closed set of codes, one status mapping, one JSON body
//! `{"error": "...", "error_description": "..."}`. 5xx bodies are generic; their detail is
//! logged, at most once a second.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error code the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed.
    InvalidRequest,
    /// No token, or a wrong one.
    Unauthorized,
    /// The token's role may not do this.
    Forbidden,
    /// No such route or resource.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// A body, event, batch or frame over its limit.
    PayloadTooLarge,
    /// An `Accept` header naming no format the route gives.
    NotAcceptable,
    /// The resource is not in a state that allows this yet.
    Conflict,
    /// The resource existed and was deleted on purpose.
    Gone,
    /// A content type or encoding the route does not take.
    UnsupportedMediaType,
    /// Too many requests for this key.
    RateLimited,
    /// The service sheds load; try again after `Retry-After`.
    Overloaded,
    /// The request took longer than allowed.
    Timeout,
    /// A query ran past its deadline and was cancelled.
    QueryTimeout,
    /// A query needed more memory than a query may hold.
    QueryResources,
    /// Something failed inside the service.
    Internal,
    /// The service does not do this (yet).
    NotImplemented,
}

impl ErrorCode {
    /// Returns the HTTP status of the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Gone => StatusCode::GONE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::QueryTimeout | ErrorCode::QueryResources => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Returns the code as it appears in the `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NotAcceptable => "not_acceptable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Gone => "gone",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Timeout => "timeout",
            ErrorCode::QueryTimeout => "query_timeout",
            ErrorCode::QueryResources => "query_resources_exhausted",
            ErrorCode::Internal => "internal_error",
            ErrorCode::NotImplemented => "not_implemented",
        }
    }
}

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: ErrorCode,
    description: Cow<'static, str>,
    retry_after: Option<Duration>,
    /// The `WWW-Authenticate` challenge of a 401 or 403 (RFC 6750).
    challenge: Option<String>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: invalid_request, unauthorized, forbidden, not_found,
    /// method_not_allowed, payload_too_large, not_acceptable, conflict, gone,
    /// unsupported_media_type,
    /// rate_limited, not_implemented,
    /// overloaded, timeout, query_timeout, query_resources_exhausted or internal_error.
    pub error: &'static str,
    /// What went wrong, in words for a developer.
    pub error_description: String,
}

impl ApiError {
    /// Builds an error with a description for the client.
    pub fn new(code: ErrorCode, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            description: description.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// Builds an internal error: the client sees a generic text, the detail is logged.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        log_internal(&detail);
        Self::new(
            ErrorCode::Internal,
            "the service failed to handle the request",
        )
    }

    /// Asks the client to wait before trying again.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Sends `WWW-Authenticate: <challenge>` with the answer.
    pub fn challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// The `WWW-Authenticate` challenge sent with the answer, if any.
    pub fn www_authenticate(&self) -> Option<&str> {
        self.challenge.as_deref()
    }

    /// Returns the code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Returns the description sent to the client.
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.as_str(),
            error_description: self.description.into_owned(),
        };
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(value) = self
            .challenge
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    /// A body that could not be read: over its route's limit (413) or broken (400).
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::PayloadTooLarge
        } else {
            ErrorCode::InvalidRequest
        };
        ApiError::new(code, rejection.body_text())
    }
}

/// Logs an internal error's detail, at most once a second so a failure storm cannot flood
/// the log.
fn log_internal(detail: &dyn std::fmt::Display) {
    static LAST_LOGGED_SECOND: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if LAST_LOGGED_SECOND.swap(now, Ordering::Relaxed) != now {
        tracing::error!(error = %detail, "internal error");
    }
}

/// Answers routes that do not exist.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {}", uri.path()))
}

/// Answers existing routes called with a method they do not take.
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("this route does not take {method}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_detail() {
        let response = ApiError::internal("disk /secret/path failed").into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let error = ApiError::internal("x");
        assert!(!error.description.contains('x'));
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        let response = ApiError::new(ErrorCode::Overloaded, "busy")
            .retry_after(Duration::from_millis(10))
            .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
