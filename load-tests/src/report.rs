//! Outcomes of a run per operation: an HDR latency histogram, counts, and errors by status,
//! with a warm-up whose operations are not measured and a progress line while it runs.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The longest latency recorded, in microseconds; longer ones are recorded as this.
const MAX_MICROS: u64 = 60_000_000;

/// A new latency histogram (1 µs to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("bounds")
}

/// One operation's figures while the run goes on.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    events: u64,
    errors: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            histogram: histogram(),
            ok: 0,
            events: 0,
            errors: BTreeMap::new(),
        }
    }
}

/// Gathers the outcomes of every operation of a run.
pub struct Recorder {
    /// Operations that end before this are not measured (warm-up).
    measure_from: Instant,
    tallies: Mutex<BTreeMap<&'static str, Tally>>,
    done: AtomicU64,
    failed: AtomicU64,
    events: AtomicU64,
}

impl Recorder {
    /// A recorder whose measurements start after `warmup`.
    pub fn new(warmup: Duration) -> Self {
        Self {
            measure_from: Instant::now() + warmup,
            tallies: Mutex::new(BTreeMap::new()),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            events: AtomicU64::new(0),
        }
    }

    /// When measurement starts.
    pub fn measure_from(&self) -> Instant {
        self.measure_from
    }

    /// Records a successful `operation` that carried `events` events, its latency measured
    /// from `since` (its scheduled time in the open model).
    pub fn ok(&self, operation: &'static str, since: Instant, events: u64) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        let now = Instant::now();
        if now < self.measure_from {
            return;
        }
        let micros = now
            .duration_since(since)
            .as_micros()
            .clamp(1, MAX_MICROS as u128) as u64;
        let mut tallies = self.tallies.lock().expect("tallies");
        let tally = tallies.entry(operation).or_default();
        let _ = tally.histogram.record(micros);
        tally.ok += 1;
        tally.events += events;
    }

    /// Records a failed `operation`: `status` is the HTTP status, or what went wrong
    /// (`connect`, `timeout`, `closed`, an error code of the stream).
    pub fn error(&self, operation: &'static str, status: impl Into<String>) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        // Errors count from the start: a failure in the warm-up is still a failure.
        let mut tallies = self.tallies.lock().expect("tallies");
        *tallies
            .entry(operation)
            .or_default()
            .errors
            .entry(status.into())
            .or_default() += 1;
    }

    /// Returns the errors recorded so far.
    pub fn errors(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Prints a progress line on standard error every second (every 5 s when it is not a
    /// terminal) until `end`.
    pub async fn progress(&self, started: Instant, end: Instant) {
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal { 1 } else { 5 };
        let total = end.duration_since(started).as_secs_f64().max(0.001);
        let mut last_done = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.tick().await;
        while Instant::now() < end {
            tick.tick().await;
            let elapsed = started.elapsed().as_secs_f64();
            let done = self.done.load(Ordering::Relaxed);
            let width = 30;
            let filled = ((elapsed / total).min(1.0) * width as f64) as usize;
            let phase = if Instant::now() < self.measure_from {
                "warm-up"
            } else {
                "measuring"
            };
            let line = format!(
                "[{}{}] {elapsed:>5.0}/{total:.0} s {phase}: {done} ops ({:.0}/s), {} events, {} errors",
                "#".repeat(filled),
                ".".repeat(width - filled),
                (done - last_done) as f64 / every as f64,
                self.events.load(Ordering::Relaxed),
                self.errors()
            );
            last_done = done;
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
        if terminal {
            eprintln!();
        }
    }

    /// Returns the figures of every operation over the measured `seconds`.
    pub fn summary(&self, seconds: f64) -> BTreeMap<&'static str, Operation> {
        let tallies = self.tallies.lock().expect("tallies");
        tallies
            .iter()
            .map(|(name, tally)| {
                let h = &tally.histogram;
                (
                    *name,
                    Operation {
                        ok: tally.ok,
                        events: tally.events,
                        per_second: tally.ok as f64 / seconds,
                        events_per_second: tally.events as f64 / seconds,
                        latency_us: Percentiles::of(h),
                        errors: tally.errors.clone(),
                    },
                )
            })
            .collect()
    }
}

/// One operation's figures in a report.
#[derive(Debug, Serialize)]
pub struct Operation {
    /// Successful operations measured (after the warm-up).
    pub ok: u64,
    /// Events they carried.
    pub events: u64,
    /// Successful operations per second.
    pub per_second: f64,
    /// Events per second.
    pub events_per_second: f64,
    /// Latency percentiles.
    pub latency_us: Percentiles,
    /// Failures by HTTP status or cause, warm-up included.
    pub errors: BTreeMap<String, u64>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Prints one operation's figures as text.
pub fn print_operation(name: &str, op: &Operation) {
    let l = &op.latency_us;
    let errors: u64 = op.errors.values().sum();
    println!(
        "{name}: {} ok ({:.0}/s), {} events ({:.0}/s), {errors} errors{}",
        op.ok,
        op.per_second,
        op.events,
        op.events_per_second,
        if op.errors.is_empty() {
            String::new()
        } else {
            format!(" {:?}", op.errors)
        }
    );
    println!(
        "  latency: p50 {} p90 {} p99 {} p99.9 {} max {}",
        micros(l.p50),
        micros(l.p90),
        micros(l.p99),
        micros(l.p999),
        micros(l.max)
    );
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}
