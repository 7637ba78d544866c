//! Requests a test sends as the app, the analyst or the privacy officer would.

use std::path::Path;

use serde_json::{Value, json};

use super::Service;

/// Sends `body` (JSON) to `path` with `token` as a bearer token; returns the status and the
/// JSON answer (`null` when it is not JSON).
pub async fn send(
    service: &Service,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = service
        .http
        .request(method, service.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Posts a batch with the client key; returns each event's status and reason.
pub async fn post_batch(service: &Service, batch: Vec<Value>) -> Vec<(String, String)> {
    let (status, answer) = send(
        service,
        "client-key",
        reqwest::Method::POST,
        "/v1/batch",
        Some(json!({"batch": batch})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Runs `sql` as the analyst; returns the `n` column of its first row.
pub async fn count(service: &Service, sql: &str) -> i64 {
    let (status, answer) = send(
        service,
        "analyst-key",
        reqwest::Method::POST,
        "/v1/sql",
        Some(json!({"sql": sql})),
    )
    .await;
    assert_eq!(status, 200, "{sql}: {answer}");
    answer["rows"][0]["n"]
        .as_i64()
        .unwrap_or_else(|| panic!("{answer}"))
}

/// Every file under `dir`, as bytes.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}
