//! Live ingest over `/v1/stream` with a real WebSocket client.

use std::time::Duration;

use flagstream::events::time::format_rfc3339;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::harness::wait::{now_ms, until};
use crate::harness::{Service, client_and_analyst_tokens, stored_events};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn event(id: &str) -> Value {
    json!({"event_id": id, "user_id": "child-ws", "type": "app_opened", "timestamp": format_rfc3339(now_ms())})
}

async fn connect(service: &Service, header: Option<(&'static str, &str)>) -> Result<Socket, u16> {
    let mut request = format!("ws://{}/v1/stream", service.addr)
        .into_client_request()
        .unwrap();
    if let Some((name, value)) = header {
        request
            .headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

/// Reads until a JSON text message of `kind` arrives (pings are answered by the client).
async fn next_of(socket: &mut Socket, kind: &str) -> Value {
    let read = async {
        while let Some(message) = socket.next().await {
            if let Message::Text(text) = message.expect("a message") {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == kind {
                    return value;
                }
            }
        }
        panic!("the session ended before a {kind} message");
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a reply in time")
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_come_after_durability_with_per_event_results() {
    let service = Service::start_with(|c| c.auth.tokens = client_and_analyst_tokens()).await;
    let mut socket = connect(&service, Some(("authorization", "Bearer client-key")))
        .await
        .unwrap();
    send(&mut socket, json!({"seq": 1, "events": [event("w-1"), event("w-2"), {"event_id": "w-3", "type": "nope", "timestamp": "x"}]})).await;
    let ack = next_of(&mut socket, "ack").await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(
        (ack["accepted"].as_u64(), ack["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(ack["results"][2]["reason"], "unknown_type");
    // Acknowledged means durable: it is in the write-ahead log now.
    let stored: Vec<String> = stored_events(service.data_dir())
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(stored.contains(&"w-1".to_owned()) && stored.contains(&"w-2".to_owned()));

    // The same event over HTTP, then over the socket again: stored once.
    let response = service
        .http
        .post(service.url("/v1/batch"))
        .bearer_auth("client-key")
        .json(&json!({"batch": [event("w-1")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["duplicates"], 1);
    send(&mut socket, json!({"seq": 2, "event": event("w-2")})).await;
    assert_eq!(next_of(&mut socket, "ack").await["duplicates"], 1);

    // One oversized event is rejected on its own; its neighbour is stored.
    let mut big = event("w-big");
    big["pad"] = json!("x".repeat(40_000));
    send(
        &mut socket,
        json!({"seq": 3, "events": [event("w-4"), big]}),
    )
    .await;
    let ack = next_of(&mut socket, "ack").await;
    assert_eq!(ack["results"][0]["status"], "ok");
    assert_eq!(ack["results"][1]["reason"], "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_checked_before_the_upgrade() {
    let service = Service::start_with(|c| c.auth.tokens = client_and_analyst_tokens()).await;
    assert_eq!(connect(&service, None).await.err(), Some(401));
    assert_eq!(
        connect(&service, Some(("authorization", "Bearer wrong")))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        connect(&service, Some(("authorization", "Bearer analyst-key")))
            .await
            .err(),
        Some(403)
    );
    // Browsers cannot set headers: the key travels as a subprotocol.
    let mut socket = connect(
        &service,
        Some(("sec-websocket-protocol", "flagstream, key.client-key")),
    )
    .await
    .unwrap();
    send(&mut socket, json!({"seq": 9, "event": event("b-1")})).await;
    assert_eq!(next_of(&mut socket, "ack").await["accepted"], 1);
    // A plain GET is not an upgrade.
    let response = service
        .http
        .get(service.url("/v1/stream"))
        .bearer_auth("client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_error_replies_and_the_session_goes_on() {
    let service = Service::start_with(|c| {
        c.ingest.max_batch_events = 5;
        c.stream.max_message = flagstream::config::ByteSize::kib(16);
        c.stream.max_frame = flagstream::config::ByteSize::kib(16);
    })
    .await;
    let mut socket = connect(&service, None).await.unwrap();
    let cases = [
        (Message::Text("not json".into()), "invalid_request"),
        (Message::Text(json!({"events": [event("x")]}).to_string().into()), "invalid_request"),
        (Message::Text(json!({"seq": 1, "events": "nope"}).to_string().into()), "invalid_request"),
        (Message::Text(json!({"seq": 2, "events": (0..6).map(|i| event(&format!("m{i}"))).collect::<Vec<_>>()}).to_string().into()), "payload_too_large"),
        (Message::Text(json!({"seq": 3, "sent_at": "tuesday", "events": []}).to_string().into()), "invalid_request"),
    ];
    for (message, error) in cases {
        socket.send(message).await.unwrap();
        assert_eq!(next_of(&mut socket, "error").await["error"], error);
    }
    send(
        &mut socket,
        json!({"seq": 4, "event": event("after-errors")}),
    )
    .await;
    assert_eq!(next_of(&mut socket, "ack").await["accepted"], 1);

    // A message over the size limit closes the session; the service goes on.
    let huge =
        json!({"seq": 5, "event": {"event_id": "big", "pad": "x".repeat(40_000)}}).to_string();
    let _ = socket.send(Message::Text(huge.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "an oversized message ends the session");
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_hear_about_flag_changes() {
    let dir = tempfile::tempdir().unwrap();
    let flags = r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a"}}}"#;
    std::fs::write(dir.path().join("f.json"), flags).unwrap();
    let path = dir.path().to_path_buf();
    let service = Service::start_with(move |c| {
        c.flags.dir = path;
        c.flags.reload_interval = Duration::from_millis(50);
    })
    .await;
    let mut socket = connect(&service, None).await.unwrap();
    // Make sure the session is up before the change.
    send(&mut socket, json!({"seq": 1, "event": event("c-1")})).await;
    next_of(&mut socket, "ack").await;
    std::fs::write(
        dir.path().join("f.json"),
        flags.replace("\"defaultVariant\": \"a\"", "\"defaultVariant\": \"b\""),
    )
    .unwrap();
    let push = next_of(&mut socket, "config_changed").await;
    assert!(push["etag"].as_str().unwrap().starts_with('"'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed() {
    let service = Service::start_with(|c| {
        c.stream.idle_timeout = Duration::from_millis(400);
        c.stream.ping_interval = Duration::from_millis(100);
    })
    .await;
    let mut socket = connect(&service, None).await.unwrap();
    // Read nothing (so no pong goes back) for longer than the idle timeout.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return "ended",
                Some(Ok(Message::Close(_))) => return "closed",
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the idle session is closed");
    assert!(matches!(ended, "closed" | "ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_acks_does_not_hurt_the_others() {
    let service = Service::start().await;
    let mut greedy = connect(&service, None).await.unwrap();
    // Write as much as the socket takes without reading a single ack, bounded in time.
    let flood = async {
        for seq in 0..2_000u64 {
            let message = json!({"seq": seq, "events": (0..20).map(|i| event(&format!("g-{seq}-{i}"))).collect::<Vec<_>>()});
            if greedy
                .send(Message::Text(message.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), flood).await;
    let mut polite = connect(&service, None).await.unwrap();
    send(&mut polite, json!({"seq": 1, "event": event("polite-1")})).await;
    assert_eq!(next_of(&mut polite, "ack").await["accepted"], 1);
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_are_refused_until_one_ends() {
    let service = Service::start_with(|config| config.stream.max_sessions = 2).await;
    let mut first = connect(&service, None).await.expect("the first session");
    let _second = connect(&service, None).await.expect("the second session");
    // The third handshake is answered 503 (with Retry-After) and no session is opened.
    assert_eq!(connect(&service, None).await.err(), Some(503));
    let response = service
        .http
        .get(service.url("/v1/stream"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    // A session that ends gives its place back.
    first.close(None).await.unwrap();
    drop(first);
    let third = until(Duration::from_secs(10), "a place is free again", || async {
        connect(&service, None).await
    })
    .await;
    drop(third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_an_error_reply_and_the_session_goes_on() {
    let service = Service::start_with(|config| {
        config.ingest.rate_limit = 1;
        config.ingest.rate_burst = 3;
        config.ingest.max_batch_events = 3;
    })
    .await;
    let mut socket = connect(&service, None).await.expect("a session");
    let batch = |seq: u64, ids: &[&str]| json!({"seq": seq, "events": ids.iter().map(|id| event(id)).collect::<Vec<_>>()});
    send(&mut socket, batch(1, &["r-1", "r-2", "r-3"])).await;
    let ack = next_of(&mut socket, "ack").await;
    assert_eq!(ack["accepted"], 3, "{ack}");
    send(&mut socket, batch(2, &["r-4", "r-5"])).await;
    let refused = next_of(&mut socket, "error").await;
    assert_eq!(refused["seq"], 2, "{refused}");
    assert_eq!(refused["error"], "rate_limited", "{refused}");
    assert!(refused["retry_after"].as_u64().unwrap() >= 1, "{refused}");
    // Nothing of the refused message was stored; the session is still open.
    let stored = crate::harness::client::count(&service, "SELECT count(*) AS n FROM events").await;
    assert_eq!(stored, 3, "the first message's three events only");
    socket.send(Message::Text("not json".into())).await.unwrap();
    let answer = next_of(&mut socket, "error").await;
    assert_eq!(
        answer["error"], "invalid_request",
        "the session answers on: {answer}"
    );
}
