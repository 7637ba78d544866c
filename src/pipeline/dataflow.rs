//! The timely dataflow and the threads that drive it.
//!
//! ```text
//! WAL tail (first worker of each process) ─ exchange by subject ─▸ attribute: assignments,
//!   cohorts, per-cell aggregates ─ exchange by cohort ─▸ flush: one write per cohort and cell
//!   ─▸ probe: the epoch below which every counter is in the store (the checkpoint)
//! ```
//!
//! A cell is the stretch of epochs `[cell × flush_interval, (cell + 1) × flush_interval)`. Its
//! aggregates depend only on the events in it, so a replay writes exactly what was written the
//! first time, and the store's per-cohort high-water mark turns the second write into a no-op.
//! Operators hold a capability for each cell until its counters are written (and the
//! assignments it created are on disk), so the probe's frontier is a safe checkpoint.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Input, Operator, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use super::aggregate::{Aggregate, WindowKey};
use super::cohort::Assignments;
use super::metrics::{
    PIPELINE_CHECKPOINT_EPOCH, PIPELINE_EVENTS_TOTAL, PIPELINE_FLUSH_LAG_SECONDS,
    PIPELINE_LAG_SECONDS, PIPELINE_PENDING_EPOCHS, PIPELINE_RESTARTS_TOTAL, PIPELINE_RUNNING,
    PIPELINE_UNREADABLE_EVENTS_TOTAL,
};
use super::operators::{Attribution, flush_cells, hold_earliest};
use super::record::PipelineEvent;
use super::state::AssignmentLog;
use crate::counters::{CounterStore, WindowDelta};
use crate::wal::tail::Tail;
use crate::wal::{Checkpoints, Epoch, Wal, WalError, unix_millis};

/// The consumer name of the pipeline in the log's checkpoints.
const CONSUMER: &str = "pipeline";

/// How long stopping waits for the dataflow to write what it read.
const STOP_WAIT: Duration = Duration::from_secs(8);

