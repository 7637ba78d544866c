//! `flagstream-load`: drives a flagstream server on this machine with the traffic of the
//! reading app — launches, live sessions, offline syncs, or a school morning of all three — and
//! reports latency percentiles from HDR histograms. `--verify` then checks, through the
//! server's API, that every acknowledged event is stored exactly once and that the live
//! counters equal a recount.
//!
//! It targets loopback addresses only unless `--allow-remote` is given, and every run is
//! bounded in requests and in time, so it always stops by itself.

mod clock;
mod events;
mod http;
mod ledger;
mod live;
mod report;
mod traffic;
mod verify;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::ledger::{DeviceLog, Ledger};
use crate::report::{Operation, Percentiles, Recorder, histogram, print_operation};

/// Load generator for flagstream.
#[derive(Debug, Parser)]
#[command(name = "flagstream-load", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// App launches: `GET /v1/config` for children of a population, at `--rate` per second.
    Launch {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        traffic: TrafficArgs,
    },
    /// `--connections` WebSocket sessions streaming messages of `--events` events; each
    /// session keeps what is unacknowledged and sends it again after a reconnect. With
    /// `--rate` (messages per second over all sessions) the model is open; without, each
    /// session sends its next message once the previous is acknowledged.
    Live {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        traffic: TrafficArgs,
        /// Seconds to keep each session open after its messages (to measure idle sessions).
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
    /// Tablets back online after `--days` offline, at `--rate` tablets per second, each
    /// posting `--batches` batches of `--events` week-old events to `/v1/batch`.
    Sync {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        traffic: TrafficArgs,
    },
    /// A school morning at `--rate` operations per second: 80% live messages (over
    /// `--connections` sessions), 15% app launches, 5% sync batches.
    Mixed {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        traffic: TrafficArgs,
    },
    /// Checks a recorded run (`--record`) again against the server, for example after a
    /// restart.
    Verify {
        #[command(flatten)]
        target: Target,
        /// The file `--record` wrote.
        #[arg(long)]
        ledger: std::path::PathBuf,
        /// Seconds to wait for the server and its counters.
        #[arg(long, default_value_t = 60)]
        verify_timeout: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sends one kind of request over keep-alive connections (a raw throughput benchmark).
    /// `{n}` in the path or body becomes a per-request number.
    Request {
        #[command(flatten)]
        run: RunArgs,
        /// GET or POST.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The path (and query).
        #[arg(long, default_value = "/healthz")]
        path: String,
        /// The request body (JSON).
        #[arg(long, default_value = "")]
        body: String,
    },
    /// Posts batches of new events to `/v1/batch` as fast as they are acknowledged (a raw
    /// throughput benchmark).
    Batch {
        #[command(flatten)]
        run: RunArgs,
        /// Events per batch.
        #[arg(long, default_value_t = 100)]
        events: usize,
    },
}

/// The server and how to reach it.
#[derive(Debug, Clone, clap::Args)]
struct Target {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Client key (bearer token) for ingest and config.
    #[arg(long)]
    token: Option<String>,
    /// A whole `Authorization` header value, for servers that do not take bearer tokens.
    #[arg(long, conflicts_with = "token")]
    authorization: Option<String>,
    /// Analyst token for `--verify` (SQL and counters); the client key when not given.
    #[arg(long)]
    analyst_token: Option<String>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent connections: WebSocket sessions for `live` and `mixed`, workers for the
    /// other scenarios.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Operations (requests or messages) in all: an upper bound.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Seconds of measured run time after the warm-up: an upper bound.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds of warm-up before measuring (operations run, latencies are not recorded).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Open model: operations per second in all, on a fixed schedule, with latency measured
    /// from each operation's scheduled time.
    #[arg(long)]
    rate: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
struct TrafficArgs {
    /// Events per message (live) or per batch (sync).
    #[arg(long, default_value_t = 10)]
    events: u64,
    /// Batches each syncing tablet posts.
    #[arg(long, default_value_t = 5)]
    batches: u64,
    /// Days a syncing tablet was offline.
    #[arg(long, default_value_t = 7)]
    days: u64,
    /// Children the events and launches are drawn from.
    #[arg(long, default_value_t = 10_000)]
    children: u64,
    /// The run's tag, sent as the events' `app_version` (letters, digits, `.`, `_`, `-`);
    /// a new one per run by default.
    #[arg(long)]
    tag: Option<String>,
    /// Seconds after the run to wait for unacknowledged messages and batches.
    #[arg(long, default_value_t = 30)]
    drain: u64,
    /// After the run, check that every acknowledged event is stored exactly once and that the
    /// counters equal a recount.
    #[arg(long)]
    verify: bool,
    /// Seconds `--verify` waits for the server and its counters.
    #[arg(long, default_value_t = 60)]
    verify_timeout: u64,
    /// Write what was sent and acknowledged per device to this file (for `verify --ledger`).
    #[arg(long)]
    record: Option<std::path::PathBuf>,
    /// Exit successfully even if operations failed (fault injection expects failures); the
    /// verification must still pass.
    #[arg(long)]
    allow_errors: bool,
}

/// A run's ledger on disk.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    tag: String,
    devices: BTreeMap<String, DeviceLog>,
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    tag: Option<String>,
    target: String,
    rate: Option<f64>,
    connections: usize,
    warmup_s: u64,
    seconds: f64,
    operations: BTreeMap<&'static str, Operation>,
    errors: u64,
    acknowledged_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<verify::Verification>,
}

impl Target {
    /// The target's address; refused (exit status 2, with the reason) when it is not a loopback
    /// address and remote targets are not allowed.
    fn resolve(&self) -> Result<SocketAddr, ExitCode> {
        self.address().map_err(|err| {
            eprintln!("{err}");
            ExitCode::from(2)
        })
    }

    fn address(&self) -> Result<SocketAddr, String> {
        let addr = self
            .target
            .to_socket_addrs()
            .map_err(|err| format!("cannot resolve {}: {err}", self.target))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.target))?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "{addr} is not a loopback address; load is only sent to this machine unless --allow-remote is given"
            ));
        }
        Ok(addr)
    }

    /// The `Authorization` header value to send, if any.
    fn authorization(&self) -> Option<String> {
        self.authorization
            .clone()
            .or_else(|| self.token.as_ref().map(|token| format!("Bearer {token}")))
    }

    fn analyst(&self) -> Option<String> {
        self.analyst_token
            .as_ref()
            .map(|token| format!("Bearer {token}"))
            .or_else(|| self.authorization())
    }
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 48
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Request {
            run,
            method,
            path,
            body,
        } => {
            raw(run, "request", |_| {
                (method.clone(), path.clone(), body.clone(), 1)
            })
            .await
        }
        Scenario::Batch { run, events } => {
            let run_id = clock::now_ms();
            let body = batch_body(events)
                .replace("TS", &clock::rfc3339_now())
                .replace("RUN", &run_id.to_string());
            raw(run, "batch", |_| {
                (
                    "POST".into(),
                    "/v1/batch".into(),
                    body.clone(),
                    events as u64,
                )
            })
            .await
        }
        Scenario::Verify {
            target,
            ledger,
            verify_timeout,
            json,
        } => verify_recorded(&target, &ledger, verify_timeout, json).await,
        Scenario::Launch { run, traffic } => scenario("launch", run, traffic, 0).await,
        Scenario::Live { run, traffic, hold } => scenario("live", run, traffic, hold).await,
        Scenario::Sync { run, traffic } => scenario("sync", run, traffic, 0).await,
        Scenario::Mixed { run, traffic } => scenario("mixed", run, traffic, 0).await,
    }
}

