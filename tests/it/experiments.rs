//! Experiment results end to end: generated children with a known true lift go in over HTTP,
//! `/v1/experiments/{key}/results` must find the lift, equal an exact recount of what was
//! sent, flag an allocation skewed on purpose, and publish the gauges the Experiments
//! dashboard reads; bad requests get clear errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use flagstream::events::time::format_rfc3339;
use serde_json::{Value, json};

use crate::harness::wait::now_ms;
use crate::harness::{Service, client_and_analyst_tokens};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

/// Conversion to `lesson_completed` per variant: confetti's true absolute lift is +0.10,
/// mascot's is zero.
const LESSON_RATE: [(&str, f64); 3] = [("stars", 0.20), ("confetti", 0.30), ("mascot", 0.20)];
/// Mean session length per variant, ms: mascot's true lift is +60 s.
const SESSION_MS: [(&str, f64); 3] = [
    ("stars", 300_000.0),
    ("confetti", 300_000.0),
    ("mascot", 360_000.0),
];
const PER_VARIANT: usize = 1_200;

const FLAGS: &str = r#"{"flags": {
  "reward": {"state": "ENABLED",
    "variants": {"stars": "stars", "confetti": "confetti", "mascot": "mascot"},
    "defaultVariant": "stars",
    "metadata": {"experiment": true, "control": "stars",
                 "goals": "lesson_completed,reward_shown", "description": "Reward animation."},
    "targeting": {"fractional": [["stars", 34], ["confetti", 33], ["mascot", 33]]}},
  "pacing": {"state": "ENABLED", "variants": {"standard": 1, "gentle": 2},
    "defaultVariant": "standard",
    "metadata": {"experiment": true, "control": "standard", "goals": "lesson_completed"},
    "targeting": {"fractional": [["standard", 50], ["gentle", 50]]}},
  "old-test": {"state": "DISABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
    "metadata": {"experiment": true, "control": "a", "goals": "app_opened"}},
  "kill-switch": {"state": "ENABLED", "variants": {"on": true, "off": false},
    "defaultVariant": "on"}
}}"#;

/// A small deterministic generator (SplitMix64), so the data and the verdicts are the same on
/// every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the generated data holds, counted here independently of the service.
#[derive(Debug, Default)]
struct Truth {
    exposed: BTreeMap<String, u64>,
    converted: BTreeMap<String, u64>,
    time_sum: BTreeMap<String, f64>,
    multiple: u64,
}

fn event(id: &str, user: &str, kind: &str, at: i64, properties: Value) -> Value {
    json!({"event_id": id, "user_id": user, "type": kind, "timestamp": format_rfc3339(at),
           "properties": properties})
}

fn exposure(id: String, user: &str, flag: &str, variant: &str, at: i64) -> Value {
    event(
        &id,
        user,
        "$exposure",
        at,
        json!({"flag": flag, "variant": variant}),
    )
}

/// Children of the `reward` experiment, `PER_VARIANT` per variant, exposed in the last three
/// hours, plus noise the results must ignore: goals before exposure, children never exposed,
/// exposures to another flag, and second exposures to another variant.
fn reward_workload(now: i64) -> (Vec<Value>, Truth) {
    // A fixed seed: the draws are the same on every run, each within half a standard error
    // of the truth (any seed puts a 95% interval around the truth 19 times in 20).
    let mut random = Random(1);
    let mut events = Vec::new();
    let mut truth = Truth::default();
    for i in 0..3 * PER_VARIANT {
        let (variant, rate) = LESSON_RATE[i % 3];
        let user = format!("child-{i}");
        let exposed_at = now - 3 * HOUR + i as i64 * 1_000;
        events.push(exposure(
            format!("x-{i}"),
            &user,
            "reward",
            variant,
            exposed_at,
        ));
        *truth.exposed.entry(variant.into()).or_default() += 1;
        if i % 50 == 7 {
            // A second exposure to another variant a minute later: still in its first.
            let other = LESSON_RATE[(i + 1) % 3].0;
            events.push(exposure(
                format!("x2-{i}"),
                &user,
                "reward",
                other,
                exposed_at + MINUTE,
            ));
            truth.multiple += 1;
        }
        if random.unit() < rate {
            let properties = json!({"lesson_id": "l-1", "score": 1});
            events.push(event(
                &format!("l-{i}"),
                &user,
                "lesson_completed",
                exposed_at + 10 * MINUTE,
                properties,
            ));
            *truth.converted.entry(variant.into()).or_default() += 1;
        } else if i % 7 == 0 {
            // Completed a lesson an hour before the exposure: not a conversion.
            let properties = json!({"lesson_id": "l-0", "score": 1});
            events.push(event(
                &format!("e-{i}"),
                &user,
                "lesson_completed",
                exposed_at - HOUR,
                properties,
            ));
        }
        let mean = SESSION_MS.iter().find(|(v, _)| *v == variant).unwrap().1;
        let duration = (mean + (random.unit() - 0.5) * 200_000.0).round();
        events.push(event(
            &format!("s-{i}"),
            &user,
            "session_ended",
            exposed_at + 20 * MINUTE,
            json!({"duration_ms": duration as i64}),
        ));
        *truth.time_sum.entry(variant.into()).or_default() += duration;
    }
    for i in 0..200 {
        let user = format!("unexposed-{i}");
        let properties = json!({"lesson_id": "l-1", "score": 1});
        events.push(event(
            &format!("u-{i}"),
            &user,
            "lesson_completed",
            now - HOUR,
            properties,
        ));
        events.push(exposure(
            format!("o-{i}"),
            &user,
            "pacing-old",
            "gentle",
            now - 2 * HOUR,
        ));
    }
    (events, truth)
}

