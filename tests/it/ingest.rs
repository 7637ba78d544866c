//! Event intake against the real server: per-event results, dedup, encodings, every limit,
//! pseudonymization on disk, offline batches, exposures, and `kill -9` crash recovery.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use flagstream::events::time::format_rfc3339;
use serde_json::{Value, json};

use crate::harness::wait::{now_ms, until};
use crate::harness::{Process, Service, client_and_analyst_tokens, stored_events};

fn event(id: &str, user: &str, at: i64) -> Value {
    json!({
        "event_id": id, "user_id": user, "session_id": "s-1", "type": "lesson_completed",
        "timestamp": format_rfc3339(at),
        "context": {"app_version": "3.2.0", "platform": "android", "country": "FR"},
        "properties": {"lesson_id": "g-14", "duration_ms": 41000, "score": 0.8}
    })
}

async fn post_batch(service: &Service, body: &Value) -> (u16, Value) {
    service.post_json("/v1/batch", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_keeps_its_good_events_and_explains_the_bad_ones() {
    let service = Service::start().await;
    let now = now_ms();
    let batch = json!({"sent_at": format_rfc3339(now), "batch": [
        event("good-1", "child-1", now - 1000),
        {"event_id": "bad-type", "type": "dance", "timestamp": format_rfc3339(now)},
        {"event_id": "bad-prop", "type": "lesson_started", "timestamp": format_rfc3339(now), "properties": {"lesson_id": 14}},
        "not an object",
        event("good-2", "child-2", now - 2000),
    ]});
    let (status, answer) = post_batch(&service, &batch).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(2), Some(3))
    );
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ok", "rejected", "rejected", "rejected", "ok"]);
    assert_eq!(results[1]["reason"], "unknown_type");
    assert_eq!(results[2]["reason"], "wrong_type");
    assert_eq!(results[3]["reason"], "malformed");
    assert_eq!(results[2]["event_id"], "bad-prop");

    let stored = stored_events(service.data_dir());
    let ids: BTreeSet<&str> = stored
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["good-1", "good-2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_events_sent_twice_are_stored_once() {
    let service = Service::start().await;
    let now = now_ms();
    let batch = json!({"batch": [
        event("e-1", "child-1", now),
        {"event_id": "s-1", "device_id": "tab-1", "seq": 1, "type": "app_opened", "timestamp": format_rfc3339(now)},
        {"event_id": "s-2", "device_id": "tab-1", "seq": 2, "type": "app_opened", "timestamp": format_rfc3339(now)},
        event("e-1", "child-1", now),
    ]});
    let (_, first) = post_batch(&service, &batch).await;
    assert_eq!(
        (first["accepted"].as_u64(), first["duplicates"].as_u64()),
        (Some(3), Some(1))
    );
    let (_, second) = post_batch(&service, &batch).await;
    assert_eq!(
        (second["accepted"].as_u64(), second["duplicates"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(stored_events(service.data_dir()).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_and_zstd_bodies_are_accepted() {
    let service = Service::start().await;
    let now = now_ms();
    let ndjson = format!("{}\n{}\n", event("n-1", "c", now), event("n-2", "c", now));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(ndjson.as_bytes()).unwrap();
    let zst = zstd::encode_all(
        json!({"batch": [event("z-1", "c", now)]})
            .to_string()
            .as_bytes(),
        3,
    )
    .unwrap();
    let cases = [
        ("application/x-ndjson", None, ndjson.clone().into_bytes(), 2),
        (
            "application/x-ndjson",
            Some("gzip"),
            gz.finish().unwrap(),
            0,
        ),
        ("application/json", Some("zstd"), zst, 1),
    ];
    for (content_type, encoding, body, accepted) in cases {
        let mut request = service
            .http
            .post(service.url("/v1/batch"))
            .header("content-type", content_type)
            .body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["accepted"].as_u64(), Some(accepted), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_limit_answers_its_status_and_json_body() {
    let service = Service::start_with(|config| {
        config.ingest.max_body = flagstream::config::ByteSize::kib(64);
        config.ingest.max_decompressed = flagstream::config::ByteSize::kib(64);
        config.ingest.max_batch_events = 10;
        config.ingest.rate_limit = 20;
        config.ingest.rate_burst = 30;
    })
    .await;
    let send = |content_type: &str, encoding: Option<&str>, body: Vec<u8>| {
        let mut request = service
            .http
            .post(service.url("/v1/batch"))
            .header("content-type", content_type.to_owned())
            .body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding.to_owned());
        }
        request.send()
    };
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 10 * 1024 * 1024]).unwrap();
    let eleven: Vec<Value> = (0..11)
        .map(|i| event(&format!("x{i}"), "c", now_ms()))
        .collect();
    /// A request and the answer it must get.
    struct Case {
        content_type: &'static str,
        encoding: Option<&'static str>,
        body: Vec<u8>,
        status: u16,
        code: &'static str,
    }
    let case = |content_type, encoding, body, status, code| Case {
        content_type,
        encoding,
        body,
        status,
        code,
    };
    let cases = vec![
        case(
            "application/json",
            None,
            b"{\"batch\": [".to_vec(),
            400,
            "invalid_request",
        ),
        case(
            "application/json",
            None,
            b"{\"events\": []}".to_vec(),
            400,
            "invalid_request",
        ),
        case(
            "application/json",
            Some("gzip"),
            b"not gzip".to_vec(),
            400,
            "invalid_request",
        ),
        case(
            "application/json",
            Some("br"),
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        case(
            "text/csv",
            None,
            b"a,b".to_vec(),
            415,
            "unsupported_media_type",
        ),
        case(
            "application/json",
            None,
            vec![b' '; 100 * 1024],
            413,
            "payload_too_large",
        ),
        case(
            "application/json",
            Some("gzip"),
            bomb.finish().unwrap(),
            413,
            "payload_too_large",
        ),
        case(
            "application/json",
            None,
            json!({"batch": eleven}).to_string().into_bytes(),
            413,
            "payload_too_large",
        ),
    ];
    for Case {
        content_type,
        encoding,
        body,
        status,
        code,
    } in cases
    {
        let response = send(content_type, encoding, body).await.unwrap();
        assert_eq!(response.status(), status, "{content_type} {encoding:?}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], code, "{answer}");
        assert!(answer["error_description"].is_string());
    }
    // The rate limit: 30 events of burst, then 429 with Retry-After.
    let ten: Vec<Value> = (0..10)
        .map(|i| event(&format!("r{i}"), "c", now_ms()))
        .collect();
    let body = json!({"batch": ten}).to_string().into_bytes();
    let mut limited = None;
    for _ in 0..5 {
        let response = send("application/json", None, body.clone()).await.unwrap();
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("the rate limit applies");
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "rate_limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_needs_a_client_key() {
    let tokens = client_and_analyst_tokens();
    let service = Service::start_with(|config| config.auth.tokens = tokens).await;
    let body = json!({"batch": [event("a-1", "c", now_ms())]});
    for (token, status) in [
        (None, 401),
        (Some("wrong"), 401),
        (Some("analyst-key"), 403),
        (Some("client-key"), 200),
    ] {
        let mut request = service.http.post(service.url("/v1/batch")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), status, "{token:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_week_offline_tablet_syncs_5000_events() {
    let service = Service::start().await;
    let now = now_ms();
    let week = 7 * 86_400_000;
    // The tablet's clock is 3 minutes slow; it sends what it recorded over the past week.
    let skew = -180_000;
    let events: Vec<Value> = (0..5000)
        .map(|i| {
            let happened = now - week + i * 100_000;
            json!({
                "event_id": format!("off-{i}"), "device_id": "tablet-7", "seq": i + 1,
                "user_id": "child-42", "type": "exercise_answered",
                "timestamp": format_rfc3339(happened + skew),
                "properties": {"lesson_id": "g-1", "correct": i % 3 == 0}
            })
        })
        .collect();
    let mut accepted = 0;
    for chunk in events.chunks(2000) {
        let body = json!({"sent_at": format_rfc3339(now_ms() + skew), "batch": chunk});
        let (status, answer) = post_batch(&service, &body).await;
        assert_eq!(status, 200);
        accepted += answer["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, 5000);
    let stored = stored_events(service.data_dir());
    assert_eq!(stored.len(), 5000);
    let first = stored.iter().find(|e| e["event_id"] == "off-0").unwrap();
    let corrected = first["event_time"].as_i64().unwrap();
    // Skew corrected to within the test's own run time.
    assert!(
        (corrected - (now - week)).abs() < 30_000,
        "{corrected} vs {}",
        now - week
    );
    assert_eq!(first["device_time"].as_i64().unwrap(), now - week + skew);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_user_ids_never_reach_the_disk_and_pseudonyms_are_stable() {
    let service = Service::start().await;
    let now = now_ms();
    let body = json!({"batch": [event("p-1", "child-SECRET-7781", now), event("p-2", "child-SECRET-7781", now)]});
    assert_eq!(post_batch(&service, &body).await.0, 200);
    let stored = stored_events(service.data_dir());
    assert_eq!(stored[0]["subject"], stored[1]["subject"]);
    assert!(stored[0]["subject"].as_str().unwrap().starts_with("p1_"));
    for entry in walk(service.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("SECRET-7781"),
            "raw id in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_evaluations_store_one_pseudonymous_exposure_per_day() {
    let service = Service::start().await;
    for _ in 0..3 {
        let response = service
            .http
            .post(service.url("/ofrep/v1/evaluate/flags/reward-animation"))
            .json(&json!({"context": {"targetingKey": "child-EXPOSED-1"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let exposures = until(Duration::from_secs(10), "an exposure stored", || async {
        let exposures: Vec<Value> = stored_events(service.data_dir())
            .into_iter()
            .filter(|e| e["type"] == "$exposure")
            .collect();
        if exposures.is_empty() {
            Err("none")
        } else {
            Ok(exposures)
        }
    })
    .await;
    assert_eq!(exposures.len(), 1, "{exposures:?}");
    assert_eq!(exposures[0]["properties"]["flag"], "reward-animation");
    assert!(!exposures[0].to_string().contains("EXPOSED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_is_published_as_json_schema() {
    let service = Service::start().await;
    let (status, schema) = service.get_json("/v1/schema").await;
    assert_eq!(status, 200);
    assert!(
        schema["properties"]["type"]["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("lesson_completed"))
    );
}

/// `kill -9` while a client streams, restart, and check that every acknowledged event is stored
/// exactly once. Bounded in count: four rounds, each request with a 5 s timeout (the time it
/// took is printed, not asserted: a slow machine is no failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    let data = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut unacknowledged: Vec<Value> = Vec::new();
    let mut next_id = 0u64;
    let rounds = 4;
    let started = Instant::now();
    for round in 0..rounds {
        let mut process = Process::spawn(data.path(), &[]);
        let url = format!("http://{}/v1/batch", process.addr);
        // Resend what was not acknowledged before the last kill: it may or may not be stored.
        let mut pending: Vec<Vec<Value>> = vec![std::mem::take(&mut unacknowledged)];
        let kill_after = Duration::from_millis(150 + 120 * round);
        let streaming_since = Instant::now();
        let client = {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let last_unacked = loop {
                    let batch = match pending.pop() {
                        Some(batch) if !batch.is_empty() => batch,
                        _ => {
                            let batch: Vec<Value> = (0..50)
                                .map(|i| event(&format!("k-{}", next_id + i), "child-k", now_ms()))
                                .collect();
                            next_id += 50;
                            batch
                        }
                    };
                    match http.post(&url).json(&json!({"batch": batch})).send().await {
                        Ok(response) if response.status() == 200 => {
                            let answer: Value = response.json().await.unwrap_or_default();
                            for result in answer["results"].as_array().into_iter().flatten() {
                                if matches!(result["status"].as_str(), Some("ok" | "duplicate")) {
                                    acked.push(result["event_id"].as_str().unwrap().to_owned());
                                }
                            }
                        }
                        _ => break batch,
                    }
                };
                (acked, last_unacked, next_id)
            })
        };
        tokio::time::sleep(kill_after.saturating_sub(streaming_since.elapsed())).await;
        process.kill_9();
        let (acked, last_unacked, advanced) = client.await.unwrap();
        next_id = advanced;
        acknowledged.extend(acked);
        unacknowledged = last_unacked;
    }
    // A last clean start recovers the log (truncating any torn tail) before reading it.
    drop(Process::spawn(data.path(), &[]));
    let stored = stored_events(data.path());
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for event in &stored {
        *counts
            .entry(event["event_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    println!(
        "kill -9 x{rounds}: {} events acknowledged, {} stored, in {:?}",
        acknowledged.len(),
        stored.len(),
        started.elapsed()
    );
    assert!(
        acknowledged.len() > 100,
        "the client got few acknowledgements: {}",
        acknowledged.len()
    );
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    let repeated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "stored more than once: {repeated:?}");
}

/// A small tmpfs mounted over a directory for the length of a test (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Self(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {size}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_acknowledges_nothing_false_and_recovers_when_space_returns() {
    let data = tempfile::tempdir().unwrap();
    // The write-ahead log on a 3 MiB disk.
    let Some(disk) = SmallDisk::mount(&data.path().join("wal"), "3m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (run as root)"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let service = Service::start_with(|config| {
        config.storage.data_dir = data.path().to_path_buf();
        config.ingest.wal_segment_size = flagstream::config::ByteSize::mib(1);
    })
    .await;
    let pad = "x".repeat(300);
    let mut acknowledged = BTreeSet::new();
    let mut refused = None;
    let at = now_ms();
    for round in 0..400 {
        let batch: Vec<Value> = (0..200)
            .map(|i| {
                let mut e = event(&format!("full-{round}-{i}"), "child-disk", at);
                e["properties"] = json!({"lesson_id": pad});
                e["type"] = json!("lesson_started");
                e
            })
            .collect();
        let (status, answer) = post_batch(&service, &json!({"batch": batch})).await;
        match status {
            200 => {
                for result in answer["results"].as_array().unwrap() {
                    assert_eq!(result["status"], "ok", "{result}");
                    acknowledged.insert(result["event_id"].as_str().unwrap().to_owned());
                }
            }
            503 => {
                refused = Some(answer);
                break;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert_eq!(refused["error"], "overloaded", "{refused}");
    assert!(!acknowledged.is_empty());
    // Still full: still refused, and everything else is served.
    let one = json!({"batch": [event("full-again", "child-disk", at)]});
    assert_eq!(post_batch(&service, &one).await.0, 503);
    assert_eq!(service.get_json("/healthz").await.0, 200);

    // Space returns: ingest goes on without a restart.
    disk.resize("64m");
    let (status, answer) = post_batch(&service, &one).await;
    assert_eq!(status, 200, "{answer}");
    acknowledged.insert("full-again".to_owned());
    service.stop().await.unwrap();

    // Everything acknowledged is in the log, once; nothing half written is.
    let stored: Vec<String> = stored_events(data.path())
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "an event stored twice");
    let missing: Vec<&String> = acknowledged.difference(&unique).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    drop(disk);
}

fn wal_segments(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(data.join("wal"))
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "wal"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_known_after_a_crash_even_once_the_log_segments_holding_them_are_gone() {
    let redis = crate::harness::Redis::start();
    let url = format!("unix://{}", redis.socket().display());
    let data = tempfile::tempdir().unwrap();
    // Small segments that every consumer moves past quickly: the pipeline (Redis counters),
    // the SQL window (rolls every 2,000 events) and the dedup snapshots.
    let env = [
        ("FLAGSTREAM_COUNTERS__REDIS_URL", url.as_str()),
        ("FLAGSTREAM_PIPELINE__FLUSH_INTERVAL", "50ms"),
        ("FLAGSTREAM_INGEST__WAL_SEGMENT_SIZE", "1MiB"),
        ("FLAGSTREAM_SQL__MEMORY_EVENTS", "2000"),
        ("FLAGSTREAM_INGEST__DEDUP_SNAPSHOT_INTERVAL", "200ms"),
    ];
    let now = now_ms();
    // A tablet's numbered events and a web client's events with ids only.
    let events: Vec<Value> = (0..12_000)
        .map(|i| {
            let mut e = event(&format!("dedup-{i}"), "child-9", now - 3_600_000 + i);
            if i % 2 == 0 {
                e["device_id"] = json!("tablet-9");
                e["seq"] = json!(i / 2 + 1);
            }
            e
        })
        .collect();
    let http = reqwest::Client::new();
    let send = |addr: std::net::SocketAddr, chunk: &[Value]| {
        let request = http
            .post(format!("http://{addr}/v1/batch"))
            .json(&json!({"sent_at": format_rfc3339(now_ms()), "batch": chunk}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let mut process = Process::spawn(data.path(), &env);
    for chunk in events.chunks(1000) {
        assert_eq!(send(process.addr, chunk).await["accepted"], 1000);
    }
    let first = wal_segments(data.path())[0].clone();
    until(
        Duration::from_secs(60),
        "the oldest log segment deleted",
        || async {
            if first.exists() {
                Err(format!("{:?}", wal_segments(data.path())))
            } else {
                Ok(())
            }
        },
    )
    .await;
    process.kill_9();

    // The tablet lost every answer and sends it all again; so does the web client.
    let process = Process::spawn(data.path(), &env);
    let mut duplicates = 0;
    for chunk in events.chunks(1000) {
        let answer = send(process.addr, chunk).await;
        assert_eq!(answer["accepted"], 0, "{}", answer["results"][0]);
        duplicates += answer["duplicates"].as_u64().unwrap();
    }
    assert_eq!(duplicates, 12_000);
}
