//! The write-ahead log: append-only segment files of CRC-framed records, written by one
//! group-commit thread that fsyncs before completing any append.
//!
//! Input: encoded events from `ingest`. Output: epochs — one per group commit, numbered from
//! 1 — for the pipeline and the SQL segment writer, and replay after a crash.
//!
//! Invariants: an append completes with `Ok` only after its frame is on disk (`fdatasync`);
//! a write that fails (a full disk) is cut off again and only its group is refused, while
//! after a failed sync, or a write that cannot be undone, the log stops accepting appends
//! until a restart (no false acknowledgement);
//! recovery truncates a torn tail and reports, then skips, damage in the middle. With a
//! [`Sealer`], records are encrypted at rest (see [`seal`]); a sealed record whose key is
//! missing stops recovery instead of being skipped.

pub mod erase;
pub mod frame;
pub mod metrics;
pub mod tail;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use self::metrics::{
    WAL_BYTES_TOTAL, WAL_CORRUPT_RECORDS_TOTAL, WAL_EPOCHS_TOTAL, WAL_ERRORS_TOTAL,
    WAL_FSYNC_DURATION_SECONDS, WAL_QUEUE_DEPTH, WAL_TRUNCATED_BYTES_TOTAL,
};
use crate::crypto::Sealer;
pub use frame::Batch;
use frame::{Format, Scan};

/// The number of a committed WAL batch; timely's timestamp in the pipeline.
///
/// Epochs strictly increase and follow the wall clock: an epoch is at least the Unix time in
/// milliseconds of its commit. Processes of a cluster therefore number their epochs alike, and
/// an idle log can promise that nothing older than the current time will still be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// Hands out epoch numbers; shared by the writer and the readers that ask how far the log is
/// settled.
#[derive(Debug, Default)]
struct EpochClock {
    /// No later epoch may be smaller.
    floor: u64,
    /// An epoch is being written and is not durable yet.
    in_flight: bool,
    /// The last durable epoch.
    durable: u64,
}

/// Returns the current Unix time in milliseconds (0 before 1970).
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why an append or the log failed.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading, writing or syncing failed.
    #[error("write-ahead log i/o: {0}")]
    Io(#[from] std::io::Error),
    /// An earlier write or sync failed; nothing more is acknowledged until restart.
    #[error("the write-ahead log stopped after an earlier write error")]
    Stopped,
    /// Too many appends are waiting.
    #[error("the write-ahead log queue is full")]
    Overloaded,
    /// An intact encrypted record does not open with the configured data keys.
    #[error(
        "write-ahead log record {at} is encrypted with a data key that is not configured (or not at all); configure the data keys it was written with (privacy.data_key_file)"
    )]
    Key {
        /// The segment and offset.
        at: String,
    },
}

/// How the log is laid out and batched.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The directory of segment files.
    pub dir: PathBuf,
    /// A segment is closed once it reaches this size.
    pub segment_bytes: u64,
    /// Appends that may wait for the writer.
    pub queue: usize,
    /// The most bytes one group commit gathers.
    pub group_bytes: usize,
    /// How long a group commit waits for more appends before it syncs, when the previous
    /// group held at least `commit_siblings` appends (many writers: the wait fills the
    /// group, one sync acknowledges more of them and the CPU a sync costs is shared); a
    /// lone writer never waits. Zero turns it off.
    pub commit_delay: Duration,
    /// Appends in the previous group that make the next one wait `commit_delay`.
    pub commit_siblings: usize,
    /// Seals new records at rest (AES-256-GCM) and opens sealed ones; `None` writes them
    /// in clear (sealed records of an earlier run then cannot be read).
    pub sealer: Option<Arc<Sealer>>,
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Intact epochs replayed.
    pub epochs: u64,
    /// Events in them.
    pub events: u64,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Damaged stretches found before the tail, as `file@offset (n bytes)`.
    pub damaged: Vec<String>,
    /// The last epoch on disk.
    pub last_epoch: Epoch,
}

struct Append {
    events: Batch,
    done: oneshot::Sender<Result<Epoch, WalError>>,
}

