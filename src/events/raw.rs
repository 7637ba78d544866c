//! An event as sent, read without building a JSON tree: each known top-level field is kept as
//! the raw text the device sent, borrowed from the request body, and is only decoded when
//! [`validate`](super::validate::validate) checks it. Undeclared fields are counted and never
//! decoded, so data the service does not keep costs no allocation. Pure.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::validate::{RejectReason, Rejection};

/// The top-level fields of the envelope (ARCHITECTURE.md), in the order [`RawEvent`] keeps them.
pub const KNOWN_FIELDS: [&str; 10] = [
    "event_id",
    "device_id",
    "seq",
    "user_id",
    "session_id",
    "type",
    "timestamp",
    "sent_at",
    "context",
    "properties",
];

/// One event of a request, its fields not yet checked.
#[derive(Debug, Clone, Copy)]
pub struct RawEvent<'a> {
    fields: [Option<&'a RawValue>; KNOWN_FIELDS.len()],
    unknown: usize,
}

impl<'a> RawEvent<'a> {
    /// Reads one event; a rejection (`malformed`) when it is not a JSON object.
    pub fn parse(text: &'a str) -> Result<Self, Rejection> {
        serde_json::from_str(text).map_err(|err| {
            let detail = if err.is_data() {
                "an event is a JSON object".to_owned()
            } else {
                format!("not valid JSON: {err}")
            };
            Rejection::new(RejectReason::Malformed, detail)
        })
    }

    /// Returns the raw text of a known field; `None` when absent (a JSON `null` is returned
    /// as sent).
    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        let index = KNOWN_FIELDS.iter().position(|known| *known == name)?;
        self.fields[index]
    }

    /// Returns how many top-level fields the envelope does not declare.
    pub fn unknown_fields(&self) -> usize {
        self.unknown
    }

    /// Returns `event_id` when it is a string, for answers that name each event.
    pub fn event_id(&self) -> Option<Cow<'a, str>> {
        self.field("event_id").and_then(json_string)
    }
}

impl<'de> Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = RawEvent<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut event = RawEvent {
                    fields: [None; KNOWN_FIELDS.len()],
                    unknown: 0,
                };
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match KNOWN_FIELDS.iter().position(|known| *known == key.0) {
                        // A repeated field: the last one counts, as in any JSON object reader.
                        Some(index) => event.fields[index] = Some(map.next_value()?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                            event.unknown += 1;
                        }
                    }
                }
                Ok(event)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A JSON object's members, their values as sent.
#[derive(Debug, Default)]
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// Reads an object's members; `None` when `raw` is not an object.
    pub fn of(raw: &'a RawValue) -> Option<Self> {
        serde_json::from_str(raw.get()).ok()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Pairs<'a> {
            type Value = Members<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Key<'a>>()? {
                    let value: &'a RawValue = map.next_value()?;
                    members.push((key.0, value));
                }
                keep_last(&mut members);
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Pairs(std::marker::PhantomData))
    }
}

/// Of members with the same key, keeps the last only (as any JSON object reader does), in
/// O(n log n) so that a hostile object of thousands of members costs little.
fn keep_last<V>(members: &mut Vec<(Cow<'_, str>, V)>) {
    let n = members.len();
    // The usual object has a few members and no repeats: look without allocating.
    if n < 2
        || (n <= 16 && !(1..n).any(|i| members[..i].iter().any(|(key, _)| *key == members[i].0)))
    {
        return;
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|a, b| members[*a].0.cmp(&members[*b].0).then(a.cmp(b)));
    let mut superseded = vec![false; members.len()];
    let mut any = false;
    for pair in order.windows(2) {
        if members[pair[0]].0 == members[pair[1]].0 {
            superseded[pair[0]] = true;
            any = true;
        }
    }
    if any {
        let mut index = 0;
        members.retain(|_| {
            index += 1;
            !superseded[index - 1]
        });
    }
}

/// An object key, borrowed unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Text<'a> {
            type Value = Key<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Text(std::marker::PhantomData))
    }
}

/// Returns the text of a JSON string, borrowed unless it holds escapes; `None` when `raw` is
/// not a string.
pub fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        // A raw value is valid JSON: a string token without escapes is its own text.
        Some(Cow::Borrowed(inner))
    }
}

/// Returns whether `raw` is JSON `null`.
pub fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_fields_are_kept_as_sent_and_the_others_only_counted() {
        let text = r#"{"event_id":"e\u00e9","type":"app_opened","email":"x@y","seq":3,
            "context":{"platform":"ios"},"extra":{"deep":[1,2,{"a":null}]},"seq":4}"#;
        let event = RawEvent::parse(text).unwrap();
        assert_eq!(event.event_id().as_deref(), Some("eé"));
        assert_eq!(event.field("type").unwrap().get(), r#""app_opened""#);
        // The last of a repeated field counts.
        assert_eq!(event.field("seq").unwrap().get(), "4");
        assert_eq!(event.field("user_id").map(RawValue::get), None);
        assert_eq!(event.unknown_fields(), 2);
        let context = Members::of(event.field("context").unwrap()).unwrap();
        assert_eq!(context.0.len(), 1);
        assert_eq!(context.0[0].0, "platform");
        // The last of a repeated member counts; the others keep their order.
        let raw: &RawValue = serde_json::from_str(r#"{"b":1,"a":2,"b":3,"c":4,"a":5}"#).unwrap();
        let members: Vec<(String, &str)> = Members::of(raw)
            .unwrap()
            .0
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.get()))
            .collect();
        assert_eq!(
            members,
            [("b".into(), "3"), ("c".into(), "4"), ("a".into(), "5")]
        );
        // Past the small-object shortcut too.
        let many = format!(
            "{{{},\"k3\":\"last\"}}",
            (0..20)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let raw: &RawValue = serde_json::from_str(&many).unwrap();
        let members = Members::of(raw).unwrap().0;
        assert_eq!(members.len(), 20);
        assert_eq!(members.last().unwrap().1.get(), "\"last\"");
        assert!(!members.iter().any(|(k, v)| k == "k3" && v.get() == "3"));
    }

    #[test]
    fn anything_but_an_object_is_malformed_with_a_reason() {
        for (text, detail) in [
            ("[1]", "an event is a JSON object"),
            ("\"e\"", "an event is a JSON object"),
            ("{\"event_id\": ", "not valid JSON"),
            ("{\"a\":1} x", "not valid JSON"),
        ] {
            let rejection = RawEvent::parse(text).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::Malformed);
            assert!(
                rejection.detail.starts_with(detail),
                "{text}: {rejection:?}"
            );
        }
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let plain: &RawValue = serde_json::from_str(r#""tab-42""#).unwrap();
        assert!(matches!(json_string(plain), Some(Cow::Borrowed("tab-42"))));
        let escaped: &RawValue = serde_json::from_str(r#""a\"b\nc""#).unwrap();
        assert_eq!(json_string(escaped).as_deref(), Some("a\"b\nc"));
        let number: &RawValue = serde_json::from_str("42").unwrap();
        assert_eq!(json_string(number), None);
        assert!(is_null(serde_json::from_str("null").unwrap()));
        assert!(Members::of(number).is_none());
    }
}
