//! The `live` scenario: many WebSocket sessions, each sending messages of events and waiting
//! for each durable acknowledgement before the next (as the app does).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What one session did.
pub struct SessionReport {
    /// Ack latency in microseconds.
    pub histogram: Histogram<u64>,
    /// Events acknowledged.
    pub events: u64,
    /// Messages that failed or were not acknowledged.
    pub errors: u64,
}

/// What one session does.
pub struct Plan {
    /// Makes device and event ids unique to this run, so repeated runs send new events.
    pub run: u128,
    /// The server.
    pub addr: SocketAddr,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// The session's number.
    pub id: usize,
    /// Messages to send.
    pub messages: u64,
    /// Events per message.
    pub per_message: usize,
    /// No message is sent after this.
    pub deadline: Instant,
    /// How long to stay connected afterwards, answering pings, as an idle app does.
    pub hold: Duration,
}

/// Runs one session: sends its messages, waiting for each acknowledgement, then holds.
pub async fn session(plan: Plan) -> SessionReport {
    let Plan {
        run,
        addr,
        token,
        id,
        messages,
        per_message,
        deadline,
        hold,
    } = plan;
    let mut report = SessionReport {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        events: 0,
        errors: 0,
    };
    let mut request = match format!("ws://{addr}/v1/stream").into_client_request() {
        Ok(request) => request,
        Err(_) => {
            report.errors += 1;
            return report;
        }
    };
    if let Some(token) = token
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await else {
        report.errors += 1;
        return report;
    };
    for seq in 0..messages {
        if Instant::now() >= deadline {
            break;
        }
        let at = crate::clock::rfc3339_now();
        let events: Vec<String> = (0..per_message)
            .map(|i| {
                format!(
                    r#"{{"event_id":"live-{run}-{id}-{seq}-{i}","device_id":"dev-{run}-{id}","seq":{},"user_id":"child-{id}","session_id":"s-{id}","type":"exercise_answered","timestamp":"{at}","context":{{"app_version":"3.2.0","platform":"android","country":"FR"}},"properties":{{"lesson_id":"g-1","correct":true,"duration_ms":1200}}}}"#,
                    seq * per_message as u64 + i as u64 + 1
                )
            })
            .collect();
        let message = format!(
            r#"{{"seq":{seq},"sent_at":"{at}","events":[{}]}}"#,
            events.join(",")
        );
        let sent = Instant::now();
        if socket.send(Message::Text(message.into())).await.is_err() {
            report.errors += 1;
            break;
        }
        let acked = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(Ok(reply)) = socket.next().await {
                if let Message::Text(text) = reply
                    && text.contains("\"type\":\"ack\"")
                {
                    return text.contains("\"rejected\":0");
                }
            }
            false
        })
        .await;
        match acked {
            Ok(true) => {
                let micros = sent.elapsed().as_micros().max(1) as u64;
                let _ = report.histogram.record(micros.min(60_000_000));
                report.events += per_message as u64;
            }
            _ => report.errors += 1,
        }
    }
    if !hold.is_zero() {
        // Stay connected and answer pings, as an idle app does.
        let _ = tokio::time::timeout(hold, async {
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
    }
    let _ = socket.close(None).await;
    report
}
