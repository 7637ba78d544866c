//! Request bodies to events: decompression with a cap on the decompressed size, then a JSON
//! body `{"sent_at": …, "batch": [ … ]}` (or a bare array) or NDJSON, one event a line.
//! Each event is checked for size on its own, so one oversized event rejects only itself.

use std::borrow::Cow;
use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::events::raw::json_string;
use crate::events::time::{Millis, parse_rfc3339};
use crate::events::{RawEvent, RejectReason, Rejection};

/// `Content-Encoding` values the batch endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No compression.
    Identity,
    /// gzip.
    Gzip,
    /// Zstandard.
    Zstd,
}

impl Encoding {
    /// Reads a `Content-Encoding` header value.
    pub fn from_header(value: Option<&str>) -> Option<Self> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Some(Encoding::Identity),
            Some("gzip") | Some("x-gzip") => Some(Encoding::Gzip),
            Some("zstd") => Some(Encoding::Zstd),
            Some(_) => None,
        }
    }
}

/// How the events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// One JSON event per line.
    Ndjson,
}

impl BodyFormat {
    /// Reads a `Content-Type` header value; no header means JSON.
    pub fn from_header(value: Option<&str>) -> Option<Self> {
        let media = value.map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        match media.as_deref() {
            None | Some("") | Some("application/json") => Some(BodyFormat::Json),
            Some("application/x-ndjson")
            | Some("application/ndjson")
            | Some("application/jsonl") => Some(BodyFormat::Ndjson),
            Some(_) => None,
        }
    }
}

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Bytes after decompression.
    pub max_decompressed: usize,
    /// Bytes of one event.
    pub max_event: usize,
    /// Events in one batch.
    pub max_events: usize,
}

/// Why a whole request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body does not decompress.
    #[error("the body is not valid {0}")]
    Corrupt(&'static str),
    /// Over the decompressed size limit.
    #[error("the body decompresses to more than {0} bytes")]
    TooLarge(usize),
    /// More events than a batch may hold.
    #[error("a batch holds at most {0} events")]
    TooManyEvents(usize),
    /// Not the expected JSON shape.
    #[error("{0}")]
    Malformed(String),
}

/// The events of one request, each read or rejected on its own, borrowed from the body.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// The batch's `sent_at`, for events without their own.
    pub sent_at: Option<Millis>,
    /// The events, in order.
    pub events: Vec<Result<RawEvent<'a>, Rejection>>,
}

/// A WebSocket client message: its sequence number and its events.
#[derive(Debug)]
pub struct StreamMessage<'a> {
    /// The client's sequence number, echoed in the ack.
    pub seq: u64,
    /// The message's `sent_at`, for events without their own.
    pub sent_at: Option<Millis>,
    /// The events, in order; an oversized or malformed one is rejected on its own.
    pub events: Vec<Result<RawEvent<'a>, Rejection>>,
}

/// The kinds of refusal of a WebSocket message; the HTTP layer answers each with its error
/// code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefusal {
    /// The message is malformed.
    Invalid,
    /// The message holds more events than allowed.
    TooLarge,
}

impl StreamRefusal {
    /// The error code of the reply, as the HTTP layer's error model names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_request",
            Self::TooLarge => "payload_too_large",
        }
    }
}

/// Why a whole WebSocket message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The message's sequence number, when it could be read.
    pub seq: Option<u64>,
    /// What kind of refusal it is.
    pub code: StreamRefusal,
    /// What was wrong.
    pub description: String,
}

/// The members of a WebSocket client message, as sent.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    events: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
}

/// Reads a WebSocket client message: `{"seq": n, "events": [...]}` or `{"seq": n, "event":
/// {...}}`, with an optional `sent_at`.
pub fn decode_message<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<StreamMessage<'a>, StreamError> {
    let refuse = |seq, code, description: &str| StreamError {
        seq,
        code,
        description: description.to_owned(),
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(refuse(
            None,
            StreamRefusal::Invalid,
            "a message is a JSON object: {\"seq\": n, \"events\": [...]}",
        ));
    }
    let message: Message<'a> = serde_json::from_slice(bytes).map_err(|err| StreamError {
        seq: None,
        code: StreamRefusal::Invalid,
        description: format!("not JSON: {err}"),
    })?;
    let seq = message.seq.and_then(|raw| raw.get().parse::<u64>().ok());
    let Some(seq_number) = seq else {
        return Err(refuse(
            None,
            StreamRefusal::Invalid,
            "a message needs a numeric seq",
        ));
    };
    let raw: Vec<&'a RawValue> = match (message.events, message.event) {
        (Some(events), None) => serde_json::from_str(events.get()).map_err(|_| {
            refuse(
                seq,
                StreamRefusal::Invalid,
                "a message carries `events` (an array) or `event`",
            )
        })?,
        (None, Some(event)) => vec![event],
        _ => {
            return Err(refuse(
                seq,
                StreamRefusal::Invalid,
                "a message carries `events` (an array) or `event`",
            ));
        }
    };
    if raw.len() > limits.max_events {
        return Err(StreamError {
            seq,
            code: StreamRefusal::TooLarge,
            description: format!("a message holds at most {} events", limits.max_events),
        });
    }
    let sent_at = match message.sent_at {
        None => None,
        Some(raw) => Some(
            json_string(raw)
                .and_then(|text| parse_rfc3339(&text))
                .ok_or_else(|| {
                    refuse(
                        seq,
                        StreamRefusal::Invalid,
                        "sent_at must be an RFC 3339 timestamp",
                    )
                })?,
        ),
    };
    Ok(StreamMessage {
        seq: seq_number,
        sent_at,
        events: raw.iter().map(|e| one_event(e.get(), limits)).collect(),
    })
}

