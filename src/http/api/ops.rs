//! Operations endpoints: liveness, readiness, metrics and the effective configuration.

use std::collections::BTreeMap;
use std::path::Path;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::counters::CounterStore;
use crate::http::AppState;
use crate::http::audit::Audited;
use crate::http::auth::{Admin, Authorized};
use crate::http::error::ErrorBody;
use crate::http::metrics::READY;

/// The answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: &'static str,
    /// The service version.
    pub version: &'static str,
}

/// Answers while the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive.", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// One readiness check.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// Whether the check passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The answer of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each check by name: `data_dir`, `flags`, `counters`, `wal`.
    pub checks: BTreeMap<&'static str, Check>,
}

/// Answers 200 when the service can do its work: the data dir is writable, the flags are
/// loaded, the counter store answers (Redis, when configured), and the write-ahead log accepts
/// appends.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve.", body = Readiness),
        (status = 503, description = "A check failed.", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (data_dir, counters) = tokio::join!(
        check_data_dir(&state.config.storage.data_dir),
        check_counters(&state.counters)
    );
    // A broken flag file leaves the last good flags serving, so it does not make the node
    // unready; the detail and `flagstream_flag_problems` say what is wrong.
    let snapshot = state.flags.snapshot();
    let flags = Check {
        ok: true,
        detail: match snapshot.problems.len() {
            0 => format!("{} flags loaded", snapshot.len()),
            n => format!(
                "{} flags loaded; {n} problem(s) in the flag files, see the log",
                snapshot.len()
            ),
        },
    };
    let wal = state.ingest.wal();
    let wal = if wal.is_stopped() {
        Check {
            ok: false,
            detail: "stopped after a write error: ingest acknowledges nothing until restart".into(),
        }
    } else {
        Check {
            ok: true,
            detail: format!(
                "epoch {}, {} appends queued",
                wal.last_epoch().0,
                wal.queued()
            ),
        }
    };
    let checks = BTreeMap::from([
        ("data_dir", data_dir),
        ("flags", flags),
        ("counters", counters),
        ("wal", wal),
    ]);
    for (name, check) in &checks {
        metrics::gauge!(READY, "check" => *name).set(if check.ok { 1.0 } else { 0.0 });
    }
    let ready = checks.values().all(|check| check.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        checks,
    };
    (status, Json(body))
}

async fn check_data_dir(dir: &Path) -> Check {
    let probe = dir.join(".readiness-probe");
    let result = async {
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await
    }
    .await;
    match result {
        Ok(()) => Check {
            ok: true,
            detail: "writable".into(),
        },
        Err(err) => Check {
            ok: false,
            detail: format!("not writable: {err}"),
        },
    }
}

async fn check_counters(store: &CounterStore) -> Check {
    match store {
        CounterStore::Embedded(_) => Check {
            ok: true,
            detail: "embedded store".into(),
        },
        CounterStore::Redis(redis) => match redis.ping().await {
            Ok(()) => Check {
                ok: true,
                detail: "redis answers PING".into(),
            },
            Err(err) => Check {
                ok: false,
                detail: err.to_string(),
            },
        },
    }
}

/// Renders every metric in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format.",
        content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Returns the effective configuration as TOML, secrets redacted.
#[utoipa::path(get, path = "/v1/admin/config", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The effective configuration (TOML).",
            content_type = "application/toml", body = String),
        (status = 401, description = "Missing or unknown token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin token.", body = ErrorBody)))]
pub async fn admin_config(
    caller: Authorized<Admin>,
    State(state): State<AppState>,
) -> impl IntoResponse {
    state
        .audit
        .record(&caller.principal, "admin.config", "", 200);
    (
        [(header::CONTENT_TYPE, "application/toml")],
        state.config.render(),
    )
}
