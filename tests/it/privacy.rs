//! Privacy end to end: guardians' consent gates ingest and exposures at once and survives a
//! restart; consent requests are checked; no raw id reaches the data dir.

use std::path::Path;
use std::time::Duration;

use flagstream::events::time::format_rfc3339;
use serde_json::{Value, json};

use crate::harness::client::{count, files, post_batch, send};
use crate::harness::wait::{eventually, eventually_every, now_ms, until};
use crate::harness::{Service, role_tokens, test_config};

async fn consent(service: &Service, user: &str, scope: &str, granted: bool) -> Value {
    let body = json!({"subject": user, "scope": scope, "granted": granted, "guardian_id": "guardian-of-" .to_owned() + user});
    let (status, answer) = send(
        service,
        "privacy-key",
        reqwest::Method::POST,
        "/v1/consent",
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    answer
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sends one event per (user, type) and returns each one's status and reason.
async fn ingest(service: &Service, events: &[(Option<&str>, &str)]) -> Vec<(String, String)> {
    let at = format_rfc3339(now_ms());
    let batch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (user, kind))| {
            let properties = match *kind {
                "$exposure" => json!({"flag": "reward-animation", "variant": "stars"}),
                _ => json!({}),
            };
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut event = json!({"event_id": format!("c-{id}-{i}"), "type": kind,
                "timestamp": at, "properties": properties});
            if let Some(user) = user {
                event["user_id"] = json!(user);
            }
            event
        })
        .collect();
    post_batch(service, batch).await
}

fn ok() -> (String, String) {
    ("ok".into(), String::new())
}