/// Decompresses `body`, refusing output beyond `max` bytes.
pub fn decompress(
    body: &[u8],
    encoding: Encoding,
    max: usize,
) -> Result<Cow<'_, [u8]>, DecodeError> {
    let mut out = Vec::new();
    let limit = max as u64 + 1;
    let read = match encoding {
        Encoding::Identity => {
            return if body.len() > max {
                Err(DecodeError::TooLarge(max))
            } else {
                Ok(Cow::Borrowed(body))
            };
        }
        Encoding::Gzip => flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|_| DecodeError::Corrupt("gzip")),
        Encoding::Zstd => zstd::stream::read::Decoder::new(body)
            .and_then(|decoder| decoder.take(limit).read_to_end(&mut out))
            .map_err(|_| DecodeError::Corrupt("zstd")),
    };
    read?;
    if out.len() > max {
        return Err(DecodeError::TooLarge(max));
    }
    Ok(Cow::Owned(out))
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    sent_at: Option<String>,
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
}

/// Reads one event of `text` (as sent, so its size is what the device sent).
fn one_event<'a>(text: &'a str, limits: &DecodeLimits) -> Result<RawEvent<'a>, Rejection> {
    if text.len() > limits.max_event {
        return Err(Rejection {
            reason: RejectReason::TooLarge,
            detail: format!("an event may have at most {} bytes", limits.max_event),
        });
    }
    RawEvent::parse(text)
}

fn batch_sent_at(text: Option<&str>) -> Result<Option<Millis>, DecodeError> {
    match text {
        None => Ok(None),
        Some(text) => parse_rfc3339(text)
            .map(Some)
            .ok_or_else(|| DecodeError::Malformed("sent_at must be an RFC 3339 timestamp".into())),
    }
}

