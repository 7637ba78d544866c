//! Tokens of school staff: scoped to a school or a class, they see its events only, and only
//! in groups of enough children — through SQL, saved queries and cohorts alike.

use std::time::Duration;

use flagstream::config::{Role, TokenConfig, TokenHash};
use serde_json::{Value, json};

use crate::harness::client::{post_batch, send};
use crate::harness::wait::{now_ms, until};
use crate::harness::{Service, role_tokens, test_config};

fn teacher(name: &str, key: &str, scope: &str) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        role: Role::Analyst,
        sha256: TokenHash::of(key),
        scope: Some(scope.parse().unwrap()),
        project: None,
    }
}

async fn sql(service: &Service, token: &str, text: &str) -> (u16, Value) {
    send(
        service,
        token,
        reqwest::Method::POST,
        "/v1/sql",
        Some(json!({"sql": text})),
    )
    .await
}

async fn get(service: &Service, token: &str, path: &str) -> (u16, Value) {
    send(service, token, reqwest::Method::GET, path, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn school_staff_see_their_school_only_in_groups_of_enough_children() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config(data.path());
    config.auth.tokens = role_tokens();
    config
        .auth
        .tokens
        .push(teacher("head-s1", "school-key", "school_id=s1"));
    config
        .auth
        .tokens
        .push(teacher("teacher-4b", "class-key", "class_id=4B"));
    config.pipeline.segments = vec!["school_id".into(), "class_id".into()];
    let service = Service::start_config(config).await;

    // School s1: class 4A with 6 children, 4B with 3; school s2: class 9Z with 8.
    let at = now_ms() - 60_000;
    let mut batch = Vec::new();
    for (school, class, children) in [("s1", "4A", 6), ("s1", "4B", 3), ("s2", "9Z", 8)] {
        for child in 0..children {
            batch.push(
                json!({"event_id": format!("{class}-{child}"), "type": "app_opened",
                "user_id": format!("child-{class}-{child}"),
                "timestamp": flagstream::events::time::format_rfc3339(at),
                "context": {"school_id": school, "class_id": class, "platform": "ios"}}),
            );
        }
    }
    let results = post_batch(&service, batch).await;
    assert!(results.iter().all(|r| r.0 == "ok"), "{results:?}");

    // SQL: the school's rows only, whatever the WHERE; the class of 3 is left out.
    let (status, answer) = sql(
        &service,
        "school-key",
        "SELECT class_id, count(*) AS n FROM events WHERE school_id IN ('s1', 's2') GROUP BY class_id ORDER BY class_id",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"], json!([{"class_id": "4A", "n": 6}]));
    let (status, answer) = sql(&service, "analyst-key", "SELECT count(*) AS n FROM events").await;
    assert_eq!((status, &answer["rows"][0]["n"]), (200, &json!(17)));
    // Rows that name a child, and other tables, are refused with the reason.
    for text in [
        "SELECT subject, class_id FROM events",
        "SELECT count(*) FROM exposures",
        "SELECT count(*) FROM counters",
    ] {
        let (status, answer) = sql(&service, "school-key", text).await;
        assert!(matches!(status, 400 | 403), "{text}: {status} {answer}");
        assert!(answer["error_description"].is_string(), "{answer}");
    }
    let (status, answer) = sql(&service, "school-key", "SELECT subject FROM events").await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"], "forbidden");
    // A class's teacher: 3 children, fewer than 5: nothing is answered.
    let (status, answer) = sql(&service, "class-key", "SELECT count(*) AS n FROM events").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"], json!([]));
    // A saved aggregation runs in the scope too.
    let (status, answer) = get(&service, "school-key", "/v1/queries/events_per_platform").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["rows"],
        json!([{"platform": "ios", "events": 9, "subjects": 9}])
    );

    // Cohorts: the own segment only; a window of too few children is blanked.
    let series = until(Duration::from_secs(30), "the pipeline counted", || async {
        let (status, answer) = get(&service, "school-key", "/v1/cohorts?segment=school_id").await;
        assert_eq!(status, 200, "{answer}");
        let series = answer["series"].as_array().unwrap().clone();
        let counted = series.iter().any(|s| {
            s["points"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["active_subjects"].as_u64().unwrap_or(0) > 0)
        });
        if counted { Ok(series) } else { Err(answer) }
    })
    .await;
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0]["value"], "s1");
    let active: u64 = series[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["active_subjects"].as_u64().unwrap())
        .sum();
    assert_eq!(active, 9);
    let (status, answer) = get(&service, "class-key", "/v1/cohorts?segment=class_id").await;
    assert_eq!(status, 200, "{answer}");
    let points = answer["series"][0]["points"].as_array().unwrap().clone();
    assert!(points.iter().any(|p| p["suppressed"] == true), "{answer}");
    assert!(
        points
            .iter()
            .all(|p| p["active_subjects"] == 0 && p["events"] == json!({})),
        "{answer}"
    );
    for path in [
        "/v1/cohorts",
        "/v1/cohorts?segment=class_id",
        "/v1/cohorts?experiment=reward-animation",
        "/v1/experiments/reward-animation/results",
    ] {
        let (status, answer) = get(&service, "school-key", path).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert_eq!(answer["error"], "forbidden");
    }
    // The unscoped analyst still sees every school.
    let (status, answer) = get(&service, "analyst-key", "/v1/cohorts?segment=school_id").await;
    assert_eq!(status, 200);
    assert_eq!(answer["series"].as_array().unwrap().len(), 2, "{answer}");
}
