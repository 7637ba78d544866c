//! Validation of one event: from the JSON a device sent to the typed [`Event`] that is stored,
//! or a [`Rejection`] with a reason. The raw `user_id` is handed back separately so that the
//! privacy gate can pseudonymize it; it never enters an `Event`.

// Long file: a quarter of it is the unit tests of every rejection reason, kept beside it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::raw::{Members, RawEvent, is_null, json_string};
use super::schema::{CONTEXT_KEYS, EventType, Schema};
use super::time::{Corrected, Millis, correct, parse_rfc3339};

/// An event as stored: validated, time-corrected, pseudonymous. Its text fields borrow from
/// the request it came in (or the record it is read from) unless they held escapes, so that
/// accepting an event costs few allocations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<'a> {
    /// Client-generated unique id.
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    /// The installation.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<Cow<'a, str>>,
    /// Monotonic per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The subject's pseudonym (never the raw user id).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Cow<'a, str>>,
    /// The app session.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Cow<'a, str>>,
    /// The declared event type.
    #[serde(borrow, rename = "type")]
    pub event_type: Cow<'a, str>,
    /// Corrected event time, ms since the Unix epoch.
    pub event_time: Millis,
    /// The device's own timestamp, ms.
    pub device_time: Millis,
    /// The device's send time, ms, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<Millis>,
    /// When the service received it, ms.
    pub received_at: Millis,
    /// Declared context keys (app version, platform, locale, country, school, class); the
    /// keys are the schema's own names (no copy per event) when built by [`validate`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: BTreeMap<Cow<'static, str>, Cow<'a, str>>,
    /// Declared properties of its type.
    #[serde(borrow, default, skip_serializing_if = "Properties::is_empty")]
    pub properties: Properties<'a>,
}

impl Event<'_> {
    /// Returns a copy that borrows nothing.
    pub fn into_owned(self) -> Event<'static> {
        let owned = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        Event {
            event_id: owned(self.event_id),
            device_id: self.device_id.map(owned),
            seq: self.seq,
            subject: self.subject.map(owned),
            session_id: self.session_id.map(owned),
            event_type: owned(self.event_type),
            event_time: self.event_time,
            device_time: self.device_time,
            sent_at: self.sent_at,
            received_at: self.received_at,
            context: (self.context.into_iter())
                .map(|(key, value)| (key, owned(value)))
                .collect(),
            properties: Properties(
                (self.properties.0.into_iter())
                    .map(|(key, value)| (owned(key), Cow::Owned(value.into_owned())))
                    .collect(),
            ),
        }
    }
}

/// An event's declared properties, by name, each value the JSON text sent (checked against
/// its declared type). Read back from a stored record with a borrowing reader
/// (`serde_json::from_slice` or `from_str`).
#[derive(Debug, Clone, Default)]
pub struct Properties<'a>(Vec<(Cow<'a, str>, Cow<'a, RawValue>)>);

impl<'a> Properties<'a> {
    /// Returns whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Returns the JSON text of property `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.get())
    }

    /// Returns whether property `name` is present.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets property `name` to a string, replacing any value it had.
    pub fn insert_str(&mut self, name: &'a str, value: &str) {
        let json = serde_json::to_string(value).expect("strings serialize");
        let raw = RawValue::from_string(json).expect("a serialized string is JSON");
        self.0.retain(|(key, _)| key != name);
        self.0.push((Cow::Borrowed(name), Cow::Owned(raw)));
        self.0.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }
}

impl PartialEq for Properties<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.0 == b.0 && a.1.get() == b.1.get())
    }
}

impl Serialize for Properties<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Properties<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let members = Members::deserialize(deserializer)?;
        let mut properties: Vec<_> = (members.0.into_iter())
            .map(|(key, value)| (key, Cow::Borrowed(value)))
            .collect();
        properties.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Self(properties))
    }
}