/// Splits a decompressed body into events.
pub fn decode<'a>(
    bytes: &'a [u8],
    format: BodyFormat,
    limits: &DecodeLimits,
) -> Result<Decoded<'a>, DecodeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| DecodeError::Malformed("the body is not UTF-8".into()))?;
    match format {
        BodyFormat::Json => {
            let trimmed = text.trim_start();
            let (sent_at, raws): (Option<String>, Vec<&'a RawValue>) = if trimmed.starts_with('[') {
                let raws: Vec<&'a RawValue> = serde_json::from_str(text).map_err(|err| {
                    DecodeError::Malformed(format!("the body is not valid JSON: {err}"))
                })?;
                (None, raws)
            } else {
                let envelope: Envelope<'a> = serde_json::from_str(text).map_err(|err| {
                    DecodeError::Malformed(format!(
                        "the body must be {{\"sent_at\": …, \"batch\": [events]}}: {err}"
                    ))
                })?;
                (envelope.sent_at, envelope.batch)
            };
            if raws.len() > limits.max_events {
                return Err(DecodeError::TooManyEvents(limits.max_events));
            }
            Ok(Decoded {
                sent_at: batch_sent_at(sent_at.as_deref())?,
                events: raws
                    .iter()
                    .map(|raw| one_event(raw.get(), limits))
                    .collect(),
            })
        }
        BodyFormat::Ndjson => {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() > limits.max_events {
                return Err(DecodeError::TooManyEvents(limits.max_events));
            }
            Ok(Decoded {
                sent_at: None,
                events: lines.iter().map(|line| one_event(line, limits)).collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_decompressed: 1024,
        max_event: 64,
        max_events: 3,
    };

    #[test]
    fn json_and_ndjson_bodies_split_into_events() {
        let decoded = decode(
            br#"{"sent_at": "2026-11-23T16:02:00Z", "batch": [{"a": 1}, {"b": 2}]}"#,
            BodyFormat::Json,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(decoded.events.len(), 2);
        assert!(decoded.sent_at.is_some());
        let decoded = decode(b"{\"a\":1}\n\n not json\n", BodyFormat::Ndjson, &LIMITS).unwrap();
        assert!(decoded.events[0].is_ok());
        assert_eq!(
            decoded.events[1].as_ref().unwrap_err().reason,
            RejectReason::Malformed
        );
    }

    #[test]
    fn limits_apply_per_event_and_per_batch() {
        let big = format!("[{{\"pad\": \"{}\"}}, {{}}]", "x".repeat(100));
        let decoded = decode(big.as_bytes(), BodyFormat::Json, &LIMITS).unwrap();
        assert_eq!(
            decoded.events[0].as_ref().unwrap_err().reason,
            RejectReason::TooLarge
        );
        assert!(decoded.events[1].is_ok());
        assert_eq!(
            decode(b"[{},{},{},{}]", BodyFormat::Json, &LIMITS).unwrap_err(),
            DecodeError::TooManyEvents(3)
        );
        assert!(matches!(
            decode(b"{\"batch\": 3}", BodyFormat::Json, &LIMITS),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&[0xff, 0xfe], BodyFormat::Json, &LIMITS),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_stream_message_gives_its_seq_and_each_event_on_its_own() {
        let message = decode_message(
            br#" {"seq": 7, "sent_at": "2026-11-23T16:02:00Z", "client": "x",
                "events": [{"event_id": "a"}, 5, {"pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(message.seq, 7);
        assert!(message.sent_at.is_some());
        let events = &message.events;
        assert_eq!(events[0].as_ref().unwrap().event_id().as_deref(), Some("a"));
        assert_eq!(
            events[1].as_ref().unwrap_err().reason,
            RejectReason::Malformed
        );
        assert_eq!(
            events[2].as_ref().unwrap_err().reason,
            RejectReason::TooLarge
        );
        let single = decode_message(br#"{"seq": 1, "event": {"event_id": "b"}}"#, &LIMITS).unwrap();
        assert_eq!(single.events.len(), 1);
        assert_eq!(single.sent_at, None);
    }

    #[test]
    fn a_bad_stream_message_is_refused_whole_with_its_seq_when_known() {
        let cases: [(&[u8], Option<u64>, &str, &str); 9] = [
            (
                b"not json",
                None,
                "invalid_request",
                "a message is a JSON object",
            ),
            (
                b"[5, null, [{}]]",
                None,
                "invalid_request",
                "a message is a JSON object",
            ),
            (b"{\"seq\": 1, ", None, "invalid_request", "not JSON"),
            (
                br#"{"events": [{}]}"#,
                None,
                "invalid_request",
                "numeric seq",
            ),
            (
                br#"{"seq": "5", "events": [{}]}"#,
                None,
                "invalid_request",
                "numeric seq",
            ),
            (
                br#"{"seq": 5, "events": {}}"#,
                Some(5),
                "invalid_request",
                "carries",
            ),
            (br#"{"seq": 5}"#, Some(5), "invalid_request", "carries"),
            (
                br#"{"seq": 5, "events": [{},{},{},{}]}"#,
                Some(5),
                "payload_too_large",
                "at most 3",
            ),
            (
                br#"{"seq": 5, "sent_at": 17, "events": [{}]}"#,
                Some(5),
                "invalid_request",
                "RFC 3339",
            ),
        ];
        for (bytes, seq, code, description) in cases {
            let err = decode_message(bytes, &LIMITS).unwrap_err();
            let text = String::from_utf8_lossy(bytes);
            assert_eq!((err.seq, err.code.as_str()), (seq, code), "{text}");
            assert!(err.description.contains(description), "{text}: {err:?}");
        }
    }

    #[test]
    fn decompression_is_capped_and_checked() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![b'x'; 5000]).unwrap();
        let bomb = gz.finish().unwrap();
        assert_eq!(
            decompress(&bomb, Encoding::Gzip, 1024).unwrap_err(),
            DecodeError::TooLarge(1024)
        );
        assert_eq!(
            decompress(&bomb, Encoding::Gzip, 10_000).unwrap().len(),
            5000
        );
        let zst = zstd::encode_all(&b"[{}]"[..], 3).unwrap();
        assert_eq!(&*decompress(&zst, Encoding::Zstd, 100).unwrap(), b"[{}]");
        assert_eq!(
            decompress(b"garbage", Encoding::Zstd, 100).unwrap_err(),
            DecodeError::Corrupt("zstd")
        );
        assert_eq!(Encoding::from_header(Some("br")), None);
        assert_eq!(BodyFormat::from_header(Some("text/csv")), None);
        assert_eq!(
            BodyFormat::from_header(Some("application/json; charset=utf-8")),
            Some(BodyFormat::Json)
        );
    }
}
