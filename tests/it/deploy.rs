//! The files users deploy with: the compose stack, the Dockerfile, Prometheus and Grafana.
//! No Docker engine runs here, so they are validated as files and against the real service.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use flagstream::config::TokenHash;
use serde_json::Value;

use crate::harness::{Service, repo_path};

fn run_tool(program: &str, args: &[&str], install: &str) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(repo_path(""))
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}. Install it with `{install}`"))
}

#[test]
fn the_compose_file_matches_the_compose_schema() {
    let output = run_tool(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
        "apt-get install docker-compose",
    );
    assert!(
        output.status.success(),
        "docker-compose rejects docker-compose.yml:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_prometheus_config_passes_promtool() {
    let output = run_tool(
        "promtool",
        &["check", "config", "grafana/prometheus/prometheus.yml"],
        "apt-get install prometheus",
    );
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `ENV` settings of the Dockerfile's final stage.
fn dockerfile_env() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_path("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .flat_map(|settings| settings.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn compose() -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(repo_path("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

#[test]
fn the_container_environment_is_a_valid_configuration() {
    let compose = compose();
    let service_env = &compose["services"]["flagstream"]["environment"];
    let mut env = dockerfile_env();
    for (key, value) in service_env.as_mapping().expect("environment as a map") {
        env.insert(
            key.as_str().unwrap().to_owned(),
            value.as_str().unwrap().to_owned(),
        );
    }
    // Paths inside the image do not exist here; point them at the repository's copies.
    env.insert(
        "FLAGSTREAM_FLAGS_DIR".into(),
        repo_path("flags").display().to_string(),
    );
    env.insert(
        "FLAGSTREAM_QUERIES_DIR".into(),
        repo_path("queries").display().to_string(),
    );
    env.insert(
        "FLAGSTREAM_DATA_DIR".into(),
        std::env::temp_dir().display().to_string(),
    );
    let output = Command::new(env!("CARGO_BIN_EXE_flagstream"))
        .arg("config")
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the compose environment is rejected:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("listen = \"0.0.0.0:8080\""), "{stdout}");
    assert!(
        stdout.contains("metrics_listen = \"0.0.0.0:9090\""),
        "{stdout}"
    );
    // The comment in docker-compose.yml names the demo tokens; make sure it tells the truth.
    for token in ["demo-client-key", "demo-admin-key"] {
        let digest = TokenHash::of(token).to_hex();
        assert!(
            stdout.contains(&digest),
            "{token} is not a configured token"
        );
    }
}

#[test]
fn prometheus_scrapes_the_port_flagstream_serves_metrics_on() {
    let compose = compose();
    let env = &compose["services"]["flagstream"]["environment"];
    let metrics_listen = env["FLAGSTREAM_SERVER__METRICS_LISTEN"].as_str().unwrap();
    let port = metrics_listen.rsplit(':').next().unwrap();
    let prometheus =
        std::fs::read_to_string(repo_path("grafana/prometheus/prometheus.yml")).unwrap();
    assert!(
        prometheus.contains(&format!("flagstream:{port}")),
        "prometheus.yml does not scrape flagstream:{port}"
    );
}

/// The dashboards the stack provisions: the checks below must see both, not pass on an empty
/// directory.
fn dashboard_files() -> Vec<std::path::PathBuf> {
    let dir = repo_path("grafana/dashboards");
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["experiments.json", "flagstream-service.json"]);
    paths
}

/// Every `flagstream_*` metric named in a dashboard expression.
fn dashboard_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let mut found = BTreeMap::new();
    for path in dashboard_files() {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        found.insert(path.display().to_string(), names);
    }
    found
}

/// Every `$variable` a dashboard's queries use is one of its template variables or one of
/// Grafana's own; panel ids are unique.
#[test]
fn dashboards_declare_their_variables_and_unique_panels() {
    for path in dashboard_files() {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
        let declared: BTreeSet<&str> = dashboard["templating"]["list"]
            .as_array()
            .expect("a templating list")
            .iter()
            .map(|v| v["name"].as_str().expect("a variable name"))
            .collect();
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        for expr in &exprs {
            for used in expr.split('$').skip(1) {
                let name: String = used
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || declared.contains(name.as_str()),
                    "{}: ${name} in {expr:?} is not a template variable",
                    path.display()
                );
            }
        }
        let mut ids = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let id = panel["id"].as_i64().expect("a panel id");
            assert!(ids.insert(id), "{}: panel id {id} repeats", path.display());
        }
    }
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            if let Some(Value::Object(ds)) = map.get("datasource")
                && ds.get("type") == Some(&Value::String("prometheus".into()))
            {
                assert_eq!(ds["uid"], "flagstream-prometheus", "unknown datasource uid");
            }
            map.values().for_each(|v| collect_exprs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("flagstream_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_query_only_metrics_the_service_exports() {
    // Experiment results are recomputed for the gauges every 200 ms instead of every minute.
    let service = Service::start_with(|c| {
        c.experiments.refresh = std::time::Duration::from_millis(200);
    })
    .await;
    for path in ["/healthz", "/readyz", "/nope"] {
        service.get_json(path).await;
    }
    // Exercise ingest (accepted and rejected events) and flags (with an experiment exposure).
    let at = flagstream::events::time::format_rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    // Two children per variant of two reward-animation variants, one of each converting, so
    // that every result gauge (rates, lifts, p-values, the sample-ratio check) has a value.
    let mut events = vec![
        serde_json::json!({"event_id": "d-1", "type": "app_opened", "timestamp": at}),
        serde_json::json!({"event_id": "d-2", "type": "nope", "timestamp": at}),
    ];
    for (i, variant) in ["stars", "stars", "confetti", "confetti"]
        .iter()
        .enumerate()
    {
        let user = format!("dashboard-child-{i}");
        events.push(
            serde_json::json!({"event_id": format!("d-x{i}"), "user_id": user,
            "type": "$exposure", "timestamp": at,
            "properties": {"flag": "reward-animation", "variant": variant}}),
        );
        if i % 2 == 0 {
            events.push(
                serde_json::json!({"event_id": format!("d-l{i}"), "user_id": user,
                "type": "lesson_completed", "timestamp": at,
                "properties": {"lesson_id": "l-1", "score": 1}}),
            );
        }
    }
    let batch = serde_json::json!({ "batch": events });
    assert_eq!(service.post_json("/v1/batch", &batch).await.0, 200);
    let query = serde_json::json!({"sql": "SELECT count(*) FROM events"});
    assert_eq!(service.post_json("/v1/sql", &query).await.0, 200);
    let context = serde_json::json!({"context": {"targetingKey": "child-dashboard"}});
    service
        .post_json("/ofrep/v1/evaluate/flags", &context)
        .await;
    let wanted = dashboard_metrics();
    let all_exported = |exported: &BTreeSet<String>| {
        wanted.values().flatten().all(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            exported.contains(base) || exported.contains(name)
        })
    };
    // Some metrics appear only once their first value is recorded (the exposure sink and
    // the result refresh run in the background): wait for them, a bounded time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exported = loop {
        let metrics = service.get_text("/metrics").await;
        let exported: BTreeSet<String> = metrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        if all_exported(&exported) || std::time::Instant::now() > deadline {
            break exported;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for (dashboard, names) in wanted {
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exported.contains(base) || exported.contains(&name),
                "{dashboard} queries {name}, which /metrics does not export"
            );
        }
    }
}
