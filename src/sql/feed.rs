//! The feeder: a thread that follows the write-ahead log into the in-memory window and rolls
//! the window into a Parquet segment once it spans `memory_window` of ingest time (or holds
//! `memory_events` events).
//!
//! Its checkpoint in the log is the last epoch written to a segment, so a restart replays
//! into memory exactly the events no segment holds. Segment names carry their last epoch, so
//! a crash between writing a segment and saving the checkpoint does not count events twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::metrics::{
    SQL_MEMORY_BYTES, SQL_MEMORY_EVENTS, SQL_ROLL_ERRORS_TOTAL, SQL_SEGMENTS,
    SQL_UNREADABLE_EVENTS_TOTAL,
};
use super::segments;
use super::table::RecentEvents;
use crate::wal::tail::{Follower, Tail};
use crate::wal::{Checkpoints, Epoch, Wal, WalError, unix_millis};

/// The consumer name of the SQL window in the log's checkpoints.
const CONSUMER: &str = "sql";

/// How the window rolls.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// Where segments are written.
    pub dir: std::path::PathBuf,
    /// Ingest time (ms) the memory window spans before it rolls.
    pub memory_window_ms: u64,
    /// Events in memory that trigger a roll.
    pub memory_events: usize,
    /// Segments whose newest event was received longer ago (ms) are deleted.
    pub retention_ms: u64,
}

/// The running feeder.
pub struct Feeder(Follower);

impl Feeder {
    /// Starts following the log after the SQL checkpoint (or the newest segment, if later).
    pub fn start(
        options: FeedOptions,
        wal: Wal,
        checkpoints: Arc<Checkpoints>,
        events: Arc<RecentEvents>,
    ) -> Result<Self, WalError> {
        let registered = checkpoints.register(CONSUMER)?;
        let start = Epoch(registered.0.max(events.newest_segment_epoch().unwrap_or(0)));
        events.mark_delivered(start.0);
        let feed = Feed {
            options,
            wal,
            checkpoints,
            events,
            start,
            held: None,
        };
        // The window follows the log, which buffers it: ingest comes first.
        Ok(Self(Follower::spawn("sql-feeder", move |stop| {
            feed.run(stop)
        })?))
    }

    /// Stops the thread and waits for it. The window is not rolled: the log still holds it.
    pub fn stop(self) {
        self.0.stop();
    }
}

struct Feed {
    options: FeedOptions,
    wal: Wal,
    checkpoints: Arc<Checkpoints>,
    events: Arc<RecentEvents>,
    start: Epoch,
    /// The first and last epochs held in memory.
    held: Option<(u64, u64)>,
}

impl Feed {
    fn run(mut self, stop: &AtomicBool) {
        let mut tail = Tail::new(self.wal.dir(), self.start)
            .sealed_by(self.wal.sealer().cloned())
            .bounded_by(self.wal.committed());
        let mut next_expiry = Instant::now();
        let mut roll_after = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let durable = self.wal.last_epoch();
            // Past twice the roll size (rolls failing), the log keeps the events instead.
            let room = self.events.rows_in_memory() < self.options.memory_events * 2;
            let mut read = 0;
            if room && tail.delivered() < durable {
                read = self.read(&mut tail, durable);
            }
            self.events.mark_delivered(tail.delivered().0);
            if Instant::now() >= roll_after
                && self.due()
                && let Err(err) = self.roll()
            {
                metrics::counter!(SQL_ROLL_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %err, "sql window not rolled into a segment; retrying in 30s");
                roll_after = Instant::now() + Duration::from_secs(30);
            }
            if Instant::now() >= next_expiry {
                let horizon = unix_millis() as i64 - self.options.retention_ms as i64;
                self.events.expire(horizon);
                next_expiry = Instant::now() + Duration::from_secs(60);
            }
            self.publish();
            if read == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn read(&mut self, tail: &mut Tail, durable: Epoch) -> usize {
        let mut read = 0;
        let mut unreadable = 0;
        let events = &self.events;
        let held = &mut self.held;
        let result = tail.read(durable, 65_536, |epoch, batch| {
            unreadable += events.append(batch.iter().copied());
            read += batch.len();
            let (first, _) = held.get_or_insert((epoch.0, epoch.0));
            *held = Some((*first, epoch.0));
        });
        if let Err(err) = result {
            tracing::error!(error = %err, "sql window cannot read the write-ahead log");
            std::thread::sleep(Duration::from_millis(200));
        }
        if unreadable > 0 {
            metrics::counter!(SQL_UNREADABLE_EVENTS_TOTAL).increment(unreadable as u64);
        }
        read
    }

    /// Returns whether the memory window is due to roll.
    fn due(&self) -> bool {
        let Some((first, _)) = self.held else {
            return false;
        };
        unix_millis().saturating_sub(first) >= self.options.memory_window_ms
            || self.events.rows_in_memory() >= self.options.memory_events
    }

    fn roll(&mut self) -> Result<(), String> {
        let Some((first, last)) = self.held else {
            return Ok(());
        };
        let events = self.events.clone();
        let _rolling = events.rolling();
        let Some((batches, span)) = self.events.take_for_roll() else {
            // Epochs without a readable event: nothing to keep, only the checkpoint moves.
            self.held = None;
            return self.checkpoint(last);
        };
        let started = Instant::now();
        let segment = segments::write(
            &self.options.dir,
            &batches,
            (first, last),
            span,
            &self.events.keys(),
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(
            file = %segment.path.display(),
            events = batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            bytes = segment.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "sql window rolled into a segment"
        );
        self.events.rolled(batches.len(), segment);
        self.held = None;
        self.checkpoint(last)
    }

    fn checkpoint(&self, last: u64) -> Result<(), String> {
        self.checkpoints
            .advance(CONSUMER, Epoch(last))
            .map(|_| ())
            .map_err(|e| format!("checkpoint not saved: {e}"))
    }

    fn publish(&self) {
        let (bytes, segments) = self.events.footprint();
        metrics::gauge!(SQL_MEMORY_BYTES).set(bytes as f64);
        metrics::gauge!(SQL_MEMORY_EVENTS).set(self.events.rows_in_memory() as f64);
        metrics::gauge!(SQL_SEGMENTS).set(segments as f64);
    }
}
