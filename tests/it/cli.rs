//! The `flagstream` binary itself: `check`, `config`, and `serve` with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::repo_path;

fn flagstream() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flagstream"));
    // The tests must not pick up the developer's own settings.
    for (name, _) in std::env::vars() {
        if name.starts_with("FLAGSTREAM_") {
            command.env_remove(name);
        }
    }
    command
}

#[test]
fn check_reports_every_configuration_mistake_at_once_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "0.0.0.0:8080"
request_timeout = "forever"
max_body = "12 parsecs"

[storage]
data_dir = "/etc/hostname"

[telemetry]
log_format = "xml"

[auth]
tokens = [{ name = "x", role = "superuser", sha256 = "abc" }]
"#,
    )
    .unwrap();
    let output = flagstream()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "server.request_timeout",
        "server.max_body",
        "storage.data_dir",
        "telemetry.log_format",
        "auth.tokens",
        "unknown role",
        "sha256 must be 64",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.starts_with("6 configuration problem(s)"), "{stderr}");
}

#[test]
fn check_reports_broken_flag_files_and_saved_queries() {
    let dir = tempfile::tempdir().unwrap();
    let flags = dir.path().join("flags");
    let queries = dir.path().join("queries");
    std::fs::create_dir_all(&flags).unwrap();
    std::fs::create_dir_all(&queries).unwrap();
    std::fs::write(
        flags.join("broken.json"),
        "{\"flags\": {\n  \"a\": {\"state\": \"MAYBE\", \"variants\": {\"on\": true}}\n}}",
    )
    .unwrap();
    std::fs::write(queries.join("drop_all.sql"), "DROP TABLE events").unwrap();
    std::fs::write(queries.join("typo.sql"), "SELEC 1").unwrap();
    std::fs::write(queries.join("no_column.sql"), "SELECT lesson FROM events").unwrap();
    std::fs::write(
        queries.join("params.sql"),
        "-- @param unused=1 Never used.\nSELECT count(*) FROM events WHERE platform = $platform",
    )
    .unwrap();
    let output = flagstream()
        .arg("check")
        .arg("--flags-dir")
        .arg(&flags)
        .arg("--queries-dir")
        .arg(&queries)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("6 problem(s)"), "{stderr}");
    assert!(
        stderr.contains("no_column: ") && stderr.contains("lesson"),
        "{stderr}"
    );
    assert!(
        stderr.contains("$platform is used but not declared"),
        "{stderr}"
    );
    assert!(
        stderr.contains("@param unused is declared but not used"),
        "{stderr}"
    );
    assert!(stderr.contains("broken.json:2: flag \"a\""), "{stderr}");
    assert!(
        stderr.contains("drop_all.sql: only a read-only query"),
        "{stderr}"
    );
    assert!(stderr.contains("typo.sql"), "{stderr}");
}

