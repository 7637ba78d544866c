//! The pipeline end to end: events in over HTTP, counters out of `/v1/cohorts`, compared with
//! a recount computed here from the events sent — for both stores, through duplicates, late
//! and out-of-order events, several workers, a Redis outage and a `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use flagstream::events::time::format_rfc3339;
use serde_json::{Value, json};

use crate::harness::wait::{eventually, now_ms, until};
use crate::harness::{Process, Redis, Service};
use crate::sql::sql;

const EXPERIMENT: &str = "reward-animation";
const DAY: i64 = 86_400_000;

/// A generated workload: batches to send, and what the counters must say afterwards.
struct Workload {
    batches: Vec<Vec<Value>>,
    /// cohort tag → day start → (events by type, sessions, time spent, subjects)
    expected: BTreeMap<String, BTreeMap<i64, Expected>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Expected {
    events: BTreeMap<String, i64>,
    sessions: i64,
    time_spent_ms: i64,
    subjects: BTreeSet<String>,
}

/// `subjects` children over the last three days: a third exposed to the experiment first, then
/// sessions and lessons in shuffled order, some of them days late.
fn workload(subjects: usize, seed: u64) -> Workload {
    let now = now_ms();
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut exposures = Vec::new();
    let mut events = Vec::new();
    let mut variant_of = BTreeMap::new();
    let mut expected: BTreeMap<String, BTreeMap<i64, Expected>> = BTreeMap::new();
    let mut count = |cohort: &str, user: &str, kind: &str, at: i64, duration: i64| {
        let day = at.div_euclid(DAY) * DAY;
        let slot = expected
            .entry(cohort.into())
            .or_default()
            .entry(day)
            .or_default();
        *slot.events.entry(kind.into()).or_default() += 1;
        slot.sessions += i64::from(kind == "session_started");
        if kind == "session_ended" {
            slot.time_spent_ms += duration;
        }
        slot.subjects.insert(user.into());
    };
    for s in 0..subjects {
        let user = format!("child-{seed}-{s}");
        if s % 3 == 0 {
            let variant = if s % 2 == 0 { "stars" } else { "confetti" };
            let at = now - 3 * DAY + 1000 * s as i64;
            variant_of.insert(user.clone(), variant);
            exposures.push(json!({"event_id": format!("x-{seed}-{s}"), "user_id": user, "type": "$exposure",
                "timestamp": format_rfc3339(at), "properties": {"flag": EXPERIMENT, "variant": variant}}));
            count("all", &user, "$exposure", at, 0);
            count(
                &format!("exp:{EXPERIMENT}:{variant}"),
                &user,
                "$exposure",
                at,
                0,
            );
        }
        for session in 0..3 {
            let start = now - (next(3 * 86_400) as i64) * 1000 + 1000;
            let duration = 60_000 + next(600) as i64 * 1000;
            let id = |kind: &str| format!("{seed}-{s}-{session}-{kind}");
            let mut add = |kind: &str, at: i64, properties: Value| {
                events.push(json!({"event_id": id(kind), "user_id": user, "type": kind,
                    "timestamp": format_rfc3339(at), "properties": properties,
                    "context": {"platform": if s % 2 == 0 { "ios" } else { "android" }}}));
                count("all", &user, kind, at, duration);
                count(
                    &format!(
                        "seg:platform:{}",
                        if s % 2 == 0 { "ios" } else { "android" }
                    ),
                    &user,
                    kind,
                    at,
                    duration,
                );
                if let Some(variant) = variant_of.get(&user) {
                    count(
                        &format!("exp:{EXPERIMENT}:{variant}"),
                        &user,
                        kind,
                        at,
                        duration,
                    );
                }
            };
            add("session_started", start, json!({}));
            add(
                "lesson_completed",
                start + 10_000,
                json!({"lesson_id": format!("l{session}")}),
            );
            add(
                "session_ended",
                (start + duration).min(now),
                json!({"duration_ms": duration}),
            );
        }
    }
    // Shuffle, so windows are filled out of order, then cut into batches.
    for i in (1..events.len()).rev() {
        events.swap(i, next(i as u64 + 1) as usize);
    }
    let mut batches = vec![exposures];
    batches.extend(events.chunks(37).map(<[Value]>::to_vec));
    Workload { batches, expected }
}

async fn send(http: &reqwest::Client, addr: SocketAddr, batch: &[Value]) -> Value {
    let response = http
        .post(format!("http://{addr}/v1/batch"))
        .json(&json!({"sent_at": format_rfc3339(now_ms()), "batch": batch}))
        .send()
        .await
        .expect("batch request");
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Reads day counters for every cohort the workload names.
async fn day_counters(
    http: &reqwest::Client,
    addr: SocketAddr,
) -> BTreeMap<String, BTreeMap<i64, Value>> {
    let from = format_rfc3339(now_ms() - 4 * DAY);
    let to = format_rfc3339(now_ms() + DAY);
    let mut out = BTreeMap::new();
    for selector in ["", "&experiment=reward-animation", "&segment=platform"] {
        let url = format!("http://{addr}/v1/cohorts?window=1d&from={from}&to={to}{selector}");
        let response = http.get(url).send().await.unwrap();
        if response.status() != 200 {
            // The store is away (503): nothing to compare yet.
            return BTreeMap::new();
        }
        let answer: Value = response.json().await.unwrap();
        for series in answer["series"].as_array().expect("series") {
            let points = series["points"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["events"].as_object().is_some_and(|e| !e.is_empty()))
                .map(|p| {
                    let start =
                        flagstream::events::time::parse_rfc3339(p["start"].as_str().unwrap())
                            .unwrap();
                    (start, p.clone())
                })
                .collect();
            out.insert(series["cohort"].as_str().unwrap().to_owned(), points);
        }
    }
    out
}

/// Waits until the counters hold `expected` exactly (distinct subjects within the sketch's
/// error), or fails with the difference after a deadline.
async fn assert_counters_match(http: &reqwest::Client, addr: SocketAddr, workload: &Workload) {
    let matching = || async {
        let actual = day_counters(http, addr).await;
        match compare(&workload.expected, &actual) {
            None => Ok(()),
            Some(problem) => Err(problem),
        }
    };
    until(
        Duration::from_secs(60),
        "counters equal to the recount",
        matching,
    )
    .await;
}

fn compare(
    expected: &BTreeMap<String, BTreeMap<i64, Expected>>,
    actual: &BTreeMap<String, BTreeMap<i64, Value>>,
) -> Option<String> {
    for (cohort, days) in expected {
        let Some(got) = actual.get(cohort) else {
            return Some(format!("cohort {cohort} missing"));
        };
        if got.len() != days.len() {
            return Some(format!(
                "{cohort}: {} days, expected {}",
                got.len(),
                days.len()
            ));
        }
        for (day, want) in days {
            let Some(point) = got.get(day) else {
                return Some(format!("{cohort}: day {day} missing"));
            };
            let events: BTreeMap<String, i64> =
                serde_json::from_value(point["events"].clone()).unwrap();
            let subjects = point["active_subjects"].as_i64().unwrap();
            let exact = want.subjects.len() as i64;
            if events != want.events
                || point["sessions"] != want.sessions
                || point["time_spent_ms"] != want.time_spent_ms
                // Distinct subjects are a HyperLogLog estimate: two of a few dozen subjects
                // may share a register.
                || (subjects - exact).abs() > 2 + exact * 3 / 100
            {
                return Some(format!(
                    "{cohort} day {day}: got {point}, expected {want:?}"
                ));
            }
        }
    }
    None
}

#[tokio::test]
async fn embedded_counters_equal_a_recount_through_duplicates_and_late_events() {
    let service = Service::start_with(|config| {
        config.pipeline.workers = 2;
        config.pipeline.flush_interval = Duration::from_millis(50);
    })
    .await;
    let workload = workload(60, 7);
    for batch in &workload.batches {
        send(&service.http, service.addr, batch).await;
    }
    // Every batch again: all duplicates, counted once.
    for batch in workload.batches.iter().step_by(3) {
        let answer = send(&service.http, service.addr, batch).await;
        assert_eq!(answer["accepted"], 0, "{answer}");
    }
    assert_counters_match(&service.http, service.addr, &workload).await;
    // The live per-variant gauges follow within their refresh interval.
    until(Duration::from_secs(20), "per-variant gauges", || async {
        let metrics = service.get_text("/metrics").await;
        assert!(metrics.contains("flagstream_pipeline_flush_lag_seconds_bucket"));
        let gauge = "flagstream_experiment_subjects_today{experiment=\"reward-animation\"";
        if metrics.contains(gauge) {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
}

#[tokio::test]
async fn redis_counters_equal_a_recount_through_a_redis_outage() {
    let mut redis = Redis::start_durable();
    let url = redis.url();
    let service = Service::start_with(move |config| {
        config.pipeline.workers = 2;
        config.pipeline.flush_interval = Duration::from_millis(50);
        config.counters.redis_url = Some(url);
        config.counters.redis_timeout = Duration::from_millis(300);
    })
    .await;
    let workload = workload(90, 11);
    let half = workload.batches.len() / 2;
    for batch in &workload.batches[..half] {
        send(&service.http, service.addr, batch).await;
    }
    // Redis dies mid-stream: ingest keeps acknowledging; the counters catch up afterwards.
    redis.kill();
    for batch in &workload.batches[half..] {
        let answer = send(&service.http, service.addr, batch).await;
        assert_eq!(answer["rejected"], 0);
    }
    redis.restart();
    assert_counters_match(&service.http, service.addr, &workload).await;
    let metrics = service.get_text("/metrics").await;
    let errors: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("flagstream_store_write_errors_total{") && l.contains("store=\"redis\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors > 0.0, "the outage was noticed: {metrics}");
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_leaves_redis_counters_exact() {
    let redis = Redis::start_durable();
    let data = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", redis.socket().display());
    let env = [
        ("FLAGSTREAM_COUNTERS__REDIS_URL", url.as_str()),
        ("FLAGSTREAM_PIPELINE__FLUSH_INTERVAL", "50ms"),
        ("FLAGSTREAM_PIPELINE__WORKERS", "2"),
    ];
    let http = reqwest::Client::new();
    let workload = workload(60, 23);
    let mut process = Process::spawn(data.path(), &env);
    let third = workload.batches.len() / 3;
    for batch in &workload.batches[..third] {
        send(&http, process.addr, batch).await;
    }
    process.kill_9();
    let mut process = Process::spawn(data.path(), &env);
    for batch in &workload.batches[third..2 * third] {
        send(&http, process.addr, batch).await;
    }
    // Right after acknowledgements, before the counters could be written.
    process.kill_9();
    let process = Process::spawn(data.path(), &env);
    for batch in &workload.batches[2 * third..] {
        send(&http, process.addr, batch).await;
    }
    assert_counters_match(&http, process.addr, &workload).await;
}

#[tokio::test]
async fn the_cohorts_endpoint_rejects_bad_parameters_and_callers() {
    let service = Service::start_with(|config| {
        config.auth.tokens = crate::harness::client_and_analyst_tokens();
    })
    .await;
    let get = |path: &str, key: Option<&str>| {
        let mut request = service.http.get(service.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/v1/cohorts", None).await.0, 401);
    assert_eq!(get("/v1/cohorts", Some("client-key")).await.0, 403);
    let (status, body) = get("/v1/cohorts?window=1h", Some("analyst-key")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 25);
    for (query, needle) in [
        ("window=5m", "window must be"),
        ("from=yesterday", "RFC 3339"),
        ("window=1m&from=2020-01-01T00:00:00Z", "at most 1440"),
        (
            "from=2030-01-01T00:00:00Z&to=2029-01-01T00:00:00Z",
            "before",
        ),
        ("experiment=a&segment=b", "not both"),
        ("colour=blue", "unknown parameter"),
    ] {
        let (status, body) = get(&format!("/v1/cohorts?{query}"), Some("analyst-key")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_request");
        assert!(
            body["error_description"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }
}

/// Two free loopback addresses for the cluster's peers (bound, then released).
fn two_free_addresses() -> [String; 2] {
    let listeners = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    listeners.map(|l| l.local_addr().unwrap().to_string())
}

#[tokio::test]
async fn a_two_process_cluster_counts_what_one_process_counts() {
    // Every process of a deployment shares the pepper, so a child is one subject everywhere.
    let pepper = format!("1 {}", "ab".repeat(32));
    let http = reqwest::Client::new();
    let workload = workload(90, 31);

    // One process, two workers.
    let single_redis = Redis::start();
    let single_data = tempfile::tempdir().unwrap();
    let single_url = format!("unix://{}", single_redis.socket().display());
    let single = Process::spawn(
        single_data.path(),
        &[
            ("FLAGSTREAM_COUNTERS__REDIS_URL", single_url.as_str()),
            ("FLAGSTREAM_PIPELINE__FLUSH_INTERVAL", "50ms"),
            ("FLAGSTREAM_PIPELINE__WORKERS", "2"),
            ("FLAGSTREAM_PRIVACY__PEPPER", pepper.as_str()),
        ],
    );
    for batch in &workload.batches {
        send(&http, single.addr, batch).await;
    }

    // Two processes of one worker each, one timely cluster, one Redis; each process ingests
    // a share of the batches into its own log, and subjects are exchanged between them.
    let cluster_redis = Redis::start();
    let cluster_url = format!("unix://{}", cluster_redis.socket().display());
    let [first, second] = two_free_addresses();
    let peers = format!("[\"{first}\", \"{second}\"]");
    let data = [0, 1].map(|_| tempfile::tempdir().unwrap());
    let processes: Vec<Process> = (0..2)
        .map(|index| cluster_process(index, data[index].path(), &peers, &cluster_url, &pepper))
        .collect();
    // The exposures first (acknowledged before any later event), then batches in turn.
    for (n, batch) in workload.batches.iter().enumerate() {
        send(&http, processes[n % 2].addr, batch).await;
    }

    assert_counters_match(&http, single.addr, &workload).await;
    for process in &processes {
        assert_counters_match(&http, process.addr, &workload).await;
    }
    // Beyond the recount's tolerance for distinct subjects: the very same answers, sketches
    // included, from one process and from either process of the cluster.
    let one = day_counters(&http, single.addr).await;
    for process in &processes {
        assert_eq!(day_counters(&http, process.addr).await, one);
    }
    for (index, process) in processes.iter().enumerate() {
        let logs = process.logs().join("\n");
        let events = process_metric(&http, process.addr, "flagstream_pipeline_events_total").await;
        assert!(
            events > 0.0,
            "process {index} read its own log into the dataflow: {logs}"
        );
    }
}

/// Process `index` of a two-process cluster with one worker each.
fn cluster_process(
    index: usize,
    data: &std::path::Path,
    peers: &str,
    redis_url: &str,
    pepper: &str,
) -> Process {
    let index = index.to_string();
    Process::spawn(
        data,
        &[
            ("FLAGSTREAM_COUNTERS__REDIS_URL", redis_url),
            ("FLAGSTREAM_PIPELINE__FLUSH_INTERVAL", "50ms"),
            ("FLAGSTREAM_PIPELINE__WORKERS", "1"),
            ("FLAGSTREAM_PIPELINE__PEERS", peers),
            ("FLAGSTREAM_PIPELINE__PROCESS", index.as_str()),
            ("FLAGSTREAM_PRIVACY__PEPPER", pepper),
        ],
    )
}

#[tokio::test]
async fn cluster_processes_that_crash_or_stop_rejoin_and_the_counters_stay_exact() {
    let pepper = format!("1 {}", "cd".repeat(32));
    let http = reqwest::Client::new();
    let workload = workload(90, 37);
    let redis = Redis::start_durable();
    let url = format!("unix://{}", redis.socket().display());
    let [first, second] = two_free_addresses();
    let peers = format!("[\"{first}\", \"{second}\"]");
    let data = [0, 1].map(|_| tempfile::tempdir().unwrap());
    let spawn = |index: usize| cluster_process(index, data[index].path(), &peers, &url, &pepper);
    let mut processes = [spawn(0), spawn(1)];
    let third = workload.batches.len() / 3;
    for (n, batch) in workload.batches[..third].iter().enumerate() {
        send(&http, processes[n % 2].addr, batch).await;
    }
    // Process 1 crashes: process 0 keeps acknowledging while its dataflow waits for the peer.
    processes[1].kill_9();
    for batch in &workload.batches[third..2 * third] {
        send(&http, processes[0].addr, batch).await;
    }
    processes[1] = spawn(1);
    // Process 1 has rejoined once its dataflow runs with process 0's (before that, stopping
    // process 0 would only delay a dataflow that never started, and nothing would restart).
    let rejoined = || async {
        process_metric(&http, processes[1].addr, "flagstream_pipeline_running").await == 1.0
    };
    eventually(
        Duration::from_secs(30),
        "process 1 rejoined the cluster",
        rejoined,
    )
    .await;
    // Process 0 is stopped and started again (a deployment rolling through the cluster).
    processes[0].terminate();
    processes[0] = spawn(0);
    for (n, batch) in workload.batches[2 * third..].iter().enumerate() {
        send(&http, processes[n % 2].addr, batch).await;
    }
    for process in &processes {
        assert_counters_match(&http, process.addr, &workload).await;
    }
    let restarts = process_metric(
        &http,
        processes[1].addr,
        "flagstream_pipeline_restarts_total",
    )
    .await;
    assert!(
        restarts >= 1.0,
        "process 1's dataflow ended with its peer's and started again: {}",
        processes[1].logs().join("\n")
    );
    let running = process_metric(&http, processes[0].addr, "flagstream_pipeline_running").await;
    assert_eq!(running, 1.0);
}

/// The sum of a metric's samples in a process's `/metrics`.
async fn process_metric(http: &reqwest::Client, addr: SocketAddr, name: &str) -> f64 {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_counters_table_answers_what_the_recount_says_and_a_clear_error_otherwise() {
    let mut redis = Redis::start();
    let url = redis.url();
    let service = Service::start_with(move |config| {
        config.pipeline.flush_interval = Duration::from_millis(50);
        config.counters.redis_url = Some(url);
        config.counters.redis_timeout = Duration::from_millis(300);
    })
    .await;
    let workload = workload(45, 41);
    for batch in &workload.batches {
        send(&service.http, service.addr, batch).await;
    }
    assert_counters_match(&service.http, service.addr, &workload).await;

    // Every additive day counter of every cohort, as SQL rows.
    let (status, answer) = sql(
        &service,
        "SELECT cohort, CAST(start AS BIGINT) AS day, metric, event_type, value FROM counters \
         WHERE window = '1d' AND metric IN ('events', 'sessions', 'time_spent_ms') \
         AND start >= now() - interval '5 days'",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut got: BTreeMap<String, BTreeMap<i64, Expected>> = BTreeMap::new();
    for row in answer["rows"].as_array().unwrap() {
        // Timestamps cast to BIGINT are milliseconds here (the column's unit).
        let day = row["day"].as_i64().unwrap();
        let slot = got
            .entry(row["cohort"].as_str().unwrap().into())
            .or_default()
            .entry(day)
            .or_default();
        let value = row["value"].as_i64().unwrap();
        match row["metric"].as_str().unwrap() {
            "events" => {
                slot.events
                    .insert(row["event_type"].as_str().unwrap().into(), value);
            }
            "sessions" => slot.sessions = value,
            "time_spent_ms" => slot.time_spent_ms = value,
            other => panic!("metric {other} was filtered out"),
        }
    }
    let expected: BTreeMap<String, BTreeMap<i64, Expected>> = workload
        .expected
        .iter()
        .map(|(cohort, days)| {
            let days = days
                .iter()
                .map(|(day, e)| {
                    let additive = Expected {
                        subjects: BTreeSet::new(),
                        ..e.clone()
                    };
                    (*day, additive)
                })
                .collect();
            (cohort.clone(), days)
        })
        .collect();
    assert_eq!(got, expected);

    // Distinct subjects per variant, within the sketch's error of the recount.
    let (status, answer) = sql(
        &service,
        "SELECT variant, CAST(start AS BIGINT) AS day, value FROM counters \
         WHERE experiment = 'reward-animation' AND window = '1d' AND metric = 'active_subjects'",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let rows = answer["rows"].as_array().unwrap();
    assert!(!rows.is_empty(), "{answer}");
    for row in rows {
        let cohort = format!("exp:{EXPERIMENT}:{}", row["variant"].as_str().unwrap());
        let exact = workload.expected[&cohort][&row["day"].as_i64().unwrap()]
            .subjects
            .len() as i64;
        let estimate = row["value"].as_i64().unwrap();
        assert!(
            (estimate - exact).abs() <= 2 + exact * 3 / 100,
            "{row} vs {exact}"
        );
    }

    // Too wide a range of minute windows is refused with the way out, not cut short.
    let (status, answer) = sql(
        &service,
        "SELECT count(*) FROM counters WHERE window = '1m' AND start >= now() - interval '36 hours'",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let description = answer["error_description"].as_str().unwrap();
    assert!(description.contains("at most 1440"), "{answer}");

    // Redis away: the counters table answers 503 with Retry-After; the events table still
    // answers.
    redis.kill();
    let response = service
        .http
        .post(service.url("/v1/sql"))
        .json(&json!({"sql": "SELECT count(*) FROM counters"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("counter store is unavailable"),
        "{answer}"
    );
    let (status, answer) = sql(&service, "SELECT count(*) AS n FROM events").await;
    assert_eq!(status, 200, "{answer}");
}
