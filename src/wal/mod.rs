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

mod checkpoints;
pub mod erase;
pub mod frame;
pub mod metrics;
mod recovery;
mod segments;
pub mod tail;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use self::metrics::WAL_QUEUE_DEPTH;
use crate::crypto::Sealer;
pub use checkpoints::Checkpoints;
pub use frame::Batch;
pub use recovery::{read_epoch, recover};
use segments::{REWRITING, SEGMENT_FILES, Segment, first_epoch};
pub use segments::{expire, segments};
use writer::Writer;

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

#[cfg(test)]
mod tests {
    use super::frame::Scan;
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
