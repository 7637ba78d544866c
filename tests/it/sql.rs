//! SQL end to end: events in over HTTP, answers out of `/v1/sql` and `/v1/queries/{name}`,
//! compared with answers computed here from the events sent; the hostile-query suite while
//! ingest keeps being served; Parquet segments that roll, survive a restart, expire, and
//! cannot be read without the key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flagstream::events::time::{format_rfc3339, parse_rfc3339};
use serde_json::{Value, json};

use crate::harness::wait::{eventually, eventually_every, now_ms};
use crate::harness::{Service, client_and_analyst_tokens, test_config};

const EXPERIMENT: &str = "reward-animation";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// One generated event, kept in the form the recount needs.
#[derive(Debug, Clone)]
struct Sent {
    user: String,
    kind: &'static str,
    at: i64,
    platform: &'static str,
    app_version: &'static str,
    country: &'static str,
    lesson: Option<String>,
    duration_ms: Option<i64>,
    variant: Option<&'static str>,
}

impl Sent {
    fn to_json(&self, id: usize) -> Value {
        let mut properties = serde_json::Map::new();
        if let Some(lesson) = &self.lesson {
            properties.insert("lesson_id".into(), json!(lesson));
        }
        if let Some(duration) = self.duration_ms {
            properties.insert("duration_ms".into(), json!(duration));
        }
        if let Some(variant) = self.variant {
            properties.insert("flag".into(), json!(EXPERIMENT));
            properties.insert("variant".into(), json!(variant));
        }
        json!({"event_id": format!("sql-{id}"), "user_id": self.user, "type": self.kind,
            "timestamp": format_rfc3339(self.at), "properties": properties,
            "context": {"platform": self.platform, "app_version": self.app_version,
                        "country": self.country}})
    }
}

/// `subjects` children: three in four exposed five hours ago; a session three (or, for some,
/// six) hours ago and one in the last hour, each with a lesson started and usually completed.
fn workload(subjects: usize) -> Vec<Sent> {
    let now = now_ms();
    let mut sent = Vec::new();
    for s in 0..subjects {
        let user = format!("reader-{s}");
        let base = Sent {
            user: user.clone(),
            kind: "app_opened",
            at: now,
            platform: ["ios", "android", "web"][s % 3],
            app_version: ["2.0", "2.1"][s % 2],
            country: if s % 5 == 0 { "PT" } else { "BR" },
            lesson: None,
            duration_ms: None,
            variant: None,
        };
        if s % 4 != 3 {
            sent.push(Sent {
                kind: "$exposure",
                at: now - 5 * HOUR + s as i64 * 1000,
                variant: Some(if s % 2 == 0 { "stars" } else { "confetti" }),
                ..base.clone()
            });
        }
        for session in 0..2usize {
            let start = match session {
                0 if s % 5 == 1 => now - 6 * HOUR - s as i64 * 1000,
                0 => now - 3 * HOUR - s as i64 * 10_000,
                _ => now - 40 * 60_000 + s as i64 * 5_000,
            };
            let duration = 2_000 * (30 + ((s * 7 + session * 13) % 50) as i64);
            let lesson = Some(format!("{}", 10 + (s + session) % 6));
            sent.push(Sent {
                kind: "session_started",
                at: start,
                ..base.clone()
            });
            sent.push(Sent {
                kind: "lesson_started",
                at: start + 10_000,
                lesson: lesson.clone(),
                ..base.clone()
            });
            if (s + session) % 3 != 0 {
                sent.push(Sent {
                    kind: "lesson_completed",
                    at: start + 50_000,
                    lesson,
                    ..base.clone()
                });
            }
            sent.push(Sent {
                kind: "session_ended",
                at: start + duration,
                duration_ms: Some(duration),
                ..base.clone()
            });
        }
    }
    sent
}