/// What the writer thread is asked to do.
enum Message {
    Append(Append),
    /// Close the segment being written: the next epoch starts a new one.
    Rotate(oneshot::Sender<()>),
}

/// Held while a segment file is deleted or replaced, so that an erasure never brings back a
/// segment the checkpoints just deleted.
static SEGMENT_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The suffix of a segment being rewritten by an erasure; one left by a crash is deleted.
const REWRITING: &str = "erasing";

/// How far the log is committed: the segment being written and its synced length. Readers of
/// that segment never read past it, so they never see a write in progress, nor one that failed
/// and is being cut off (whose bytes, read while the file changes, could mix with the next
/// record's and look like damage).
#[derive(Debug, Default)]
pub struct CommittedEnd {
    end: std::sync::Mutex<Option<(PathBuf, u64)>>,
}

impl CommittedEnd {
    /// Forgets the segment being written (it is finished; the next one is not created yet).
    fn clear(&self) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn set(&self, path: &Path, len: u64) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        match end.as_mut() {
            Some((current, committed)) if current == path => *committed = len,
            _ => *end = Some((path.to_path_buf(), len)),
        }
    }

    /// Returns how much of `path` may be read: its committed length while it is the segment
    /// being written; `None` (all of it) for a finished segment.
    pub fn limit(&self, path: &Path) -> Option<u64> {
        let end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        end.as_ref()
            .filter(|(current, _)| current == path)
            .map(|(_, len)| *len)
    }
}

/// The handle producers append through.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Message>,
    stopped: Arc<AtomicBool>,
    last_epoch: Arc<AtomicU64>,
    committed: Arc<CommittedEnd>,
    clock: Arc<std::sync::Mutex<EpochClock>>,
    dir: PathBuf,
    sealer: Option<Arc<Sealer>>,
}

impl Wal {
    /// Recovers the log in `options.dir` (calling `replay` for every intact epoch, in order),
    /// then starts the writer thread.
    pub fn open(
        options: WalOptions,
        replay: impl FnMut(Epoch, &[&[u8]]),
    ) -> Result<(Self, Recovery), WalError> {
        std::fs::create_dir_all(&options.dir)?;
        erase::remove_leftovers(&options.dir)?;
        let recovery = recover(&options.dir, true, options.sealer.as_deref(), replay)?;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let stopped = Arc::new(AtomicBool::new(false));
        let last_epoch = Arc::new(AtomicU64::new(recovery.last_epoch.0));
        let clock = Arc::new(std::sync::Mutex::new(EpochClock {
            floor: recovery.last_epoch.0 + 1,
            in_flight: false,
            durable: recovery.last_epoch.0,
        }));
        let dir = options.dir.clone();
        let sealer = options.sealer.clone();
        let committed = Arc::new(CommittedEnd::default());
        let segment = Segment::open_last(&options.dir)?;
        if let Some(segment) = &segment {
            committed.set(&segment.path, segment.len);
        }
        let writer = Writer {
            clock: clock.clone(),
            segment,
            options,
            stopped: stopped.clone(),
            last_epoch: last_epoch.clone(),
            committed: committed.clone(),
        };
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Self {
                tx,
                stopped,
                last_epoch,
                committed,
                clock,
                dir,
                sealer,
            },
            recovery,
        ))
    }

    /// Appends encoded events as part of the next epoch; completes once they are durable.
    /// Fails at once with `Overloaded` when the queue is full, or `Stopped` after a failure.
    pub async fn append(&self, events: impl Into<Batch>) -> Result<Epoch, WalError> {
        let events = events.into();
        if self.stopped.load(Ordering::Acquire) {
            return Err(WalError::Stopped);
        }
        let (done, result) = oneshot::channel();
        ::metrics::gauge!(WAL_QUEUE_DEPTH).set(self.queued() as f64);
        self.tx
            .try_send(Message::Append(Append { events, done }))
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => WalError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => WalError::Stopped,
            })?;
        result.await.unwrap_or(Err(WalError::Stopped))
    }

    /// Closes the segment being written, so that every segment on disk is complete and may
    /// be rewritten (see [`erase`]); the next epoch starts a new segment.
    pub async fn rotate(&self) -> Result<(), WalError> {
        let (done, rotated) = oneshot::channel();
        self.tx
            .send(Message::Rotate(done))
            .await
            .map_err(|_| WalError::Stopped)?;
        rotated.await.map_err(|_| WalError::Stopped)
    }

    /// Returns how far the segment being written is committed (for readers: see [`Tail`]).
    pub fn committed(&self) -> Arc<CommittedEnd> {
        self.committed.clone()
    }

    /// Returns what seals and opens its records, when they are encrypted.
    pub fn sealer(&self) -> Option<&Arc<Sealer>> {
        self.sealer.as_ref()
    }

    /// Returns whether the log stopped after a failure.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Returns the last durable epoch.
    pub fn last_epoch(&self) -> Epoch {
        Epoch(self.last_epoch.load(Ordering::Acquire))
    }

    /// Returns the appends waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Returns the directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// For a reader that has read every epoch up to `read_through`: returns an epoch below
    /// which nothing will ever be committed any more, and promises it — or `None` when an
    /// epoch is being written or a durable one is still unread.
    pub fn settled(&self, read_through: Epoch) -> Option<Epoch> {
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        if clock.in_flight || clock.durable > read_through.0 {
            return None;
        }
        clock.floor = clock.floor.max(unix_millis()).max(clock.durable + 1);
        Some(Epoch(clock.floor))
    }
}

