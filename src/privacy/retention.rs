//! Retention: how long each kind of data is kept, in plain words, as the configuration sets
//! it (`GET /v1/privacy/retention-policy` answers it). The job that deletes what is past its
//! time is `jobs::retention`.
//!
//! Each kind has its own clock, its setting and its enforcer:
//! raw events (`sql.retention`: SQL segments by the feeder, log segments by the retention
//! job), exposure assignments (`privacy.exposure_retention`, the retention job), counters
//! (`counters.*_retention`: `EXPIREAT` in Redis, the upkeep job for the embedded store),
//! consent records (`privacy.consent_retention`, the retention job), access exports
//! (`privacy.export_retention`, the upkeep job) and erasure suppressions
//! (`ingest.late_horizon`, the retention job).

use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

/// One kind of data and how long it is kept.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Kept {
    /// The kind of data.
    pub data: &'static str,
    /// How long it is kept, in seconds.
    pub kept_for_seconds: u64,
    /// The same, in words.
    pub kept_for: String,
    /// What it is, from when the time counts, and what happens then.
    pub policy: String,
}

/// The answer of `GET /v1/privacy/retention-policy`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetentionPolicy {
    /// Every kind of data kept.
    pub kinds: Vec<Kept>,
    /// How often deletion runs, in seconds: data goes at most this long after its time.
    pub enforced_every_seconds: u64,
    /// What erasure leaves.
    pub note: &'static str,
}

/// A duration in words: "30 days", "12 hours", "90 seconds".
pub fn in_words(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let (count, unit) = if seconds == 0 {
        (duration.as_millis() as u64, "millisecond")
    } else if seconds.is_multiple_of(86_400) {
        (seconds / 86_400, "day")
    } else if seconds.is_multiple_of(3_600) {
        (seconds / 3_600, "hour")
    } else if seconds.is_multiple_of(60) {
        (seconds / 60, "minute")
    } else {
        (seconds, "second")
    };
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} {unit}{plural}")
}

/// The policy the configuration sets.
// Long: a table, one entry per kind of data kept.
pub fn policy(config: &Config) -> RetentionPolicy {
    let privacy = &config.privacy;
    let counters = &config.counters;
    let kept = |data, duration: Duration, policy: String| Kept {
        data,
        kept_for_seconds: duration.as_secs(),
        kept_for: in_words(duration),
        policy,
    };
    let events = config.sql.retention;
    RetentionPolicy {
        kinds: vec![
            kept(
                "raw_events",
                events,
                format!(
                    "Events as the app sent them, under a pseudonym, never the child's id: kept for {} after they reach the service, then deleted (the SQL tables and the write-ahead log alike). Exposure events are raw events.",
                    in_words(events)
                ),
            ),
            kept(
                "exposures",
                privacy.exposure_retention,
                format!(
                    "Which variant of an experiment a child saw first (its assignment): kept for {} after that first exposure, then deleted.",
                    in_words(privacy.exposure_retention)
                ),
            ),
            kept(
                "counters_minute",
                counters.minute_retention,
                format!(
                    "Per-minute counts per group of children (experiment variant or segment), which name no child: kept for {} after the minute.",
                    in_words(counters.minute_retention)
                ),
            ),
            kept(
                "counters_hour",
                counters.hour_retention,
                format!(
                    "Per-hour counts per group of children: kept for {} after the hour.",
                    in_words(counters.hour_retention)
                ),
            ),
            kept(
                "counters_day",
                counters.day_retention,
                format!(
                    "Per-day counts per group of children: kept for {} after the day.",
                    in_words(counters.day_retention)
                ),
            ),
            kept(
                "consent_records",
                privacy.consent_retention,
                format!(
                    "A guardian's consent decisions: kept while a consent is given, and for {} after the last decision once none is, as proof of what was allowed; then deleted.",
                    in_words(privacy.consent_retention)
                ),
            ),
            kept(
                "access_exports",
                privacy.export_retention,
                format!(
                    "The copy of a child's data made for its family: kept for {} after it is made, then deleted.",
                    in_words(privacy.export_retention)
                ),
            ),
            kept(
                "erasure_suppressions",
                config.ingest.late_horizon,
                format!(
                    "After an erasure, a one-way reference to the child, so that events from before the erasure that arrive late are refused: kept for {} after the request (older events are refused anyway).",
                    in_words(config.ingest.late_horizon)
                ),
            ),
        ],
        enforced_every_seconds: privacy.retention_check.as_secs().max(1),
        note: "An erasure removes a child's events and assignments at once, whatever their retention; counts per group remain, as they identify no one.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_words() {
        let cases = [
            (Duration::from_secs(30 * 86_400), "30 days"),
            (Duration::from_secs(86_400), "1 day"),
            (Duration::from_secs(36 * 3_600), "36 hours"),
            (Duration::from_secs(90), "90 seconds"),
            (Duration::from_secs(120), "2 minutes"),
            (Duration::from_millis(250), "250 milliseconds"),
        ];
        for (duration, words) in cases {
            assert_eq!(in_words(duration), words);
        }
    }

    #[test]
    fn the_policy_follows_the_configuration() {
        let mut config = Config::default();
        config.sql.retention = Duration::from_secs(14 * 86_400);
        config.privacy.consent_retention = Duration::from_secs(2 * 365 * 86_400);
        let policy = policy(&config);
        let kinds: Vec<&str> = policy.kinds.iter().map(|k| k.data).collect();
        assert_eq!(
            kinds,
            [
                "raw_events",
                "exposures",
                "counters_minute",
                "counters_hour",
                "counters_day",
                "consent_records",
                "access_exports",
                "erasure_suppressions"
            ]
        );
        assert_eq!(policy.kinds[0].kept_for, "14 days");
        assert_eq!(policy.kinds[0].kept_for_seconds, 14 * 86_400);
        assert!(policy.kinds[0].policy.contains("14 days"));
        assert_eq!(policy.kinds[5].kept_for, "730 days");
        assert!(policy.kinds.iter().all(|k| k.policy.ends_with('.')));
    }
}
