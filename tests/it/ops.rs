//! Operations endpoints, the error model, auth, limits and the OpenAPI document, against the
//! real server.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use flagstream::config::{Role, TokenConfig, TokenHash};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Process, Redis, Service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_readiness_and_metrics_with_no_redis() {
    let service = Service::start().await;

    let (status, health) = service.get_json("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["counters"]["detail"], "embedded store");
    assert_eq!(ready["checks"]["data_dir"]["ok"], true);
    assert_eq!(ready["checks"]["wal"]["ok"], true);

    let metrics = service.get_text("/metrics").await;
    assert!(
        metrics.contains("flagstream_build_info{version=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "flagstream_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"2xx\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("flagstream_http_request_duration_seconds_bucket{"));
    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_real_redis() {
    let mut redis = Redis::start();
    let url = redis.url();
    let service = Service::start_with(|config| config.counters.redis_url = Some(url)).await;

    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["counters"]["detail"], "redis answers PING");

    redis.kill();
    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"]["counters"]["ok"], false);
    // Liveness does not depend on Redis.
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_answer_the_json_error_body() {
    let service = Service::start().await;
    let (status, body) = service.get_json("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing-here")
    );

    let response = service
        .http
        .delete(service.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let service = Service::start().await;
    let (status, doc) = service.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().expect("paths");
    for expected in ["/healthz", "/readyz", "/metrics", "/v1/admin/config"] {
        assert!(paths.contains_key(expected), "{expected} is not documented");
    }
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            // A saved query's name and an experiment's key are resources, not routes: name
            // ones that exist.
            let filled = path
                .replace("{name}", "events_per_platform")
                .replace("{key}", "reward-animation");
            let response = service
                .http
                .request(method.clone(), service.url(&filled))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            // A resource that does not exist (a request id) is fine; no route is not.
            assert!(
                !body.contains("no route for") && !body.contains("\"method_not_allowed\""),
                "{method} {path} is documented but not routed: {status} {body}"
            );
        }
    }
    // And the document is the one the library generates.
    let generated = serde_json::to_value(flagstream::http::api_doc()).unwrap();
    assert_eq!(generated["paths"], doc["paths"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let service = Service::start().await;
    // Touch a few routes so every kind of series is present.
    service.get_json("/healthz").await;
    service.get_json("/readyz").await;
    service.get_json("/missing").await;
    let text = service.get_text("/metrics").await;

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|err| {
        panic!(
            "cannot run promtool: {err}. Install it with `apt-get install prometheus` \
             (Debian/Ubuntu); .ci/run does this"
        )
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool rejected /metrics:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_admin_configuration() {
    let tokens = vec![
        TokenConfig {
            name: "ios-app".into(),
            role: Role::Client,
            sha256: TokenHash::of("client-secret"),
            scope: None,
            project: None,
        },
        TokenConfig {
            name: "ops".into(),
            role: Role::Admin,
            sha256: TokenHash::of("admin-secret"),
            scope: None,
            project: None,
        },
    ];
    let service = Service::start_with(|config| {
        config.auth.tokens = tokens;
        config.counters.redis_url = Some("redis://user:hunter2@127.0.0.1:1".parse().unwrap());
    })
    .await;
    let get = |token: Option<&'static str>| {
        let mut request = service.http.get(service.url("/v1/admin/config"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = get(None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "unauthorized"
    );
    let response = get(Some("guess")).await.unwrap();
    assert_eq!(response.status(), 401);
    let response = get(Some("client-secret")).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "forbidden"
    );

    let response = get(Some("admin-secret")).await.unwrap();
    assert_eq!(response.status(), 200);
    let shown = response.text().await.unwrap();
    assert!(
        shown.contains("[server]") && shown.contains("ios-app"),
        "{shown}"
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("client-secret"),
        "{shown}"
    );
    // Operations endpoints stay open to probes.
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_their_own_listener() {
    let service = Service::start_with(|config| {
        config.server.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let metrics_addr = service.metrics_addr.expect("metrics listener");
    let response = service
        .http
        .get(service.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "metrics moved off the API listener");
    let text = service
        .http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("flagstream_build_info"));
    let (_, doc) = service.get_json("/openapi.json").await;
    assert!(doc["paths"].get("/metrics").is_none());
    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let service = Service::start_with(|config| {
        config.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buffer))
        .await
        .expect("the server closes the connection");
    assert!(read.is_ok());
    let answer = String::from_utf8_lossy(&buffer);
    assert!(!answer.contains("200 OK"), "{answer}");
    // Everyone else is still served.
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cost_little_and_everyone_else_is_served() {
    // The real binary, so that its memory is its own and its sockets do not count against
    // this process's descriptors.
    let data = tempfile::tempdir().unwrap();
    let process = Process::spawn(
        data.path(),
        &[("FLAGSTREAM_SERVER__HEADER_READ_TIMEOUT", "3s")],
    );
    let http = reqwest::Client::new();
    let url = format!("http://{}/healthz", process.addr);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    let before = process.rss_kib();
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(tokio::net::TcpStream::connect(process.addr).await.unwrap());
    }
    // Everyone else is served while they sit there.
    for _ in 0..20 {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let during = process.rss_kib();
    let per_connection = (during.saturating_sub(before) * 1024) / 10_000;
    eprintln!(
        "10,000 idle connections: {before} KiB -> {during} KiB ({per_connection} bytes each)"
    );
    assert!(
        per_connection < 64 * 1024,
        "an idle connection costs {per_connection} bytes"
    );
    // They are closed once they have sent no request for server.header_read_timeout.
    let mut closed = 0;
    for stream in idle.iter_mut().step_by(500) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte)).await;
        if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "idle connections are closed");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_are_shed_with_retry_after() {
    let redis = Redis::start();
    let url = redis.url();
    let service = Service::start_with(|config| {
        config.counters.redis_url = Some(url);
        config.counters.redis_timeout = Duration::from_secs(10);
        config.server.max_concurrent_requests = 1;
    })
    .await;
    // Connect once while Redis answers, then freeze it so readiness checks hang.
    assert_eq!(service.get_json("/readyz").await.0, 200);
    redis.signal("STOP");
    let spawn_slow = || {
        let http = service.http.clone();
        let url = service.url("/readyz");
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    let mut slow = spawn_slow();
    // Bounded, and generous for a loaded machine: the slow request holds the only permit
    // until Redis times out (10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let shed = loop {
        assert!(std::time::Instant::now() < deadline, "no request was shed");
        // A probe below may hold the permit when the slow request arrives: then the slow one
        // is shed itself, and another is sent.
        if slow.is_finished() {
            slow = spawn_slow();
        }
        let response = service
            .http
            .get(service.url("/healthz"))
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            let retry = response.headers().get("retry-after").cloned();
            break (retry, response.json::<Value>().await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (retry_after, body) = shed;
    assert_eq!(body["error"], "overloaded");
    assert_eq!(retry_after.unwrap(), "1");
    redis.signal("CONT");
    assert!(slow.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_with_the_json_error_body() {
    let redis = Redis::start();
    let url = redis.url();
    let service = Service::start_with(|config| {
        config.counters.redis_url = Some(url);
        config.counters.redis_timeout = Duration::from_secs(5);
        config.server.request_timeout = Duration::from_millis(300);
    })
    .await;
    assert_eq!(service.get_json("/readyz").await.0, 200);
    redis.signal("STOP");
    let (status, body) = service.get_json("/readyz").await;
    redis.signal("CONT");
    assert_eq!(status, 503);
    assert_eq!(body["error"], "timeout");
}

/// The roles each documented operation admits (`None`: public; admins are always admitted).
/// Every operation of the OpenAPI document must be listed, so a new endpoint cannot ship
/// without a decision.
fn admitted_roles(method: &str, path: &str) -> Option<Option<&'static [&'static str]>> {
    let roles: &'static [&'static str] = match (method, path) {
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/schema") => return Some(None),
        (_, "/v1/privacy/retention-policy") => return Some(None),
        (_, "/v1/me") => &[
            "client",
            "analyst",
            "privacy",
            "guardian",
            "teacher",
            "school_admin",
            "researcher",
        ],
        (_, "/v1/batch" | "/v1/stream" | "/v1/config") => &["client"],
        (_, p) if p.starts_with("/ofrep/") => &["client"],
        (_, "/v1/sql" | "/v1/queries" | "/v1/queries/{name}") => {
            &["analyst", "school_admin", "researcher"]
        }
        (_, "/v1/cohorts") => &["analyst", "school_admin"],
        (_, "/v1/experiments" | "/v1/experiments/{key}/results") => &["analyst"],
        // A guardian is admitted for their own children (the path names one of them).
        (_, "/v1/consent" | "/v1/consent/{subject}") => &["privacy", "guardian"],
        (_, p) if p.starts_with("/v1/privacy/") => &["privacy", "guardian", "school_admin"],
        (_, "/v1/admin/config") => &[],
        _ => return None,
    };
    Some(Some(roles))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_admits_exactly_its_roles() {
    let mut tokens = crate::harness::role_tokens();
    tokens.push(TokenConfig {
        name: "ops".into(),
        role: Role::Admin,
        sha256: TokenHash::of("admin-key"),
        scope: None,
        project: None,
    });
    let provider = crate::harness::oidc::OidcProvider::start();
    let issuer = crate::identity::issuer_config(&provider);
    let service = Service::start_with(|c| {
        c.auth.tokens = tokens;
        c.auth.oidc = vec![issuer];
        c.pipeline.segments = vec!["school_id".into()];
    })
    .await;
    // Signed-in people, with tokens from real sign-ins at the provider.
    let mut signed_in = Vec::new();
    for (account, role) in [
        ("parent-a", "guardian"),
        ("teacher-t", "teacher"),
        ("head-s", "school_admin"),
        ("researcher-r", "researcher"),
        ("nobody-n", "a token without a role"),
    ] {
        signed_in.push((provider.sign_in(account).await, role));
    }
    let (_, doc) = service.get_json("/openapi.json").await;
    let mut callers: Vec<(Option<&str>, &str)> = vec![
        (None, "nobody"),
        (Some("client-key"), "client"),
        (Some("analyst-key"), "analyst"),
        (Some("privacy-key"), "privacy"),
        (Some("admin-key"), "admin"),
        (Some("wrong-key"), "a wrong key"),
    ];
    callers.extend(
        signed_in
            .iter()
            .map(|(token, role)| (Some(token.as_str()), *role)),
    );
    let mut checked = 0;
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let admitted = admitted_roles(method, path)
                .unwrap_or_else(|| panic!("{method} {path} has no entry in the role matrix"));
            let mut filled = path
                .replace("{name}", "events_per_platform")
                .replace("{key}", "reward-animation")
                .replace("{subject}", "child-a1");
            if filled == "/v1/cohorts" {
                // The segment a school admin may read (their school's).
                filled.push_str("?segment=school_id&window=1h");
            }
            for (token, caller) in &callers {
                let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let mut request = service.http.request(method.clone(), service.url(&filled));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let status = request.send().await.unwrap().status().as_u16();
                let expected = match (admitted, *caller) {
                    (None, _) => "admitted",
                    (Some(_), "nobody" | "a wrong key") => "401",
                    (Some(_), "admin") => "admitted",
                    (Some(roles), caller) if roles.contains(&caller) => "admitted",
                    (Some(_), _) => "403",
                };
                // Admitted means the handler answered; a server error is a failure in
                // itself, whoever asked.
                assert!(status < 500, "{method} {path} as {caller}: {status}");
                let got = match status {
                    401 => "401",
                    403 => "403",
                    _ => "admitted",
                };
                assert_eq!(got, expected, "{method} {path} as {caller}: {status}");
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 11 * 20,
        "only {checked} checks: is the document complete?"
    );
}