/// Why an event was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not a JSON object.
    Malformed,
    /// Over the per-event size limit.
    TooLarge,
    /// A required field is absent.
    MissingField,
    /// A field is present but invalid (empty, too long, out of range).
    InvalidField,
    /// A field or property has the wrong JSON type.
    WrongType,
    /// The event type is not declared.
    UnknownType,
    /// A timestamp is not RFC 3339.
    InvalidTimestamp,
    /// Older than the late-arrival horizon.
    TooOld,
    /// The subject has not given the consent the project requires.
    NoConsent,
    /// The subject's data was erased at the family's request.
    Erased,
}

impl RejectReason {
    /// Returns the reason as answered to clients and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::TooLarge => "too_large",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::TooOld => "too_old",
            RejectReason::NoConsent => "no_consent",
            RejectReason::Erased => "erased",
        }
    }

    /// Every reason, for metrics.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Malformed,
        RejectReason::TooLarge,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::WrongType,
        RejectReason::UnknownType,
        RejectReason::InvalidTimestamp,
        RejectReason::TooOld,
        RejectReason::NoConsent,
        RejectReason::Erased,
    ];
}

/// A rejected event: the reason and a detail for the developer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason.
    pub reason: RejectReason,
    /// Which field and what is wrong.
    pub detail: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Limits applied to each event.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events older than this (after correction) are rejected.
    pub late_horizon: Millis,
    /// Events later than `received_at` by more than this are clamped.
    pub future_tolerance: Millis,
}

/// A valid event, its raw user id (for the privacy gate), and what validation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated<'a> {
    /// The event, with `subject` still empty.
    pub event: Event<'a>,
    /// The raw user id, to be pseudonymized and dropped.
    pub user_id: Option<Cow<'a, str>>,
    /// Properties, context keys and top-level fields dropped as undeclared.
    pub dropped: usize,
    /// The clock-skew correction.
    pub correction: Corrected,
}

fn text_field<'a>(
    event: &RawEvent<'a>,
    name: &'static str,
    max: usize,
    required: bool,
) -> Result<Option<Cow<'a, str>>, Rejection> {
    match event.field(name).filter(|raw| !is_null(raw)) {
        None if required => Err(Rejection::new(
            RejectReason::MissingField,
            format!("{name} is required"),
        )),
        None => Ok(None),
        Some(raw) => match json_string(raw) {
            Some(s) if s.is_empty() || s.len() > max => Err(Rejection::new(
                RejectReason::InvalidField,
                format!("{name} must have 1 to {max} bytes"),
            )),
            Some(s) => Ok(Some(s)),
            None => Err(Rejection::new(
                RejectReason::WrongType,
                format!("{name} must be a string"),
            )),
        },
    }
}

fn time_field(event: &RawEvent<'_>, name: &'static str) -> Result<Option<Millis>, Rejection> {
    match text_field(event, name, 64, false)? {
        None => Ok(None),
        Some(text) => parse_rfc3339(&text).map(Some).ok_or_else(|| {
            Rejection::new(
                RejectReason::InvalidTimestamp,
                format!("{name} must be an RFC 3339 timestamp such as 2026-11-20T09:14:03.120Z"),
            )
        }),
    }
}

/// Reads an optional object field: its members, or `None` when absent or null.
fn object_field<'a>(
    event: &RawEvent<'a>,
    name: &'static str,
) -> Result<Option<Members<'a>>, Rejection> {
    match event.field(name).filter(|raw| !is_null(raw)) {
        None => Ok(None),
        Some(raw) => Members::of(raw).map(Some).ok_or_else(|| {
            Rejection::new(RejectReason::WrongType, format!("{name} must be an object"))
        }),
    }
}

