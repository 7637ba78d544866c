//! The dataflow's operators, apart from the wiring in `dataflow`: the "Attribute" state
//! (events stashed by epoch, attributed to cohorts, aggregated per cell) and the "Flush"
//! side (complete cells grouped by cohort and written to the counter store, retried while
//! the store is away).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use timely::dataflow::operators::Capability;

use super::aggregate::{Aggregate, CohortHasher};
use super::cohort::{Assignments, epoch_order};
use super::dataflow::Shared;
use super::metrics::PIPELINE_ASSIGNED_SUBJECTS;
use super::record::PipelineEvent;
use super::state::AssignmentLog;
use crate::counters::metrics::{self as counters_metrics, WriteFailure};
use crate::counters::{CohortKey, CohortUpdate, CounterWriter};

/// The state of one worker's "Attribute" operator: events stashed by epoch until their epoch
/// is complete, then attributed to cohorts and aggregated per cell of the log until the cell
/// is complete.
pub(super) struct Attribution {
    pub(super) shared: Arc<Shared>,
    pub(super) assignments: Assignments,
    pub(super) log: Option<AssignmentLog>,
    /// The erasure generation last applied.
    pub(super) forgotten_seen: u64,
    pub(super) stash: BTreeMap<u64, (Capability<u64>, Vec<PipelineEvent>)>,
    pub(super) cells: BTreeMap<u64, (Capability<u64>, Aggregate)>,
    pub(super) cell_ms: u64,
}

impl Attribution {
    /// Forgets the assignments of subjects erased since the last look.
    pub(super) fn forget_erased(&mut self) {
        let generation = self.shared.forget_generation.load(Ordering::Acquire);
        if generation == self.forgotten_seen {
            return;
        }
        self.forgotten_seen = generation;
        let forgotten = self
            .shared
            .forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.assignments.forget(&forgotten);
        if let Some(log) = &mut self.log {
            log.forget_unwritten(&forgotten);
        }
    }

    /// Keeps the events of epoch `time` until the epoch is complete.
    pub(super) fn stash<'d>(
        &mut self,
        time: u64,
        cap: Capability<u64>,
        data: impl Iterator<Item = &'d mut Vec<PipelineEvent>>,
    ) {
        let entry = self.stash.entry(time).or_insert_with(|| (cap, Vec::new()));
        for batch in data {
            entry.1.append(batch);
        }
    }

    /// Attributes and aggregates every stashed epoch the frontier has passed, in order.
    pub(super) fn aggregate_complete_epochs(&mut self, pending: impl Fn(&u64) -> bool) {
        while let Some(entry) = self.stash.first_entry() {
            let time = *entry.key();
            if pending(&time) {
                break;
            }
            let (cap, events) = entry.remove();
            let (_, aggregate) = self
                .cells
                .entry(time / self.cell_ms)
                .or_insert_with(|| (cap, Aggregate::default()));
            attribute_epoch(
                time,
                events,
                &mut self.assignments,
                &mut self.log,
                aggregate,
                &self.shared,
            );
        }
    }

    /// Takes the cells the frontier has passed, in order, once the assignments they rely on
    /// are durable.
    pub(super) fn complete_cells(
        &mut self,
        pending: impl Fn(&u64) -> bool,
    ) -> Vec<(u64, Capability<u64>, Aggregate)> {
        let mut complete = Vec::new();
        while let Some(entry) = self.cells.first_entry() {
            let cell = *entry.key();
            if pending(&((cell + 1) * self.cell_ms - 1)) {
                break;
            }
            let (cap, aggregate) = entry.remove();
            if let Some(log) = &mut self.log
                && let Err(err) = log.sync()
            {
                tracing::error!(error = %err, "assignment log not synced; checkpoints stop");
                self.shared.abandoned.store(true, Ordering::Release);
            }
            complete.push((cell, cap, aggregate));
        }
        complete
    }
}

