//! The embedded counter store: the same semantics as Redis, in process memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::hll::Hll;
use super::{CohortKey, Window, WindowStart};
use super::{CohortUpdate, CounterError, CounterWriter, Retention, WindowCounts};

#[derive(Default)]
struct Counters {
    counts: BTreeMap<String, i64>,
    subjects: Hll,
    converted: BTreeMap<String, Hll>,
    expires_at: i64,
}

#[derive(Default)]
struct Cohort {
    applied: u64,
    windows: HashMap<(Window, WindowStart), Counters>,
}

/// Counters in process memory, rebuilt from the write-ahead log on start.
pub struct Embedded {
    retention: Retention,
    cohorts: Mutex<HashMap<CohortKey, Cohort>>,
}

impl Embedded {
    /// An empty store keeping windows as long as `retention` says.
    pub fn new(retention: Retention) -> Self {
        Self {
            retention,
            cohorts: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CohortKey, Cohort>> {
        self.cohorts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies updates, each cohort's cells at most once.
    pub fn apply(&self, updates: &[CohortUpdate]) {
        let mut cohorts = self.lock();
        for update in updates {
            let cohort = cohorts.entry(update.cohort.clone()).or_default();
            if update.cell <= cohort.applied {
                continue;
            }
            cohort.applied = update.cell;
            for (window, start, delta) in &update.windows {
                let counters = cohort.windows.entry((*window, *start)).or_default();
                counters.expires_at = self.retention.expires_at(*window, *start);
                for (field, value) in &delta.counts {
                    *counters.counts.entry(field.clone()).or_default() += value;
                }
                delta
                    .subjects
                    .iter()
                    .for_each(|s| counters.subjects.insert(*s));
                for (kind, subjects) in &delta.converted {
                    let sketch = counters.converted.entry(kind.clone()).or_default();
                    subjects.iter().for_each(|s| sketch.insert(*s));
                }
            }
        }
    }

    /// Returns every cohort with counters.
    pub fn cohorts(&self) -> Vec<CohortKey> {
        let mut all: Vec<CohortKey> = self.lock().keys().cloned().collect();
        all.sort();
        all
    }

    /// Reads the windows of `cohort` starting at `starts` (zeros where nothing was counted).
    pub fn read(
        &self,
        cohort: &CohortKey,
        window: Window,
        starts: &[WindowStart],
    ) -> Vec<WindowCounts> {
        let cohorts = self.lock();
        let windows = cohorts.get(cohort).map(|c| &c.windows);
        starts
            .iter()
            .map(
                |start| match windows.and_then(|w| w.get(&(window, *start))) {
                    None => WindowCounts::default(),
                    Some(counters) => WindowCounts {
                        counts: counters.counts.clone(),
                        subjects: counters.subjects.estimate(),
                        converted: counters
                            .converted
                            .iter()
                            .map(|(kind, sketch)| (kind.clone(), sketch.estimate()))
                            .collect(),
                    },
                },
            )
            .collect()
    }

    /// Drops windows whose retention ended before `now_ms`; returns how many.
    pub fn expire(&self, now_ms: i64) -> usize {
        let mut cohorts = self.lock();
        let mut dropped = 0;
        for cohort in cohorts.values_mut() {
            let before = cohort.windows.len();
            cohort.windows.retain(|_, c| c.expires_at > now_ms);
            dropped += before - cohort.windows.len();
        }
        dropped
    }
}

impl CounterWriter for Arc<Embedded> {
    fn apply(&mut self, updates: &[CohortUpdate]) -> Result<(), CounterError> {
        Embedded::apply(self, updates);
        Ok(())
    }
}