/// `seq`: absent, or a whole number from 1 sent with a `device_id`.
fn seq_field(raw: &RawEvent<'_>, has_device: bool) -> Result<Option<u64>, Rejection> {
    let seq = match raw.field("seq").filter(|v| !is_null(v)) {
        None => return Ok(None),
        Some(value) => match value.get().parse::<u64>() {
            Ok(seq) if seq >= 1 => seq,
            _ => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "seq must be a whole number from 1",
                ));
            }
        },
    };
    if !has_device {
        return Err(Rejection::new(
            RejectReason::MissingField,
            "seq needs device_id",
        ));
    }
    Ok(Some(seq))
}

/// The declared context keys sent, each a string of at most 128 bytes; others are counted
/// in `dropped`.
fn context_of<'a>(
    raw: &RawEvent<'a>,
    dropped: &mut usize,
) -> Result<BTreeMap<Cow<'static, str>, Cow<'a, str>>, Rejection> {
    let mut context = BTreeMap::new();
    for (key, value) in object_field(raw, "context")?.unwrap_or_default().0 {
        let Some(name) = CONTEXT_KEYS.iter().find(|name| **name == key) else {
            *dropped += 1;
            continue;
        };
        match json_string(value) {
            Some(s) if s.len() <= 128 => {
                context.insert(Cow::Borrowed(*name), s);
            }
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    format!("context.{key} must have at most 128 bytes"),
                ));
            }
            None => {
                return Err(Rejection::new(
                    RejectReason::WrongType,
                    format!("context.{key} must be a string"),
                ));
            }
        }
    }
    Ok(context)
}

/// The declared properties sent, each checked against its declared kind and kept as the
/// JSON text sent, sorted by name; required ones must be there. Others are counted in
/// `dropped`.
fn properties_of<'a>(
    raw: &RawEvent<'a>,
    declared: &EventType,
    event_type: &str,
    dropped: &mut usize,
) -> Result<Properties<'a>, Rejection> {
    let mut properties = Vec::new();
    for (name, raw_value) in object_field(raw, "properties")?.unwrap_or_default().0 {
        let Some(property) = declared.properties.get(name.as_ref()) else {
            *dropped += 1;
            continue;
        };
        if is_null(raw_value) {
            continue;
        }
        // Declared properties are scalars, kept as the JSON text sent once checked.
        if !property.kind.admits_json(raw_value.get()) {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!("properties.{name} must be {}", property.kind.json_type()),
            ));
        }
        properties.push((name, Cow::Borrowed(raw_value)));
    }
    properties.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let properties = Properties(properties);
    if let Some((name, _)) = declared
        .properties
        .iter()
        .find(|(name, p)| p.required && !properties.contains_key(name))
    {
        return Err(Rejection::new(
            RejectReason::MissingField,
            format!("properties.{name} is required for {event_type}"),
        ));
    }
    Ok(properties)
}

