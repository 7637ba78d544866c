//! Flag endpoints against the real server: OFREP single and bulk, `/v1/config`, ETags, auth,
//! bad input, and hot reload of the flag directory.

use std::path::Path;
use std::time::Duration;

use flagstream::config::TokenConfig;
use serde_json::{Value, json};

use crate::harness::wait::{eventually, eventually_every, until};
use crate::harness::{Service, client_and_analyst_tokens};

const FLAGS: &str = r#"{
  "flags": {
    "pacing": {
      "state": "ENABLED",
      "variants": {"slow": 0.5, "fast": 1.0},
      "defaultVariant": "fast",
      "targeting": {"if": [{"sem_ver": [{"var": "app_version"}, ">=", "3.2.0"]}, "slow", null]}
    },
    "reward": {
      "state": "ENABLED",
      "variants": {"stars": "stars", "confetti": "confetti"},
      "defaultVariant": "stars",
      "metadata": {"experiment": true, "control": "stars", "goals": "lesson_completed"},
      "targeting": {"fractional": [["stars", 50], ["confetti", 50]]}
    },
    "off": {"state": "DISABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}
  }
}"#;

fn write_flags(dir: &Path, name: &str, text: &str) {
    // Write then rename, as an editor or a deploy would, so the watcher never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn start(flags: &str, tokens: Vec<TokenConfig>) -> (Service, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_flags(dir.path(), "app.json", flags);
    let path = dir.path().to_path_buf();
    let service = Service::start_with(move |config| {
        config.flags.dir = path;
        config.flags.reload_interval = Duration::from_millis(50);
        config.flags.max_request_body = flagstream::config::ByteSize::kib(2);
        config.auth.tokens = tokens;
    })
    .await;
    (service, dir)
}