fn no_consent() -> (String, String) {
    ("rejected".into(), "no_consent".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_gates_ingest_and_exposures_at_once_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    config.privacy.consent_required = true;
    let service = Service::start_config(config.clone()).await;

    // Without a grant nothing of the child is kept; anonymous events pass.
    let results = ingest(
        &service,
        &[(Some("child-ada"), "app_opened"), (None, "app_opened")],
    )
    .await;
    assert_eq!(results, [no_consent(), ok()]);

    let granted = consent(&service, "child-ada", "analytics", true).await;
    let ada = granted["subject"].as_str().unwrap().to_owned();
    assert!(ada.starts_with("p1_"), "{granted}");
    assert!(
        !granted.to_string().contains("child-ada"),
        "the raw id is echoed: {granted}"
    );
    assert_eq!(granted["seq"], 1);
    // In force for the very next request: events yes, exposures not yet.
    let results = ingest(
        &service,
        &[
            (Some("child-ada"), "app_opened"),
            (Some("child-ada"), "$exposure"),
        ],
    )
    .await;
    assert_eq!(results, [ok(), no_consent()]);
    consent(&service, "child-ada", "experiments", true).await;
    assert_eq!(
        ingest(&service, &[(Some("child-ada"), "$exposure")]).await,
        [ok()]
    );

    // Server-side exposures follow the same gate: Ada's is kept, Bob's is not.
    let (_, bob) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        "/v1/consent/child-bob",
        None,
    )
    .await;
    let bob = bob["subject"].as_str().unwrap().to_owned();
    for child in ["child-ada", "child-bob"] {
        let body = json!({"context": {"targetingKey": child}});
        let (status, answer) = send(
            &service,
            "client-key",
            reqwest::Method::POST,
            "/ofrep/v1/evaluate/flags/reward-animation",
            Some(body),
        )
        .await;
        assert_eq!(status, 200, "the flag still evaluates: {answer}");
    }
    // Ada has one client exposure; the server-side one makes two. Bob sent nothing.
    let exposures = "SELECT count(*) AS n FROM exposures WHERE subject = ";
    let arrived = || async { count(&service, &format!("{exposures}'{ada}'")).await >= 2 };
    eventually(
        Duration::from_secs(10),
        "Ada's server-side exposure arrived",
        arrived,
    )
    .await;
    assert_eq!(count(&service, &format!("{exposures}'{bob}'")).await, 0);

    // A revocation takes effect at once; a grant decided earlier but sent later does not
    // undo it.
    consent(&service, "child-ada", "analytics", false).await;
    assert_eq!(
        ingest(&service, &[(Some("child-ada"), "session_started")]).await,
        [no_consent()]
    );
    let stale = json!({"subject": "child-ada", "scope": "analytics", "granted": true,
        "guardian_id": "guardian-of-child-ada", "at": format_rfc3339(now_ms() - 3_600_000)});
    let (status, _) = send(
        &service,
        "privacy-key",
        reqwest::Method::POST,
        "/v1/consent",
        Some(stale),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        ingest(&service, &[(Some("child-ada"), "session_started")]).await,
        [no_consent()]
    );
    let kept = count(
        &service,
        &format!("SELECT count(*) AS n FROM events WHERE subject = '{ada}'"),
    )
    .await;
    assert_eq!(
        kept, 3,
        "app_opened, the client exposure and the server-side one"
    );

    // The state and the history, by raw id or by pseudonym.
    for name in ["child-ada", ada.as_str()] {
        let (status, state) = send(
            &service,
            "privacy-key",
            reqwest::Method::GET,
            &format!("/v1/consent/{name}"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(state["subject"], ada.as_str());
        assert_eq!(state["consents"]["analytics"]["granted"], false, "{state}");
        assert_eq!(state["consents"]["experiments"]["granted"], true, "{state}");
        assert_eq!(state["history"].as_array().unwrap().len(), 4, "{state}");
        assert!(!state.to_string().contains("child-ada"));
    }
    let (_, nobody) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        "/v1/consent/child-zed",
        None,
    )
    .await;
    assert_eq!(nobody["consents"]["analytics"], Value::Null);
    assert_eq!(nobody["history"], json!([]));
    let metrics = service.get_text("/metrics").await;
    assert!(
        metrics.contains("reason=\"no_consent\""),
        "no_consent rejections are counted"
    );
    assert!(metrics.contains("flagstream_exposures_total{outcome=\"no_consent\"}"));

    // After a restart the ledger holds the same decisions.
    service.stop().await.unwrap();
    let service = Service::start_config(config).await;
    let results = ingest(
        &service,
        &[
            (Some("child-ada"), "app_opened"),
            (Some("child-ada"), "$exposure"),
        ],
    )
    .await;
    assert_eq!(results, [no_consent(), ok()]);
    let next = consent(&service, "child-ada", "analytics", true).await;
    assert_eq!(next["seq"], 5, "the ledger continues");
    assert_eq!(
        ingest(&service, &[(Some("child-ada"), "app_opened")]).await,
        [ok()]
    );
    service.stop().await.unwrap();

    // No raw id of a child or a guardian in any file of the data dir.
    for (path, bytes) in files(data.path()) {
        let text = String::from_utf8_lossy(&bytes);
        for raw in ["child-ada", "child-bob", "guardian-of"] {
            assert!(!text.contains(raw), "{path} holds {raw:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_requests_are_authorized_and_checked() {
    let service = Service::start_with(|c| c.auth.tokens = role_tokens()).await;
    let good =
        json!({"subject": "child-1", "scope": "analytics", "granted": true, "guardian_id": "g-1"});
    for (token, status) in [("client-key", 403), ("analyst-key", 403), ("nope", 401)] {
        let (got, answer) = send(
            &service,
            token,
            reqwest::Method::POST,
            "/v1/consent",
            Some(good.clone()),
        )
        .await;
        assert_eq!(got, status, "{token}: {answer}");
        let (got, _) = send(
            &service,
            token,
            reqwest::Method::GET,
            "/v1/consent/child-1",
            None,
        )
        .await;
        assert_eq!(got, status, "{token}");
    }
    let response = service
        .http
        .post(service.url("/v1/consent"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "no token");

    let future = format_rfc3339(now_ms() + 86_400_000);
    let long = "x".repeat(300);
    let cases: Vec<(Value, &str)> = vec![
        (json!("not an object"), "the body must be"),
        (
            json!({"subject": "child-1", "scope": "analytics", "granted": true}),
            "guardian_id",
        ),
        (
            json!({"subject": "child-1", "scope": "marketing", "granted": true, "guardian_id": "g"}),
            "unknown variant",
        ),
        (
            json!({"subject": "child-1", "scope": "analytics", "granted": "yes", "guardian_id": "g"}),
            "invalid type",
        ),
        (
            json!({"subject": "child-1", "scope": "analytics", "granted": true, "guardian_id": "g", "extra": 1}),
            "unknown field",
        ),
        (
            json!({"subject": " ", "scope": "analytics", "granted": true, "guardian_id": "g"}),
            "subject is empty",
        ),
        (
            json!({"subject": long, "scope": "analytics", "granted": true, "guardian_id": "g"}),
            "longer than 256",
        ),
        (
            json!({"subject": "a\u{0}b", "scope": "analytics", "granted": true, "guardian_id": "g"}),
            "control characters",
        ),
        (
            json!({"subject": "c", "scope": "analytics", "granted": true, "guardian_id": "g", "at": future}),
            "in the future",
        ),
        (
            json!({"subject": "c", "scope": "analytics", "granted": true, "guardian_id": "g", "at": "monday"}),
            "RFC 3339",
        ),
    ];
    for (body, text) in cases {
        let (status, answer) = send(
            &service,
            "privacy-key",
            reqwest::Method::POST,
            "/v1/consent",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "invalid_request");
        let description = answer["error_description"].as_str().unwrap();
        assert!(description.contains(text), "{body}: {description}");
        assert!(
            !description.contains(&"x".repeat(100)),
            "the error echoes the input"
        );
    }
    let huge = json!({"subject": "c", "scope": "analytics", "granted": true, "guardian_id": "x".repeat(64 * 1024)});
    // On a connection of its own: the server answers 413 before reading the whole body and
    // then closes that connection, which a pooled client could pick for the next request.
    let response = reqwest::Client::new()
        .post(service.url("/v1/consent"))
        .bearer_auth("privacy-key")
        .json(&huge)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 413, "{answer}");
    let (status, _) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        &format!("/v1/consent/{long}"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    // Nothing bad was recorded, and the service still takes good requests.
    let (status, answer) = send(
        &service,
        "privacy-key",
        reqwest::Method::POST,
        "/v1/consent",
        Some(good),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(answer["seq"], 1, "no rejected request reached the ledger");
}

/// Opens `/v1/stream` with a client key and, when given, an `Origin`; returns the handshake's
/// status.
async fn stream_status(service: &Service, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut request = format!("ws://{}/v1/stream", service.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer client-key"),
    );
    if let Some(origin) = origin {
        headers.insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut socket, response)) => {
            let _ = socket.close(None).await;
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

async fn preflight(service: &Service, origin: &str) -> reqwest::Response {
    service
        .http
        .request(reqwest::Method::OPTIONS, service.url("/v1/batch"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pages_of_allowed_origins_reach_the_api_from_a_browser() {
    const APP: &str = "https://app.example.org";
    const OTHER: &str = "https://elsewhere.example.com";
    let service = Service::start_with(|c| {
        c.auth.tokens = role_tokens();
        c.server.allowed_origins = vec![APP.into()];
    })
    .await;
    let response = preflight(&service, APP).await;
    assert!(response.status().is_success(), "{}", response.status());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], APP);
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    let response = preflight(&service, OTHER).await;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // Answers (errors included) carry the header for the allowed origin only.
    let response = service
        .http
        .get(service.url("/v1/experiments"))
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    assert_eq!(stream_status(&service, Some(APP)).await, 101);
    assert_eq!(stream_status(&service, Some(OTHER)).await, 403);
    assert_eq!(
        stream_status(&service, None).await,
        101,
        "native apps send no Origin"
    );

    // With no origins configured, no page of another origin gets in.
    let closed = Service::start_with(|c| c.auth.tokens = role_tokens()).await;
    let response = preflight(&closed, APP).await;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_eq!(stream_status(&closed, Some(APP)).await, 403);
    assert_eq!(stream_status(&closed, None).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_privacy_and_admin_actions_are_audited_without_raw_ids() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    let mut tokens = role_tokens();
    tokens.push(flagstream::config::TokenConfig {
        name: "ops".into(),
        role: flagstream::config::Role::Admin,
        sha256: flagstream::config::TokenHash::of("admin-key"),
        scope: None,
        project: None,
    });
    config.auth.tokens = tokens;
    let service = Service::start_config(config).await;
    let (post, get) = (reqwest::Method::POST, reqwest::Method::GET);
    let analyst_calls = [
        (
            post.clone(),
            "/v1/sql",
            Some(json!({"sql": "SELECT 42 AS answer"})),
            200,
        ),
        (post, "/v1/sql", Some(json!({"sql": "SELEC nope"})), 400),
        (
            get.clone(),
            "/v1/queries/events_per_platform?hours=2",
            None,
            200,
        ),
        (
            get.clone(),
            "/v1/experiments/reward-animation/results",
            None,
            200,
        ),
    ];
    for (method, path, body, expected) in analyst_calls {
        let (status, answer) = send(&service, "analyst-key", method, path, body).await;
        assert_eq!(status, expected, "{path}: {answer}");
    }
    let granted = consent(&service, "child-audit", "analytics", true).await;
    let pseudonym = granted["subject"].as_str().unwrap().to_owned();
    // Subjects are named by reference, so that an erasure leaves nothing of them here, even
    // in a query's text.
    let reference = flagstream::privacy::erasure::reference(&pseudonym);
    let by_pseudonym = format!("SELECT count(*) AS n FROM events WHERE subject = '{pseudonym}'");
    assert_eq!(count(&service, &by_pseudonym).await, 0);
    let (status, _) = send(
        &service,
        "privacy-key",
        get.clone(),
        "/v1/consent/child-audit",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send(&service, "admin-key", get, "/v1/admin/config", None).await;
    assert_eq!(status, 200);
    service.stop().await.unwrap();

    let raw = std::fs::read(data.path().join("audit").join("audit.sealed")).unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains("sql.adhoc"),
        "the audit log is sealed"
    );
    let entries = crate::harness::audit_entries(data.path());
    let text: String = entries.iter().map(Value::to_string).collect();
    assert!(
        !text.contains("child-audit") && !text.contains(&pseudonym),
        "a raw id or a pseudonym in the audit log:\n{text}"
    );
    let summary: Vec<(String, String, String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["who"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["detail"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("team", "sql.adhoc", "SELECT 42 AS answer".to_owned(), 200),
        ("team", "sql.adhoc", "SELEC nope".to_owned(), 400),
        (
            "team",
            "sql.saved",
            r#"events_per_platform {"hours":"2"}"#.to_owned(),
            200,
        ),
        (
            "team",
            "experiments.results",
            "reward-animation {}".to_owned(),
            200,
        ),
        (
            "dpo",
            "consent.record",
            format!("{reference} analytics grant seq 1"),
            201,
        ),
        (
            "team",
            "sql.adhoc",
            format!("SELECT count(*) AS n FROM events WHERE subject = '{reference}'"),
            200,
        ),
        ("dpo", "consent.read", reference.clone(), 200),
        ("ops", "admin.config", String::new(), 200),
    ];
    let expected: Vec<(String, String, String, u64)> = expected
        .into_iter()
        .map(|(who, action, detail, status)| (who.to_owned(), action.to_owned(), detail, status))
        .collect();
    assert_eq!(summary, expected);
    for entry in &entries {
        assert!(entry["at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(entries[0]["role"], "analyst");
}

/// Sends one HTTP/1.1 request over `stream` and returns the whole answer as text.
async fn raw_get<S>(mut stream: S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A TLS client that trusts `root` (or nothing).
fn tls_client(root: Option<&rcgen::Certificate>) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    if let Some(root) = root {
        roots.add(root.der().clone()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_with_hsts_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    let service = Service::start_with(|c| {
        c.server.tls_cert = Some(cert);
        c.server.tls_key = Some(key);
    })
    .await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connect = || tokio::net::TcpStream::connect(service.addr);

    // A client that trusts the generated certificate gets the API, with HSTS.
    let trusting = tls_client(Some(&generated.cert));
    let tls = trusting
        .connect(name.clone(), connect().await.unwrap())
        .await
        .expect("the TLS handshake");
    let answer = raw_get(tls, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{answer}"
    );
    // Plain HTTP on the TLS port gets no answer.
    let answer = raw_get(connect().await.unwrap(), "/healthz").await;
    assert!(
        !answer.contains("HTTP/1.1 200"),
        "plain HTTP was served: {answer}"
    );
    // A client that does not trust the certificate refuses it.
    let untrusting = tls_client(None);
    assert!(
        untrusting
            .connect(name.clone(), connect().await.unwrap())
            .await
            .is_err()
    );
    // Still serving after both.
    let tls = trusting
        .connect(name, connect().await.unwrap())
        .await
        .unwrap();
    assert!(raw_get(tls, "/readyz").await.starts_with("HTTP/1.1 200"));

    // Without TLS there is no HSTS header.
    let plain = Service::start().await;
    let response = plain.http.get(plain.url("/healthz")).send().await.unwrap();
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_request_exports_everything_held_about_the_child() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    let service = Service::start_config(config.clone()).await;
    let results = ingest(
        &service,
        &[
            (Some("child-exp"), "app_opened"),
            (Some("child-exp"), "$exposure"),
            (Some("child-exp"), "session_started"),
            (Some("child-other"), "app_opened"),
        ],
    )
    .await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    let granted = consent(&service, "child-exp", "analytics", true).await;
    let pseudonym = granted["subject"].as_str().unwrap().to_owned();

    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let body = json!({"type": "access", "subject": "child-exp"});
    let (status, received) = send(
        &service,
        "privacy-key",
        post.clone(),
        "/v1/privacy/requests",
        Some(body),
    )
    .await;
    assert_eq!(status, 202, "{received}");
    assert_eq!(received["subject"], pseudonym.as_str());
    assert!(!received.to_string().contains("child-exp"));
    let id = received["id"].as_str().unwrap().to_owned();
    let received_at =
        flagstream::events::time::parse_rfc3339(received["received_at"].as_str().unwrap()).unwrap();
    let due = flagstream::events::time::parse_rfc3339(received["due"].as_str().unwrap()).unwrap();
    let days = (due - received_at) as f64 / 86_400_000.0;
    assert!(
        (28.0..=31.0).contains(&days),
        "due {days} days after receipt"
    );

    let path = format!("/v1/privacy/requests/{id}");
    let done = until(Duration::from_secs(20), "the request completed", || async {
        let (status, state) = send(&service, "privacy-key", get.clone(), &path, None).await;
        assert_eq!(status, 200);
        assert_ne!(state["status"], "failed", "{state}");
        if state["status"] == "completed" {
            Ok(state)
        } else {
            Err(state)
        }
    })
    .await;
    assert_eq!(done["events"], 3, "{done}");
    let download = done["download"].as_str().unwrap().to_owned();
    assert_eq!(download, format!("{path}/export"));

    let export = |service: &Service| {
        let request = service
            .http
            .get(service.url(&download))
            .header("accept", "application/x-ndjson")
            .bearer_auth("privacy-key");
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["content-type"], "application/x-ndjson");
            response.text().await.unwrap()
        }
    };
    let text = export(&service).await;
    assert!(
        !text.contains("child-exp") && !text.contains("child-other"),
        "{text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "request",
            "event",
            "event",
            "event",
            "assignment",
            "consent"
        ],
        "{text}"
    );
    for event in lines.iter().filter(|l| l["kind"] == "event") {
        assert_eq!(event["event"]["subject"], pseudonym.as_str());
    }
    assert_eq!(lines[4]["flag"], "reward-animation");
    assert_eq!(lines[4]["variant"], "stars");
    assert_eq!(lines[5]["scope"], "analytics");

    // Bad requests get clear errors and record nothing.
    let cases = [
        (json!({"type": "erasure"}), 400),
        (json!({"type": "delete", "subject": "child-exp"}), 400),
        (json!({"type": "access"}), 400),
        (json!({"type": "access", "subject": ""}), 400),
        (
            json!({"type": "access", "subject": "c", "why": "curious"}),
            400,
        ),
        (
            json!({"type": "access", "subject": "x".repeat(20_000)}),
            413,
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = send(
            &service,
            "privacy-key",
            post.clone(),
            "/v1/privacy/requests",
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, expected, "{answer}");
        assert!(answer["error_description"].is_string(), "{answer}");
    }
    let (status, _) = send(
        &service,
        "analyst-key",
        post.clone(),
        "/v1/privacy/requests",
        Some(json!({"type": "access", "subject": "c"})),
    )
    .await;
    assert_eq!(status, 403);
    for unknown in [
        "/v1/privacy/requests/dsr-nope",
        "/v1/privacy/requests/dsr-nope/export",
    ] {
        let (status, _) = send(&service, "privacy-key", get.clone(), unknown, None).await;
        assert_eq!(status, 404, "{unknown}");
    }

    // The request and its export outlive a restart.
    service.stop().await.unwrap();
    let service = Service::start_config(config).await;
    let (status, state) = send(&service, "privacy-key", get, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(state["status"], "completed");
    assert_eq!(export(&service).await, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_encrypted_at_rest_and_keys_rotate_without_losing_data() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    // The query names nothing of the events: the audit log keeps its text.
    let count_sql = "SELECT count(*) AS n FROM events";
    let lessons = |service: &Service, n: usize| {
        let batch: Vec<Value> = (0..n)
            .map(|i| {
                let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                json!({"event_id": format!("enc-{id}"), "user_id": "child-enc", "type": "lesson_completed",
                    "timestamp": format_rfc3339(now_ms()),
                    "properties": {"lesson_id": format!("secret-lesson-{i}"), "score": 1}})
            })
            .collect();
        let request = service
            .http
            .post(service.url("/v1/batch"))
            .bearer_auth("client-key")
            .json(&json!({"batch": batch}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    let service = Service::start_config(config.clone()).await;
    lessons(&service, 20).await;
    assert_eq!(count(&service, count_sql).await, 20);
    service.stop().await.unwrap();
    // Nothing of the events is readable in any file of the data dir.
    for (path, bytes) in files(data.path()) {
        let text = String::from_utf8_lossy(&bytes);
        for clear in ["secret-lesson", "lesson_completed", "child-enc"] {
            assert!(!text.contains(clear), "{path} holds {clear:?} in clear");
        }
    }

    // Rotate: a second key joins the ring; new records use it, old ones still open.
    let key_file = data.path().join("keys").join("data");
    let mut ring = std::fs::read_to_string(&key_file).unwrap();
    let first_key = ring.trim().to_owned();
    ring.push_str(&format!("\n2 {}\n", "5a".repeat(32)));
    std::fs::write(&key_file, &ring).unwrap();
    let service = Service::start_config(config.clone()).await;
    assert_eq!(
        count(&service, count_sql).await,
        20,
        "records of key 1 after the rotation"
    );
    lessons(&service, 5).await;
    assert_eq!(count(&service, count_sql).await, 25);
    service.stop().await.unwrap();
    let service = Service::start_config(config.clone()).await;
    assert_eq!(
        count(&service, count_sql).await,
        25,
        "records of both keys after a restart"
    );
    service.stop().await.unwrap();

    // Dropping the old key while records still need it stops the start, with the reason.
    std::fs::write(&key_file, format!("2 {}\n", "5a".repeat(32))).unwrap();
    let service = Service::start_config(config.clone()).await;
    let err = service
        .stop()
        .await
        .expect_err("records of key 1 cannot be read");
    assert!(err.to_string().contains("data key"), "{err}");
    std::fs::write(&key_file, format!("{first_key}\n2 {}\n", "5a".repeat(32))).unwrap();
    let service = Service::start_config(config).await;
    assert_eq!(count(&service, count_sql).await, 25);
}

/// Sends one HTTP/1.1 POST of `body` to `path` over a fresh connection and returns the
/// client's own port (to look for in the logs) and the answer.
async fn post_raw(addr: std::net::SocketAddr, path: &str, body: &Value) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let port = stream.local_addr().unwrap().port();
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    (port, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_id_or_client_address_reaches_the_logs_redis_or_the_data_dir() {
    const RAW: &str = "child-logcheck-7";
    let redis = crate::harness::Redis::start();
    let data = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", redis.socket().display());
    let process = crate::harness::Process::spawn(
        data.path(),
        &[
            ("FLAGSTREAM_REDIS_URL", url.as_str()),
            ("FLAGSTREAM_TELEMETRY__LOG_FILTER", "debug"),
        ],
    );
    let at = format_rfc3339(now_ms());
    let batch = json!({"batch": [
        {"event_id": "log-1", "user_id": RAW, "type": "app_opened", "timestamp": at},
        {"event_id": "log-2", "user_id": RAW, "type": "lesson_completed", "timestamp": at,
         "properties": {"lesson_id": "l-1", "score": 1}},
        {"event_id": "log-3", "user_id": RAW, "type": "no_such_type", "timestamp": at},
        {"event_id": "log-4", "user_id": RAW, "type": "lesson_completed", "timestamp": "garbage"}
    ]});
    let mut ports = Vec::new();
    let (port, answer) = post_raw(process.addr, "/v1/batch", &batch).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    ports.push(port);
    let context = json!({"context": {"targetingKey": RAW}});
    let (port, answer) = post_raw(
        process.addr,
        "/ofrep/v1/evaluate/flags/reward-animation",
        &context,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    ports.push(port);
    let decision = json!({"subject": RAW, "scope": "analytics", "granted": true, "guardian_id": "guardian-logcheck"});
    let (port, answer) = post_raw(process.addr, "/v1/consent", &decision).await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    ports.push(port);
    let (port, answer) = post_raw(process.addr, "/v1/batch", &json!({"batch": "nope"})).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    ports.push(port);

    // Wait until the pipeline has written the child's counters to Redis.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis_conn = client.get_connection().unwrap();
    let keys = until(Duration::from_secs(20), "counters in Redis", || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("fs:*")
            .query(&mut redis_conn)
            .unwrap();
        let found = keys.iter().any(|k| k.contains(":s:lesson_completed"));
        std::future::ready(if found {
            Ok(keys)
        } else {
            Err(format!("{keys:?}"))
        })
    })
    .await;
    for key in &keys {
        assert!(!key.contains(RAW), "a Redis key names the child: {key}");
        let dump: Vec<u8> = redis::cmd("DUMP").arg(key).query(&mut redis_conn).unwrap();
        assert!(
            !String::from_utf8_lossy(&dump).contains(RAW),
            "Redis value of {key} holds the raw id"
        );
    }
    let logs = process.logs();
    assert!(logs.len() > 3, "the logs were not captured: {logs:?}");
    for line in &logs {
        assert!(
            !line.contains(RAW) && !line.contains("guardian-logcheck"),
            "a log line holds a raw id: {line}"
        );
        for port in &ports {
            assert!(
                !line.contains(&format!(":{port}")),
                "a log line holds a client address: {line}"
            );
        }
    }
    drop(process);
    for (path, bytes) in files(data.path()) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(RAW), "{path} holds the raw id");
    }
    // Inside the seals too: the log's events, the ledger, the audit log.
    let opened = crate::harness::opened_records(data.path());
    assert!(
        opened.contains("lesson_completed"),
        "the sealed records were read"
    );
    assert!(
        !opened.contains(RAW) && !opened.contains("guardian-logcheck"),
        "a sealed record holds a raw id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_export_is_gone_and_deleted() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    config.privacy.export_retention = Duration::from_millis(1);
    let service = Service::start_config(config).await;
    ingest(&service, &[(Some("child-expiry"), "app_opened")]).await;
    let body = json!({"type": "access", "subject": "child-expiry"});
    let (status, received) = send(
        &service,
        "privacy-key",
        reqwest::Method::POST,
        "/v1/privacy/requests",
        Some(body),
    )
    .await;
    assert_eq!(status, 202);
    let id = received["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/privacy/requests/{id}");
    // Completed, and past its 1 ms retention: the answer may come within that millisecond.
    let done = until(
        Duration::from_secs(20),
        "completed and not offered",
        || async {
            let (_, state) = send(&service, "privacy-key", reqwest::Method::GET, &path, None).await;
            if state["status"] == "completed" && state.get("download").is_none() {
                Ok(state)
            } else {
                Err(state)
            }
        },
    )
    .await;
    assert!(done["export_expires_at"].is_string(), "{done}");
    let (status, answer) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        &format!("{path}/export"),
        None,
    )
    .await;
    assert_eq!(status, 410, "{answer}");
    assert_eq!(answer["error"], "gone");
    // The upkeep deletes the file.
    let file = data
        .path()
        .join("privacy")
        .join("exports")
        .join(format!("{id}.sealed"));
    let deleted = || async { !file.exists() };
    eventually_every(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the expired export was deleted from disk",
        deleted,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_required_per_project() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    config.auth.tokens.push(flagstream::config::TokenConfig {
        name: "reading-app".into(),
        role: flagstream::config::Role::Client,
        sha256: flagstream::config::TokenHash::of("reading-app-key"),
        scope: None,
        project: Some("reading-app".into()),
    });
    config.privacy.consent_required_projects = vec!["reading-app".into()];
    let service = Service::start_config(config).await;
    let post = |key: &'static str, user: &'static str| {
        let service = &service;
        async move {
            let event = json!({"event_id": format!("{key}-{user}"), "type": "app_opened",
                "user_id": user, "timestamp": format_rfc3339(now_ms())});
            let (status, answer) = send(
                service,
                key,
                reqwest::Method::POST,
                "/v1/batch",
                Some(json!({"batch": [event]})),
            )
            .await;
            assert_eq!(status, 200, "{answer}");
            (
                answer["results"][0]["status"].as_str().unwrap().to_owned(),
                answer["results"][0]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
    // The reading app's project requires consent; the default project (client-key) does not.
    assert_eq!(post("reading-app-key", "child-p1").await, no_consent());
    assert_eq!(post("client-key", "child-p1").await, ok());
    consent(&service, "child-p1", "analytics", true).await;
    assert_eq!(post("reading-app-key", "child-p1").await, ok());

    // Server-side exposures follow the same policy.
    let exposures = |outcome: &str| {
        let service = &service;
        let line = format!("flagstream_exposures_total{{outcome=\"{outcome}\"}}");
        async move {
            let metrics = service.get_text("/metrics").await;
            metrics
                .lines()
                .find(|l| l.starts_with(&line))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    let before = exposures("no_consent").await;
    for key in ["reading-app-key", "client-key"] {
        let (status, answer) = send(
            &service,
            key,
            reqwest::Method::POST,
            "/ofrep/v1/evaluate/flags/reward-animation",
            Some(json!({"context": {"targetingKey": "child-p2"}})),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(
        exposures("no_consent").await,
        before + 1.0,
        "only the reading app's"
    );
}

/// The data key versions of the sealed records of the write-ahead log under `data`.
fn sealed_versions(data: &Path) -> std::collections::BTreeSet<u32> {
    use flagstream::wal::frame::{Format, Scan, scan};
    let mut versions = std::collections::BTreeSet::new();
    for path in flagstream::wal::segments(&data.join("wal")).unwrap() {
        let bytes = std::fs::read(path).unwrap();
        let mut at = 0;
        while let Scan::Frame {
            format,
            payload,
            next,
        } = scan(&bytes, at)
        {
            if format == Format::Sealed {
                versions.insert(u32::from_le_bytes(payload[..4].try_into().unwrap()));
            }
            at = next;
        }
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_key_added_to_the_file_is_used_without_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    config.privacy.key_reload_interval = Duration::from_millis(100);
    config.sql.memory_window = Duration::from_millis(200);
    let service = Service::start_config(config.clone()).await;
    let results = ingest(&service, &[(Some("child-rot"), "app_opened"); 5]).await;
    assert!(results.iter().all(|r| r.0 == "ok"));
    assert_eq!(sealed_versions(data.path()), [1].into());
    async fn gauge(service: &Service) -> Option<f64> {
        service
            .get_text("/metrics")
            .await
            .lines()
            .find(|l| l.starts_with("flagstream_data_key_version "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    }
    assert_eq!(gauge(&service).await, Some(1.0));

    // Rotation while serving: version 2 joins the file.
    let key_file = data.path().join("keys").join("data");
    let first = std::fs::read_to_string(&key_file).unwrap();
    std::fs::write(
        &key_file,
        format!("{}\n2 {}\n", first.trim(), "6b".repeat(32)),
    )
    .unwrap();
    eventually_every(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "the new key was never taken",
        || async { gauge(&service).await == Some(2.0) },
    )
    .await;
    let results = ingest(&service, &[(Some("child-rot"), "app_opened"); 5]).await;
    assert!(results.iter().all(|r| r.0 == "ok"));
    assert_eq!(
        sealed_versions(data.path()),
        [1, 2].into(),
        "new records use key 2"
    );
    // Segments rolled from now on use it too, and everything reads.
    let segment_of_2 = || {
        std::fs::read_dir(data.path().join("sql"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with("_k2.parquet"))
            })
            .unwrap_or(false)
    };
    eventually_every(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "no segment sealed with key 2",
        || async { segment_of_2() },
    )
    .await;
    assert_eq!(
        count(&service, "SELECT count(*) AS n FROM events").await,
        10
    );

    // A file that changes a known key is refused; the keys in force stay.
    std::fs::write(
        &key_file,
        format!("1 {}\n2 {}\n", "00".repeat(32), "6b".repeat(32)),
    )
    .unwrap();
    let refused = "flagstream_data_key_reloads_total{outcome=\"refused\"}";
    eventually_every(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "a changed key was not refused",
        || async { service.get_text("/metrics").await.contains(refused) },
    )
    .await;
    let results = ingest(&service, &[(Some("child-rot"), "app_opened")]).await;
    assert!(results.iter().all(|r| r.0 == "ok"));
    assert_eq!(
        count(&service, "SELECT count(*) AS n FROM events").await,
        11
    );
    service.stop().await.unwrap();
    std::fs::write(
        &key_file,
        format!("{}\n2 {}\n", first.trim(), "6b".repeat(32)),
    )
    .unwrap();
    let service = Service::start_config(config).await;
    assert_eq!(
        count(&service, "SELECT count(*) AS n FROM events").await,
        11
    );
}