#[test]
fn the_shipped_flags_and_queries_pass_check() {
    let output = flagstream()
        .arg("check")
        .arg("--flags-dir")
        .arg(repo_path("flags"))
        .arg("--queries-dir")
        .arg(repo_path("queries"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let output = flagstream()
        .arg("config")
        .env("FLAGSTREAM_REDIS_URL", "redis://app:topsecret@cache:6379")
        .env("FLAGSTREAM_SERVER__REQUEST_TIMEOUT", "7s")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("request_timeout = \"7s\""), "{stdout}");
    assert!(
        stdout.contains("redis://app:[redacted]@cache:6379"),
        "{stdout}"
    );
    assert!(!stdout.contains("topsecret"));
}

#[test]
fn serve_runs_with_no_configuration_and_stops_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut child = flagstream()
        .current_dir(data.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("FLAGSTREAM_TELEMETRY__LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = Instant::now();
    let addr = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no listening line"
        );
        let line = lines.next().expect("log line").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        if event["message"] == "serving the api" {
            break event["addr"].as_str().unwrap().to_owned();
        }
    };
    let body = reqwest::blocking_get(&format!("http://{addr}/healthz"));
    assert!(body.contains("\"ok\""), "{body}");
    assert!(
        data.path().join("data").is_dir(),
        "the default data dir is created"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// A tiny blocking GET over a raw socket, so this test needs no async runtime.
mod reqwest {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn blocking_get(url: &str) -> String {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = TcpStream::connect(host).unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_query_print_a_running_servers_answers() {
    let service = crate::harness::Service::start_with(|c| {
        c.auth.tokens = crate::harness::client_and_analyst_tokens();
    })
    .await;
    let now = flagstream::events::time::format_rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let batch: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            serde_json::json!({"event_id": format!("cli-{i}"), "user_id": format!("u{}", i % 2),
            "type": "app_opened", "timestamp": now, "context": {"platform": "ios"}})
        })
        .collect();
    let response = service
        .http
        .post(service.url("/v1/batch"))
        .bearer_auth("client-key")
        .json(&serde_json::json!({ "batch": batch }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let server = format!("http://{}", service.addr);
    let run = |args: Vec<String>| {
        let output = flagstream().args(&args).output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let args = |list: &[&str]| -> Vec<String> {
        list.iter()
            .map(|s| s.to_string())
            .chain(["--server".into(), server.clone()])
            .collect()
    };
    let sql = "SELECT platform, count(*) AS events FROM events GROUP BY platform";
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let args = args(&["sql", sql, "--token", "analyst-key"]);
        move || run(args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "platform | events\n---------+-------\nios      | 5\n(1 rows)\n"
    );

    let (code, stdout, _) = tokio::task::spawn_blocking({
        let args = args(&["sql", sql, "--token", "analyst-key", "--format", "csv"]);
        move || run(args)
    })
    .await
    .unwrap();
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "platform,events\nios,5\n")
    );

    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let args = args(&[
            "query",
            "events_per_platform",
            "--param",
            "hours=2",
            "--format",
            "json",
            "--token",
            "analyst-key",
        ]);
        move || run(args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["rows"][0]["events"], 5);
    assert_eq!(answer["rows"][0]["subjects"], 2);

    for (list, mentions) in [
        (vec!["sql", "SELECT 1", "--token", "client-key"], "403"),
        (
            vec!["sql", "SELEC 1", "--token", "analyst-key"],
            "syntax error",
        ),
        (vec!["query", "nope", "--token", "analyst-key"], "404"),
    ] {
        let (code, _, stderr) = tokio::task::spawn_blocking({
            let args = args(&list);
            move || run(args)
        })
        .await
        .unwrap();
        assert_eq!(code, Some(1), "{list:?}");
        assert!(stderr.contains(mentions), "{list:?}: {stderr}");
    }
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        run(vec![
            "sql".into(),
            "SELECT 1".into(),
            "--server".into(),
            "http://127.0.0.1:1".into(),
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot reach 127.0.0.1:1"), "{stderr}");
    service.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prints_the_sealed_audit_log() {
    let service = crate::harness::Service::start_with(|c| {
        c.auth.tokens = crate::harness::client_and_analyst_tokens();
    })
    .await;
    let response = service
        .http
        .post(service.url("/v1/sql"))
        .bearer_auth("analyst-key")
        .json(&serde_json::json!({"sql": "SELECT 7 AS seven"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let data_dir = service.data_dir().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        flagstream()
            .arg("audit")
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "sql.adhoc" && e["detail"] == "SELECT 7 AS seven"),
        "{stdout}"
    );
    // With other data keys, nothing is printed in clear.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("audit")).unwrap();
    std::fs::copy(
        service.data_dir().join("audit/audit.sealed"),
        other.path().join("audit/audit.sealed"),
    )
    .unwrap();
    let output = flagstream()
        .arg("audit")
        .arg("--data-dir")
        .arg(other.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not open"));
    assert!(!String::from_utf8_lossy(&output.stdout).contains("SELECT 7"));
}
