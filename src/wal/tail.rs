//! Following the log: a reader that delivers every durable epoch after a starting point, in
//! order, first from the segments already on disk (replay) and then as the writer commits new
//! ones. The log itself is the buffer between ingest and its consumers, so a slow consumer
//! costs disk, not memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::frame::{self, Scan};
use super::{CommittedEnd, Epoch, first_epoch, segments};
use crate::crypto::Sealer;

/// Bytes read from a segment at a time, unless one frame needs more.
const CHUNK: usize = 8 << 20;

/// A position in the log and the reader that moves it forward.
#[derive(Debug)]
pub struct Tail {
    dir: PathBuf,
    segment: Option<PathBuf>,
    offset: u64,
    delivered: Epoch,
    buffer: Vec<u8>,
    sealer: Option<Arc<Sealer>>,
    committed: Option<Arc<CommittedEnd>>,
    scratch: Vec<u8>,
}

impl Tail {
    /// Starts after `delivered`: the first epoch read will be the first one above it.
    pub fn new(dir: &Path, delivered: Epoch) -> Self {
        Self {
            dir: dir.to_path_buf(),
            segment: None,
            offset: 0,
            delivered,
            buffer: Vec::new(),
            sealer: None,
            committed: None,
            scratch: Vec::new(),
        }
    }

    /// Reads the segment being written only as far as it is committed (see `Wal::committed`).
    /// A tail of a live log needs it; one of a closed log does not.
    pub fn bounded_by(mut self, committed: Arc<CommittedEnd>) -> Self {
        self.committed = Some(committed);
        self
    }

