//! The writer thread: gathers appends into groups (waiting briefly for more when the log is
//! busy), frames and seals each group in one buffer, writes it, fsyncs, and only then
//! completes the group's appends with their epoch.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::frame::{self, Format};
use super::metrics::{
    WAL_BYTES_TOTAL, WAL_EPOCHS_TOTAL, WAL_ERRORS_TOTAL, WAL_FSYNC_DURATION_SECONDS,
};
use super::segments::Segment;
use super::{Append, CommittedEnd, Epoch, EpochClock, Message, WalError, WalOptions, unix_millis};
use crate::crypto::Sealer;

/// How a write failed.
enum WriteFailure {
    /// Nothing of the record remains: the log may go on.
    Undone(std::io::Error),
    /// What reached the disk is unknown: the log stops.
    Unknown(std::io::Error),
}

pub(super) struct Writer {
    pub(super) options: WalOptions,
    pub(super) segment: Option<Segment>,
    pub(super) stopped: Arc<AtomicBool>,
    pub(super) last_epoch: Arc<AtomicU64>,
    pub(super) committed: Arc<CommittedEnd>,
    pub(super) clock: Arc<std::sync::Mutex<EpochClock>>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut group: Vec<Append> = Vec::new();
        let mut frame = Vec::new();
        let mut rotations = Vec::new();
        let mut previous_group = 0;
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = 0;
            self.gather(Some(first), &mut rx, &mut group, &mut rotations, &mut bytes);
            // Many writers a moment ago: more are on their way, so wait for them and let one
            // sync acknowledge them all.
            if previous_group >= self.options.commit_siblings.max(1)
                && !self.options.commit_delay.is_zero()
                && bytes < self.options.group_bytes
            {
                std::thread::sleep(self.options.commit_delay);
                let next = rx.try_recv().ok();
                self.gather(next, &mut rx, &mut group, &mut rotations, &mut bytes);
            }
            previous_group = group.len();
            if !group.is_empty() {
                self.commit(&mut group, &mut frame);
            }
            // After the group: the segment it went to is closed now.
            for done in rotations.drain(..) {
                self.segment = None;
                self.committed.clear();
                let _ = done.send(());
            }
        }
    }

    /// Takes `next` and whatever else is queued into the group, up to `group_bytes`.
    fn gather(
        &self,
        mut next: Option<Message>,
        rx: &mut mpsc::Receiver<Message>,
        group: &mut Vec<Append>,
        rotations: &mut Vec<oneshot::Sender<()>>,
        bytes: &mut usize,
    ) {
        while let Some(message) = next.take() {
            match message {
                Message::Append(append) => {
                    *bytes += append.events.size();
                    group.push(append);
                }
                Message::Rotate(done) => rotations.push(done),
            }
            if *bytes < self.options.group_bytes {
                next = rx.try_recv().ok();
            }
        }
    }

    fn commit(&mut self, group: &mut Vec<Append>, frame: &mut Vec<u8>) {
        if self.stopped.load(Ordering::Acquire) {
            for append in group.drain(..) {
                let _ = append.done.send(Err(WalError::Stopped));
            }
            return;
        }
        let epoch = {
            let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = clock.floor.max(unix_millis()).max(clock.durable + 1);
            clock.floor = epoch + 1;
            clock.in_flight = true;
            epoch
        };
        // Framed, and sealed, in place in one buffer kept from group to group.
        frame.clear();
        let start = frame::start_frame(frame);
        let events = group.iter().map(|a| &a.events);
        match &self.options.sealer {
            Some(sealer) => {
                let sealed = Sealer::start(frame);
                frame::append_epoch_batches(frame, epoch, events);
                sealer.finish(epoch, frame, sealed);
                frame::finish_frame(frame, start, Format::Sealed);
            }
            None => {
                frame::append_epoch_batches(frame, epoch, events);
                frame::finish_frame(frame, start, Format::Plain);
            }
        }
        let written = self.write(epoch, frame);
        {
            let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
            clock.in_flight = false;
            if written.is_ok() {
                clock.durable = epoch;
                self.last_epoch.store(epoch, Ordering::Release);
            }
        }
        match written {
            Ok(()) => {
                ::metrics::counter!(WAL_EPOCHS_TOTAL).increment(1);
                ::metrics::counter!(WAL_BYTES_TOTAL).increment(frame.len() as u64);
                for append in group.drain(..) {
                    let _ = append.done.send(Ok(Epoch(epoch)));
                }
            }
            Err(failure) => {
                ::metrics::counter!(WAL_ERRORS_TOTAL).increment(1);
                let err = match failure {
                    // The partial record was cut off: the log is as it was, and the next
                    // group may succeed (a full disk that gets space again).
                    WriteFailure::Undone(err) => {
                        tracing::warn!(error = %err, "write-ahead log write failed and was undone; nothing of this group is stored or acknowledged");
                        err
                    }
                    // Whatever reached the disk is unknown: acknowledge nothing from now on.
                    WriteFailure::Unknown(err) => {
                        tracing::error!(error = %err, "write-ahead log write failed; ingest stops acknowledging until a restart");
                        self.stopped.store(true, Ordering::Release);
                        err
                    }
                };
                for append in group.drain(..) {
                    let _ = append.done.send(Err(WalError::Io(std::io::Error::new(
                        err.kind(),
                        err.to_string(),
                    ))));
                }
            }
        }
    }

    fn write(&mut self, epoch: u64, frame: &[u8]) -> Result<(), WriteFailure> {
        let full = self
            .segment
            .as_ref()
            .is_none_or(|s| s.len > 0 && s.len + frame.len() as u64 > self.options.segment_bytes);
        if full {
            let created =
                Segment::create(&self.options.dir, epoch).map_err(WriteFailure::Undone)?;
            self.committed.set(&created.path, 0);
            self.segment = Some(created);
        }
        let segment = self.segment.as_mut().expect("opened above");
        if let Err(err) = segment.file.write_all(frame) {
            // Nothing of this frame was synced: cutting it off restores the log as it was.
            let undone = segment
                .file
                .set_len(segment.len)
                .and_then(|()| segment.file.sync_data());
            return Err(match undone {
                Ok(()) => WriteFailure::Undone(err),
                Err(_) => WriteFailure::Unknown(err),
            });
        }
        let started = Instant::now();
        // After a failed sync the state of the file is unknown (the kernel may have dropped
        // the pages): never retried.
        segment.file.sync_data().map_err(WriteFailure::Unknown)?;
        ::metrics::histogram!(WAL_FSYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        segment.len += frame.len() as u64;
        // Before the epoch is published as durable: a reader told to read through it finds
        // its bytes committed.
        self.committed.set(&segment.path, segment.len);
        Ok(())
    }
}