/// Holds a capability at the earliest time seen for a cell, so the frontier cannot pass it.
pub(super) fn hold_earliest(
    held: &mut Capability<u64>,
    time: u64,
    earlier: impl FnOnce() -> Option<Capability<u64>>,
) {
    if time < *held.time()
        && let Some(earlier) = earlier()
    {
        *held = earlier;
    }
}

/// Processes one complete epoch of a worker's subjects: first exposures, then every event's
/// cohorts into the cell's aggregate.
fn attribute_epoch(
    time: u64,
    mut events: Vec<PipelineEvent>,
    assignments: &mut Assignments,
    log: &mut Option<AssignmentLog>,
    aggregate: &mut Aggregate,
    shared: &Shared,
) {
    epoch_order(&mut events);
    let mut cohorts: Vec<CohortKey> = Vec::new();
    for event in &events {
        if let (Some(subject), Some((flag, variant))) = (event.subject, &event.exposure)
            && let Some(assignment) = assignments.expose(subject, flag, variant)
            && let Some(log) = log
            && let Err(err) = log.append(time, subject, &assignment)
        {
            tracing::error!(error = %err, "assignment not logged; checkpoints stop");
            shared.abandoned.store(true, Ordering::Release);
        }
        cohorts.clear();
        assignments.cohorts_of(event, |c| cohorts.push(c));
        aggregate.add(event, &cohorts);
    }
    metrics::gauge!(PIPELINE_ASSIGNED_SUBJECTS).set(assignments.subjects() as f64);
}

/// Writes the cells that are complete, in order; returns them.
pub(super) fn flush_cells(
    cells: &BTreeMap<u64, (Capability<u64>, Aggregate)>,
    complete: impl Fn(u64) -> bool,
    writer: &mut dyn CounterWriter,
    shared: &Shared,
) -> Vec<u64> {
    let ready: Vec<u64> = cells.keys().copied().take_while(|c| complete(*c)).collect();
    if ready.is_empty() {
        return ready;
    }
    let updates: Vec<CohortUpdate> = ready
        .iter()
        .flat_map(|cell| cohort_updates(*cell, &cells[cell].1))
        .collect();
    write_until_stored(writer, &updates, shared);
    ready
}

/// Groups a cell's window deltas by cohort, as the store applies them.
fn cohort_updates(cell: u64, aggregate: &Aggregate) -> Vec<CohortUpdate> {
    let mut by_cohort: HashMap<&CohortKey, CohortUpdate, CohortHasher> = HashMap::default();
    for (key, delta) in &aggregate.windows {
        by_cohort
            .entry(&key.cohort)
            .or_insert_with(|| CohortUpdate {
                cohort: key.cohort.clone(),
                // Cell 0 must be above a new cohort's mark of 0.
                cell: cell + 1,
                windows: Vec::new(),
            })
            .windows
            .push((key.window, key.start, delta.clone()));
    }
    let mut updates: Vec<CohortUpdate> = by_cohort.into_values().collect();
    updates.sort_by(|a, b| a.cohort.cmp(&b.cohort));
    updates
}

/// Writes `updates`, retrying with backoff while the store is away; gives up only at
/// shutdown, and then marks the pipeline so that nothing later is checkpointed.
fn write_until_stored(writer: &mut dyn CounterWriter, updates: &[CohortUpdate], shared: &Shared) {
    let mut backoff = Duration::from_millis(50);
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        match writer.apply(updates) {
            Ok(()) => return,
            Err(err) => {
                let failure = if err.is_retryable() {
                    WriteFailure::Retryable
                } else {
                    WriteFailure::Permanent
                };
                counters_metrics::write_failed(shared.store.kind(), failure);
                if logged.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(error = %err, "counter store write failed; retrying (the log keeps the events)");
                    logged = Instant::now();
                }
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            shared.abandoned.store(true, Ordering::Release);
            return;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