/// `pacing` exposures split 600 : 450 although the allocation says 50 : 50.
fn skewed_workload(now: i64) -> Vec<Value> {
    (0..1_050)
        .map(|i| {
            let variant = if i < 600 { "standard" } else { "gentle" };
            exposure(
                format!("p-{i}"),
                &format!("pupil-{i}"),
                "pacing",
                variant,
                now - HOUR,
            )
        })
        .collect()
}

async fn ingest(service: &Service, events: &[Value]) {
    for chunk in events.chunks(1_000) {
        let response = service
            .http
            .post(service.url("/v1/batch"))
            .bearer_auth("client-key")
            .json(&json!({"sent_at": format_rfc3339(now_ms()), "batch": chunk}))
            .send()
            .await
            .expect("batch request");
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        for result in answer["results"].as_array().expect("results") {
            assert_eq!(result["status"], "ok", "{result}");
        }
    }
}

async fn start(flags_dir: &Path, refresh: Duration) -> Service {
    let dir = flags_dir.to_path_buf();
    Service::start_with(move |c| {
        c.auth.tokens = client_and_analyst_tokens();
        c.flags.dir = dir;
        c.experiments.refresh = refresh;
    })
    .await
}

fn flags_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("experiments.json"), FLAGS).unwrap();
    dir
}

async fn get(
    service: &Service,
    path: &str,
    token: Option<&str>,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut request = service.http.get(service.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.expect("request")
}

async fn results(service: &Service, path: &str) -> Value {
    let response = get(service, path, Some("analyst-key"), None).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

fn variant<'a>(results: &'a Value, name: &str) -> &'a Value {
    results["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"] == name)
        .unwrap_or_else(|| panic!("no variant {name} in {results}"))
}

