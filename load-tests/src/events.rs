//! The events the scenarios send: what a child's app session looks like in the reading app.
//!
//! Every event names its device and a per-device sequence number starting at 1, and carries the
//! run's tag as its `app_version`, so a run's events can be found again (and counted) among
//! everything else the server holds: `--verify` relies on it.

use std::fmt::Write;

/// Events in one app session: `session_started`, lessons of ten events, `session_ended`.
const SESSION_EVENTS: u64 = 100;

/// The time a child spends on one event, as the app reports it.
const EVENT_MS: i64 = 1_500;

/// Identifies one device's events within a run.
#[derive(Debug, Clone)]
pub struct Device {
    /// The device id, unique to the run.
    pub id: String,
    /// The child using it (a raw id; the server pseudonymizes it).
    pub child: String,
    /// The run's tag, sent as `context.app_version`.
    pub tag: String,
    /// `ios`, `android` or `web`.
    pub platform: &'static str,
}

impl Device {
    /// Device number `n` of a kind (`live`, `sync`) in a run; children are drawn from a
    /// population of `children`.
    pub fn new(tag: &str, kind: &str, n: u64, children: u64) -> Self {
        Self {
            id: format!("{tag}-{kind}-{n}"),
            child: format!("child-{}", n % children.max(1)),
            tag: tag.to_owned(),
            platform: ["ios", "android", "web"][(n % 3) as usize],
        }
    }

    /// Appends the event with sequence number `seq` (from 1), happening at `at_ms` on the
    /// device clock, to `out`. Within each block of [`SESSION_EVENTS`] the app opens a session,
    /// plays lessons of ten events, and ends the session with its duration. Written in place:
    /// the generator shares the cores with the server it measures.
    fn write_event(&self, out: &mut String, seq: u64, at_ms: i64) {
        let position = (seq - 1) % SESSION_EVENTS;
        let session = (seq - 1) / SESSION_EVENTS;
        let lesson = (seq - 1) / 10 % 40;
        let kind = match position {
            0 => "session_started",
            p if p == SESSION_EVENTS - 1 => "session_ended",
            p if p % 10 == 1 => "lesson_started",
            p if p % 10 == 9 => "lesson_completed",
            _ => "exercise_answered",
        };
        let _ = write!(
            out,
            r#"{{"event_id":"{id}-{seq}","device_id":"{id}","seq":{seq},"user_id":"{child}","session_id":"{id}-s{session}","type":"{kind}","timestamp":"{at}","context":{{"app_version":"{tag}","platform":"{platform}","locale":"fr-FR","country":"FR"}}"#,
            id = self.id,
            child = self.child,
            at = crate::clock::rfc3339(at_ms),
            tag = self.tag,
            platform = self.platform,
        );
        let _ = match kind {
            "session_started" => Ok(()),
            "session_ended" => write!(
                out,
                r#","properties":{{"duration_ms":{}}}"#,
                SESSION_EVENTS as i64 * EVENT_MS
            ),
            "lesson_started" => write!(out, r#","properties":{{"lesson_id":"g-{lesson}"}}"#),
            "lesson_completed" => write!(
                out,
                r#","properties":{{"lesson_id":"g-{lesson}","duration_ms":{},"score":0.{}}}"#,
                10 * EVENT_MS,
                seq % 10
            ),
            _ => write!(
                out,
                r#","properties":{{"lesson_id":"g-{lesson}","exercise_id":"x-{position}","correct":{},"duration_ms":{EVENT_MS}}}"#,
                !seq.is_multiple_of(3)
            ),
        };
        out.push('}');
    }

    /// The events with sequence numbers `first..first + count`, as a JSON array's items.
    pub fn events(&self, first: u64, count: u64, at_ms: impl Fn(u64) -> i64) -> String {
        let mut out = String::with_capacity(count as usize * 360);
        for seq in first..first + count {
            if seq > first {
                out.push(',');
            }
            self.write_event(&mut out, seq, at_ms(seq));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_plays_whole_sessions_of_lessons() {
        let device = Device::new("run-1", "live", 4, 3);
        assert_eq!(device.child, "child-1");
        let events: Vec<serde_json::Value> = (1..=SESSION_EVENTS + 1)
            .map(|seq| serde_json::from_str(&device.events(seq, 1, |_| 1_795_166_043_120)).unwrap())
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds[0], "session_started");
        assert_eq!(kinds[1], "lesson_started");
        assert_eq!(kinds[9], "lesson_completed");
        assert_eq!(kinds[5], "exercise_answered");
        assert_eq!(kinds[99], "session_ended");
        assert_eq!(kinds[100], "session_started");
        assert_eq!(events[99]["properties"]["duration_ms"], 150_000);
        assert_eq!(events[100]["session_id"], "run-1-live-4-s1");
        assert_eq!(events[0]["context"]["app_version"], "run-1");
        assert_eq!(events[0]["event_id"], "run-1-live-4-1");
        assert_eq!(events[0]["timestamp"], "2026-11-20T09:14:03.120Z");
        let array = format!("[{}]", device.events(3, 4, |_| 0));
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&array).unwrap();
        assert_eq!(parsed.len(), 4);
        assert_eq!(parsed[3]["seq"], 6);
    }
}