    /// Opens sealed records with `sealer` (the log's own, see `Wal::sealer`).
    pub fn sealed_by(mut self, sealer: Option<Arc<Sealer>>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Returns the last epoch delivered.
    pub fn delivered(&self) -> Epoch {
        self.delivered
    }

    /// Delivers, in order, the epochs after the last one delivered and up to `through`
    /// (which must be durable), at most `max_events` events' worth unless a single epoch holds
    /// more. Returns how many epochs were delivered.
    // Long: one pass over the segments, each branch a state a segment can be in (being written, rotated, deleted, damaged).
    pub fn read(
        &mut self,
        through: Epoch,
        max_events: usize,
        mut deliver: impl FnMut(Epoch, &[&[u8]]),
    ) -> std::io::Result<usize> {
        let mut epochs = 0;
        let mut events = 0;
        let mut final_read = false;
        while self.delivered < through && events < max_events {
            let Some(path) = self.current_segment()? else {
                return Ok(epochs);
            };
            let (at_end, capped) = self.fill(&path)?;
            let mut at = 0;
            let mut stop = false;
            // The file ends inside a frame: the writer may be writing it right now.
            let mut unfinished = false;
            while at < self.buffer.len() {
                match frame::scan(&self.buffer, at) {
                    Scan::Frame {
                        format,
                        payload,
                        next,
                    } => {
                        // Damage was reported and counted by recovery when the log opened.
                        if let Some((epoch, batch)) = super::read_epoch(
                            format,
                            payload,
                            self.sealer.as_deref(),
                            &mut self.scratch,
                        ) {
                            if epoch > through.0 {
                                stop = true;
                                break;
                            }
                            if epoch > self.delivered.0 {
                                deliver(Epoch(epoch), &batch);
                                self.delivered = Epoch(epoch);
                                epochs += 1;
                                events += batch.len();
                            }
                        }
                        at = next;
                        if events >= max_events {
                            stop = true;
                            break;
                        }
                    }
                    Scan::Incomplete => {
                        unfinished = at_end;
                        break;
                    }
                    Scan::Damaged => match frame::resync(&self.buffer, at) {
                        Some(next) => at = next,
                        None if at_end => {
                            at = self.buffer.len();
                        }
                        None => break,
                    },
                }
            }
            self.offset += at as u64;
            if stop {
                break;
            }
            if at_end && (at == self.buffer.len() || unfinished) {
                // This segment is read to its end: go on only once a newer one exists. A frame
                // still being written is waited for; once a newer segment exists, this one is
                // final, so it is read once more (whole: it is no longer the one being written)
                // before an unfinished frame is given up as torn.
                match self.next_segment(&path)? {
                    Some(_) if (unfinished || capped) && !final_read => {
                        final_read = true;
                        continue;
                    }
                    Some(next) => {
                        if unfinished {
                            tracing::warn!(segment = %path.display(), "torn frame at the end of a finished write-ahead log segment skipped");
                        }
                        self.segment = Some(next);
                        self.offset = 0;
                        final_read = false;
                    }
                    None => break,
                }
            } else if at == 0 {
                // One frame is larger than a chunk; `fill` reads it whole next time.
                continue;
            }
        }
        Ok(epochs)
    }

    /// Reads the unread rest of `path` (up to a chunk, or one whole frame) into the buffer,
    /// no further than it is committed; returns whether it reaches the end of what may be read,
    /// and whether that end was the committed length rather than the file's.
    fn fill(&mut self, path: &Path) -> std::io::Result<(bool, bool)> {
        let mut file = File::open(path)?;
        let limit = self.committed.as_ref().and_then(|c| c.limit(path));
        let len = match limit {
            Some(committed) => file.metadata()?.len().min(committed),
            None => file.metadata()?.len(),
        };
        let remaining = len.saturating_sub(self.offset) as usize;
        let mut want = remaining.min(CHUNK);
        if remaining >= frame::HEADER_LEN {
            // A frame bigger than a chunk is read whole.
            let mut header = [0u8; frame::HEADER_LEN];
            file.seek(SeekFrom::Start(self.offset))?;
            file.read_exact(&mut header)?;
            if header[..4] == frame::MAGIC {
                let payload = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes"));
                want = want.max((frame::HEADER_LEN + payload as usize).min(remaining));
            }
        }
        self.buffer.clear();
        file.seek(SeekFrom::Start(self.offset))?;
        file.take(want as u64).read_to_end(&mut self.buffer)?;
        Ok((self.buffer.len() == remaining, limit.is_some()))
    }

    /// The segment being read, chosen on first use: the newest one that starts at or before
    /// the first epoch wanted.
    fn current_segment(&mut self) -> std::io::Result<Option<PathBuf>> {
        if let Some(path) = &self.segment {
            if path.exists() {
                return Ok(Some(path.clone()));
            }
            tracing::warn!(segment = %path.display(), "write-ahead log segment removed while being read");
            self.segment = None;
        }
        let all = segments(&self.dir)?;
        let wanted = self.delivered.0 + 1;
        let chosen = all
            .iter()
            .rev()
            .find(|p| first_epoch(p).is_some_and(|first| first <= wanted))
            .or(all.first())
            .cloned();
        self.segment = chosen.clone();
        self.offset = 0;
        Ok(chosen)
    }

    fn next_segment(&self, current: &Path) -> std::io::Result<Option<PathBuf>> {
        Ok(segments(&self.dir)?
            .into_iter()
            .find(|p| p.as_path() > current))
    }
}

/// A thread that follows the log at a lower priority than ingest (the log buffers it) until
/// it is stopped: the SQL window's feeder, the dedup snapshots.
pub struct Follower {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Runs `follow` on a thread named `name`; it returns once the flag it is given is set.
    pub fn spawn(
        name: &str,
        follow: impl FnOnce(&std::sync::atomic::AtomicBool) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::lower_thread_priority();
                follow(&flag);
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the flag and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Wal, WalOptions};
    use super::*;

