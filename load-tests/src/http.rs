//! A minimal HTTP/1.1 keep-alive client: it writes a prepared request and reads exactly one
//! response (status line, headers, `Content-Length` body), timing each round trip.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request to send, where `{n}` in the path or body becomes a per-request number (so each
/// request can name another subject).
#[derive(Debug, Clone)]
pub struct Template {
    method: String,
    host: String,
    path: String,
    body: String,
    authorization: Option<String>,
}

impl Template {
    /// Describes the request.
    pub fn new(
        method: &str,
        host: &str,
        path: &str,
        body: &str,
        authorization: Option<&str>,
    ) -> Self {
        Self {
            method: method.to_uppercase(),
            host: host.to_owned(),
            path: path.to_owned(),
            body: body.to_owned(),
            authorization: authorization.map(str::to_owned),
        }
    }

    /// Returns the bytes of request number `n`.
    pub fn render(&self, n: u64) -> Vec<u8> {
        let number = n.to_string();
        let path = self.path.replace("{n}", &number);
        let body = self.body.replace("{n}", &number);
        let mut request = format!("{} {path} HTTP/1.1\r\nHost: {}\r\n", self.method, self.host);
        if let Some(authorization) = &self.authorization {
            request.push_str(&format!("Authorization: {authorization}\r\n"));
        }
        if !body.is_empty() || self.method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        request.into_bytes()
    }
}

/// When a connection sends: as fast as answers come (closed model), or on a fixed schedule
/// (open model) where this connection owns every `connections`-th slot of a global rate.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Send the next request as soon as the previous answer arrived.
    Closed,
    /// Send request k at `start + (k × connections + index) / rate`; latency is measured from
    /// that scheduled time, so a slow server cannot hide its queueing (no coordinated omission).
    Open {
        /// Requests per second, over all connections.
        rate: f64,
        /// This connection's position.
        index: usize,
        /// All connections.
        connections: usize,
        /// When the schedule starts.
        start: Instant,
    },
}

impl Pace {
    fn scheduled(&self, k: u64) -> Option<Instant> {
        match *self {
            Pace::Closed => None,
            Pace::Open {
                rate,
                index,
                connections,
                start,
            } => {
                let slot = k as f64 * connections as f64 + index as f64;
                Some(start + std::time::Duration::from_secs_f64(slot / rate))
            }
        }
    }
}

/// Sends requests made from `template` on one connection until the shared budget or the
/// deadline runs out; returns the latencies in microseconds of the answers after
/// `measure_from` (the warm-up's end). A non-2xx answer or a broken
/// connection counts as an error (and the connection is opened again).
pub async fn drive(
    addr: SocketAddr,
    template: &Template,
    budget: &AtomicU64,
    errors: &AtomicU64,
    measure_from: Instant,
    deadline: Instant,
    pace: Pace,
) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut connection: Option<TcpStream> = None;
    let mut buffer = Vec::with_capacity(4096);
    let mut k = 0u64;
    while let Some(n) = take_one(budget).filter(|_| Instant::now() < deadline) {
        let scheduled = pace.scheduled(k);
        k += 1;
        if let Some(at) = scheduled {
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let request = template.render(n);
        let stream = match connection.as_mut() {
            Some(stream) => stream,
            None => match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    connection.insert(stream)
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        let sent = scheduled.unwrap_or_else(Instant::now);
        match round_trip(stream, &request, &mut buffer).await {
            Ok(Head { status, .. }) => {
                if Instant::now() >= measure_from {
                    let micros = sent.elapsed().as_micros().max(1) as u64;
                    let _ = histogram.record(micros.min(60_000_000));
                }
                if !(200..300).contains(&status) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                connection = None;
            }
        }
    }
    histogram
}

/// Takes one request from the budget; returns its number (counting down), or `None` when the
/// budget is spent.
fn take_one(budget: &AtomicU64) -> Option<u64> {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            left.checked_sub(1)
        })
        .ok()
}

/// One answer: the status, the `Retry-After` seconds if any, and the body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

/// A keep-alive connection to one server that sends one request at a time (reconnecting
/// after an error).
pub struct Client {
    addr: SocketAddr,
    host: String,
    authorization: Option<String>,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Client {
    /// A client of `addr` that sends `authorization` (a whole header value) when given.
    pub fn new(addr: SocketAddr, authorization: Option<String>) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            authorization,
            stream: None,
            buffer: Vec::with_capacity(8192),
        }
    }

    /// Sends one request with a JSON body (when not empty) and reads its answer, within
    /// `timeout`. An error drops the connection, so the next call connects again.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
        timeout: std::time::Duration,
    ) -> std::io::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(authorization) = &self.authorization {
            request.push_str(&format!("Authorization: {authorization}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let outcome = tokio::time::timeout(timeout, async {
            if self.stream.is_none() {
                let stream = TcpStream::connect(self.addr).await?;
                let _ = stream.set_nodelay(true);
                self.stream = Some(stream);
            }
            let stream = self.stream.as_mut().expect("connected");
            let head = round_trip(stream, request.as_bytes(), &mut self.buffer).await?;
            Ok::<_, std::io::Error>(head)
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match outcome {
            Ok(head) => Ok(Response {
                status: head.status,
                retry_after: head.retry_after,
                body: self.buffer[head.body.clone()].to_vec(),
            }),
            Err(err) => {
                self.stream = None;
                Err(err)
            }
        }
    }
}

/// Names a failed call the way reports count it: `connect`, `timeout` or `io`.
pub fn cause(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect",
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "io",
    }
}

/// What [`round_trip`] read: the status, `Retry-After`, and where the body is in the buffer
/// (de-chunked in place).
struct Head {
    status: u16,
    retry_after: Option<u64>,
    body: std::ops::Range<usize>,
}

async fn round_trip(
    stream: &mut TcpStream,
    request: &[u8],
    buffer: &mut Vec<u8>,
) -> std::io::Result<Head> {
    stream.write_all(request).await?;
    buffer.clear();
    let header_end = loop {
        if let Some(at) = find(buffer, b"\r\n\r\n") {
            break at + 4;
        }
        read_more(stream, buffer).await?;
    };
    let head = std::str::from_utf8(&buffer[..header_end]).map_err(invalid)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status"))?;
    let header = |wanted: &str| {
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(wanted)
                .then(|| value.trim().to_owned())
        })
    };
    let retry_after = header("retry-after").and_then(|v| v.parse().ok());
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let end = read_chunked(stream, buffer, header_end).await?;
        return Ok(Head {
            status,
            retry_after,
            body: header_end..end,
        });
    }
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid("no content-length"))?;
    while buffer.len() < header_end + length {
        read_more(stream, buffer).await?;
    }
    Ok(Head {
        status,
        retry_after,
        body: header_end..header_end + length,
    })
}

/// Reads a chunked body that starts at `start`, moving the chunks' data together; returns
/// where the data ends.
async fn read_chunked(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    start: usize,
) -> std::io::Result<usize> {
    let mut data_end = start;
    let mut at = start;
    loop {
        let line_end = loop {
            if let Some(i) = find(&buffer[at..], b"\r\n") {
                break at + i;
            }
            read_more(stream, buffer).await?;
        };
        let size_text = std::str::from_utf8(&buffer[at..line_end]).map_err(invalid)?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(invalid)?;
        let data = line_end + 2;
        while buffer.len() < data + size + 2 {
            read_more(stream, buffer).await?;
        }
        if size == 0 {
            return Ok(data_end);
        }
        buffer.copy_within(data..data + size, data_end);
        data_end += size;
        at = data + size + 2;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(err: impl ToString) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string())
}