fn num(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

fn contains(interval: &Value, value: f64) -> bool {
    num(&interval[0]) <= value && value <= num(&interval[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_find_a_known_lift_and_equal_a_recount() {
    let flags = flags_dir();
    let service = start(flags.path(), Duration::ZERO).await;
    let now = now_ms();
    let (events, truth) = reward_workload(now);
    ingest(&service, &events).await;

    let answer = results(&service, "/v1/experiments/reward/results").await;
    assert_eq!(answer["experiment"], "reward");
    assert_eq!(answer["control"], "stars");
    assert_eq!(
        answer["variants"][0]["variant"], "stars",
        "the control leads"
    );
    assert_eq!(answer["exposed_subjects"], 3 * PER_VARIANT as u64);
    assert_eq!(answer["multiple_variant_subjects"], truth.multiple);
    for (name, _) in LESSON_RATE {
        let row = variant(&answer, name);
        let exposed = truth.exposed[name];
        assert_eq!(row["exposed_subjects"], exposed, "{name}");
        let lessons = &row["goals"][0];
        assert_eq!(lessons["goal"], "lesson_completed");
        assert_eq!(
            lessons["converted"], truth.converted[name],
            "{name}: {answer}"
        );
        let rate = truth.converted[name] as f64 / exposed as f64;
        assert!((num(&lessons["rate"]) - rate).abs() < 1e-12, "{name}");
        assert_eq!(row["goals"][1]["converted"], 0, "nobody was shown a reward");
        let mean = truth.time_sum[name] / exposed as f64;
        let reported = num(&row["time_spent_ms"]["mean"]);
        assert!(
            (reported - mean).abs() < 1e-6 * mean,
            "{name}: {reported} vs {mean}"
        );
        assert!(
            (num(&row["expected_share"]) - [0.34, 0.33][usize::from(name != "stars")]).abs()
                < 1e-12
        );
    }
    // The known lifts are found, and the absent one is not.
    let confetti = &variant(&answer, "confetti")["goals"][0]["lift"];
    assert!(contains(&confetti["absolute_ci"], 0.10), "{confetti}");
    assert!(num(&confetti["absolute_ci"][0]) > 0.0, "{confetti}");
    assert!(num(&confetti["p_value"]) < 0.001, "{confetti}");
    assert_eq!(confetti["test"], "z");
    let mascot = variant(&answer, "mascot");
    let no_lift = &mascot["goals"][0]["lift"];
    assert!(contains(&no_lift["absolute_ci"], 0.0), "{no_lift}");
    let time = &mascot["time_spent_ms"]["lift"];
    assert_eq!(time["test"], "welch_t");
    assert!(contains(&time["absolute_ci"], 60_000.0), "{time}");
    assert!(num(&time["absolute_ci"][0]) > 0.0, "{time}");
    assert!(num(&time["p_value"]) < 0.001, "{time}");
    assert!(contains(&time["relative_ci"], 0.2), "{time}");
    assert!(variant(&answer, "stars")["goals"][0].get("lift").is_none());
    // The allocation holds; the double exposures are reported.
    let srm = &answer["sample_ratio"];
    assert_eq!(srm["mismatch"], false, "{srm}");
    assert!(num(&srm["p_value"]) > 0.01, "{srm}");
    let warnings = answer["warnings"].to_string();
    assert!(!warnings.contains("mismatch"), "{warnings}");
    assert!(
        warnings.contains(&format!("{} subjects", truth.multiple)),
        "{warnings}"
    );

    // A range before every exposure holds nobody.
    let early = format!(
        "/v1/experiments/reward/results?from={}&to={}",
        format_rfc3339(now - 10 * HOUR),
        format_rfc3339(now - 5 * HOUR)
    );
    let empty = results(&service, &early).await;
    assert_eq!(empty["exposed_subjects"], 0);
    assert_eq!(empty["variants"].as_array().unwrap().len(), 3);
    assert!(
        empty["warnings"].to_string().contains("no subject"),
        "{empty}"
    );

    // The same results as CSV, by parameter or by Accept.
    for (path, accept) in [
        ("/v1/experiments/reward/results?format=csv", None),
        ("/v1/experiments/reward/results", Some("text/csv")),
    ] {
        let response = get(&service, path, Some("analyst-key"), accept).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv")
        );
        let csv = response.text().await.unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 1 + 3 * 3, "{csv}");
        let confetti_line = lines
            .iter()
            .find(|l| l.starts_with("reward,confetti,false,conversion:lesson_completed,"))
            .unwrap_or_else(|| panic!("{csv}"));
        let cells: Vec<&str> = confetti_line.split(',').collect();
        assert_eq!(cells[5], truth.converted["confetti"].to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_allocation_raises_the_srm_warning_and_the_gauges_follow() {
    let flags = flags_dir();
    let service = start(flags.path(), Duration::from_millis(200)).await;
    ingest(&service, &skewed_workload(now_ms())).await;

    let answer = results(&service, "/v1/experiments/pacing/results").await;
    assert_eq!(variant(&answer, "standard")["exposed_subjects"], 600);
    assert_eq!(variant(&answer, "gentle")["exposed_subjects"], 450);
    let srm = &answer["sample_ratio"];
    assert_eq!(srm["mismatch"], true, "{srm}");
    assert!(num(&srm["p_value"]) < 0.001, "{srm}");
    assert_eq!(srm["df"], 1.0);
    assert!(
        answer["warnings"]
            .to_string()
            .contains("sample ratio mismatch"),
        "{answer}"
    );

    // The refresh task publishes the same verdict for the dashboard.
    // Bounded, and generous: under a loaded machine the SQL runtime runs at a lower priority.
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let metrics = service.get_text("/metrics").await;
        let found = metrics
            .lines()
            .find(|l| {
                l.starts_with("flagstream_experiment_exposed_subjects")
                    && l.contains("experiment=\"pacing\"")
                    && l.contains("variant=\"gentle\"")
                    && l.ends_with(" 450")
            })
            .map(str::to_owned);
        match found {
            Some(line)
                if metrics.contains("flagstream_experiment_srm_p_value{experiment=\"pacing\"}") =>
            {
                let srm_line = metrics
                    .lines()
                    .find(|l| {
                        l.starts_with("flagstream_experiment_srm_p_value{experiment=\"pacing\"}")
                    })
                    .unwrap();
                let value: f64 = srm_line.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(value < 0.001, "{srm_line}");
                break line;
            }
            _ if Instant::now() > deadline => {
                let related: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.contains("experiment") || l.contains("sql_queries"))
                    .collect();
                panic!("no pacing gauges in /metrics:\n{}", related.join("\n"))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(line.contains("gentle"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_and_bad_requests_get_clear_answers() {
    let flags = flags_dir();
    let service = start(flags.path(), Duration::ZERO).await;

    let response = get(&service, "/v1/experiments", Some("analyst-key"), None).await;
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    let keys: Vec<&str> = list["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["old-test", "pacing", "reward"], "{list}");
    let reward = &list["experiments"][2];
    assert_eq!(reward["status"], "running");
    assert_eq!(reward["goals"], json!(["lesson_completed", "reward_shown"]));
    assert_eq!(reward["allocation"]["stars"], 0.34);
    assert_eq!(list["experiments"][0]["status"], "stopped");
    assert_eq!(list["experiments"][0]["allocation"], Value::Null);

    for token in [None, Some("client-key"), Some("wrong-key")] {
        for path in ["/v1/experiments", "/v1/experiments/reward/results"] {
            let status = get(&service, path, token, None).await.status().as_u16();
            let expected = if token == Some("client-key") {
                403
            } else {
                401
            };
            assert_eq!(status, expected, "{path} with {token:?}");
        }
    }

    let long_key = "k".repeat(5_000);
    let cases: Vec<(String, Option<&str>, u16, &str)> = vec![
        (
            "/v1/experiments/nope/results".into(),
            None,
            404,
            "no experiment",
        ),
        (
            "/v1/experiments/kill-switch/results".into(),
            None,
            404,
            "no experiment",
        ),
        (
            format!("/v1/experiments/{long_key}/results"),
            None,
            404,
            "no experiment",
        ),
        (
            "/v1/experiments/x'%20OR%20'1'='1/results".into(),
            None,
            404,
            "no experiment",
        ),
        (
            "/v1/experiments/%F0%9F%A6%80/results".into(),
            None,
            404,
            "no experiment",
        ),
        (
            "/v1/experiments/reward/results?from=yesterday".into(),
            None,
            400,
            "RFC 3339",
        ),
        (
            "/v1/experiments/reward/results?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z"
                .into(),
            None,
            400,
            "before",
        ),
        (
            "/v1/experiments/reward/results?window=1h".into(),
            None,
            400,
            "unknown parameter",
        ),
        (
            "/v1/experiments/reward/results?format=xml".into(),
            None,
            400,
            "json or csv",
        ),
        (
            "/v1/experiments/reward/results?from=%ZZ".into(),
            None,
            400,
            "",
        ),
        (
            "/v1/experiments/reward/results".into(),
            Some("image/png"),
            406,
            "text/csv",
        ),
    ];
    for (path, accept, status, text) in cases {
        let response = get(&service, &path, Some("analyst-key"), accept).await;
        let short: String = path.chars().take(80).collect();
        assert_eq!(response.status().as_u16(), status, "{short}");
        let body: Value = response.json().await.expect("a JSON error body");
        let message = body["error_description"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(text), "{short}: {body}");
        assert!(
            message.len() < 300,
            "{short}: the error echoes the input: {body}"
        );
    }
    // Still serving.
    let response = get(
        &service,
        "/v1/experiments/reward/results",
        Some("analyst-key"),
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
}
