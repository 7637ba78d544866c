//! The HTTP layer's metrics (requests by matched route, readiness, WebSocket sessions) and the middleware that labels requests by matched route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

crate::telemetry::catalog! {
    /// HTTP requests answered, by matched route, method and status class.
    counter HTTP_REQUESTS_TOTAL = "flagstream_http_requests_total";
    /// HTTP request latency by matched route and method.
    histogram HTTP_REQUEST_DURATION_SECONDS = "flagstream_http_request_duration_seconds" in Seconds;
    /// HTTP requests being handled.
    gauge HTTP_REQUESTS_IN_FLIGHT = "flagstream_http_requests_in_flight";
    /// Always 1; the version is a label.
    gauge BUILD_INFO = "flagstream_build_info";
    /// 1 when the readiness check passed at its last run, by check.
    gauge READY = "flagstream_ready";
    /// Live WebSocket sessions.
    gauge STREAM_SESSIONS = "flagstream_stream_sessions" from zero;
    /// WebSocket client messages, by outcome (ack, error).
    counter STREAM_MESSAGES_TOTAL = "flagstream_stream_messages_total";
}

/// Sets the build information gauge.
pub fn build_info() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The route label of requests that matched no route, so raw paths never become labels.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Counts and times every request by its matched route (never the raw path).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let in_flight = metrics::gauge!(HTTP_REQUESTS_IN_FLIGHT);
    in_flight.increment(1.0);
    let response = next.run(request).await;
    in_flight.decrement(1.0);
    let status = status_class(response.status().as_u16());
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