/// How long a stopping cluster process keeps writing before it leaves the cluster's dataflow.
const CLUSTER_DRAIN: Duration = Duration::from_secs(2);

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Worker threads in this process.
    pub workers: usize,
    /// The length of a cell, in epochs (milliseconds).
    pub cell_ms: u64,
    /// Context keys that define segment cohorts.
    pub segments: Vec<String>,
    /// Events read but not yet written before reading pauses.
    pub max_pending_events: usize,
    /// Where the assignment logs live.
    pub state_dir: PathBuf,
    /// This process's index and every process's address, for a multi-process cluster.
    pub cluster: Option<(usize, Vec<String>)>,
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The checkpoints or the state directory failed.
    #[error("pipeline state: {0}")]
    Wal(#[from] WalError),
    /// The state directory failed.
    #[error("pipeline state: {0}")]
    Io(#[from] std::io::Error),
    /// Timely could not start (for example, cluster peers unreachable).
    #[error("pipeline dataflow: {0}")]
    Timely(String),
}

/// What the threads share.
pub(super) struct Shared {
    pub(super) options: PipelineOptions,
    pub(super) wal: Wal,
    pub(super) store: CounterStore,
    pub(super) checkpoints: Option<Arc<Checkpoints>>,
    /// The epoch the current run of the dataflow reads after.
    pub(super) start: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Set when a write was abandoned at shutdown: nothing after it may be checkpointed.
    pub(super) abandoned: AtomicBool,
    /// The last epoch whose counters are written on every worker.
    pub(super) flushed: AtomicU64,
    /// Erased subjects whose assignments every worker must forget.
    pub(super) forgotten: Mutex<HashSet<u64>>,
    /// Bumped with each erasure, so workers look at `forgotten` only when it changed.
    pub(super) forget_generation: AtomicU64,
}

impl Shared {
    fn start(&self) -> Epoch {
        Epoch(self.start.load(Ordering::Acquire))
    }
}

/// A running pipeline.
pub struct Pipeline {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the dataflow on its own threads. With a durable store it resumes after its
    /// checkpoint; with the embedded store it replays the whole log.
    pub fn start(
        options: PipelineOptions,
        wal: Wal,
        store: CounterStore,
        checkpoints: Arc<Checkpoints>,
    ) -> Result<Self, PipelineError> {
        std::fs::create_dir_all(&options.state_dir)?;
        // Registered even when it never advances (embedded store): the log's segments are
        // then kept for the replay at the next start, whatever other consumers have read.
        let registered = checkpoints.register(CONSUMER)?;
        let (start, checkpoints) = if store.is_durable() {
            (registered, Some(checkpoints))
        } else {
            (Epoch(0), None)
        };
        let config = match &options.cluster {
            None => timely::Config::process(options.workers.max(1)),
            Some((process, peers)) => timely::Config {
                communication: timely::CommunicationConfig::Cluster {
                    threads: options.workers.max(1),
                    process: *process,
                    addresses: peers.clone(),
                    report: false,
                    zerocopy: false,
                },
                worker: timely::WorkerConfig::default(),
            },
        };
        let shared = Arc::new(Shared {
            options,
            wal,
            store,
            checkpoints,
            start: AtomicU64::new(start.0),
            stop: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            flushed: AtomicU64::new(start.0),
            forgotten: Mutex::default(),
            forget_generation: AtomicU64::new(0),
        });
        let in_thread = shared.clone();
        // Joining the cluster blocks until every peer is up; the service does not wait for it.
        let thread = std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || supervise(&in_thread, &config))?;
        tracing::info!(
            from_epoch = start.0,
            store = shared.store.kind(),
            "pipeline started"
        );
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Returns the last epoch whose counters are in the store on every worker.
    pub fn flushed(&self) -> Epoch {
        Epoch(self.shared.flushed.load(Ordering::Acquire))
    }

    /// Returns a handle that erases subjects' assignments (see [`Forgetter::forget`]).
    pub fn forgetter(&self) -> Forgetter {
        Forgetter {
            shared: self.shared.clone(),
        }
    }

    /// Stops reading, writes what was read, checkpoints and waits for the threads — at most
    /// [`STOP_WAIT`]: a cluster's dataflow may be waiting for a peer process that is gone, and
    /// leaving then is safe (the checkpoint stays behind what was not written).
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_WAIT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    "pipeline did not stop in time (waiting for cluster peers?); what it read after its checkpoint is counted again from the log at the next start"
                );
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Erases subjects from a running pipeline's state.
#[derive(Clone)]
pub struct Forgetter {
    shared: Arc<Shared>,
}

impl Forgetter {
    /// Erasure: makes every worker forget the experiment assignments of `subjects` (by
    /// subject hash), in memory at its next step and in its assignment log; returns the log
    /// lines removed. Blocks on the disk.
    pub fn forget(&self, subjects: &[u64]) -> std::io::Result<usize> {
        let all = {
            let mut forgotten = self
                .shared
                .forgotten
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            forgotten.extend(subjects.iter().copied());
            forgotten.clone()
        };
        self.shared.forget_generation.fetch_add(1, Ordering::AcqRel);
        AssignmentLog::forget(&self.shared.options.state_dir, &all)
    }
}

/// Runs the dataflow until the pipeline is stopped. A run that ends otherwise — a worker
/// panicked, or in a cluster a peer process was lost, which takes down every process's run — is
/// started again from the checkpoint after a pause: the log still holds every event after it,
/// and the store's per-cohort marks make the cells written twice count once.
fn supervise(shared: &Arc<Shared>, config: &timely::Config) {
    let mut pause = Duration::from_millis(250);
    loop {
        let worker_shared = shared.clone();
        let started = Instant::now();
        // Dropping the guards joins timely's network threads, and panics if one of them did
        // (a peer's connection broke): that is an end like any other here.
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match timely::execute(
                config.clone(),
                move |worker| run_worker(worker, &worker_shared),
            ) {
                Ok(guards) => guards.join().into_iter().find_map(Result::err),
                Err(err) => Some(err),
            }));
        let failure = run.unwrap_or_else(|_| Some("a timely thread panicked".into()));
        metrics::gauge!(PIPELINE_RUNNING).set(0.0);
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let why = failure.unwrap_or_else(|| "a peer process stopped".into());
        if started.elapsed() > Duration::from_secs(60) {
            pause = Duration::from_millis(250);
        }
        tracing::error!(error = %why, retry_in_ms = pause.as_millis() as u64,
            "pipeline dataflow ended; it starts again from its checkpoint (the log keeps the events)");
        metrics::counter!(PIPELINE_RESTARTS_TOTAL).increment(1);
        let resume = Instant::now() + pause;
        while Instant::now() < resume {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(Duration::from_secs(5));
        let start = match &shared.checkpoints {
            Some(checkpoints) => match checkpoints.register(CONSUMER) {
                Ok(epoch) => epoch,
                Err(err) => {
                    tracing::error!(error = %err, "pipeline checkpoint unreadable; retrying");
                    continue;
                }
            },
            // The embedded store's cells are replayed from the start of the log; its marks
            // skip those already applied.
            None => Epoch(0),
        };
        shared.start.store(start.0, Ordering::Release);
        shared.abandoned.store(false, Ordering::Release);
    }
}

type Worker = timely::worker::Worker;
type EventInput = InputHandle<u64, CapacityContainerBuilder<Vec<PipelineEvent>>>;
type Partial = (u64, WindowKey, WindowDelta);

