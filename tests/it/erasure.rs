//! Erasure end to end: a family's request hides the child at once, then removes its events
//! from the write-ahead log, the SQL window and segments, the experiment assignments, the
//! request journal and earlier exports — and keeps old events of the child from coming back,
//! across a restart.

use std::time::Duration;

use flagstream::counters::subject_hash;
use flagstream::events::time::{format_rfc3339, parse_rfc3339};
use serde_json::{Value, json};

use crate::harness::client::{count, files, post_batch, send};
use crate::harness::wait::{eventually, eventually_every, now_ms, until};
use crate::harness::{Redis, Service, role_tokens, stored_events, test_config};

const ERASED: &str = "child-erased-4471";
const KEPT: &str = "child-kept-5582";

/// Sends one event per (user, type, time) and returns each one's status and reason.
async fn post(service: &Service, events: &[(&str, &str, i64)]) -> Vec<(String, String)> {
    let batch: Vec<Value> = events
        .iter()
        .map(|(user, kind, at)| {
            let properties = match *kind {
                "$exposure" => json!({"flag": "reward-animation", "variant": "stars"}),
                "lesson_completed" => json!({"lesson_id": "lesson-14", "duration_ms": 61_000}),
                _ => json!({}),
            };
            json!({"event_id": uuid::Uuid::new_v4().to_string(), "type": kind, "user_id": user,
                "timestamp": format_rfc3339(*at), "properties": properties})
        })
        .collect();
    post_batch(service, batch).await
}

fn session(user: &'static str, at: i64) -> Vec<(&'static str, &'static str, i64)> {
    vec![
        (user, "app_opened", at),
        (user, "$exposure", at + 1),
        (user, "lesson_completed", at + 2),
    ]
}

async fn request(service: &Service, kind: &str, subject: &str) -> Value {
    let (status, received) = send(
        service,
        "privacy-key",
        reqwest::Method::POST,
        "/v1/privacy/requests",
        Some(json!({"type": kind, "subject": subject})),
    )
    .await;
    assert_eq!(status, 202, "{received}");
    received
}

