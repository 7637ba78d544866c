//! What the pipeline keeps of a stored event: the few fields cohorts and counters need. Pure.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::counters::subject_hash;
use crate::events::raw::{Members, json_string};
use crate::events::schema::EXPOSURE_TYPE;

/// An event as it travels through the dataflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineEvent {
    /// A 64-bit hash of the subject's pseudonym; `None` for anonymous events. Counters and
    /// sketches only ever see this hash.
    pub subject: Option<u64>,
    /// The event type.
    pub kind: String,
    /// Corrected event time, ms since the Unix epoch.
    pub event_time: i64,
    /// `duration_ms` of the event's properties, when present.
    pub duration_ms: Option<i64>,
    /// For exposure events: the experiment's flag and the variant.
    pub exposure: Option<(String, String)>,
    /// The declared segment dimensions the event's context names, with their values.
    pub segments: Vec<(String, String)>,
}

/// The fields of a stored event the pipeline reads, borrowed from the record where possible.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    event_time: i64,
    #[serde(borrow, default)]
    context: Members<'a>,
    #[serde(borrow, default)]
    properties: Properties<'a>,
}

#[derive(Deserialize, Default)]
struct Properties<'a> {
    #[serde(default)]
    duration_ms: Option<i64>,
    #[serde(borrow, default)]
    flag: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    variant: Option<Cow<'a, str>>,
}

impl PipelineEvent {
    /// Reads the stored JSON form of an event, keeping the context keys named in `segments`;
    /// `None` when it is not a stored event.
    pub fn decode(bytes: &[u8], segments: &[String]) -> Option<Self> {
        let stored: Stored<'_> = serde_json::from_slice(bytes).ok()?;
        let (duration_ms, exposure) = match (stored.kind.as_ref(), stored.properties) {
            (
                EXPOSURE_TYPE,
                Properties {
                    flag: Some(flag),
                    variant: Some(variant),
                    ..
                },
            ) => (None, Some((flag.into_owned(), variant.into_owned()))),
            (EXPOSURE_TYPE, _) => (None, None),
            (_, properties) => (properties.duration_ms, None),
        };
        Some(Self {
            subject: stored.subject.as_deref().map(subject_hash),
            segments: pick(&stored.context, segments),
            kind: stored.kind.into_owned(),
            event_time: stored.event_time,
            duration_ms,
            exposure,
        })
    }

    /// Returns the key events are exchanged by, so one worker owns each subject.
    pub fn route(&self) -> u64 {
        self.subject.unwrap_or(self.event_time as u64)
    }
}

fn pick(context: &Members<'_>, segments: &[String]) -> Vec<(String, String)> {
    segments
        .iter()
        .filter_map(|dimension| {
            let (_, value) = context.0.iter().find(|(key, _)| key == dimension)?;
            Some((dimension.clone(), json_string(value)?.into_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Vec<String> {
        vec!["platform".into(), "country".into()]
    }

    #[test]
    fn keeps_what_counters_need_and_nothing_else() {
        let stored = br#"{"event_id":"e1","subject":"p1_00ff","type":"session_ended",
            "event_time":1795166043120,"device_time":1,"received_at":2,
            "context":{"platform":"ios","locale":"pt-BR","country":"BR"},
            "properties":{"duration_ms":61000}}"#;
        let event = PipelineEvent::decode(stored, &dims()).unwrap();
        assert_eq!(event.subject, Some(subject_hash("p1_00ff")));
        assert_eq!(event.kind, "session_ended");
        assert_eq!(event.duration_ms, Some(61_000));
        assert_eq!(
            event.segments,
            [
                ("platform".into(), "ios".into()),
                ("country".into(), "BR".into())
            ]
        );
        assert_eq!(event.exposure, None);
    }

    #[test]
    fn exposures_carry_flag_and_variant() {
        let stored = br#"{"event_id":"x","subject":"p1_aa","type":"$exposure","event_time":5,
            "device_time":5,"received_at":5,"properties":{"flag":"reward-animation","variant":"stars"}}"#;
        let event = PipelineEvent::decode(stored, &dims()).unwrap();
        assert_eq!(
            event.exposure,
            Some(("reward-animation".into(), "stars".into()))
        );
        assert!(PipelineEvent::decode(b"{\"type\":1}", &dims()).is_none());
        assert!(PipelineEvent::decode(b"not json", &dims()).is_none());
    }
}