async fn ofrep(service: &Service, key: &str, body: Value) -> (u16, Value) {
    service
        .post_json(&format!("/ofrep/v1/evaluate/flags/{key}"), &body)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ofrep_single_answers_value_variant_reason_and_keeps_floats_floats() {
    let (service, _dir) = start(FLAGS, vec![]).await;
    let (status, body) = ofrep(
        &service,
        "pacing",
        json!({"context": {"app_version": "3.1.9"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reason"], "DEFAULT");
    assert_eq!(body["variant"], "fast");
    // 1.0 stays a float on the wire.
    let raw = service
        .http
        .post(service.url("/ofrep/v1/evaluate/flags/pacing"))
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.contains("\"value\":1.0"), "{raw}");

    let (_, body) = ofrep(
        &service,
        "pacing",
        json!({"context": {"app_version": "3.2.0"}}),
    )
    .await;
    assert_eq!(
        (body["reason"].as_str(), body["value"].as_f64()),
        (Some("TARGETING_MATCH"), Some(0.5))
    );

    let (status, body) = ofrep(&service, "off", json!({"context": {}})).await;
    assert_eq!(status, 200);
    assert_eq!(body["reason"], "DISABLED");
    assert!(
        body.get("value").is_none(),
        "disabled flags defer to the code default: {body}"
    );

    let (status, body) = ofrep(&service, "nope", json!({"context": {}})).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"key": "nope", "errorCode": "FLAG_NOT_FOUND", "errorDetails": "flag \"nope\" was not found"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_child_always_gets_the_same_variant() {
    let (service, _dir) = start(FLAGS, vec![]).await;
    let mut seen = std::collections::BTreeMap::new();
    for child in 0..200 {
        let context = json!({"context": {"targetingKey": format!("child-{child}")}});
        let (_, first) = ofrep(&service, "reward", context.clone()).await;
        let (_, again) = ofrep(&service, "reward", context).await;
        assert_eq!(first["variant"], again["variant"]);
        *seen
            .entry(first["variant"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both variants get children: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_evaluation_has_etags_that_follow_flags_and_context() {
    let (service, dir) = start(FLAGS, vec![]).await;
    let bulk = |context: Value, etag: Option<String>| {
        let mut request = service
            .http
            .post(service.url("/ofrep/v1/evaluate/flags"))
            .json(&json!({ "context": context }));
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        request.send()
    };
    let response = bulk(json!({"targetingKey": "child-1"}), None)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let keys: Vec<&str> = body["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["off", "pacing", "reward"]);

    let response = bulk(json!({"targetingKey": "child-1"}), Some(etag.clone()))
        .await
        .unwrap();
    assert_eq!(response.status(), 304);
    let response = bulk(json!({"targetingKey": "child-2"}), Some(etag.clone()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "another context is another answer");

    write_flags(
        dir.path(),
        "app.json",
        &FLAGS.replace(
            "\"defaultVariant\": \"fast\"",
            "\"defaultVariant\": \"slow\"",
        ),
    );
    let changed = || async {
        let answer = bulk(json!({"targetingKey": "child-1"}), Some(etag.clone())).await;
        answer.unwrap().status() == 200
    };
    eventually(
        Duration::from_secs(10),
        "the ETag changed after a flag change",
        changed,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_config_serves_every_value_with_caching_headers() {
    let (service, _dir) = start(FLAGS, client_and_analyst_tokens()).await;
    let response = service
        .http
        .get(service.url("/v1/config?targetingKey=child-9&app_version=3.4.1"))
        .bearer_auth("client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "private, max-age=60");
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["flags"]["pacing"], json!(0.5));
    assert!(
        body["flags"].get("off").is_none(),
        "disabled flags are left to the app's default"
    );
    assert!(body["variants"]["reward"].is_string());

    let again = service
        .http
        .get(service.url("/v1/config?targetingKey=child-9&app_version=3.4.1"))
        .header("X-API-Key", "client-key")
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    let posted: Value = service
        .http
        .post(service.url("/v1/config"))
        .bearer_auth("client-key")
        .json(&json!({"context": {"targetingKey": "child-9", "app_version": "3.4.1"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(posted, body, "GET and POST agree for the same context");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_endpoints_refuse_missing_wrong_and_unauthorized_keys() {
    let (service, _dir) = start(FLAGS, client_and_analyst_tokens()).await;
    let cases = [
        (None, 401),
        (Some("guess"), 401),
        (Some("analyst-key"), 403),
        (Some("client-key"), 200),
    ];
    for (token, expected) in cases {
        let mut ofrep = service
            .http
            .post(service.url("/ofrep/v1/evaluate/flags/pacing"))
            .json(&json!({"context": {}}));
        let mut config = service.http.get(service.url("/v1/config"));
        if let Some(token) = token {
            ofrep = ofrep.bearer_auth(token);
            config = config.bearer_auth(token);
        }
        let response = ofrep.send().await.unwrap();
        assert_eq!(response.status(), expected, "ofrep with {token:?}");
        let body: Value = response.json().await.unwrap();
        if expected != 200 {
            assert!(
                body["errorDetails"].is_string(),
                "OFREP error shape: {body}"
            );
        }
        let response = config.send().await.unwrap();
        assert_eq!(response.status(), expected, "config with {token:?}");
        if expected != 200 {
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].is_string(), "JSON error body: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hostile_and_oversized_contexts_get_clear_errors() {
    let (service, _dir) = start(FLAGS, vec![]).await;
    let post = |path: &str, body: Vec<u8>| {
        service
            .http
            .post(service.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let nested = format!(
        "{{\"context\": {{\"a\": {}1{}}}}}",
        "[".repeat(500),
        "]".repeat(500)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"context\": ".to_vec(), 400, "INVALID_CONTEXT"),
        (b"\"just a string\"".to_vec(), 400, "INVALID_CONTEXT"),
        (b"{\"context\": [1, 2]}".to_vec(), 400, "INVALID_CONTEXT"),
        (
            b"{\"context\": {\"targetingKey\": 42}}".to_vec(),
            400,
            "INVALID_CONTEXT",
        ),
        (nested.into_bytes(), 400, "INVALID_CONTEXT"),
        (vec![0xff, 0xfe, 0x00], 400, "INVALID_CONTEXT"),
    ];
    for (body, status, code) in cases {
        for path in [
            "/ofrep/v1/evaluate/flags/pacing",
            "/ofrep/v1/evaluate/flags",
        ] {
            let response = post(path, body.clone()).await.unwrap();
            assert_eq!(
                response.status(),
                status,
                "{path} {:?}",
                String::from_utf8_lossy(&body)
            );
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["errorCode"], code, "{answer}");
            assert!(answer["errorDetails"].is_string());
        }
    }
    let huge = format!("{{\"context\": {{\"pad\": \"{}\"}}}}", "x".repeat(10_000));
    let response = post("/ofrep/v1/evaluate/flags", huge.clone().into_bytes())
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(response.json::<Value>().await.unwrap()["errorDetails"].is_string());
    let response = post("/v1/config", huge.into_bytes()).await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );
    // The service is still fine.
    let (status, _) = ofrep(&service, "pacing", json!({"context": {}})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_applies_changes_and_rejects_broken_files_while_serving_the_last_good_flags() {
    let (service, dir) = start(FLAGS, vec![]).await;
    let value_of = |key: &'static str| {
        let service = &service;
        async move {
            ofrep(service, key, json!({"context": {"app_version": "1.0.0"}}))
                .await
                .1["value"]
                .clone()
        }
    };
    assert_eq!(value_of("pacing").await, json!(1.0));

    // A good change is live within a second or so.
    write_flags(
        dir.path(),
        "app.json",
        &FLAGS.replace("\"fast\": 1.0", "\"fast\": 2.0"),
    );
    eventually_every(
        Duration::from_secs(10),
        Duration::from_millis(25),
        "the change was not applied",
        || async { value_of("pacing").await == json!(2.0) },
    )
    .await;

    // A broken file is rejected: the last good flags keep serving and the problem is visible.
    write_flags(dir.path(), "app.json", "{ \"flags\": { \"pacing\": ");
    until(
        Duration::from_secs(10),
        "the broken file reported",
        || async {
            let metrics = service.get_text("/metrics").await;
            let (_, ready) = service.get_json("/readyz").await;
            let detail = ready["checks"]["flags"]["detail"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if detail.contains("problem") && metrics.contains("flagstream_flag_problems 1") {
                Ok(())
            } else {
                Err(detail)
            }
        },
    )
    .await;
    assert_eq!(
        value_of("pacing").await,
        json!(2.0),
        "the last good snapshot keeps serving"
    );
    assert_eq!(service.get_json("/readyz").await.0, 200);

    // A new file adds flags; deleting it removes them.
    write_flags(
        dir.path(),
        "extra.yaml",
        "flags:\n  kill-switch:\n    state: ENABLED\n    variants:\n      enabled: true\n      disabled: false\n    defaultVariant: disabled\n",
    );
    eventually_every(
        Duration::from_secs(10),
        Duration::from_millis(25),
        "the YAML file was not loaded",
        || async { value_of("kill-switch").await == json!(false) },
    )
    .await;
}

/// Hostile app-launch requests: each gets a clear 4xx with the JSON error body, or, where the
/// input is a legal context, an answer; never a 5xx, and the service goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_config_requests_get_clear_answers() {
    let service = Service::start().await;
    let get = |query: String| {
        let request = service.http.get(service.url(&format!("/v1/config{query}")));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // Two values for one attribute: which one the flags saw would be a guess.
    let (status, answer) = get("?targetingKey=child-1&targetingKey=child-2".into()).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_request");
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("targetingKey")
    );
    // Legal contexts, however odd: every query parameter is a context attribute.
    for query in [
        "?targetingKey=child-1&unknown=1".to_owned(),
        "?targetingKey=%ZZ".to_owned(),
        "?targetingKey=child-1&school_id=%00%01%1b".to_owned(),
        format!("?targetingKey={}", "k".repeat(8_000)),
        "?app_version=not-a-version&targetingKey=child-1".to_owned(),
    ] {
        let (status, answer) = get(query.clone()).await;
        assert_eq!(status, 200, "{query}: {answer}");
        assert!(answer["flags"].is_object(), "{query}: {answer}");
    }
    let post = |body: Vec<u8>| {
        let request = service
            .http
            .post(service.url("/v1/config"))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let deep = format!("{{\"context\": {}{}}}", "[".repeat(500), "]".repeat(500));
    for (body, status, says) in [
        (b"not json".to_vec(), 400, "not valid JSON"),
        (
            br#"{"context": {"targetingKey": 5}}"#.to_vec(),
            400,
            "targetingKey must be a string",
        ),
        (
            br#"{"context": [1, 2]}"#.to_vec(),
            400,
            "context must be a JSON object",
        ),
        (deep.into_bytes(), 400, "not valid JSON"),
        (vec![0xff, 0xfe, 0x00], 400, "not valid JSON"),
    ] {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let (got, answer) = post(body).await;
        assert_eq!(got, status, "{shown}: {answer}");
        assert_eq!(answer["error"], "invalid_request", "{shown}: {answer}");
        let description = answer["error_description"].as_str().unwrap();
        assert!(description.contains(says), "{shown}: {description}");
    }
    assert_eq!(service.get_json("/healthz").await.0, 200);
}