async fn completed(service: &Service, id: &str) -> Value {
    let path = format!("/v1/privacy/requests/{id}");
    until(Duration::from_secs(30), "completed", || async {
        let (status, state) = send(service, "privacy-key", reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{state}");
        assert_ne!(state["status"], "failed", "{state}");
        if state["status"] == "completed" {
            Ok(state)
        } else {
            Err(state)
        }
    })
    .await
}

/// Every file under `dir` that can be read now (files come and go while the service runs).
fn readable_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(readable_files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out
}

/// Waits until some file under `dir` satisfies `found`.
async fn wait_for_file(dir: &std::path::Path, what: &str, found: impl Fn(&str, &[u8]) -> bool) {
    let written = || async {
        readable_files(dir)
            .iter()
            .any(|(name, bytes)| found(name, bytes))
    };
    eventually(
        Duration::from_secs(30),
        &format!("written: {what}"),
        written,
    )
    .await;
}

fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn erased() -> (String, String) {
    ("rejected".into(), "erased".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_removes_the_child_everywhere_and_keeps_its_old_events_out() {
    let redis = Redis::start();
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    // A durable counter store: the pipeline keeps assignment logs on disk.
    config.counters.redis_url = Some(redis.url());
    // Rolls into encrypted Parquet segments quickly.
    config.sql.memory_window = Duration::from_millis(200);
    let service = Service::start_config(config.clone()).await;

    // A week-old sync from a tablet, rolled into a segment; then a live session in memory.
    let week_ago = now_ms() - 7 * 86_400_000;
    let mut old = session(ERASED, week_ago);
    old.extend(session(KEPT, week_ago));
    let results = post(&service, &old).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    wait_for_file(&data.path().join("sql"), "a segment", |name, _| {
        name.ends_with(".parquet")
    })
    .await;
    let mut live = session(ERASED, now_ms() - 60_000);
    live.extend(session(KEPT, now_ms() - 60_000));
    let results = post(&service, &live).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");

    // An earlier access request of the family, with its export.
    let access = request(&service, "access", ERASED).await;
    let pseudonym = access["subject"].as_str().unwrap().to_owned();
    let access_id = access["id"].as_str().unwrap().to_owned();
    assert_eq!(completed(&service, &access_id).await["events"], 6);
    let hash = format!("{:016x}", subject_hash(&pseudonym));
    wait_for_file(
        &data.path().join("pipeline"),
        "the assignment",
        |name, bytes| name.contains("assignments-") && contains(bytes, &hash),
    )
    .await;
    let by_subject = format!("SELECT count(*) AS n FROM events WHERE subject = '{pseudonym}'");
    assert_eq!(count(&service, &by_subject).await, 6, "before: all there");

    // The erasure: hidden at once, before it is carried out.
    let erasure = request(&service, "erasure", ERASED).await;
    let reference = erasure["subject"].as_str().unwrap().to_owned();
    assert!(reference.starts_with("r_"), "{erasure}");
    assert!(!erasure.to_string().contains(&pseudonym), "{erasure}");
    let received_at = parse_rfc3339(erasure["received_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        post(&service, &[(ERASED, "app_opened", now_ms())]).await,
        [erased()],
        "pending: nothing of the child is taken in"
    );
    let id = erasure["id"].as_str().unwrap().to_owned();
    let done = completed(&service, &id).await;
    assert_eq!(done["events"], 6, "{done}");

    // Gone from the SQL window and segments; the other child is all there.
    assert_eq!(count(&service, &by_subject).await, 0);
    assert_eq!(count(&service, "SELECT count(*) AS n FROM events").await, 6);
    assert_eq!(
        count(
            &service,
            "SELECT count(*) AS n FROM exposures WHERE variant = 'stars'"
        )
        .await,
        2,
        "the kept child's exposures (client and its server-side twin are one each per session)"
    );
    // Gone from the write-ahead log (read with the data key).
    let stored = stored_events(data.path());
    assert_eq!(stored.len(), 6);
    assert!(stored.iter().all(|e| e["subject"] != pseudonym.as_str()));
    // Nothing of the child left in any file: assignment logs, requests journal, exports,
    // audit log, checkpoints, segments (encrypted anyway), the log (encrypted anyway).
    for (name, bytes) in files(data.path()) {
        for needle in [ERASED, pseudonym.as_str(), hash.as_str()] {
            assert!(!contains(&bytes, needle), "{needle} is still in {name}");
        }
    }
    // Nor inside the seals: the log's events, the ledger and journal records, the audit log
    // and the exports, opened with the data keys.
    let opened = crate::harness::opened_records(data.path());
    assert!(!opened.is_empty(), "the sealed records were read");
    for needle in [ERASED, pseudonym.as_str(), hash.as_str()] {
        assert!(
            !opened.contains(needle),
            "{needle} is still in a sealed record"
        );
    }
    // The assignment logs are still there, with the other child.
    wait_for_file(
        &data.path().join("pipeline"),
        "the kept assignment",
        |name, bytes| name.contains("assignments-") && !bytes.is_empty(),
    )
    .await;
    // The earlier export went with the data.
    let (status, view) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        &format!("/v1/privacy/requests/{access_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(view.get("download").is_none(), "{view}");
    let (status, answer) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        &format!("/v1/privacy/requests/{access_id}/export"),
        None,
    )
    .await;
    assert_eq!(status, 410, "{answer}");

    // After a restart: still gone, and a late sync of old events stays out; new events of the
    // child (after the request) are its new data.
    service.stop().await.unwrap();
    let service = Service::start_config(config).await;
    assert_eq!(count(&service, &by_subject).await, 0);
    let (_, state) = send(
        &service,
        "privacy-key",
        reqwest::Method::GET,
        &format!("/v1/privacy/requests/{id}"),
        None,
    )
    .await;
    assert_eq!(state["status"], "completed");
    let results = post(
        &service,
        &[
            (ERASED, "app_opened", week_ago + 10),
            (ERASED, "lesson_completed", received_at - 1),
            (ERASED, "app_opened", received_at + 1_000),
            (KEPT, "app_opened", week_ago + 10),
        ],
    )
    .await;
    let ok = ("ok".to_owned(), String::new());
    assert_eq!(results, [erased(), erased(), ok.clone(), ok]);
    assert_eq!(count(&service, &by_subject).await, 1);

    // Erasure requests are checked like access ones.
    for body in [
        json!({"type": "erasure"}),
        json!({"type": "erasure", "subject": ""}),
        json!({"type": "erasure", "subject": "c", "also": "this"}),
    ] {
        let (status, answer) = send(
            &service,
            "privacy-key",
            reqwest::Method::POST,
            "/v1/privacy/requests",
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{answer}");
    }
    let (status, _) = send(
        &service,
        "analyst-key",
        reqwest::Method::POST,
        "/v1/privacy/requests",
        Some(json!({"type": "erasure", "subject": KEPT})),
    )
    .await;
    assert_eq!(status, 403);
}

fn wal_segments(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("wal"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .count()
}

fn assignment_lines(data: &std::path::Path) -> usize {
    readable_files(&data.join("pipeline"))
        .iter()
        .filter(|(name, _)| name.contains("assignments-"))
        .map(|(_, bytes)| bytes.iter().filter(|b| **b == b'\n').count())
        .sum()
}

fn retention_config(data: &std::path::Path) -> flagstream::config::Config {
    let mut config = test_config(data);
    config.auth.tokens = role_tokens();
    config.sql.retention = Duration::from_secs(3);
    config.sql.memory_window = Duration::from_secs(1);
    config.privacy.exposure_retention = Duration::from_secs(3);
    config.privacy.consent_retention = Duration::from_secs(3);
    config.privacy.retention_check = Duration::from_millis(200);
    config.ingest.wal_segment_size = flagstream::config::ByteSize::mib(1);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_each_kind_of_data_on_its_own_clock_and_says_so() {
    // The embedded counter store: the pipeline never checkpoints (it replays the log at
    // start), so only retention deletes log segments.
    let data = tempfile::tempdir().unwrap();
    let service = Service::start_config(retention_config(data.path())).await;

    // The policy is public, in words, and follows the configuration.
    let response = service
        .http
        .get(service.url("/v1/privacy/retention-policy"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let policy: Value = response.json().await.unwrap();
    assert_eq!(policy["kinds"][0]["data"], "raw_events");
    assert_eq!(policy["kinds"][0]["kept_for"], "3 seconds");
    assert_eq!(policy["kinds"][5]["data"], "consent_records");
    assert_eq!(policy["enforced_every_seconds"], 1);

    let decide = |user: &'static str, granted: bool| {
        let service = &service;
        async move {
            let body = json!({"subject": user, "scope": "analytics", "granted": granted,
                "guardian_id": "guardian-1"});
            let (status, answer) = send(
                service,
                "privacy-key",
                reqwest::Method::POST,
                "/v1/consent",
                Some(body),
            )
            .await;
            assert_eq!(status, 201, "{answer}");
        }
    };
    decide("child-lapsed", true).await;
    decide("child-lapsed", false).await;
    decide("child-granted", true).await;
    let history = |user: &'static str| {
        let service = &service;
        async move {
            let (_, answer) = send(
                service,
                "privacy-key",
                reqwest::Method::GET,
                &format!("/v1/consent/{user}"),
                None,
            )
            .await;
            answer["history"].as_array().unwrap().len()
        }
    };
    assert_eq!(history("child-lapsed").await, 2);

    // More than a log segment (1 MiB) of events.
    let at = now_ms();
    for _ in 0..4 {
        let events: Vec<(&str, &str, i64)> = (0..1_500)
            .map(|i| match i % 2 {
                0 => ("child-reading", "lesson_completed", at + i),
                _ => ("child-other", "app_opened", at + i),
            })
            .collect();
        let results = post(&service, &events).await;
        assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    }
    assert!(wal_segments(data.path()) >= 2, "the log rotated");
    eventually_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "old log segments deleted",
        || async { wal_segments(data.path()) == 1 },
    )
    .await;
    eventually_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "lapsed consent records deleted",
        || async { history("child-lapsed").await == 0 },
    )
    .await;
    assert_eq!(history("child-granted").await, 1, "a grant in force stays");
    let metrics = service.get_text("/metrics").await;
    for data in ["raw_events", "consent_records"] {
        let line = format!("flagstream_retention_deleted_total{{data=\"{data}\"}}");
        assert!(metrics.contains(&line), "{line}");
    }
    // What the log still holds reads after a restart, and ingest goes on.
    service.stop().await.unwrap();
    let service = Service::start_config(retention_config(data.path())).await;
    let results = post(&service, &[("child-other", "app_opened", now_ms())]).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    service.stop().await.unwrap();

    // Redis: the pipeline keeps assignment logs, and retention empties them.
    let redis = Redis::start();
    let data = tempfile::tempdir().unwrap();
    let mut config = retention_config(data.path());
    config.counters.redis_url = Some(redis.url());
    let service = Service::start_config(config).await;
    let exposures: Vec<(&str, &str, i64)> = (0..3)
        .map(|i| ("child-exposed", "$exposure", now_ms() + i))
        .collect();
    let results = post(&service, &exposures).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");
    // Written, then deleted (the counter moves only when lines were deleted).
    eventually_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the assignment deleted",
        || async {
            let metrics = service.get_text("/metrics").await;
            metrics.contains("flagstream_retention_deleted_total{data=\"exposures\"} 1")
                && assignment_lines(data.path()) == 0
        },
    )
    .await;
}
