//! `flagstream-load`: drives a flagstream server on this machine and reports latency
//! percentiles from an HDR histogram.
//!
//! It targets loopback addresses only unless `--allow-remote` is given, and every run is
//! bounded in requests and in time, so it always stops by itself.

mod clock;
mod http;
mod live;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Load generator for flagstream.
#[derive(Debug, Parser)]
#[command(name = "flagstream-load", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Sends one kind of request over keep-alive connections, as fast as the server answers.
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
    /// Posts batches of new events to `/v1/batch` (each event acknowledged only once durable).
    Batch {
        #[command(flatten)]
        run: RunArgs,
        /// Events per batch.
        #[arg(long, default_value_t = 100)]
        events: usize,
    },
    /// Opens `--connections` WebSocket sessions on `/v1/stream`; each sends messages of
    /// `--events` events and waits for each acknowledgement.
    Live {
        #[command(flatten)]
        run: RunArgs,
        /// Events per message.
        #[arg(long, default_value_t = 10)]
        events: usize,
        /// Seconds to keep each session open after its messages (to measure idle sessions).
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Concurrent connections (or sessions).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests (or messages) in all: an upper bound.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Longest run time in seconds: an upper bound.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Bearer token to send.
    #[arg(long)]
    token: Option<String>,
    /// Open model: send this many requests per second in all, on a fixed schedule, measuring
    /// latency from each request's scheduled time. Without it, each connection sends as fast
    /// as it gets answers.
    #[arg(long)]
    rate: Option<f64>,
    /// A whole `Authorization` header value, for servers that do not take bearer tokens.
    #[arg(long, conflicts_with = "token")]
    authorization: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    requests: u64,
    events: u64,
    errors: u64,
    seconds: f64,
    requests_per_second: f64,
    events_per_second: f64,
    latency_us: Percentiles,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn resolve(run: &RunArgs) -> Result<SocketAddr, String> {
    let addr = run
        .target
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {}: {err}", run.target))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", run.target))?;
    if !addr.ip().is_loopback() && !run.allow_remote {
        return Err(format!(
            "{addr} is not a loopback address; load is only sent to this machine unless --allow-remote is given"
        ));
    }
    Ok(addr)
}

/// The `Authorization` header value to send, if any.
fn authorization(run: &RunArgs) -> Option<String> {
    run.authorization
        .clone()
        .or_else(|| run.token.as_ref().map(|token| format!("Bearer {token}")))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
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

async fn run_http(
    run: &RunArgs,
    addr: SocketAddr,
    template: http::Template,
) -> (Histogram<u64>, u64, f64) {
    let template = Arc::new(template);
    let budget = Arc::new(AtomicU64::new(run.requests));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(run.seconds);
    let started = Instant::now();
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
            http::drive(addr, &template, &budget, &errors, deadline, pace).await
        }));
    }
    let mut merged = histogram();
    for worker in workers {
        match worker.await {
            Ok(partial) => merged.add(&partial).expect("same bounds"),
            Err(err) => eprintln!("worker failed: {err}"),
        }
    }
    (
        merged,
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let run = match &cli.scenario {
        Scenario::Request { run, .. }
        | Scenario::Batch { run, .. }
        | Scenario::Live { run, .. } => run,
    };
    let addr = match resolve(run) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("{err}");
            return std::process::ExitCode::from(2);
        }
    };
    let (name, histogram, errors, seconds, per_request) = match &cli.scenario {
        Scenario::Request {
            run,
            method,
            path,
            body,
        } => {
            let template = http::Template::new(
                method,
                &run.target,
                path,
                body,
                authorization(run).as_deref(),
            );
            let (h, e, s) = run_http(run, addr, template).await;
            ("request", h, e, s, 1)
        }
        Scenario::Batch { run, events } => {
            let run_id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let body = batch_body(*events)
                .replace("TS", &clock::rfc3339_now())
                .replace("RUN", &run_id.to_string());
            let template = http::Template::new(
                "POST",
                &run.target,
                "/v1/batch",
                &body,
                authorization(run).as_deref(),
            );
            let (h, e, s) = run_http(run, addr, template).await;
            ("batch", h, e, s, *events as u64)
        }
        Scenario::Live { run, events, hold } => {
            let deadline = Instant::now() + Duration::from_secs(run.seconds);
            let sessions = run.connections.max(1);
            let per_session = (run.requests / sessions as u64).max(1);
            let started = Instant::now();
            let run_id = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let tasks: Vec<_> = (0..sessions)
                .map(|id| {
                    let token = run.token.clone();
                    let plan = live::Plan {
                        run: run_id,
                        addr,
                        token,
                        id,
                        messages: per_session,
                        per_message: *events,
                        deadline,
                        hold: Duration::from_secs(*hold),
                    };
                    tokio::spawn(live::session(plan))
                })
                .collect();
            let mut merged = histogram();
            let mut errors = 0;
            for task in tasks {
                match task.await {
                    Ok(report) => {
                        merged.add(&report.histogram).expect("same bounds");
                        errors += report.errors;
                    }
                    Err(_) => errors += 1,
                }
            }
            (
                "live",
                merged,
                errors,
                started.elapsed().as_secs_f64(),
                *events as u64,
            )
        }
    };
    let report = Report {
        scenario: name,
        requests: histogram.len(),
        events: histogram.len() * per_request,
        errors,
        seconds,
        requests_per_second: histogram.len() as f64 / seconds,
        events_per_second: (histogram.len() * per_request) as f64 / seconds,
        latency_us: Percentiles {
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        },
    };
    if run.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report"));
    } else {
        let l = &report.latency_us;
        println!(
            "{}: {} requests ({} events) in {:.2}s: {:.0} req/s, {:.0} events/s, {} errors\nlatency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
            report.scenario,
            report.requests,
            report.events,
            report.seconds,
            report.requests_per_second,
            report.events_per_second,
            report.errors,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
    }
    if report.errors > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
