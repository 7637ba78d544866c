//! `flagstream-load`: drives a flagstream server on this machine and reports latency
//! percentiles from an HDR histogram.
//!
//! It targets loopback addresses only unless `--allow-remote` is given, and every run is
//! bounded in requests and in time, so it always stops by itself.

mod http;

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
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests in all (an upper bound).
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Longest run time in seconds (an upper bound).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Bearer token to send.
    #[arg(long)]
    token: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The outcome of a run.
#[derive(Debug, Serialize)]
struct Report {
    requests: u64,
    errors: u64,
    seconds: f64,
    requests_per_second: f64,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let Scenario::Request {
        run,
        method,
        path,
        body,
    } = cli.scenario;
    let addr = match resolve(&run) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("{err}");
            return std::process::ExitCode::from(2);
        }
    };
    let template = Arc::new(http::Template::new(
        &method,
        &run.target,
        &path,
        &body,
        run.token.as_deref(),
    ));
    let budget = Arc::new(AtomicU64::new(run.requests));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(run.seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..run.connections.max(1) {
        let (template, budget, errors) = (template.clone(), budget.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            http::drive(addr, &template, &budget, &errors, deadline).await
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for worker in workers {
        match worker.await {
            Ok(partial) => histogram.add(&partial).expect("same bounds"),
            Err(err) => eprintln!("worker failed: {err}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        requests: histogram.len(),
        errors: errors.load(Ordering::Relaxed),
        seconds,
        requests_per_second: histogram.len() as f64 / seconds,
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
            "{} requests in {:.2}s: {:.0} req/s, {} errors\nlatency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
            report.requests,
            report.seconds,
            report.requests_per_second,
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
