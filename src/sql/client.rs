//! The command-line side of SQL: `flagstream sql` and `flagstream query` send a query to a
//! running server and print the answer — an aligned table for people, CSV or JSON for
//! programs. Plain HTTP/1.1 over one connection.

use std::fmt::Write as _;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How the answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// CSV with a header line.
    Csv,
    /// The server's JSON answer.
    Json,
}

/// Why a query from the command line failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not `http://host:port`.
    #[error("the server URL must look like http://127.0.0.1:8080, not {0:?}")]
    Url(String),
    /// The server could not be reached or the exchange broke.
    #[error("cannot reach {server}: {reason}")]
    Connect {
        /// The server.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{status}: {description}")]
    Answer {
        /// The HTTP status.
        status: u16,
        /// The server's `error_description` (or the body).
        description: String,
    },
}

/// A server and the token to call it with.
#[derive(Debug, Clone)]
pub struct Server {
    authority: String,
    token: Option<String>,
}

impl Server {
    /// Reads `http://host:port` (a trailing `/` is allowed).
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .ok_or_else(|| ClientError::Url(url.to_owned()))?;
        Ok(Self {
            authority: authority.to_owned(),
            token,
        })
    }

    /// Runs ad-hoc SQL; returns the body in `output`'s wire format (JSON for tables).
    pub async fn sql(&self, sql: &str, output: Output) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::json!({ "sql": sql }).to_string();
        self.call(
            "POST",
            &format!("/v1/sql?format={}", wire(output)),
            Some(body),
        )
        .await
    }

    /// Runs a saved query with parameters.
    pub async fn query(
        &self,
        name: &str,
        params: &[(String, String)],
        output: Output,
    ) -> Result<Vec<u8>, ClientError> {
        let mut path = format!("/v1/queries/{}?format={}", encode(name), wire(output));
        for (key, value) in params {
            let _ = write!(path, "&{}={}", encode(key), encode(value));
        }
        self.call("GET", &path, None).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Vec<u8>, ClientError> {
        let broken = |reason: String| ClientError::Connect {
            server: self.authority.clone(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| broken(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| broken(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| broken(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| broken(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| broken(e.to_string()))?
            .to_bytes()
            .to_vec();
        if status != StatusCode::OK {
            let description = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error_description"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Answer {
                status: status.as_u16(),
                description,
            });
        }
        Ok(bytes)
    }
}

fn wire(output: Output) -> &'static str {
    match output {
        Output::Csv => "csv",
        Output::Table | Output::Json => "json",
    }
}

/// Percent-encodes a query-string component.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Renders a JSON answer of `/v1/sql` as aligned columns, with a last line counting the rows
/// (and saying when the answer was cut).
pub fn render_table(answer: &Value) -> String {
    let names: Vec<&str> = answer["columns"]
        .as_array()
        .map(|columns| columns.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = answer["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    names
                        .iter()
                        .map(|name| match &row[*name] {
                            Value::Null => String::new(),
                            Value::String(text) => text.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let widths: Vec<usize> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([name.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join(" | ").trim_end());
    };
    line(&mut out, &mut names.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "{}", rule.join("-+-"));
    for row in &rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    let truncated = if answer["truncated"] == Value::Bool(true) {
        " (truncated: more rows exist)"
    } else {
        ""
    };
    let _ = writeln!(out, "({} rows{truncated})", rows.len());
    if answer["complete"] == Value::Bool(false) {
        let _ = writeln!(
            out,
            "(incomplete: the server is still reading its log after a start; ask again shortly)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answers_render_as_aligned_columns() {
        let answer = json!({"columns": [{"name": "platform"}, {"name": "events"}],
            "rows": [{"platform": "ios", "events": 1200}, {"platform": "android", "events": null}],
            "truncated": true});
        assert_eq!(
            render_table(&answer),
            "platform | events\n---------+-------\nios      | 1200\nandroid  |\n(2 rows (truncated: more rows exist))\n"
        );
        let behind = json!({"columns": [{"name": "n"}], "rows": [{"n": 3}], "complete": false});
        assert!(render_table(&behind).ends_with("(1 rows)\n(incomplete: the server is still reading its log after a start; ask again shortly)\n"));
    }

    #[test]
    fn urls_and_parameters_are_checked_and_encoded() {
        assert!(Server::new("http://127.0.0.1:8080/", None).is_ok());
        assert!(Server::new("https://x:1", None).is_err());
        assert!(Server::new("http://x:1/v1", None).is_err());
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