/// The consumers of the log and the last epoch each has made durable on its side. A segment is
/// deleted only when every registered consumer has checkpointed past its last epoch; with no
/// consumer registered, nothing is deleted.
pub struct Checkpoints {
    dir: PathBuf,
    positions: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

const CHECKPOINT_FILE: &str = "checkpoints.json";

impl Checkpoints {
    /// Loads the checkpoints kept beside the segments in `dir`.
    pub fn load(dir: &Path) -> Result<Self, WalError> {
        let positions = match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                WalError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(err) => return Err(err.into()),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            positions: std::sync::Mutex::new(positions),
        })
    }

    /// Registers `consumer`, which starts from its saved position (0 when new); returns it.
    pub fn register(&self, consumer: &str) -> Result<Epoch, WalError> {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        let position = *positions.entry(consumer.to_owned()).or_insert(0);
        self.save(&positions)?;
        Ok(Epoch(position))
    }

    /// Records that `consumer` has everything up to `epoch` durable on its side, then deletes
    /// the segments every consumer has passed. Returns how many segments were deleted.
    pub fn advance(&self, consumer: &str, epoch: Epoch) -> Result<usize, WalError> {
        let low = {
            let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
            let position = positions.entry(consumer.to_owned()).or_insert(0);
            *position = (*position).max(epoch.0);
            self.save(&positions)?;
            positions.values().copied().min().unwrap_or(0)
        };
        let _files = SEGMENT_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let paths = segments(&self.dir)?;
        let mut deleted = 0;
        // A segment's last epoch is one less than the next segment's first; the newest segment
        // (being written) is never deleted.
        for pair in paths.windows(2) {
            let next_first = first_epoch(&pair[1]).unwrap_or(0);
            if next_first == 0 || next_first - 1 > low {
                break;
            }
            std::fs::remove_file(&pair[0])?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn save(&self, positions: &std::collections::BTreeMap<String, u64>) -> Result<(), WalError> {
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(positions).expect("a map serializes"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(CHECKPOINT_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Retention: deletes the segments of the log in `dir` whose every epoch was committed before
/// `horizon` (an epoch is its commit time in ms), whatever the consumers have read; the
/// newest segment stays. Returns how many were deleted.
pub fn expire(dir: &Path, horizon: u64) -> std::io::Result<usize> {
    let _files = SEGMENT_FILES.lock().unwrap_or_else(|p| p.into_inner());
    let paths = segments(dir)?;
    let mut deleted = 0;
    for pair in paths.windows(2) {
        // Everything in a segment is older than the next one's first epoch.
        match first_epoch(&pair[1]) {
            Some(next_first) if next_first <= horizon => {
                std::fs::remove_file(&pair[0])?;
                deleted += 1;
            }
            _ => break,
        }
    }
    if deleted > 0 {
        File::open(dir)?.sync_all()?;
    }
    Ok(deleted)
}

/// Reads a segment's first epoch from its file name.
fn first_epoch(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

struct Segment {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Segment {
    fn path(dir: &Path, first_epoch: u64) -> PathBuf {
        dir.join(format!("{first_epoch:020}.wal"))
    }

    fn open_last(dir: &Path) -> std::io::Result<Option<Self>> {
        let Some(last) = segments(dir)?.pop() else {
            return Ok(None);
        };
        let file = OpenOptions::new().append(true).open(&last)?;
        let len = file.metadata()?.len();
        Ok(Some(Self {
            file,
            path: last,
            len,
        }))
    }

    fn create(dir: &Path, first_epoch: u64) -> std::io::Result<Self> {
        let path = Self::path(dir, first_epoch);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // Make the new file's name durable too.
        File::open(dir)?.sync_all()?;
        Ok(Self { file, path, len: 0 })
    }
}

/// How a write failed.
enum WriteFailure {
    /// Nothing of the record remains: the log may go on.
    Undone(std::io::Error),
    /// What reached the disk is unknown: the log stops.
    Unknown(std::io::Error),
}

struct Writer {
    options: WalOptions,
    segment: Option<Segment>,
    stopped: Arc<AtomicBool>,
    last_epoch: Arc<AtomicU64>,
    committed: Arc<CommittedEnd>,
    clock: Arc<std::sync::Mutex<EpochClock>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
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

/// The segment files of `dir`, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err),
    };
    paths.sort();
    Ok(paths)
}

/// The epoch and events of a frame's payload, opened first when it is sealed; `None` when
/// it does not decode (or opens with no key of the ring).
pub fn read_epoch<'a>(
    format: Format,
    payload: &'a [u8],
    sealer: Option<&Sealer>,
    scratch: &'a mut Vec<u8>,
) -> Option<(u64, Vec<&'a [u8]>)> {
    match format {
        Format::Plain => frame::decode_epoch(payload),
        Format::Sealed => frame::decode_epoch(sealer?.open(payload, scratch)?),
        Format::Padding => None,
    }
}

/// Reads every intact epoch of the log in `dir`, in order. With `repair`, a torn tail is cut
/// off the last segment; without, nothing is changed (for readers other than the writer).
pub fn recover(
    dir: &Path,
    repair: bool,
    sealer: Option<&Sealer>,
    mut replay: impl FnMut(Epoch, &[&[u8]]),
) -> Result<Recovery, WalError> {
    let mut report = Recovery::default();
    let mut scratch = Vec::new();
    let paths = segments(dir)?;
    for (index, path) in paths.iter().enumerate() {
        let is_last = index + 1 == paths.len();
        let bytes = std::fs::read(path)?;
        let mut at = 0;
        while at < bytes.len() {
            match frame::scan(&bytes, at) {
                Scan::Frame {
                    format: Format::Padding,
                    next,
                    ..
                } => at = next,
                Scan::Frame {
                    format,
                    payload,
                    next,
                } => {
                    match read_epoch(format, payload, sealer, &mut scratch) {
                        Some((epoch, events)) => {
                            report.epochs += 1;
                            report.events += events.len() as u64;
                            report.last_epoch = report.last_epoch.max(Epoch(epoch));
                            replay(Epoch(epoch), &events);
                        }
                        // The checksum held, so the bytes are as written: the key is wrong.
                        None if format == Format::Sealed => {
                            return Err(WalError::Key {
                                at: format!("{}@{at}", path.display()),
                            });
                        }
                        None => {
                            report
                                .damaged
                                .push(format!("{}@{at} (undecodable record)", path.display()));
                            ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        }
                    }
                    at = next;
                }
                Scan::Incomplete | Scan::Damaged => match frame::resync(&bytes, at) {
                    // Intact frames follow: this is damage in the middle of the log.
                    Some(next) if frame_follows(&bytes, next) => {
                        report.damaged.push(format!(
                            "{}@{at} ({} bytes)",
                            path.display(),
                            next - at
                        ));
                        ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        tracing::error!(segment = %path.display(), offset = at, bytes = next - at, "damaged write-ahead log record skipped");
                        at = next;
                    }
                    // Nothing intact follows: a torn tail.
                    _ => {
                        let torn = (bytes.len() - at) as u64;
                        if is_last {
                            report.truncated_bytes += torn;
                            if repair {
                                let file = OpenOptions::new().write(true).open(path)?;
                                file.set_len(at as u64)?;
                                file.sync_all()?;
                                ::metrics::counter!(WAL_TRUNCATED_BYTES_TOTAL).increment(torn);
                                tracing::warn!(segment = %path.display(), bytes = torn, "torn write-ahead log tail truncated");
                            }
                        } else {
                            report
                                .damaged
                                .push(format!("{}@{at} ({torn} bytes)", path.display()));
                            ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        }
                        break;
                    }
                },
            }
        }
    }
    Ok(report)
}

fn frame_follows(bytes: &[u8], at: usize) -> bool {
    let mut at = at;
    loop {
        match frame::scan(bytes, at) {
            Scan::Frame { .. } => return true,
            _ => match frame::resync(bytes, at) {
                Some(next) => at = next,
                None => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 4096,
            queue: 64,
            group_bytes: 1 << 20,
            commit_delay: Duration::ZERO,
            commit_siblings: 1,
            sealer: None,
        }
    }

    fn read(dir: &Path) -> Vec<(u64, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        recover(dir, false, None, |epoch, events| {
            out.push((epoch.0, events.iter().map(|e| e.to_vec()).collect()))
        })
        .unwrap();
        out
    }

    #[tokio::test]
    async fn appends_are_durable_numbered_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, recovery) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        assert_eq!(recovery.epochs, 0);
        let mut epochs = Vec::new();
        for i in 0..50u32 {
            let event = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(200));
            epochs.push(wal.append(vec![event.into_bytes()]).await.unwrap());
        }
        assert!(epochs.windows(2).all(|w| w[0] < w[1]));
        assert!(segments(dir.path()).unwrap().len() > 1, "segments rotate");
        drop(wal);
        let mut replayed = 0;
        let (wal, recovery) =
            Wal::open(options(dir.path()), |_, events| replayed += events.len()).unwrap();
        assert_eq!((replayed, recovery.events), (50, 50));
        let next = wal.append(vec![b"{}".to_vec()]).await.unwrap();
        assert!(next > recovery.last_epoch);
        assert!(
            next.0 >= unix_millis() - 60_000,
            "epochs follow the clock: {next:?}"
        );
    }

    #[tokio::test]
    async fn a_tail_torn_at_every_byte_is_truncated_and_nothing_before_it_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        wal.append(vec![b"{\"first\":1}".to_vec()]).await.unwrap();
        wal.append(vec![b"{\"second\":2}".to_vec(), b"{\"third\":3}".to_vec()])
            .await
            .unwrap();
        drop(wal);
        let path = segments(dir.path()).unwrap().pop().unwrap();
        let whole = std::fs::read(&path).unwrap();
        let first_len = match frame::scan(&whole, 0) {
            Scan::Frame { next, .. } => next,
            other => panic!("{other:?}"),
        };
        for cut in first_len..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let mut events = 0;
            let (_, recovery) = Wal::open(options(dir.path()), |_, e| events += e.len()).unwrap();
            assert_eq!(events, 1, "cut at {cut}");
            assert_eq!(recovery.truncated_bytes, (cut - first_len) as u64);
            assert!(recovery.damaged.is_empty());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first_len as u64);
        }
    }

    #[tokio::test]
    async fn damage_in_the_middle_is_reported_and_later_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        for i in 0..3 {
            wal.append(vec![format!("{{\"i\":{i}}}").into_bytes()])
                .await
                .unwrap();
        }
        drop(wal);
        let written: Vec<u64> = read(dir.path()).iter().map(|r| r.0).collect();
        let path = segments(dir.path()).unwrap().pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let Scan::Frame { next, .. } = frame::scan(&bytes, 0) else {
            panic!()
        };
        bytes[next + frame::HEADER_LEN + 2] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let records = read(dir.path());
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            [written[0], written[2]]
        );
        let (_, recovery) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        assert_eq!(recovery.damaged.len(), 1, "{recovery:?}");
        assert_eq!(recovery.truncated_bytes, 0);
    }

    #[tokio::test]
    async fn segments_are_deleted_only_after_every_consumer_passed_them() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        for i in 0..40u32 {
            let event = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(300));
            wal.append(vec![event.into_bytes()]).await.unwrap();
        }
        let last = wal.last_epoch();
        let before = segments(dir.path()).unwrap();
        assert!(before.len() >= 4, "{before:?}");
        let checkpoints = Checkpoints::load(dir.path()).unwrap();
        assert_eq!(checkpoints.register("pipeline").unwrap(), Epoch(0));
        assert_eq!(checkpoints.register("sql").unwrap(), Epoch(0));
        assert_eq!(
            checkpoints.advance("pipeline", last).unwrap(),
            0,
            "sql has not moved"
        );
        let checkpoints = Checkpoints::load(dir.path()).unwrap();
        assert_eq!(
            checkpoints.register("pipeline").unwrap(),
            last,
            "positions persist"
        );
        let second_first = first_epoch(&before[1]).unwrap();
        assert_eq!(
            checkpoints.advance("sql", Epoch(second_first - 1)).unwrap(),
            1
        );
        assert_eq!(checkpoints.advance("sql", last).unwrap(), before.len() - 2);
        let after = segments(dir.path()).unwrap();
        assert_eq!(
            after,
            before[before.len() - 1..],
            "the newest segment stays"
        );
        // What is left still reads and the log goes on.
        drop(wal);
        let (wal, recovery) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        assert_eq!(recovery.last_epoch, last);
        assert!(wal.append(vec![b"{}".to_vec()]).await.unwrap() > last);
    }

    #[tokio::test]
    async fn retention_deletes_segments_older_than_the_horizon_but_never_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        let mut epochs = Vec::new();
        for i in 0..40u32 {
            let event = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(300));
            epochs.push(wal.append(vec![event.into_bytes()]).await.unwrap());
        }
        let before = segments(dir.path()).unwrap();
        assert!(before.len() >= 4);
        let second_first = first_epoch(&before[1]).unwrap();
        assert_eq!(expire(dir.path(), second_first - 1).unwrap(), 0);
        assert_eq!(expire(dir.path(), second_first).unwrap(), 1);
        assert_eq!(expire(dir.path(), u64::MAX).unwrap(), before.len() - 2);
        assert_eq!(segments(dir.path()).unwrap(), before[before.len() - 1..]);
        let kept: Vec<Epoch> = read(dir.path()).iter().map(|r| Epoch(r.0)).collect();
        assert!(!kept.is_empty());
        assert_eq!(
            kept,
            epochs[epochs.len() - kept.len()..],
            "the newest epochs stay"
        );
    }

    #[tokio::test]
    async fn concurrent_appends_share_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let wal = wal.clone();
                tokio::spawn(async move {
                    wal.append(vec![format!("{{\"i\":{i}}}").into_bytes()])
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let records = read(dir.path());
        let events: usize = records.iter().map(|r| r.1.len()).sum();
        assert_eq!(events, 40);
    }

    #[tokio::test]
    async fn a_busy_log_waits_for_more_appends_before_it_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions {
            commit_delay: Duration::from_secs(1),
            commit_siblings: 1,
            ..options(dir.path())
        };
        let (wal, _) = Wal::open(options, |_, _| {}).unwrap();
        let append = |name: &str| {
            let wal = wal.clone();
            let event = format!("{{\"name\":\"{name}\"}}").into_bytes();
            tokio::spawn(async move { wal.append(vec![event]).await.unwrap() })
        };
        // The first group follows no other: it is written at once.
        let first = append("first").await.unwrap();
        // The next one follows a group: it waits, and an append made meanwhile joins it.
        let second = append("second");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let third = append("third");
        let (second, third) = (second.await.unwrap(), third.await.unwrap());
        assert!(second > first);
        assert_eq!(second, third, "one group commit for both");
        let sizes: Vec<usize> = read(dir.path()).iter().map(|r| r.1.len()).collect();
        assert_eq!(sizes, vec![1, 2]);
    }
}
