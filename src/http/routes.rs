//! The route table, the OpenAPI document generated beside it, and the middleware stack.
//!
//! Middleware, outermost first: request id and tracing → CORS for the configured origins →
//! HTTP metrics by matched route → load shedding, a global concurrency limit and the request
//! timeout → body limit.

use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::get;
use axum::{BoxError, Json, Router, middleware};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, OpenIdConnect, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{
    cohorts, consent, experiments, flags, ingest, me, ops, requests, retention, sql, stream,
};
use super::error::{self, ApiError, ErrorCode};
use super::{AppState, metrics};

#[derive(OpenApi)]
#[openapi(
    info(title = "flagstream", description = "Streaming analytics and feature-flag edge service."),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorBody)),
    tags(
        (name = "operations", description = "Health, readiness, metrics, configuration."),
        (name = "flags", description = "Flag evaluation: OFREP and app-launch config."),
        (name = "ingest", description = "Event intake: batches and the event schema."),
        (name = "cohorts", description = "Live per-cohort counters from the pipeline."),
        (name = "sql", description = "Ad-hoc and saved SQL over the recent window of events."),
        (name = "experiments", description = "Experiments and their results with statistics."),
        (name = "privacy", description = "Guardians' consent and data-subject requests."),
        (name = "identity", description = "Who the caller is: static tokens and OpenID Connect sign-ins.")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        // The access tokens of the identity providers in `[[auth.oidc]]`, sent as bearer
        // tokens; the URL is each provider's own (see docs/identity.md).
        components.add_security_scheme(
            "oidc",
            SecurityScheme::OpenIdConnect(OpenIdConnect::with_description(
                "https://identity-provider.example/.well-known/openid-configuration",
                "An access token (JWT) of an issuer configured in [[auth.oidc]], sent as \
                 `Authorization: Bearer <token>`: guardians, teachers, school admins and \
                 researchers sign in at their school's or family's identity provider.",
            )),
        );
    }
}

/// The whole route table, with its OpenAPI document. `flag_body` is the body limit of the
/// flag-evaluation routes.
fn table(
    serve_metrics: bool,
    flag_body: usize,
    batch_body: usize,
    sql_body: usize,
) -> OpenApiRouter<AppState> {
    let ingest = OpenApiRouter::new()
        .routes(routes!(ingest::batch))
        .layer(DefaultBodyLimit::max(batch_body));
    let flags = OpenApiRouter::new()
        .routes(routes!(flags::ofrep_flag))
        .routes(routes!(flags::ofrep_bulk))
        .routes(routes!(flags::config_get, flags::config_post))
        .layer(DefaultBodyLimit::max(flag_body));
    let sql = OpenApiRouter::new()
        .routes(routes!(sql::sql))
        .layer(DefaultBodyLimit::max(sql_body));
    // A consent decision is a few short fields.
    let consent = OpenApiRouter::new()
        .routes(routes!(consent::record))
        .layer(DefaultBodyLimit::max(consent::MAX_BODY));
    let requests = OpenApiRouter::new()
        .routes(routes!(requests::submit, requests::list))
        .layer(DefaultBodyLimit::max(requests::MAX_BODY));
    let table = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::admin_config))
        .routes(routes!(me::me))
        .routes(routes!(ingest::schema))
        .routes(routes!(stream::stream))
        .routes(routes!(cohorts::cohorts))
        .routes(routes!(experiments::list))
        .routes(routes!(consent::show))
        .routes(routes!(requests::show))
        .routes(routes!(requests::export))
        .routes(routes!(retention::retention_policy))
        .routes(routes!(experiments::results))
        .routes(routes!(sql::list))
        .routes(routes!(sql::saved))
        .merge(sql)
        .merge(consent)
        .merge(requests)
        .merge(ingest)
        .merge(flags);
    if serve_metrics {
        table.routes(routes!(ops::metrics))
    } else {
        table
    }
}

/// Returns the OpenAPI document of the API as served (with `/metrics` on the API listener).
pub fn api_doc() -> utoipa::openapi::OpenApi {
    table(true, 0, 0, 0).split_for_parts().1
}

/// Builds the API router with its middleware.
pub fn router(state: AppState, serve_metrics: bool) -> Router {
    let server = &state.config.server;
    let flag_body = state.config.flags.max_request_body.as_usize();
    let batch_body = state.config.ingest.max_body.as_usize();
    // The SQL text, its JSON escaping and the parameters fit. A body up to 2 MiB is read whole
    // even when its text is too long, so that its sender (an analyst: the token is checked
    // first) gets the 413 answer: a server that answers before reading a body makes a client
    // still sending it see a broken connection instead. Larger bodies are refused unread.
    let sql_body = (state.config.sql.max_sql_length.as_usize() * 2 + 16 * 1024).max(2 << 20);
    let (routes, openapi) = table(serve_metrics, flag_body, batch_body, sql_body).split_for_parts();
    let openapi = Arc::new(openapi);
    let per_route = ServiceBuilder::new()
        .layer(middleware::from_fn(metrics::track_http))
        .layer(HandleErrorLayer::new(answer_overload))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::new(
            Semaphore::new(server.max_concurrent_requests),
        )))
        .timeout(server.request_timeout);
    // With TLS on, browsers are told to reach this host over HTTPS only, for a year.
    let hsts = server.tls_cert.is_some().then(|| {
        SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        )
    });
    let outer = ServiceBuilder::new()
        .option_layer(hsts)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .option_layer(cors(&server.allowed_origins));
    let body_limit = server.max_body.as_usize();
    routes
        .route(
            "/openapi.json",
            get(move || async move { Json(openapi.as_ref().clone()) }),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(per_route)
        .layer(outer)
        .with_state(state)
}

/// The router of the separate metrics listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .fallback(error::not_found)
        .with_state(state)
}

/// CORS for the configured web origins (none: no CORS headers, so browsers keep pages of
/// other origins out). Preflight requests are answered here, before authentication.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::ACCEPT,
                header::IF_NONE_MATCH,
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                header::ETAG,
                header::RETRY_AFTER,
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-truncated"),
                HeaderName::from_static("x-row-count"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Raw paths can carry identifiers, so the span records only the method and request id.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", method = %request.method(), request_id)
}

async fn answer_overload(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(ErrorCode::Timeout, "the request took too long")
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(ErrorCode::Overloaded, "the service is at capacity")
            .retry_after(std::time::Duration::from_secs(1))
    } else {
        ApiError::internal(err)
    }
}
