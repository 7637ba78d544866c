//! Dedup snapshots: the dedup state as of a log epoch, kept on disk so that a restart after
//! the log's older segments were deleted still knows every event it acknowledged.
//!
//! A thread keeps its own copy of the state, fed only from the durable log (never from
//! requests in flight, whose appends may still fail), and writes it every `interval` with the
//! epoch it covers: written beside, synced, renamed over. It is a consumer of the log like the
//! pipeline and the SQL window: a segment is deleted only once a snapshot covers it. On start,
//! the snapshot is read first and the log replayed over it (replaying what the snapshot
//! already holds changes nothing).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dedup::Dedup;
use crate::crypto::Sealer;
use crate::wal::tail::{Follower, Tail};
use crate::wal::{Checkpoints, Epoch, Wal, WalError};

/// The consumer name of the dedup snapshots in the log's checkpoints.
pub const CONSUMER: &str = "dedup";

/// Records one stored event in `dedup`; `false` when the bytes are not a stored event.
pub fn replay(dedup: &mut Dedup, stored: &[u8]) -> bool {
    let Some(keys) = super::stored_keys::read(stored) else {
        return false;
    };
    dedup.check_keys(&keys.event_id, keys.device_id.as_deref(), keys.seq);
    true
}

/// Reads the snapshot at `path` into `dedup`, opening it with `sealer` when the log is
/// encrypted. A missing file is a first start; a damaged one is reported and ignored (the log
/// then rebuilds what it still holds).
pub fn load(path: &Path, sealer: Option<&Sealer>, dedup: &mut Dedup) {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut scratch = Vec::new();
            // A snapshot written before encryption was turned on is plain.
            let plain = sealer
                .and_then(|s| s.open(&bytes, &mut scratch))
                .unwrap_or(&bytes);
            if dedup.decode_into(plain).is_none() {
                tracing::error!(file = %path.display(), "dedup snapshot damaged; ignored (duplicates older than the log's segments may be accepted again)");
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::error!(error = %err, file = %path.display(), "dedup snapshot unreadable; ignored");
        }
    }
}

/// Writes `dedup` as the snapshot at `path`, sealed like the log's records when it is
/// encrypted (device ids are in it). A failed write leaves the previous snapshot, and no
/// partial file behind.
fn save(path: &Path, sealer: Option<&Sealer>, dedup: &Dedup) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("snapshot.tmp");
    let encoded = dedup.encode();
    let bytes = match sealer {
        Some(sealer) => sealer.reseal(&encoded),
        None => encoded,
    };
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Event ids an erasure removed, for the snapshot's copy of the state to drop too.
#[derive(Clone, Default)]
pub struct Forgotten(Arc<Mutex<Vec<u128>>>);

impl Forgotten {
    /// Queues keys (see [`Dedup::id_key`]) for the next snapshot, which is written soon.
    pub fn push(&self, keys: impl IntoIterator<Item = u128>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(keys);
    }

    fn take(&self) -> Vec<u128> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The running snapshot thread.
pub struct Snapshots(Follower);

impl Snapshots {
    /// Starts keeping `dedup` (the state as of `from`, the last epoch the log held on start)
    /// and writing it to `path` every `interval`.
    pub fn start(
        path: PathBuf,
        wal: Wal,
        checkpoints: Arc<Checkpoints>,
        dedup: Dedup,
        from: Epoch,
        forgotten: Forgotten,
        interval: Duration,
    ) -> Result<Self, WalError> {
        checkpoints.register(CONSUMER)?;
        let follower = Follower::spawn("dedup-snapshot", move |stop| {
            let mut keeper = Keeper {
                path,
                tail: Tail::new(wal.dir(), from)
                    .sealed_by(wal.sealer().cloned())
                    .bounded_by(wal.committed()),
                wal,
                checkpoints,
                dedup,
                forgotten,
                saved: None,
            };
            keeper.run(stop, interval);
        })?;
        Ok(Self(follower))
    }

