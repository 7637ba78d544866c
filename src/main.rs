//! The `flagstream` command: parse the configuration, start logging, bind, run.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flagstream::config::{Config, ConfigError, Overrides, TokenHash, render_markdown};
use flagstream::http::{Listeners, check, run};
use flagstream::sql::client::{ClientError, Output, Server, render_table};
use flagstream::telemetry;

/// Streaming analytics and feature-flag edge service.
#[derive(Debug, Parser)]
#[command(name = "flagstream", version)]
struct Cli {
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service.
    Serve,
    /// Prints the effective configuration (secrets redacted).
    Config {
        /// Prints the configuration reference (docs/config.md) instead.
        #[arg(long)]
        docs: bool,
    },
    /// Validates the configuration, flag files and saved queries; exits 2 on any problem.
    Check,
    /// Runs SQL on a running server and prints the answer.
    Sql {
        /// One read-only statement.
        sql: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Runs a saved query (`queries/NAME.sql`) on a running server and prints the answer.
    Query {
        /// The saved query's name.
        name: String,
        /// A parameter, `name=value`; repeat for several.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints the audit log (sealed under the data keys) as JSON lines, oldest first.
    Audit,
    /// Prints the sha256 of a token for `[[auth.tokens]]`; reads standard input when no
    /// token is given.
    HashToken {
        /// The token.
        token: Option<String>,
    },
}

/// Where and how `sql` and `query` reach the server.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// table, csv or json.
    #[arg(long, value_enum, default_value = "table")]
    format: Output,
    /// The server; by default the configured `server.listen` on this machine.
    #[arg(long, env = "FLAGSTREAM_SERVER")]
    server: Option<String>,
    /// An analyst token (sent as `Authorization: Bearer`).
    #[arg(long, env = "FLAGSTREAM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

// glibc's allocator spends a measurable share of each request under multithreaded load
// (BENCHMARKS.md); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for configuration and validation problems.
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config { docs: true } => {
            print!("{}", render_markdown());
            ExitCode::SUCCESS
        }
        Command::HashToken { token } => hash_token(token),
        command => match Config::from_process(&cli.overrides) {
            Ok(config) => dispatch(command, config),
            Err(err) => invalid(&err),
        },
    }
}

fn dispatch(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Serve => serve(config),
        Command::Config { .. } => {
            print!("{}", config.render());
            ExitCode::SUCCESS
        }
        Command::Check => {
            let problems = check(&config);
            if problems.is_empty() {
                println!("configuration, flags and saved queries are valid");
                return ExitCode::SUCCESS;
            }
            eprintln!("{} problem(s):", problems.len());
            for problem in problems {
                eprintln!("  - {problem}");
            }
            ExitCode::from(EXIT_INVALID)
        }
        Command::Sql { sql, client } => ask(&config, &client, |server, output| async move {
            server.sql(&sql, output).await
        }),
        Command::Query {
            name,
            params,
            client,
        } => ask(&config, &client, |server, output| async move {
            server.query(&name, &params, output).await
        }),
        Command::Audit => print_audit(&config),
        Command::HashToken { .. } => unreachable!("handled before loading the configuration"),
    }
}

/// Prints every audit entry, opened with the configured data keys.
fn print_audit(config: &Config) -> ExitCode {
    let keys = match flagstream::http::data_keys(config) {
        Ok(keys) => keys,
        Err(err) => {
            eprintln!("cannot read the data keys: {err}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let sealer = flagstream::crypto::Sealer::new(&keys);
    let dir = config.storage.data_dir.join("audit");
    match flagstream::privacy::audit::read_entries(&dir, &sealer) {
        Ok(entries) => {
            let mut out = std::io::stdout().lock();
            for entry in entries {
                if writeln!(out, "{entry}").is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cannot read the audit log: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Sends one query to the server and prints the answer; errors go to standard error.
fn ask<F, Fut>(config: &Config, client: &ClientArgs, send: F) -> ExitCode
where
    F: FnOnce(Server, Output) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, ClientError>>,
{
    let url = client.server.clone().unwrap_or_else(|| {
        let mut addr = config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let answer = Server::new(&url, client.token.clone())
        .map(|server| runtime.block_on(send(server, client.format)));
    let body = match answer {
        Ok(Ok(body)) => body,
        Ok(Err(err)) | Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let text = match client.format {
        Output::Table => match serde_json::from_slice(&body) {
            Ok(answer) => render_table(&answer),
            Err(err) => {
                eprintln!("the server's answer is not JSON: {err}");
                return ExitCode::FAILURE;
            }
        },
        Output::Csv | Output::Json => String::from_utf8_lossy(&body).into_owned(),
    };
    print!("{text}");
    if client.format == Output::Json {
        println!();
    }
    ExitCode::SUCCESS
}

fn invalid(err: &ConfigError) -> ExitCode {
    eprint!("{err}");
    ExitCode::from(EXIT_INVALID)
}

fn hash_token(token: Option<String>) -> ExitCode {
    let token = match token {
        Some(token) => token,
        None => {
            let mut input = String::new();
            if let Err(err) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("cannot read the token from standard input: {err}");
                return ExitCode::FAILURE;
            }
            input.trim().to_owned()
        }
    };
    println!("{}", TokenHash::of(&token).to_hex());
    ExitCode::SUCCESS
}

fn serve(config: Config) -> ExitCode {
    telemetry::logs::init(&config.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        run(config, listeners, shutdown_signal()).await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "flagstream stopped");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
