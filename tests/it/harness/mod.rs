//! Test harness: a real `redis-server` and the real service, both on loopback; requests
//! as clients send them ([`client`]); the clock and waiting on conditions ([`wait`]).

pub mod client;
pub mod oidc;
pub mod wait;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flagstream::config::{Config, RedisUrl, Role, TokenConfig, TokenHash};
use flagstream::{Listeners, RunError, run};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A `redis-server` of its own, on a unix socket in a temporary directory, without
/// persistence. Killed on drop; its log is printed when the test fails.
pub struct Redis {
    child: Child,
    dir: TempDir,
}

impl Redis {
    /// Starts `redis-server` (or `$FLAGSTREAM_REDIS_SERVER`) and waits until it answers PING.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let child = Self::spawn(&dir, false);
        Self::ready(Self { child, dir })
    }

    /// Starts a server that keeps its data across a kill (append-only file, fsync always).
    pub fn start_durable() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let child = Self::spawn(&dir, true);
        Self::ready(Self { child, dir })
    }

    /// Kills the server with SIGKILL and starts it again on the same socket and data.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.dir, true);
        self.wait_for_ping();
    }

    fn ready(redis: Self) -> Self {
        redis.wait_for_ping();
        redis
    }

    fn wait_for_ping(&self) {
        let redis = self;
        let started = Instant::now();
        while !redis.answers_ping() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(dir: &TempDir, durable: bool) -> Child {
        let binary =
            std::env::var("FLAGSTREAM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let persistence: &[&str] = if durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        Command::new(&binary)
            .args(["--port", "0", "--save", ""])
            .args(persistence)
            .arg("--unixsocket")
            .arg(dir.path().join("redis.sock"))
            .args(["--unixsocketperm", "700"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {binary}: {err}. The integration tests need a real Redis: \
                     install it with `apt-get install redis-server` (Debian/Ubuntu) or \
                     `brew install redis` (macOS), or set FLAGSTREAM_REDIS_SERVER to its path"
                )
            })
    }

    /// Returns the socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// Returns the URL the service should use.
    pub fn url(&self) -> RedisUrl {
        format!("unix://{}", self.socket().display())
            .parse()
            .expect("valid redis url")
    }

    /// Returns whether the server answers PING right now.
    pub fn answers_ping(&self) -> bool {
        let Ok(mut stream) = UnixStream::connect(self.socket()) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Kills the server and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal_quietly();
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("redis.log"))
                .unwrap_or_else(|err| format!("(no redis log: {err})"));
            eprintln!("---- redis-server log ----\n{log}\n--------------------------");
        }
    }
}

impl Redis {
    /// A stopped (SIGSTOP) server cannot be killed until continued.
    fn signal_quietly(&self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// Two tokens: `client-key` (role client) and `analyst-key` (role analyst).
pub fn client_and_analyst_tokens() -> Vec<TokenConfig> {
    vec![
        TokenConfig {
            name: "app".into(),
            role: Role::Client,
            sha256: TokenHash::of("client-key"),
            scope: None,
            project: None,
        },
        TokenConfig {
            name: "team".into(),
            role: Role::Analyst,
            sha256: TokenHash::of("analyst-key"),
            scope: None,
            project: None,
        },
    ]
}

/// Three tokens: `client-key`, `analyst-key` and `privacy-key`, one per role.
pub fn role_tokens() -> Vec<TokenConfig> {
    let mut tokens = client_and_analyst_tokens();
    tokens.push(TokenConfig {
        name: "dpo".into(),
        role: Role::Privacy,
        sha256: TokenHash::of("privacy-key"),
        scope: None,
        project: None,
    });
    tokens
}

/// A configuration for tests: loopback on port 0, a temporary data dir, the repo's flags and
/// queries.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.shutdown_grace = Duration::from_secs(2);
    config.storage.data_dir = data_dir.to_path_buf();
    config.flags.dir = repo_path("flags");
    config.sql.queries_dir = repo_path("queries");
    config.telemetry.log_filter = "warn".into();
    config
}

/// A sealer over the data keys the service made in `data_dir`, to open what it sealed.
pub fn data_sealer(data_dir: &Path) -> flagstream::crypto::Sealer {
    let keys = flagstream::crypto::KeyRing::from_config(
        None,
        "privacy.data_key",
        &data_dir.join("keys").join("data"),
    )
    .expect("the data keys");
    flagstream::crypto::Sealer::new(&keys)
}

/// Everything the service sealed in `data_dir`, opened with its data keys, as text: the
/// write-ahead log's events, the consent ledger and request journal records, the audit log's
/// entries and the access exports. Scans of the data dir check this as well as the raw bytes,
/// since a raw id sealed inside a file would not show in its bytes.
pub fn opened_records(data_dir: &Path) -> String {
    use flagstream::privacy::journal::Journal;
    let sealer = std::sync::Arc::new(data_sealer(data_dir));
    let mut text = String::new();
    for event in stored_events(data_dir) {
        text.push_str(&event.to_string());
        text.push('\n');
    }
    for journal in ["consent/ledger", "privacy/requests"] {
        let path = data_dir.join(journal);
        if path.exists() {
            let (_, records) = Journal::<serde_json::Value>::open(&path, sealer.clone())
                .expect("the journal opens with the data keys");
            for record in records {
                text.push_str(&record.to_string());
                text.push('\n');
            }
        }
    }
    for entry in audit_entries(data_dir) {
        text.push_str(&entry.to_string());
        text.push('\n');
    }
    let exports = data_dir.join("privacy").join("exports");
    if exports.is_dir() {
        for (name, bytes) in client::files(&exports) {
            if name.ends_with(".sealed") {
                let mut plain = Vec::new();
                let opened = sealer.open(&bytes, &mut plain).expect("the export opens");
                text.push_str(&String::from_utf8_lossy(opened));
            }
        }
    }
    text
}

/// The audit log of a data dir, opened with the data keys the service made there.
pub fn audit_entries(data_dir: &Path) -> Vec<serde_json::Value> {
    flagstream::privacy::audit::read_entries(&data_dir.join("audit"), &data_sealer(data_dir))
        .expect("the audit log opens")
}

/// Returns a path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The real service, running in this process on `127.0.0.1:0`.
pub struct Service {
    /// The API address.
    pub addr: SocketAddr,
    /// The metrics address, when served on its own listener.
    pub metrics_addr: Option<SocketAddr>,
    /// A client for it.
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
    _data_dir: Option<TempDir>,
}

impl Service {
    /// Starts the service with the default test configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts the service with a test configuration changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data_dir = tempfile::tempdir().expect("temp data dir");
        let mut config = test_config(data_dir.path());
        adjust(&mut config);
        let mut service = Self::start_config(config).await;
        service._data_dir = Some(data_dir);
        service
    }

