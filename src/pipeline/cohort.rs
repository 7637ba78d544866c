//! Cohorts and who belongs to them. Pure.
//!
//! Every event counts toward the `all` cohort and toward one segment cohort per declared
//! dimension its context names. Toward an experiment it counts only once its subject has been
//! exposed: a subject belongs to the variant of its first exposure, in log order, and an
//! exposure applies to the events of its own epoch too (see [`Assignments::expose`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::record::PipelineEvent;
use crate::counters::CohortKey;

impl CohortKey {
    /// Returns the key the dataflow exchanges a cohort's aggregates by.
    pub fn route(&self) -> u64 {
        crate::counters::subject_hash(&self.tag())
    }
}

/// One assignment: a subject's variant of an experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The experiment's flag key.
    pub experiment: String,
    /// The variant of the first exposure.
    pub variant: String,
}

/// The experiments each subject (by hash) was exposed to, with the variant of the first
/// exposure.
#[derive(Debug, Default)]
pub struct Assignments {
    by_subject: HashMap<u64, Vec<Assignment>>,
}

impl Assignments {
    /// Records an exposure; returns the new assignment when it is the subject's first exposure
    /// to that experiment (later ones change nothing).
    pub fn expose(&mut self, subject: u64, experiment: &str, variant: &str) -> Option<Assignment> {
        let assigned = self.by_subject.entry(subject).or_default();
        if assigned.iter().any(|a| a.experiment == experiment) {
            return None;
        }
        let assignment = Assignment {
            experiment: experiment.to_owned(),
            variant: variant.to_owned(),
        };
        assigned.push(assignment.clone());
        Some(assignment)
    }

    /// Forgets the assignments of `subjects` (erased); returns how many subjects had any.
    pub fn forget(&mut self, subjects: &std::collections::HashSet<u64>) -> usize {
        subjects
            .iter()
            .filter(|s| self.by_subject.remove(s).is_some())
            .count()
    }

    /// Returns the subjects known.
    pub fn subjects(&self) -> usize {
        self.by_subject.len()
    }

    /// Calls `visit` with every cohort `event` counts toward.
    pub fn cohorts_of(&self, event: &PipelineEvent, mut visit: impl FnMut(CohortKey)) {
        visit(CohortKey::All);
        for (dimension, value) in &event.segments {
            visit(CohortKey::Segment {
                dimension: dimension.clone(),
                value: value.clone(),
            });
        }
        let Some(subject) = event.subject else {
            return;
        };
        for assignment in self.by_subject.get(&subject).into_iter().flatten() {
            visit(CohortKey::Variant {
                experiment: assignment.experiment.clone(),
                variant: assignment.variant.clone(),
            });
        }
    }
}

/// Puts one epoch's events in the order the pipeline processes them: exposures first (so an
/// exposure covers the events of its own epoch), each group by event time, ties by content —
/// an order that does not depend on how the epoch reached the worker.
pub fn epoch_order(events: &mut [PipelineEvent]) {
    events.sort_by(|a, b| {
        (
            a.exposure.is_none(),
            a.event_time,
            &a.exposure,
            a.subject,
            &a.kind,
        )
            .cmp(&(
                b.exposure.is_none(),
                b.event_time,
                &b.exposure,
                b.subject,
                &b.kind,
            ))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(subject: u64, kind: &str, exposure: Option<(&str, &str)>) -> PipelineEvent {
        PipelineEvent {
            subject: Some(subject),
            kind: kind.into(),
            event_time: 10,
            duration_ms: None,
            exposure: exposure.map(|(f, v)| (f.into(), v.into())),
            segments: vec![("platform".into(), "ios".into())],
        }
    }

    fn cohorts(assignments: &Assignments, event: &PipelineEvent) -> Vec<String> {
        let mut out = Vec::new();
        assignments.cohorts_of(event, |c| out.push(c.tag()));
        out
    }

    #[test]
    fn the_first_exposure_decides_and_unexposed_subjects_stay_out() {
        let mut assignments = Assignments::default();
        let lesson = event(1, "lesson_completed", None);
        assert_eq!(cohorts(&assignments, &lesson), ["all", "seg:platform:ios"]);
        assert!(assignments.expose(1, "reward", "stars").is_some());
        assert!(assignments.expose(1, "reward", "confetti").is_none());
        assert_eq!(
            cohorts(&assignments, &lesson),
            ["all", "seg:platform:ios", "exp:reward:stars"]
        );
        assert_eq!(
            cohorts(&assignments, &event(2, "lesson_completed", None)),
            ["all", "seg:platform:ios"]
        );
    }

    #[test]
    fn exposures_sort_first_within_an_epoch() {
        let mut events = vec![
            event(1, "lesson_completed", None),
            event(1, "$exposure", Some(("reward", "stars"))),
        ];
        epoch_order(&mut events);
        assert!(events[0].exposure.is_some());
    }
}