/// Runs the app scenarios (launch, live, sync, mixed).
async fn scenario(name: &'static str, run: RunArgs, traffic: TrafficArgs, hold: u64) -> ExitCode {
    let addr = match run.target.resolve() {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    let tag = traffic
        .tag
        .clone()
        .unwrap_or_else(|| format!("load-{}", clock::now_ms()));
    if !valid_tag(&tag) {
        eprintln!("--tag must be 1 to 48 letters, digits, '.', '_' or '-'");
        return ExitCode::from(2);
    }
    let (live_share, launch_share, sync_share) = match name {
        "launch" => (0.0, 1.0, 0.0),
        "live" => (1.0, 0.0, 0.0),
        "sync" => (0.0, 0.0, 1.0),
        _ => (0.80, 0.15, 0.05),
    };
    let rate = match (name, run.rate) {
        (_, Some(rate)) if rate > 0.0 => Some(rate),
        ("live", _) => None,
        (_, Some(_)) => {
            eprintln!("--rate must be above 0");
            return ExitCode::from(2);
        }
        ("launch", None) => Some(500.0),
        ("sync", None) => Some(2.0),
        _ => Some(1_000.0),
    };
    let recorder = Arc::new(Recorder::new(Duration::from_secs(run.warmup)));
    let ledger = Arc::new(Ledger::default());
    let budget = Arc::new(AtomicU64::new(run.requests));
    let started = Instant::now();
    let end = recorder.measure_from() + Duration::from_secs(run.seconds);
    let drain_until = end + Duration::from_secs(traffic.drain);
    let authorization = run.target.authorization();
    let mut tasks = Vec::new();

    if live_share > 0.0 {
        let sessions = run.connections.max(1);
        for n in 0..sessions {
            let pace = match rate {
                Some(rate) => {
                    let every = Duration::from_secs_f64(sessions as f64 / (rate * live_share));
                    live::Pace::Open {
                        // Sessions spread their sends over one interval.
                        start: started + every.mul_f64(n as f64 / sessions as f64),
                        every,
                    }
                }
                None => live::Pace::Closed,
            };
            let plan = live::Plan {
                addr,
                authorization: authorization.clone(),
                device: events::Device::new(&tag, "live", n as u64, traffic.children),
                per_message: traffic.events.max(1),
                pace,
                end,
                drain_until,
                hold: Duration::from_secs(hold),
                budget: budget.clone(),
            };
            tasks.push(tokio::spawn(live::session(
                plan,
                recorder.clone(),
                ledger.clone(),
            )));
        }
    }
    let workers = |share: f64| ((run.connections as f64 * share).ceil() as usize).max(1);
    if launch_share > 0.0 {
        let (sender, queue) = traffic::queue();
        let launch_rate = rate.unwrap_or(500.0) * launch_share;
        let plan = traffic::Launch {
            addr,
            authorization: authorization.clone(),
            children: traffic.children,
        };
        let count = if name == "launch" {
            run.connections.max(1)
        } else {
            workers(0.25)
        };
        for _ in 0..count {
            tasks.push(tokio::spawn(traffic::launch_worker(
                plan.clone(),
                queue.clone(),
                recorder.clone(),
            )));
        }
        tasks.push(tokio::spawn(traffic::arrivals(
            launch_rate,
            started,
            end,
            budget.clone(),
            sender,
            recorder.clone(),
            "launch",
        )));
    }
    if sync_share > 0.0 {
        let (sender, queue) = traffic::queue();
        // In `sync`, --rate counts tablets; in `mixed`, operations (batches).
        let tablets = if name == "sync" {
            rate.unwrap_or(2.0)
        } else {
            rate.unwrap_or(1_000.0) * sync_share / traffic.batches.max(1) as f64
        };
        let plan = traffic::Sync {
            addr,
            authorization: authorization.clone(),
            tag: tag.clone(),
            children: traffic.children,
            batches: traffic.batches.max(1),
            events: traffic.events.max(1),
            days: traffic.days,
            drain_until,
        };
        let count = if name == "sync" {
            run.connections.max(1)
        } else {
            workers(0.1)
        };
        for _ in 0..count {
            tasks.push(tokio::spawn(traffic::sync_worker(
                plan.clone(),
                queue.clone(),
                recorder.clone(),
                ledger.clone(),
            )));
        }
        tasks.push(tokio::spawn(traffic::arrivals(
            tablets,
            started,
            end,
            budget.clone(),
            sender,
            recorder.clone(),
            "sync",
        )));
    }
    let progress = {
        let recorder = recorder.clone();
        tokio::spawn(async move { recorder.progress(started, end).await })
    };
    for task in tasks {
        let _ = task.await;
    }
    progress.abort();
    let measured = end
        .min(Instant::now())
        .saturating_duration_since(recorder.measure_from())
        .as_secs_f64()
        .max(0.001);
    if let Some(path) = &traffic.record {
        let recorded = Recorded {
            tag: tag.clone(),
            devices: ledger.devices(),
        };
        let text = serde_json::to_string(&recorded).expect("ledger");
        if let Err(err) = std::fs::write(path, text) {
            eprintln!("cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let verification = if traffic.verify {
        eprintln!("verifying {tag} …");
        Some(
            verify::verify(
                addr,
                run.target.analyst(),
                &tag,
                &ledger,
                Duration::from_secs(traffic.verify_timeout),
            )
            .await,
        )
    } else {
        None
    };
    let report = Report {
        scenario: name,
        tag: Some(tag),
        target: run.target.target.clone(),
        rate,
        connections: run.connections,
        warmup_s: run.warmup,
        seconds: measured,
        operations: recorder.summary(measured),
        errors: recorder.errors(),
        acknowledged_events: ledger.acked(),
        verify: verification,
    };
    let verified = report.verify.as_ref().is_none_or(|v| v.passed);
    let ok = verified && (report.errors == 0 || traffic.allow_errors);
    if emit(&report, &run).is_err() {
        return ExitCode::FAILURE;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints the report, and writes it to `--report` when given.
fn emit(report: &Report, run: &RunArgs) -> Result<(), ()> {
    let json = serde_json::to_string_pretty(report).expect("report");
    if let Some(path) = &run.report
        && let Err(err) = std::fs::write(path, &json)
    {
        eprintln!("cannot write {}: {err}", path.display());
        return Err(());
    }
    if run.json {
        println!("{json}");
        return Ok(());
    }
    // The raw benchmarks keep no ledger: they have no acknowledged events to tell.
    let acknowledged = match &report.tag {
        Some(_) => format!(", {} events acknowledged", report.acknowledged_events),
        None => String::new(),
    };
    println!(
        "{}{}: {:.1} s measured after {} s warm-up, {} errors{acknowledged}",
        report.scenario,
        report
            .tag
            .as_ref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default(),
        report.seconds,
        report.warmup_s,
        report.errors,
    );
    for (name, operation) in &report.operations {
        print_operation(name, operation);
    }
    if let Some(v) = &report.verify {
        print_verification(v);
    }
    Ok(())
}

fn print_verification(v: &verify::Verification) {
    println!(
        "verify: {} — {} devices, {} acknowledged, {} stored, {} missing, {} duplicates, {} unexpected; counters {} ({:.1} s)",
        if v.passed { "PASSED" } else { "FAILED" },
        v.devices,
        v.acknowledged,
        v.stored,
        v.missing,
        v.duplicates,
        v.unexpected,
        if v.counters_match {
            format!("match the recount over {} hourly windows", v.windows)
        } else {
            "DIFFER".to_owned()
        },
        v.waited_s
    );
    for problem in &v.problems {
        println!("  {problem}");
    }
}

/// `verify --ledger FILE`: checks a recorded run again.
async fn verify_recorded(
    target: &Target,
    path: &std::path::Path,
    timeout: u64,
    json: bool,
) -> ExitCode {
    let addr = match target.resolve() {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    let recorded: Recorded = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(recorded) => recorded,
        Err(err) => {
            eprintln!("cannot read {}: {err}", path.display());
            return ExitCode::from(2);
        }
    };
    if !valid_tag(&recorded.tag) {
        eprintln!("{}: the recorded tag is not valid", path.display());
        return ExitCode::from(2);
    }
    let ledger = Ledger::from_devices(recorded.devices);
    let found = verify::verify(
        addr,
        target.analyst(),
        &recorded.tag,
        &ledger,
        Duration::from_secs(timeout),
    )
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&found).expect("verification")
        );
    } else {
        print_verification(&found);
    }
    if found.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The body of a batch of `events` new events; `{n}` makes each request's ids unique.
fn batch_body(events: usize) -> String {
    let items: Vec<String> = (0..events)
        .map(|i| {
            format!(
                r#"{{"event_id":"load-RUN-{{n}}-{i}","user_id":"child-{i}","session_id":"s-{{n}}","type":"lesson_completed","timestamp":"TS","context":{{"app_version":"3.2.0","platform":"ios","country":"BR"}},"properties":{{"lesson_id":"g-14","duration_ms":41000,"score":0.8}}}}"#
            )
        })
        .collect();
    format!(r#"{{"sent_at":"TS","batch":[{}]}}"#, items.join(","))
}

/// The raw benchmarks (`request`, `batch`): one request template, each connection sending as
/// fast as it is answered (or on the `--rate` schedule), without a per-operation lock.
async fn raw(
    run: RunArgs,
    name: &'static str,
    shape: impl Fn(()) -> (String, String, String, u64),
) -> ExitCode {
    let addr = match run.target.resolve() {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    let (method, path, body, per_request) = shape(());
    let template = Arc::new(http::Template::new(
        &method,
        &run.target.target,
        &path,
        &body,
        run.target.authorization().as_deref(),
    ));
    let budget = Arc::new(AtomicU64::new(run.requests));
    let errors = Arc::new(AtomicU64::new(0));
    let warmup = Duration::from_secs(run.warmup);
    let started = Instant::now();
    let deadline = started + warmup + Duration::from_secs(run.seconds);
    let connections = run.connections.max(1);
    let mut workers = Vec::new();
    for index in 0..connections {
        let (template, budget, errors) = (template.clone(), budget.clone(), errors.clone());
        let pace = match run.rate {
            Some(rate) if rate > 0.0 => http::Pace::Open {
                rate,
                index,
                connections,
                start: started,
            },
            _ => http::Pace::Closed,
        };
        workers.push(tokio::spawn(async move {
            http::drive(
                addr,
                &template,
                &budget,
                &errors,
                started + warmup,
                deadline,
                pace,
            )
            .await
        }));
    }
    let mut merged = histogram();
    for worker in workers {
        match worker.await {
            Ok(partial) => merged.add(&partial).expect("same bounds"),
            Err(err) => eprintln!("worker failed: {err}"),
        }
    }
    let seconds = deadline
        .min(Instant::now())
        .saturating_duration_since(started + warmup)
        .as_secs_f64()
        .max(0.001);
    let errors = errors.load(Ordering::Relaxed);
    let operation = Operation {
        ok: merged.len(),
        events: merged.len() * per_request,
        per_second: merged.len() as f64 / seconds,
        events_per_second: (merged.len() * per_request) as f64 / seconds,
        latency_us: Percentiles::of(&merged),
        errors: if errors > 0 {
            BTreeMap::from([("failed".to_owned(), errors)])
        } else {
            BTreeMap::new()
        },
    };
    let report = Report {
        scenario: name,
        tag: None,
        target: run.target.target.clone(),
        rate: run.rate,
        connections,
        warmup_s: run.warmup,
        seconds,
        operations: BTreeMap::from([(name, operation)]),
        errors,
        acknowledged_events: 0,
        verify: None,
    };
    if emit(&report, &run).is_err() || errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