    /// Starts the service with exactly this configuration.
    pub async fn start_config(config: Config) -> Self {
        let problems = config.validate();
        assert!(
            problems.is_empty(),
            "invalid test configuration: {problems:?}"
        );
        flagstream::telemetry::logs::init(&config.telemetry);
        let listeners = Listeners::bind(&config).await.expect("bind loopback");
        let addr = listeners.api_addr().expect("api address");
        let metrics_addr = listeners.metrics.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(config, listeners, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics_addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            _data_dir: None,
        }
    }

    /// Returns the data directory (when the harness made it).
    pub fn data_dir(&self) -> &Path {
        self._data_dir
            .as_ref()
            .expect("a harness-made data dir")
            .path()
    }

    /// Returns the URL of `path` on the API listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GETs `path` and returns the body as text (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> String {
        let response = self.http.get(self.url(path)).send().await.expect("request");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.text().await.expect("text body")
    }

    /// POSTs `body` as JSON to `path` and returns the status and the answer as JSON.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json body"))
    }

    /// GETs `path` and returns the status and the body as JSON.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.http.get(self.url(path)).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json body"))
    }

    /// Asks the service to stop and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), RunError> {
        let _ = self.stop.take().expect("running").send(());
        self.task
            .take()
            .expect("running")
            .await
            .expect("service task panicked")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `flagstream` binary running as its own process, for crash tests.
pub struct Process {
    child: std::process::Child,
    /// The API address it listens on.
    pub addr: SocketAddr,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// Runs `flagstream serve` on `127.0.0.1:0` with `data_dir`, waiting until it listens.
    pub fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut command = Command::new(env!("CARGO_BIN_EXE_flagstream"));
        for (name, _) in std::env::vars() {
            if name.starts_with("FLAGSTREAM_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--flags-dir")
            .arg(repo_path("flags"))
            .env("FLAGSTREAM_TELEMETRY__LOG_FORMAT", "json")
            .env("FLAGSTREAM_TELEMETRY__LOG_FILTER", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("flagstream runs");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                kept.lock().unwrap().push(line.clone());
                if !sent
                    && let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                    && event["message"] == "serving the api"
                {
                    let _ = tx.send(event["addr"].as_str().unwrap_or_default().to_owned());
                    sent = true;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("flagstream starts listening within 60 s")
            .parse()
            .expect("a socket address");
        Self { child, addr, logs }
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process runs");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Every log line the process has written so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Asks the process to stop (SIGTERM) and waits until it has.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exited = self.child.wait().expect("the process ends");
        assert!(exited.success(), "a stopped process exits with 0: {exited}");
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Every stored event of the write-ahead log under `data_dir`, as JSON.
pub fn stored_events(data_dir: &Path) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    // The service's own data key (created in the data dir on first start) opens sealed records.
    let keys = flagstream::crypto::KeyRing::load_or_create(&data_dir.join("keys").join("data"))
        .expect("the data key");
    let sealer = flagstream::crypto::Sealer::new(&keys);
    flagstream::wal::recover(&data_dir.join("wal"), false, Some(&sealer), |_, records| {
        for bytes in records {
            events.push(serde_json::from_slice(bytes).expect("stored events are JSON"));
        }
    })
    .expect("the write-ahead log reads");
    events
}