    /// Writes a last snapshot and stops.
    pub fn stop(self) {
        self.0.stop();
    }
}

struct Keeper {
    path: PathBuf,
    wal: Wal,
    tail: Tail,
    checkpoints: Arc<Checkpoints>,
    dedup: Dedup,
    forgotten: Forgotten,
    /// The epoch the last snapshot covers.
    saved: Option<Epoch>,
}

impl Keeper {
    fn run(&mut self, stop: &AtomicBool, interval: Duration) {
        // The state on start is the first snapshot: the log's older segments may go at once.
        self.snapshot();
        let mut next = Instant::now() + interval;
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let read = self.read();
            let forgotten = self.forgotten.take();
            let erased = !forgotten.is_empty();
            if erased {
                self.dedup.forget_ids(&forgotten);
            }
            if stopping || erased || Instant::now() >= next {
                self.snapshot();
                next = Instant::now() + interval;
            }
            if stopping {
                return;
            }
            if read == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Reads what the log made durable since; returns the events read.
    fn read(&mut self) -> usize {
        let durable = self.wal.last_epoch();
        let mut read = 0;
        let dedup = &mut self.dedup;
        if let Err(err) = self.tail.read(durable, 65_536, |_, events| {
            for stored in events {
                replay(dedup, stored);
            }
            read += events.len();
        }) {
            tracing::error!(error = %err, "dedup snapshots cannot read the write-ahead log");
            std::thread::sleep(Duration::from_millis(500));
        }
        read
    }

    fn snapshot(&mut self) {
        let epoch = self.tail.delivered();
        match save(&self.path, self.wal.sealer().map(|s| &**s), &self.dedup) {
            Ok(()) => {
                if self.saved != Some(epoch)
                    && let Err(err) = self.checkpoints.advance(CONSUMER, epoch)
                {
                    tracing::error!(error = %err, "dedup snapshot checkpoint not saved");
                }
                self.saved = Some(epoch);
            }
            Err(err) => {
                tracing::error!(error = %err, "dedup snapshot not written; the log keeps its segments meanwhile");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut dedup = Dedup::new(100, 8);
        assert!(replay(
            &mut dedup,
            br#"{"event_id":"a","device_id":"tab-1","seq":5}"#
        ));
        assert!(replay(
            &mut dedup,
            br#"{"event_id":"b","device_id":"tab-1","seq":3}"#
        ));
        assert!(replay(&mut dedup, br#"{"event_id":"c"}"#));
        assert!(!replay(&mut dedup, b"not json"));
        let path = dir.path().join("dedup.snapshot");
        save(&path, None, &dedup).unwrap();

        let mut loaded = Dedup::new(100, 8);
        load(&path, None, &mut loaded);
        assert_eq!(loaded.encode(), dedup.encode());
        // Seen: seq 5 and 3 of tab-1, id c. Not seen: seq 4 (a gap), id d.
        let seen = |d: &mut Dedup, id: &str, device: Option<&str>, seq: Option<u64>| {
            d.check_keys(id, device, seq) == super::super::dedup::Seen::Duplicate
        };
        assert!(seen(&mut loaded, "x", Some("tab-1"), Some(5)));
        assert!(seen(&mut loaded, "y", Some("tab-1"), Some(3)));
        assert!(seen(&mut loaded, "c", None, None));
        assert!(!seen(&mut loaded, "z", Some("tab-1"), Some(4)));
        assert!(!seen(&mut loaded, "d", None, None));

        // One flipped byte: refused whole, nothing half-read.
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let mut damaged = Dedup::new(100, 8);
        load(&path, None, &mut damaged);
        assert_eq!((damaged.devices(), damaged.ids()), (0, 0));
        // Cut short: refused too.
        assert!(
            Dedup::new(100, 8)
                .decode_into(&dedup.encode()[..20])
                .is_none()
        );
    }

    #[test]
    fn with_an_encrypted_log_the_snapshot_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::new(&crate::crypto::KeyRing::single(1, [9; 32]));
        let mut dedup = Dedup::new(100, 8);
        replay(
            &mut dedup,
            br#"{"event_id":"a","device_id":"tablet-secret","seq":1}"#,
        );
        let path = dir.path().join("dedup.snapshot");
        save(&path, Some(&sealer), &dedup).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(13).any(|w| w == b"tablet-secret"));
        let mut without_key = Dedup::new(100, 8);
        load(&path, None, &mut without_key);
        assert_eq!(without_key.devices(), 0);
        let mut with_key = Dedup::new(100, 8);
        load(&path, Some(&sealer), &mut with_key);
        assert_eq!(with_key.devices(), 1);
    }

    #[test]
    fn forgotten_ids_leave_the_state() {
        let mut dedup = Dedup::new(100, 8);
        replay(&mut dedup, br#"{"event_id":"erased"}"#);
        replay(&mut dedup, br#"{"event_id":"kept"}"#);
        dedup.forget_ids(&[Dedup::id_key("erased")]);
        assert_eq!(dedup.ids(), 1);
        let mut loaded = Dedup::new(100, 8);
        loaded.decode_into(&dedup.encode()).unwrap();
        assert_eq!(loaded.ids(), 1);
    }
}
