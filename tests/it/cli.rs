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
    assert!(stderr.starts_with("3 problem(s)"), "{stderr}");
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