/// Validates one event received at `received_at`; `batch_sent_at` applies when the event
/// carries no `sent_at` of its own.
pub fn validate<'a>(
    raw: &RawEvent<'a>,
    batch_sent_at: Option<Millis>,
    received_at: Millis,
    schema: &Schema,
    limits: &Limits,
) -> Result<Validated<'a>, Rejection> {
    let mut dropped = raw.unknown_fields();
    let event_id = text_field(raw, "event_id", 128, true)?.expect("required");
    let device_id = text_field(raw, "device_id", 128, false)?;
    let seq = seq_field(raw, device_id.is_some())?;
    let user_id = text_field(raw, "user_id", 256, false)?;
    let session_id = text_field(raw, "session_id", 128, false)?;
    let event_type = text_field(raw, "type", 64, true)?.expect("required");
    let declared = schema.get(&event_type).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownType,
            format!("event type {event_type:?} is not declared"),
        )
    })?;
    let device_time = time_field(raw, "timestamp")?
        .ok_or_else(|| Rejection::new(RejectReason::MissingField, "timestamp is required"))?;
    let sent_at = time_field(raw, "sent_at")?.or(batch_sent_at);

    let context = context_of(raw, &mut dropped)?;
    let properties = properties_of(raw, declared, &event_type, &mut dropped)?;

    let correction = correct(device_time, sent_at, received_at, limits.future_tolerance);
    if received_at.saturating_sub(correction.event_time) > limits.late_horizon {
        return Err(Rejection::new(
            RejectReason::TooOld,
            "the event is older than the late-arrival horizon",
        ));
    }
    Ok(Validated {
        event: Event {
            event_id,
            device_id,
            seq,
            subject: None,
            session_id,
            event_type,
            event_time: correction.event_time,
            device_time,
            sent_at,
            received_at,
            context,
            properties,
        },
        user_id,
        dropped,
        correction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const NOW: Millis = 1_795_500_000_000;
    const LIMITS: Limits = Limits {
        late_horizon: 30 * 86_400_000,
        future_tolerance: 60_000,
    };

    fn check(event: Value) -> Result<Validated<'static>, Rejection> {
        // Leaked: the validated event borrows from the text, as it does from a request.
        let text: &'static str = event.to_string().leak();
        RawEvent::parse(text)
            .and_then(|raw| validate(&raw, None, NOW, &Schema::reading_app(), &LIMITS))
    }

    fn lesson() -> Value {
        json!({
            "event_id": "e-1", "device_id": "tab-42", "seq": 7, "user_id": "child-7781",
            "session_id": "s-19", "type": "lesson_completed",
            "timestamp": "2026-11-20T09:14:03.120Z", "sent_at": "2026-11-20T09:15:00.000Z",
            "context": {"app_version": "3.2.0", "platform": "android", "locale": "fr-FR", "country": "FR", "ip": "10.0.0.1"},
            "properties": {"lesson_id": "g-14", "duration_ms": 41000, "score": 0.8, "child_name": "Léa"},
            "email": "parent@example.com"
        })
    }

    #[test]
    fn a_good_event_is_typed_corrected_and_minimized() {
        let valid = check(lesson()).unwrap();
        assert_eq!(valid.user_id.as_deref(), Some("child-7781"));
        assert_eq!(valid.event.subject, None);
        // ip, child_name and email were not declared: dropped, and counted.
        assert_eq!(valid.dropped, 3);
        assert!(!valid.event.context.contains_key("ip"));
        assert!(!valid.event.properties.contains_key("child_name"));
        // Sent 56.88 s after it happened, by the device's clock.
        assert_eq!(valid.event.event_time, NOW - 56_880);
        let stored = serde_json::to_string(&valid.event).unwrap();
        assert!(!stored.contains("child-7781") && !stored.contains("parent@"));
    }

    #[test]
    fn every_kind_of_bad_event_gets_its_reason() {
        let cases: Vec<(Value, RejectReason)> = vec![
            (json!([1]), RejectReason::Malformed),
            (
                json!({"type": "app_opened", "timestamp": "2026-11-20T09:14:03Z"}),
                RejectReason::MissingField,
            ),
            (
                json!({"event_id": "", "type": "app_opened", "timestamp": "2026-11-20T09:14:03Z"}),
                RejectReason::InvalidField,
            ),
            (
                json!({"event_id": 5, "type": "app_opened", "timestamp": "2026-11-20T09:14:03Z"}),
                RejectReason::WrongType,
            ),
            (
                json!({"event_id": "e", "type": "dance", "timestamp": "2026-11-20T09:14:03Z"}),
                RejectReason::UnknownType,
            ),
            (
                json!({"event_id": "e", "type": "app_opened", "timestamp": "yesterday"}),
                RejectReason::InvalidTimestamp,
            ),
            (
                json!({"event_id": "e", "type": "app_opened"}),
                RejectReason::MissingField,
            ),
            (
                json!({"event_id": "e", "type": "app_opened", "timestamp": "2026-11-20T09:14:03Z", "seq": 3}),
                RejectReason::MissingField,
            ),
            (
                json!({"event_id": "e", "device_id": "d", "type": "app_opened", "timestamp": "2026-11-20T09:14:03Z", "seq": 0}),
                RejectReason::InvalidField,
            ),
            (
                json!({"event_id": "e", "type": "lesson_started", "timestamp": "2026-11-20T09:14:03Z"}),
                RejectReason::MissingField,
            ),
            (
                json!({"event_id": "e", "type": "lesson_started", "timestamp": "2026-11-20T09:14:03Z", "properties": {"lesson_id": 14}}),
                RejectReason::WrongType,
            ),
            (
                json!({"event_id": "e", "type": "app_opened", "timestamp": "2026-11-20T09:14:03Z", "context": {"platform": 1}}),
                RejectReason::WrongType,
            ),
            (
                json!({"event_id": "e", "type": "app_opened", "timestamp": "2020-01-01T00:00:00Z"}),
                RejectReason::TooOld,
            ),
        ];
        for (event, reason) in cases {
            let rejection = check(event.clone()).unwrap_err();
            assert_eq!(rejection.reason, reason, "{event}: {}", rejection.detail);
            assert!(!rejection.detail.is_empty());
        }
    }

    #[test]
    fn a_week_old_offline_event_is_accepted_and_a_future_one_clamped() {
        let week_ago = super::super::time::format_rfc3339(NOW - 7 * 86_400_000);
        let valid =
            check(json!({"event_id": "e", "type": "app_opened", "timestamp": week_ago})).unwrap();
        assert_eq!(valid.event.event_time, NOW - 7 * 86_400_000);
        let future = super::super::time::format_rfc3339(NOW + 86_400_000);
        let valid =
            check(json!({"event_id": "e", "type": "app_opened", "timestamp": future})).unwrap();
        assert!(valid.correction.clamped);
        assert_eq!(valid.event.event_time, NOW);
    }

    #[test]
    fn properties_are_kept_as_sent_once_their_type_is_checked() {
        let text = r#"{"event_id": "e-1", "type": "lesson_completed", "timestamp": "2026-11-20T09:14:03.120Z",
            "properties": {"score": 8E-1, "lesson_id": "g-\u00e9\"14\"", "duration_ms": 41000}}"#;
        let raw = RawEvent::parse(text).unwrap();
        let valid = validate(&raw, None, NOW, &Schema::reading_app(), &LIMITS).unwrap();
        let properties = &valid.event.properties;
        assert_eq!(properties.get("lesson_id"), Some(r#""g-\u00e9\"14\"""#));
        assert_eq!(properties.get("duration_ms"), Some("41000"));
        // A number is stored as the device wrote it, in its own notation.
        assert_eq!(properties.get("score"), Some("8E-1"));
        // Stored, then read back the way every consumer reads it: the same event.
        let stored = serde_json::to_vec(&valid.event).unwrap();
        let back: Event<'_> = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, valid.event);
        assert_eq!(back.clone().into_owned(), valid.event);
        let decoded: Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(decoded["properties"]["lesson_id"], "g-é\"14\"");
        assert_eq!(decoded["properties"]["score"], 0.8);
        assert!(String::from_utf8(stored).unwrap().contains(
            r#""properties":{"duration_ms":41000,"lesson_id":"g-\u00e9\"14\"","score":8E-1}"#
        ));
        // Values of the wrong kind, or numbers no reader could decode, are refused.
        for bad in [
            r#""duration_ms": 1.5"#,
            r#""duration_ms": 18446744073709551616"#,
            r#""duration_ms": "41000""#,
            r#""score": 1e400"#,
            r#""lesson_id": true"#,
        ] {
            let text = text.replace(r#""duration_ms": 41000"#, bad);
            let raw = RawEvent::parse(&text).unwrap();
            let rejection = validate(&raw, None, NOW, &Schema::reading_app(), &LIMITS).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::WrongType, "{bad}");
        }
    }
}