fn run_worker(worker: &mut Worker, shared: &Arc<Shared>) {
    metrics::gauge!(PIPELINE_RUNNING).set(1.0);
    let index = worker.index();
    let threads = shared.options.workers.max(1);
    let (assignments, log) = open_assignments(shared, index, worker.peers());
    let (mut input, probe) = build_dataflow(worker, shared, assignments, log);
    if !index.is_multiple_of(threads) {
        drop(input);
        drain(worker, shared);
        return;
    }
    let delivered = feed(worker, shared, &mut input, &probe);
    drop(input);
    let written = if drain(worker, shared) {
        // Every epoch read went through the whole dataflow.
        delivered
    } else {
        probe.with_frontier(|f| f.first().map_or(delivered, |f| Epoch(f.saturating_sub(1))))
    };
    checkpoint(shared, written, true);
}

/// This worker's experiment assignments and its log of them: read back from the state dir
/// when the pipeline checkpoints (a failure abandons checkpointing), empty otherwise.
fn open_assignments(
    shared: &Shared,
    index: usize,
    peers: usize,
) -> (Assignments, Option<AssignmentLog>) {
    if shared.checkpoints.is_none() {
        return (Assignments::default(), None);
    }
    let log = match AssignmentLog::open(&shared.options.state_dir, index) {
        Ok(log) => Some(log),
        Err(err) => {
            tracing::error!(error = %err, "cannot open the pipeline's assignment log");
            shared.abandoned.store(true, Ordering::Release);
            None
        }
    };
    let assignments = AssignmentLog::load(&shared.options.state_dir, shared.start(), |subject| {
        subject % peers as u64 == index as u64
    })
    .unwrap_or_else(|err| {
        tracing::error!(error = %err, "cannot read the pipeline's assignment logs");
        shared.abandoned.store(true, Ordering::Release);
        Assignments::default()
    });
    (assignments, log)
}

/// Builds the dataflow: events exchanged by subject are attributed to cohorts and aggregated
/// per cell of the log ("Attribute"), then exchanged by cohort and written to the counter
/// store once complete ("Flush").
// Long: the two operators' closures are the dataflow's wiring; their state lives in `operators`.
fn build_dataflow(
    worker: &mut Worker,
    shared: &Arc<Shared>,
    assignments: Assignments,
    log: Option<AssignmentLog>,
) -> (EventInput, ProbeHandle<u64>) {
    let cell_ms = shared.options.cell_ms.max(1);
    let mut input = EventInput::new();
    let probe = ProbeHandle::new();
    let mut attribute = Attribution {
        shared: shared.clone(),
        assignments,
        log,
        forgotten_seen: 0,
        stash: BTreeMap::new(),
        cells: BTreeMap::new(),
        cell_ms,
    };
    let flush_shared = shared.clone();
    let mut writer = shared.store.writer();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .unary_frontier::<CapacityContainerBuilder<Vec<Partial>>, _, _, _>(
                Exchange::new(|event: &PipelineEvent| event.route()),
                "Attribute",
                move |_, _| {
                    move |(input, frontier), output| {
                        attribute.forget_erased();
                        input.for_each_stamp(|cap, data| {
                            let Some(&time) = cap.least() else { return };
                            let Some(retained) = cap.retain_least(output.output_index()) else {
                                return;
                            };
                            attribute.stash(time, retained, data);
                        });
                        attribute.aggregate_complete_epochs(|t| frontier.less_equal(t));
                        for (cell, cap, aggregate) in
                            attribute.complete_cells(|t| frontier.less_equal(t))
                        {
                            let mut session = output.session(&cap);
                            for (key, delta) in aggregate.windows {
                                session.give((cell, key, delta));
                            }
                        }
                    }
                },
            )
            .unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                Exchange::new(|partial: &Partial| partial.1.cohort.route()),
                "Flush",
                move |_, _| {
                    let mut cells: BTreeMap<u64, (Capability<u64>, Aggregate)> = BTreeMap::new();
                    move |(input, frontier), output| {
                        input.for_each_stamp(|cap, data| {
                            let Some(&time) = cap.least() else { return };
                            for batch in data {
                                for (cell, key, delta) in batch.drain(..) {
                                    if let Some((held, aggregate)) = cells.get_mut(&cell) {
                                        hold_earliest(held, time, || {
                                            cap.retain_least(output.output_index())
                                        });
                                        aggregate.merge(key, delta);
                                    } else if let Some(retained) =
                                        cap.retain_least(output.output_index())
                                    {
                                        let mut aggregate = Aggregate::default();
                                        aggregate.merge(key, delta);
                                        cells.insert(cell, (retained, aggregate));
                                    }
                                }
                            }
                        });
                        let complete =
                            |cell: u64| !frontier.less_equal(&((cell + 1) * cell_ms - 1));
                        let written = flush_cells(&cells, complete, writer.as_mut(), &flush_shared);
                        let now = unix_millis();
                        for cell in written {
                            let end = (cell + 1) * cell_ms;
                            metrics::histogram!(PIPELINE_FLUSH_LAG_SECONDS)
                                .record(now.saturating_sub(end) as f64 / 1000.0);
                            cells.remove(&cell);
                        }
                    }
                },
            )
            .probe_with(&probe);
    });
    (input, probe)
}

