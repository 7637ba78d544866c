//! Per (cohort, window) aggregates of a stretch of the log. Pure.
//!
//! Everything here adds up: counts add, and distinct subjects are kept as sets of hashes that
//! the counter store folds into HyperLogLog sketches. So the aggregate of a stretch of the log
//! does not depend on how the stretch was cut into epochs or spread over workers.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::record::PipelineEvent;
use crate::counters::{
    CohortKey, SESSIONS_FIELD, SubjectSet, TIME_SPENT_FIELD, Window, WindowDelta, WindowStart,
    events_field,
};
use crate::events::schema::{SESSION_ENDED_TYPE, SESSION_STARTED_TYPE};

/// How an event adds to a cell of the counters.
impl WindowDelta {
    /// Counts one event.
    pub fn add(&mut self, event: &PipelineEvent) {
        self.add_counted(event, &events_field(&event.kind));
    }

    /// Counts one event whose [`events_field`] is `field` (computed once for all its windows).
    fn add_counted(&mut self, event: &PipelineEvent, field: &str) {
        match self.counts.get_mut(field) {
            Some(count) => *count += 1,
            None => {
                self.counts.insert(field.to_owned(), 1);
            }
        }
        if event.kind == SESSION_STARTED_TYPE {
            *self.counts.entry(SESSIONS_FIELD.into()).or_default() += 1;
        }
        if event.kind == SESSION_ENDED_TYPE
            && let Some(duration) = event.duration_ms.filter(|d| *d > 0)
        {
            *self.counts.entry(TIME_SPENT_FIELD.into()).or_default() += duration;
        }
        if let Some(subject) = event.subject {
            self.subjects.insert(subject);
            match self.converted.get_mut(&event.kind) {
                Some(set) => {
                    set.insert(subject);
                }
                None => {
                    self.converted
                        .insert(event.kind.clone(), SubjectSet::from_iter([subject]));
                }
            }
        }
    }
}

/// Where a window delta belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowKey {
    /// The cohort.
    pub cohort: CohortKey,
    /// The window length.
    pub window: Window,
    /// The window's start.
    pub start: WindowStart,
}

/// The hasher of the maps keyed by cohort: foldhash, seeded at random per process (segment
/// values come from devices), several times cheaper than SipHash on these short keys that are
/// looked up for every window of every cohort of every event.
pub type CohortHasher = foldhash::fast::RandomState;

/// The deltas of a stretch of the log, by (cohort, window).
#[derive(Debug, Default)]
pub struct Aggregate {
    /// The deltas.
    pub windows: HashMap<WindowKey, WindowDelta, CohortHasher>,
}

impl Aggregate {
    /// Counts `event` in each of its cohorts and windows.
    pub fn add(&mut self, event: &PipelineEvent, cohorts: &[CohortKey]) {
        let field = events_field(&event.kind);
        for cohort in cohorts {
            // One key per cohort, moved through its windows: most windows already have a
            // delta, and looking one up must not copy the cohort's names.
            let mut key = WindowKey {
                cohort: cohort.clone(),
                window: Window::ALL[0],
                start: Window::ALL[0].start_of(event.event_time),
            };
            for window in Window::ALL {
                key.window = window;
                key.start = window.start_of(event.event_time);
                match self.windows.get_mut(&key) {
                    Some(delta) => delta.add_counted(event, &field),
                    None => self
                        .windows
                        .entry(key.clone())
                        .or_default()
                        .add_counted(event, &field),
                }
            }
        }
    }

    /// Adds one window's delta.
    pub fn merge(&mut self, key: WindowKey, delta: WindowDelta) {
        match self.windows.get_mut(&key) {
            Some(existing) => existing.merge(delta),
            None => {
                self.windows.insert(key, delta);
            }
        }
    }

    /// Returns whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(subject: u64, kind: &str, time: i64, duration: Option<i64>) -> PipelineEvent {
        PipelineEvent {
            subject: Some(subject),
            kind: kind.into(),
            event_time: time,
            duration_ms: duration,
            exposure: None,
            segments: vec![],
        }
    }

    #[test]
    fn sessions_time_spent_and_distinct_subjects() {
        let mut delta = WindowDelta::default();
        delta.add(&event(1, "session_started", 0, None));
        delta.add(&event(1, "session_ended", 0, Some(90_000)));
        delta.add(&event(2, "lesson_completed", 0, Some(5)));
        delta.add(&event(2, "lesson_completed", 0, None));
        assert_eq!(delta.counts["events:lesson_completed"], 2);
        assert_eq!(delta.counts[SESSIONS_FIELD], 1);
        assert_eq!(
            delta.counts[TIME_SPENT_FIELD], 90_000,
            "only session_ended counts"
        );
        assert_eq!(delta.subjects.len(), 2);
        assert_eq!(delta.converted["lesson_completed"].len(), 1);
    }

    proptest! {
        /// However a stretch of events is split, the merged parts equal the whole.
        #[test]
        fn splitting_and_merging_changes_nothing(
            events in proptest::collection::vec((0u64..20, 0usize..3, 0i64..10_000_000), 0..60),
            cut in 0usize..60,
        ) {
            let kinds = ["session_started", "lesson_completed", "session_ended"];
            let events: Vec<PipelineEvent> = events
                .into_iter()
                .map(|(s, k, t)| event(s, kinds[k], t, Some(1000)))
                .collect();
            let cohorts = [CohortKey::All];
            let mut whole = Aggregate::default();
            events.iter().for_each(|e| whole.add(e, &cohorts));
            let cut = cut.min(events.len());
            let (mut left, mut right) = (Aggregate::default(), Aggregate::default());
            events[..cut].iter().for_each(|e| left.add(e, &cohorts));
            events[cut..].iter().for_each(|e| right.add(e, &cohorts));
            for (key, delta) in right.windows {
                left.merge(key, delta);
            }
            prop_assert_eq!(left.windows, whole.windows);
        }
    }
}