    fn options(dir: &Path) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 2048,
            queue: 64,
            group_bytes: 1 << 20,
            commit_delay: std::time::Duration::ZERO,
            commit_siblings: 1,
            sealer: None,
        }
    }

    fn collect(tail: &mut Tail, through: Epoch, max: usize) -> Vec<(u64, Vec<String>)> {
        let mut out = Vec::new();
        tail.read(through, max, |epoch, events| {
            out.push((
                epoch.0,
                events
                    .iter()
                    .map(|e| String::from_utf8(e.to_vec()).unwrap())
                    .collect(),
            ))
        })
        .unwrap();
        out
    }

    fn frame_of(epoch: u64, event: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let payload = frame::encode_epoch(epoch, [event.as_bytes()].into_iter());
        frame::encode_frame(&mut out, frame::Format::Plain, &payload);
        out
    }

    #[test]
    fn a_frame_still_being_written_is_waited_for_not_skipped() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join(format!("{:020}.wal", 1));
        let mut file = File::create(&first).unwrap();
        file.write_all(&frame_of(1, "a")).unwrap();
        let second = frame_of(2, "b");
        file.write_all(&second[..second.len() / 2]).unwrap();
        let mut tail = Tail::new(dir.path(), Epoch(0));
        // The writer has made epoch 1 durable and is half way through epoch 2.
        assert_eq!(
            collect(&mut tail, Epoch(2), 100),
            vec![(1, vec!["a".into()])]
        );
        assert_eq!(collect(&mut tail, Epoch(2), 100), vec![]);
        file.write_all(&second[second.len() / 2..]).unwrap();
        assert_eq!(
            collect(&mut tail, Epoch(2), 100),
            vec![(2, vec!["b".into()])]
        );

        // A torn frame at the end of a segment the writer has left is given up.
        file.write_all(&frame_of(3, "torn")[..10]).unwrap();
        let mut next = File::create(dir.path().join(format!("{:020}.wal", 4))).unwrap();
        next.write_all(&frame_of(4, "d")).unwrap();
        assert_eq!(
            collect(&mut tail, Epoch(4), 100),
            vec![(4, vec!["d".into()])]
        );
    }

    #[tokio::test]
    async fn follows_the_writer_across_segments_and_resumes_after_any_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        let mut tail = Tail::new(dir.path(), Epoch(0));
        let mut epochs = Vec::new();
        let mut seen = Vec::new();
        for i in 0..60u32 {
            let event = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(100));
            epochs.push(wal.append(vec![event.into_bytes()]).await.unwrap());
            if i % 7 == 0 {
                seen.extend(collect(&mut tail, wal.last_epoch(), usize::MAX));
            }
        }
        seen.extend(collect(&mut tail, wal.last_epoch(), usize::MAX));
        assert!(segments(dir.path()).unwrap().len() > 3);
        assert_eq!(
            seen.iter().map(|s| Epoch(s.0)).collect::<Vec<_>>(),
            epochs,
            "every epoch once, in order"
        );
        assert!(seen[59].1[0].starts_with("{\"n\":59,"));

        // Nothing past `through` is delivered; a bounded read stops early and goes on later.
        let mut from_start = Tail::new(dir.path(), Epoch(0));
        assert_eq!(collect(&mut from_start, epochs[9], usize::MAX).len(), 10);
        assert_eq!(collect(&mut from_start, wal.last_epoch(), 5).len(), 5);
        assert_eq!(from_start.delivered(), epochs[14]);
        // Starting after an epoch in the middle of a segment skips what came before.
        let mut resumed = Tail::new(dir.path(), epochs[30]);
        let rest = collect(&mut resumed, wal.last_epoch(), usize::MAX);
        assert_eq!(Epoch(rest[0].0), epochs[31]);
        assert_eq!(rest.len(), 29);
    }

    /// A write that failed (a full disk) leaves bytes past the committed end until the writer
    /// cuts them off; read while the file changes they can look like damage. A tail bounded by
    /// the committed end never reads them, so it neither skips them nor the record the writer
    /// puts in their place.
    #[tokio::test]
    async fn a_failed_write_being_cut_off_is_never_read() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        let first = wal.append(vec![b"{\"n\":1}".to_vec()]).await.unwrap();
        let path = segments(dir.path()).unwrap().pop().unwrap();
        let committed = std::fs::metadata(&path).unwrap().len();
        // What a failed write leaves, as a reader may see it mid-change: a whole frame whose
        // bytes do not check out.
        let mut junk = frame_of(first.0 + 1, "half written");
        let last = junk.len() - 1;
        junk[last] ^= 0xff;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&junk)
            .unwrap();
        let mut bounded = Tail::new(dir.path(), Epoch(0)).bounded_by(wal.committed());
        let mut unbounded = Tail::new(dir.path(), Epoch(0));
        assert_eq!(collect(&mut bounded, first, 100).len(), 1);
        assert_eq!(collect(&mut unbounded, first, 100).len(), 1);
        // The writer cuts the junk off and commits the next record in its place.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(committed)
            .unwrap();
        let second = wal.append(vec![b"{\"n\":2}".to_vec()]).await.unwrap();
        assert_eq!(
            collect(&mut bounded, second, 100),
            vec![(second.0, vec!["{\"n\":2}".to_owned()])]
        );
        // Unbounded, the junk was taken for damage and skipped, and the new record with it.
        assert_eq!(collect(&mut unbounded, second, 100), vec![]);
    }

    #[tokio::test]
    async fn a_frame_larger_than_a_chunk_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(options(dir.path()), |_, _| {}).unwrap();
        let big = vec![b'x'; CHUNK + 1000];
        let first = wal.append(vec![big.clone()]).await.unwrap();
        let second = wal.append(vec![b"{}".to_vec()]).await.unwrap();
        let mut tail = Tail::new(dir.path(), Epoch(0));
        let mut sizes = Vec::new();
        tail.read(second, usize::MAX, |epoch, events| {
            sizes.push((epoch, events[0].len()))
        })
        .unwrap();
        assert_eq!(sizes, [(first, big.len()), (second, 2)]);
    }
}