/// Steps the dataflow until it completes and returns whether it did. A cluster's dataflow
/// completes only when every process stops reading, so a stopping process waits for it at most
/// [`CLUSTER_DRAIN`], writing the cells the other processes let through meanwhile.
fn drain(worker: &mut Worker, shared: &Shared) -> bool {
    let deadline = Instant::now() + CLUSTER_DRAIN;
    let cluster = shared.options.cluster.is_some();
    while worker.step_or_park(Some(Duration::from_millis(10))) {
        if cluster && shared.stop.load(Ordering::Acquire) && Instant::now() > deadline {
            return false;
        }
    }
    true
}

/// Reads the log into the dataflow (on the first worker of each process) and checkpoints.
fn feed(
    worker: &mut Worker,
    shared: &Shared,
    input: &mut EventInput,
    probe: &ProbeHandle<u64>,
) -> Epoch {
    let mut tail = Tail::new(shared.wal.dir(), shared.start())
        .sealed_by(shared.wal.sealer().cloned())
        .bounded_by(shared.wal.committed());
    let mut pending: VecDeque<(u64, usize)> = VecDeque::new();
    let mut pending_events = 0usize;
    let mut last_checkpoint = Instant::now();
    let segments = shared.options.segments.clone();
    while !shared.stop.load(Ordering::Acquire) {
        let frontier = probe.with_frontier(|f| f.first().copied());
        while let Some(&(epoch, events)) = pending.front() {
            if frontier.is_some_and(|f| f <= epoch) {
                break;
            }
            pending.pop_front();
            pending_events -= events;
        }
        let flushed = frontier.map_or(tail.delivered().0, |f| f.saturating_sub(1));
        if last_checkpoint.elapsed() >= Duration::from_secs(1) {
            checkpoint(shared, Epoch(flushed), false);
            last_checkpoint = Instant::now();
        }
        metrics::gauge!(PIPELINE_PENDING_EPOCHS).set(pending.len() as f64);
        let durable = shared.wal.last_epoch();
        metrics::gauge!(PIPELINE_LAG_SECONDS)
            .set(durable.0.saturating_sub(flushed.min(durable.0)) as f64 / 1000.0);
        let mut read = 0;
        if pending_events < shared.options.max_pending_events && tail.delivered() < durable {
            let mut unreadable = 0u64;
            let result = tail.read(durable, 65_536, |epoch, events| {
                input.advance_to(epoch.0.max(*input.time()));
                for bytes in events {
                    match PipelineEvent::decode(bytes, &segments) {
                        Some(event) => input.send(event),
                        None => unreadable += 1,
                    }
                }
                pending.push_back((epoch.0, events.len()));
                pending_events += events.len();
                read += events.len();
            });
            if let Err(err) = result {
                tracing::error!(error = %err, "pipeline cannot read the write-ahead log");
                std::thread::sleep(Duration::from_millis(200));
            }
            metrics::counter!(PIPELINE_EVENTS_TOTAL).increment(read as u64);
            if unreadable > 0 {
                metrics::counter!(PIPELINE_UNREADABLE_EVENTS_TOTAL).increment(unreadable);
            }
        } else if tail.delivered() >= durable
            && let Some(settled) = shared.wal.settled(tail.delivered())
            && settled.0 > *input.time()
        {
            input.advance_to(settled.0);
        }
        let park = if read > 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        worker.step_or_park(Some(park));
    }
    tail.delivered()
}

/// Records that every counter up to `epoch` is written (unless a write was abandoned).
fn checkpoint(shared: &Shared, epoch: Epoch, last: bool) {
    if shared.abandoned.load(Ordering::Acquire) {
        return;
    }
    let before = shared.flushed.fetch_max(epoch.0, Ordering::AcqRel);
    metrics::gauge!(PIPELINE_CHECKPOINT_EPOCH).set(epoch.0.max(before) as f64);
    if let Some(checkpoints) = &shared.checkpoints
        && (epoch.0 > before || last)
        && let Err(err) = checkpoints.advance(CONSUMER, Epoch(epoch.0.max(before)))
    {
        tracing::error!(error = %err, "pipeline checkpoint not saved");
    }
}