async fn ingest(service: &Service, events: &[Sent], token: Option<&str>) {
    for (chunk_index, chunk) in events.chunks(250).enumerate() {
        let batch: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| e.to_json(chunk_index * 250 + i))
            .collect();
        let mut request = service
            .http
            .post(service.url("/v1/batch"))
            .json(&json!({"sent_at": format_rfc3339(now_ms()), "batch": batch}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("batch request");
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        for result in answer["results"].as_array().expect("results") {
            assert_eq!(result["status"], "ok", "{result}");
        }
    }
}

/// POSTs `sql` and returns the status and the JSON answer.
pub(crate) async fn sql(service: &Service, sql: &str) -> (u16, Value) {
    let response = service
        .http
        .post(service.url("/v1/sql"))
        .json(&json!({ "sql": sql }))
        .send()
        .await
        .expect("sql request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json answer"))
}

async fn saved(service: &Service, path: &str) -> Vec<Value> {
    let (status, answer) = service.get_json(path).await;
    assert_eq!(status, 200, "{path}: {answer}");
    assert_eq!(answer["truncated"], false);
    // The window had caught up with the log: nothing acknowledged is missing.
    assert_eq!(answer["complete"], true);
    answer["rows"].as_array().expect("rows").clone()
}

fn first_exposures(events: &[Sent]) -> BTreeMap<&str, (&'static str, i64)> {
    let mut assigned: BTreeMap<&str, (&'static str, i64)> = BTreeMap::new();
    for event in events.iter().filter(|e| e.kind == "$exposure") {
        let entry = assigned
            .entry(&event.user)
            .or_insert((event.variant.unwrap(), event.at));
        if event.at < entry.1 {
            *entry = (event.variant.unwrap(), event.at);
        }
    }
    assigned
}

fn rows_by(rows: &[Value], key: &str) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|row| (row[key].as_str().unwrap().to_owned(), row.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_queries_and_adhoc_sql_equal_a_recount() {
    let service = Service::start().await;
    let events = workload(240);
    ingest(&service, &events, None).await;
    let now = now_ms();
    let assigned = first_exposures(&events);

    // Events per platform in the last hour.
    let rows = saved(&service, "/v1/queries/events_per_platform").await;
    let mut expected: BTreeMap<&str, (i64, BTreeSet<&str>)> = BTreeMap::new();
    for event in events.iter().filter(|e| e.at >= now - HOUR) {
        let slot = expected.entry(event.platform).or_default();
        slot.0 += 1;
        slot.1.insert(&event.user);
    }
    let actual = rows_by(&rows, "platform");
    assert_eq!(actual.len(), expected.len(), "{rows:?}");
    for (platform, (count, subjects)) in &expected {
        assert_eq!(actual[*platform]["events"], *count, "{platform}");
        assert_eq!(actual[*platform]["subjects"], subjects.len(), "{platform}");
    }

    // Median session length by app version.
    let rows = saved(&service, "/v1/queries/median_session_by_app_version").await;
    let mut durations: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for event in events.iter().filter(|e| e.kind == "session_ended") {
        durations
            .entry(event.app_version)
            .or_default()
            .push(event.duration_ms.unwrap());
    }
    let actual = rows_by(&rows, "app_version");
    for (version, mut values) in durations {
        values.sort();
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2
        };
        assert_eq!(actual[version]["sessions"], n, "{version}");
        assert_eq!(
            actual[version]["median_session_seconds"].as_f64().unwrap(),
            median as f64 / 1000.0,
            "{version}"
        );
    }

    // The lesson funnel by variant over the last day.
    let rows = saved(
        &service,
        &format!("/v1/queries/lesson_funnel_by_variant?experiment={EXPERIMENT}"),
    )
    .await;
    let actual = rows_by(&rows, "variant");
    for variant in ["confetti", "stars"] {
        let members: BTreeSet<&str> = assigned
            .iter()
            .filter(|(_, (v, _))| *v == variant)
            .map(|(u, _)| *u)
            .collect();
        let did = |kind: &str| {
            events
                .iter()
                .filter(|e| {
                    e.kind == kind && e.at >= now - DAY && members.contains(e.user.as_str())
                })
                .map(|e| e.user.as_str())
                .collect::<BTreeSet<_>>()
                .len()
        };
        let row = &actual[variant];
        assert_eq!(row["exposed"], members.len(), "{variant}");
        assert_eq!(row["started_lesson"], did("lesson_started"), "{variant}");
        assert_eq!(
            row["completed_lesson"],
            did("lesson_completed"),
            "{variant}"
        );
    }

    // Goal conversions by variant: only goals at or after the first exposure count.
    let rows = saved(
        &service,
        &format!(
            "/v1/queries/goal_conversions_by_variant?experiment={EXPERIMENT}&goal=lesson_completed"
        ),
    )
    .await;
    let actual = rows_by(&rows, "variant");
    for variant in ["confetti", "stars"] {
        let exposed: Vec<(&str, i64)> = assigned
            .iter()
            .filter(|(_, (v, _))| *v == variant)
            .map(|(u, (_, at))| (*u, *at))
            .collect();
        let converted = exposed
            .iter()
            .filter(|(user, at)| {
                events
                    .iter()
                    .any(|e| e.user == *user && e.kind == "lesson_completed" && e.at >= *at)
            })
            .count();
        assert!(
            converted < exposed.len(),
            "the workload has late converters"
        );
        assert_eq!(actual[variant]["exposed"], exposed.len(), "{variant}");
        assert_eq!(actual[variant]["converted"], converted, "{variant}");
        let rate = actual[variant]["conversion_rate"].as_f64().unwrap();
        assert!((rate - converted as f64 / exposed.len() as f64).abs() < 1e-4);
    }

    // Daily active subjects by variant.
    let rows = saved(
        &service,
        &format!("/v1/queries/daily_active_by_cohort?experiment={EXPERIMENT}"),
    )
    .await;
    let mut expected: BTreeMap<(i64, &str), BTreeSet<&str>> = BTreeMap::new();
    for event in &events {
        if let Some((variant, _)) = assigned.get(event.user.as_str()) {
            expected
                .entry((event.at.div_euclid(DAY) * DAY, variant))
                .or_default()
                .insert(&event.user);
        }
    }
    let actual: BTreeMap<(i64, String), u64> = rows
        .iter()
        .map(|row| {
            let day = parse_rfc3339(row["day"].as_str().unwrap()).expect("an RFC 3339 day");
            let variant = row["variant"].as_str().unwrap().to_owned();
            ((day, variant), row["active_subjects"].as_u64().unwrap())
        })
        .collect();
    let expected: BTreeMap<(i64, String), u64> = expected
        .into_iter()
        .map(|((day, v), users)| ((day, v.to_owned()), users.len() as u64))
        .collect();
    assert_eq!(actual, expected);

    // The question from the issue, ad hoc: children in Brazil who finished lesson 14 on the
    // newer app version in the last hour.
    let (status, answer) = sql(
        &service,
        "SELECT count(DISTINCT subject) AS children FROM events \
         WHERE country = 'BR' AND type = 'lesson_completed' AND properties['lesson_id'] = '14' \
         AND app_version = '2.1' AND event_time >= now() - INTERVAL '1 hour'",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let expected = events
        .iter()
        .filter(|e| {
            e.country == "BR"
                && e.kind == "lesson_completed"
                && e.lesson.as_deref() == Some("14")
                && e.app_version == "2.1"
                && e.at >= now - HOUR
        })
        .map(|e| &e.user)
        .collect::<BTreeSet<_>>();
    assert!(!expected.is_empty());
    assert_eq!(answer["rows"][0]["children"], expected.len());
    assert_eq!(answer["columns"][0]["name"], "children");
    assert_eq!(answer["row_count"], 1);

    // Parameters in the body, typed by their use.
    let response = service
        .http
        .post(service.url("/v1/sql"))
        .json(
            &json!({"sql": "SELECT count(*) AS n FROM exposures WHERE variant = $v",
                      "params": {"v": "stars"}}),
        )
        .send()
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    let stars = events.iter().filter(|e| e.variant == Some("stars")).count();
    assert_eq!(answer["rows"][0]["n"], stars, "{answer}");
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_as_json_csv_or_arrow_and_are_cut_at_the_row_cap() {
    let service = Service::start_with(|c| c.sql.max_rows = 50).await;
    let events = workload(30);
    ingest(&service, &events, None).await;
    let post = |accept: &'static str, query: &'static str| {
        service
            .http
            .post(service.url(&format!("/v1/sql{query}")))
            .header("accept", accept)
            .json(&json!({"sql": "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type"}))
            .send()
    };
    let response = post("text/csv", "").await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = response.text().await.unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("type,n"));
    let opened = events.iter().filter(|e| e.kind == "$exposure").count();
    assert_eq!(lines.next(), Some(format!("$exposure,{opened}").as_str()));

    let response = post("application/vnd.apache.arrow.stream", "")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .expect("an Arrow IPC stream");
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    let types: BTreeSet<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(rows, types.len());

    // format= wins over Accept.
    let response = post("application/json", "?format=csv").await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );

    let (status, answer) = sql(&service, "SELECT * FROM events").await;
    assert_eq!(status, 200);
    assert!(events.len() > 50);
    assert_eq!(answer["truncated"], true);
    assert_eq!(answer["rows"].as_array().unwrap().len(), 50);
    assert_eq!(answer["row_count"], 50);
    let first = &answer["rows"][0];
    assert!(first["subject"].as_str().unwrap().starts_with("p1_"));
    assert!(
        !answer.to_string().contains("reader-"),
        "raw user ids never reach SQL"
    );

    let response = service
        .http
        .post(service.url("/v1/sql"))
        .json(&json!({"sql": "SELECT * FROM generate_series(1, 1000000000)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-truncated"], "true");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["rows"].as_array().unwrap().len(), 50);

    let (status, answer) = sql(&service, "SELECT count(*) AS n FROM events").await;
    assert_eq!((status, answer["truncated"].clone()), (200, json!(false)));
    assert_eq!(answer["rows"][0]["n"], events.len());
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unauthorized_and_unknown_requests_get_clear_errors() {
    let service = Service::start_with(|c| c.auth.tokens = client_and_analyst_tokens()).await;
    let url = service.url("/v1/sql");
    let body = json!({"sql": "SELECT 1"});
    let response = service.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = service
        .http
        .post(&url)
        .bearer_auth("client-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = service
        .http
        .get(service.url("/v1/queries"))
        .bearer_auth("client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let ask = |body: reqwest::Body, path: &'static str, accept: &'static str| {
        service
            .http
            .post(service.url(path))
            .bearer_auth("analyst-key")
            .header("content-type", "application/json")
            .header("accept", accept)
            .body(body)
            .send()
    };
    let cases: Vec<(&str, &str, &str, u16, &str, &str)> = vec![
        ("not json", "/v1/sql", "*/*", 400, "invalid_request", "body"),
        (
            r#"{"query": "SELECT 1"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "sql",
        ),
        (
            r#"{"sql": "SELEC 1"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "Column: 1",
        ),
        (
            r#"{"sql": "SELECT 1 FROM events WHERE"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "syntax error",
        ),
        (
            r#"{"sql": "SELECT nope FROM events"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "nope",
        ),
        (
            r#"{"sql": "SELECT * FROM passwords"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "passwords",
        ),
        (
            r#"{"sql": "SELECT 1"}"#,
            "/v1/sql?format=xml",
            "*/*",
            400,
            "invalid_request",
            "format",
        ),
        (
            r#"{"sql": "SELECT 1"}"#,
            "/v1/sql?limit=3",
            "*/*",
            400,
            "invalid_request",
            "limit",
        ),
        (
            r#"{"sql": "SELECT 1"}"#,
            "/v1/sql",
            "image/png",
            406,
            "not_acceptable",
            "csv",
        ),
        (
            r#"{"sql": "SELECT properties FROM events"}"#,
            "/v1/sql?format=csv",
            "*/*",
            400,
            "invalid_request",
            "CSV",
        ),
        (
            r#"{"sql": "SELECT CAST('x' AS INT)"}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "Cast",
        ),
        (
            r#"{"sql": "SELECT $a", "params": {}}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "\"a\"",
        ),
        (
            r#"{"sql": "SELECT 1", "params": {"a": "1"}}"#,
            "/v1/sql",
            "*/*",
            400,
            "invalid_request",
            "\"a\"",
        ),
    ];
    for (body, path, accept, status, code, mentions) in cases {
        let response = ask(body.to_owned().into(), path, accept).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body} {path}");
        if status != 200 {
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["error"], code, "{body}: {answer}");
            let text = answer["error_description"].as_str().unwrap();
            assert!(text.contains(mentions), "{body}: {text}");
        }
    }

    let get = |path: String| {
        service
            .http
            .get(service.url(&path))
            .bearer_auth("analyst-key")
            .send()
    };
    let listed: Value = get("/v1/queries".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<_> = listed["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "daily_active_by_cohort",
        "events_per_platform",
        "goal_conversions_by_variant",
        "lesson_funnel_by_variant",
        "median_session_by_app_version",
    ] {
        assert!(names.contains(&name.to_owned()), "{names:?}");
    }
    let funnel = &listed["queries"][names
        .iter()
        .position(|n| n == "lesson_funnel_by_variant")
        .unwrap()];
    assert_eq!(funnel["params"][0]["name"], "experiment");
    assert!(funnel["params"][0].get("default").is_none());
    assert_eq!(funnel["params"][1]["default"], "24");
    for (path, status, mentions) in [
        ("/v1/queries/nope".to_owned(), 404, "nope"),
        (
            "/v1/queries/lesson_funnel_by_variant".to_owned(),
            400,
            "experiment",
        ),
        (
            "/v1/queries/events_per_platform?hours=1&x=2".to_owned(),
            400,
            "\"x\"",
        ),
        (
            "/v1/queries/events_per_platform?hours=soon".to_owned(),
            400,
            "soon",
        ),
        (
            "/v1/queries/events_per_platform?format=xml".to_owned(),
            400,
            "format",
        ),
    ] {
        let response = get(path.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["error_description"]
                .as_str()
                .unwrap()
                .contains(mentions),
            "{path}: {answer}"
        );
    }
    let response = get("/v1/queries/events_per_platform?hours=2&format=csv".into())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .starts_with("platform,events,subjects")
    );
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_are_refused_or_stopped_while_ingest_keeps_being_served() {
    let service = Service::start_with(|c| {
        c.sql.timeout = Duration::from_secs(2);
        c.sql.memory_limit = flagstream::config::ByteSize::mib(32);
        c.sql.max_concurrent = 4;
    })
    .await;
    let events = workload(40);
    ingest(&service, &events, None).await;
    let escape_target =
        std::env::temp_dir().join(format!("flagstream-copy-{}", std::process::id()));
    let copy = format!(
        "COPY (SELECT 1) TO '{}' STORED AS CSV",
        escape_target.display()
    );
    let nested = format!("SELECT {}1{}", "(".repeat(5_000), ")".repeat(5_000));
    let huge_text = format!("SELECT 1 /* {} */", "x".repeat(1 << 20));
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'".into(), 400, "invalid_request", "read-only"),
        (copy, 400, "invalid_request", "read-only"),
        ("SET datafusion.execution.batch_size = 1".into(), 400, "invalid_request", "read-only"),
        ("INSERT INTO events (type) VALUES ('x')".into(), 400, "invalid_request", "read-only"),
        ("DROP TABLE events".into(), 400, "invalid_request", "read-only"),
        ("CREATE VIEW v AS SELECT 1".into(), 400, "invalid_request", "read-only"),
        ("SELECT * FROM '/etc/passwd'".into(), 400, "invalid_request", "/etc/passwd"),
        (nested, 400, "invalid_request", "recursion"),
        (huge_text, 413, "payload_too_large", ""),
        ("SELECT max(value) FROM generate_series(1, 1000000000000)".into(), 422, "query_timeout", "2s"),
        ("SELECT count(*) FROM events a, events b, events c, events d WHERE a.type = d.type".into(), 422, "query_", ""),
        // Wide groups fill the 32 MiB pool long before the timeout, even on a loaded machine.
        ("SELECT value % 100000000 AS k, repeat(CAST(value % 100000000 AS VARCHAR), 400) AS pad, count(*) FROM generate_series(1, 1000000000) GROUP BY k, pad".into(), 422, "query_resources_exhausted", "memory"),
        ("SELECT count(*) AS n FROM events WHERE regexp_like(CAST(type AS VARCHAR), '^(a+)+$')".into(), 200, "", ""),
        ("SELECT regexp_like('aaaa', repeat('(a|b|c)*', 200000)) AS m".into(), 422, "query_", ""),
    ];
    // Ingest keeps being served all along.
    let feeder = {
        let http = service.http.clone();
        let url = service.url("/v1/batch");
        tokio::spawn(async move {
            let mut acknowledged = 0usize;
            for round in 0..40 {
                let batch: Vec<Value> = (0..10)
                    .map(|i| {
                        json!({"event_id": format!("h-{round}-{i}"), "user_id": "busy-reader",
                        "type": "app_opened", "timestamp": format_rfc3339(now_ms())})
                    })
                    .collect();
                let started = Instant::now();
                let response = http
                    .post(&url)
                    .json(&json!({"batch": batch}))
                    .send()
                    .await
                    .expect("ingest answers while queries run");
                assert_eq!(response.status(), 200);
                assert!(started.elapsed() < Duration::from_secs(5), "ingest starved");
                acknowledged += 10;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acknowledged
        })
    };
    for (query, status, code, mentions) in &cases {
        let (got, answer) = sql(&service, query).await;
        let shown: String = query.chars().take(80).collect();
        assert_eq!(got, *status, "{shown}: {answer}");
        if *status != 200 {
            let error = answer["error"].as_str().unwrap();
            assert!(error.starts_with(code), "{shown}: {answer}");
            let text = answer["error_description"].as_str().unwrap();
            assert!(text.contains(mentions), "{shown}: {text}");
        }
    }
    assert!(!escape_target.exists(), "COPY wrote a file");
    let acknowledged = feeder.await.unwrap();
    let (status, answer) = sql(
        &service,
        "SELECT count(*) AS n FROM events WHERE type = 'app_opened'",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["rows"][0]["n"], acknowledged);
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_the_limit_of_concurrency_are_answered_503() {
    let service = Service::start_with(|c| {
        c.sql.timeout = Duration::from_secs(3);
        c.sql.max_concurrent = 1;
    })
    .await;
    let start_slow = || {
        let http = service.http.clone();
        let url = service.url("/v1/sql");
        tokio::spawn(async move {
            let response = http
                .post(url)
                .json(&json!({"sql": "SELECT max(value) FROM generate_series(1, 1000000000000)"}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.text().await.unwrap_or_default())
        })
    };
    // Probes get 503 while the slow query holds the only permit. A probe may take the permit
    // first and turn the slow query away, and a query cancelled by its timeout holds the
    // permit until its next yield: a refused probe counts once the slow query it raced
    // against is known to have held the permit to its timeout. Otherwise it is sent again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut slow = start_slow();
    let (refused, (status, body)) = loop {
        assert!(
            Instant::now() < deadline,
            "the slow query never held the permit"
        );
        let response = service
            .http
            .post(service.url("/v1/sql"))
            .json(&json!({"sql": "SELECT 1"}))
            .send()
            .await
            .unwrap();
        if response.status() != 503 {
            if slow.is_finished() {
                slow = start_slow();
            }
            continue;
        }
        let answer = (&mut slow).await.unwrap();
        if answer.0 != 503 {
            break (response, answer);
        }
        slow = start_slow();
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let answer: Value = refused.json().await.unwrap();
    assert_eq!(answer["error"], "overloaded");
    // The query that held the permit ran out of time (and says so).
    assert_eq!(status, 422, "{body}");
    // The cancelled query stops at its next yield and gives its permit back.
    let answered = || async { sql(&service, "SELECT 1").await.0 == 200 };
    eventually_every(
        Duration::from_secs(5),
        Duration::from_millis(10),
        "the cancelled query gave its permit back",
        answered,
    )
    .await;
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_rolls_into_encrypted_segments_that_survive_a_restart_and_expire() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = test_config(data_dir.path());
    config.sql.memory_window = Duration::from_millis(200);
    // The log in clear, so that a wrong data key meets the segments (with the log sealed
    // too, a wrong key stops the start: see the privacy tests).
    config.privacy.encrypt_wal = false;
    let service = Service::start_config(config.clone()).await;
    let events = workload(60);
    ingest(&service, &events, None).await;
    let segments_dir = data_dir.path().join("sql");
    let segments = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&segments_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let rolled = || async {
        !segments().is_empty()
            && service
                .get_text("/metrics")
                .await
                .contains("flagstream_sql_memory_events 0\n")
    };
    eventually(Duration::from_secs(20), "the window rolled", rolled).await;
    let count = "SELECT count(*) AS n, count(DISTINCT subject) AS s FROM events";
    let (status, answer) = sql(&service, count).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"][0]["n"], events.len());
    assert_eq!(answer["rows"][0]["s"], 60);
    // Time pruning: a range with no events skips every segment and answers nothing.
    let (_, answer) = sql(
        &service,
        "SELECT count(*) AS n FROM events WHERE event_time < now() - INTERVAL '10 days'",
    )
    .await;
    assert_eq!(answer["rows"][0]["n"], 0);

    for path in segments() {
        let bytes = std::fs::read(&path).unwrap();
        for plain in [
            &b"lesson_completed"[..],
            b"lesson_id",
            b"reader-",
            b"android",
        ] {
            assert!(
                !bytes.windows(plain.len()).any(|w| w == plain),
                "{path:?} holds plain text"
            );
        }
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&path).unwrap(),
            );
        assert!(reader.is_err(), "a segment opened without the key");
    }
    service.stop().await.expect("clean stop");

    // A restart reads the segments and replays only what no segment holds: same answer.
    let service = Service::start_config(config.clone()).await;
    let (_, answer) = sql(&service, count).await;
    assert_eq!(answer["rows"][0]["n"], events.len(), "{answer}");
    service.stop().await.expect("clean stop");

    // Another key cannot read them: the service says so instead of answering wrongly.
    let mut wrong_key = config.clone();
    wrong_key.privacy.data_key = Some(flagstream::config::Secret::new(format!(
        "1 {}",
        "ab".repeat(32)
    )));
    let service = Service::start_config(wrong_key).await;
    let (status, answer) = sql(&service, count).await;
    assert_eq!(status, 500, "{answer}");
    service.stop().await.expect("clean stop");

    // Past retention, segments are deleted.
    config.sql.retention = config.sql.memory_window;
    let service = Service::start_config(config).await;
    eventually_every(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "expired segments were kept",
        || async { !segments().is_empty() },
    )
    .await;
    let (_, answer) = sql(&service, count).await;
    assert_eq!(answer["rows"][0]["n"], 0, "{answer}");
    service.stop().await.expect("clean stop");
}
