//! Erasure in the log: rewriting segments without the events of an erased subject.
//!
//! Input: the segment files (the caller rotates the log first, so that none is being
//! written) and a choice of events to drop. Output: the same files, replaced atomically
//! (written beside, synced, renamed), with every epoch still in its place.
//!
//! Invariants: an epoch keeps its number and its position: a shortened record is padded back
//! to its old length with a [`Format::Padding`] frame, so the readers that follow the log by
//! file offset (the pipeline, the SQL window) never lose their place. A resealed record gets a
//! fresh random nonce. Bytes that are not an intact record are copied as they are.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::frame::{self, Format, Scan};
use super::{REWRITING, SEGMENT_FILES, WalError, read_epoch, segments};
use crate::crypto::Sealer;

/// What an erasure removed from the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Erased {
    /// Events dropped.
    pub events: u64,
    /// Segment files rewritten.
    pub segments: usize,
}

/// Deletes segment rewrites a crash left behind (they may hold erased events).
pub(super) fn remove_leftovers(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == REWRITING) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Rewrites every segment of the log in `dir` that holds an event `drops` selects, without
/// those events; `removed` sees each one dropped. The caller must have rotated the log
/// ([`super::Wal::rotate`]): the segment being written is never safe to replace, and one
/// created after the rotation is not touched.
pub fn rewrite(
    dir: &Path,
    sealer: Option<&Sealer>,
    mut drops: impl FnMut(&[u8]) -> bool,
    mut removed: impl FnMut(&[u8]),
) -> Result<Erased, WalError> {
    let mut erased = Erased::default();
    let mut scratch = Vec::new();
    for path in segments(dir)? {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            // Deleted by a checkpoint meanwhile: nothing left to erase there.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err.into()),
        };
        let mut out = Vec::with_capacity(bytes.len());
        let mut dropped = 0;
        let mut at = 0;
        while at < bytes.len() {
            let (end, kept) = match frame::scan(&bytes, at) {
                Scan::Frame {
                    format,
                    payload,
                    next,
                } => match read_epoch(format, payload, sealer, &mut scratch) {
                    Some((epoch, events)) if events.iter().any(|e| drops(e)) => {
                        let kept: Vec<&[u8]> =
                            events.iter().copied().filter(|e| !drops(e)).collect();
                        for event in events.iter().filter(|e| drops(e)) {
                            removed(event);
                        }
                        dropped += (events.len() - kept.len()) as u64;
                        let payload = frame::encode_epoch(epoch, kept.into_iter());
                        let mut record = Vec::with_capacity(next - at);
                        match format {
                            Format::Sealed => frame::encode_frame(
                                &mut record,
                                Format::Sealed,
                                &sealer.expect("it opened").reseal(&payload),
                            ),
                            _ => frame::encode_frame(&mut record, Format::Plain, &payload),
                        }
                        pad(&mut record, next - at, &path, at)?;
                        (next, Some(record))
                    }
                    _ => (next, None),
                },
                Scan::Incomplete | Scan::Damaged => {
                    (frame::resync(&bytes, at).unwrap_or(bytes.len()), None)
                }
            };
            match kept {
                Some(record) => out.extend_from_slice(&record),
                None => out.extend_from_slice(&bytes[at..end]),
            }
            at = end;
        }
        if dropped > 0 {
            replace(&path, &out)?;
            erased.events += dropped;
            erased.segments += 1;
        }
    }
    Ok(erased)
}

/// Pads `record` with a filler frame up to `len` bytes.
fn pad(record: &mut Vec<u8>, len: usize, path: &Path, at: usize) -> Result<(), WalError> {
    let gap = len - record.len();
    if gap == 0 {
        return Ok(());
    }
    // A dropped event takes its 4-byte length and its JSON with it, always more than a
    // frame header.
    if gap < frame::HEADER_LEN {
        return Err(WalError::Io(std::io::Error::other(format!(
            "{}@{at}: a rewritten record cannot be padded ({gap} bytes)",
            path.display()
        ))));
    }
    frame::encode_frame(record, Format::Padding, &vec![0; gap - frame::HEADER_LEN]);
    Ok(())
}

/// Replaces `path` by `bytes`, atomically and durably, unless it was deleted meanwhile.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), WalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = path.with_extension(REWRITING);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    let _files = SEGMENT_FILES.lock().unwrap_or_else(|p| p.into_inner());
    if path.exists() {
        std::fs::rename(&tmp, path)?;
    } else {
        std::fs::remove_file(&tmp)?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tail::Tail;
    use super::super::{Epoch, Wal, WalOptions, recover};
    use super::*;
    use crate::crypto::KeyRing;
    use std::sync::Arc;

    fn event(subject: &str, n: u32) -> Vec<u8> {
        format!(r#"{{"subject":"{subject}","n":{n}}}"#).into_bytes()
    }

    fn read_all(dir: &Path, sealer: Option<&Sealer>) -> Vec<(u64, Vec<String>)> {
        let mut out = Vec::new();
        let recovery = recover(dir, false, sealer, |epoch, events| {
            out.push((
                epoch.0,
                events
                    .iter()
                    .map(|e| String::from_utf8(e.to_vec()).unwrap())
                    .collect(),
            ))
        })
        .unwrap();
        assert!(recovery.damaged.is_empty(), "{recovery:?}");
        out
    }

    #[tokio::test]
    async fn erased_events_leave_every_segment_and_everything_else_stays_in_place() {
        for sealed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let sealer = sealed.then(|| Arc::new(Sealer::new(&KeyRing::single(1, [7; 32]))));
            let options = WalOptions {
                dir: dir.path().to_path_buf(),
                segment_bytes: 1024,
                queue: 64,
                group_bytes: 1 << 20,
                commit_delay: std::time::Duration::ZERO,
                commit_siblings: 1,
                sealer: sealer.clone(),
            };
            let (wal, _) = Wal::open(options.clone(), |_, _| {}).unwrap();
            let mut epochs = Vec::new();
            for n in 0..30 {
                let mut batch = vec![event("keep", n)];
                if n % 3 == 0 {
                    batch.push(event("gone", n));
                }
                if n % 10 == 0 {
                    batch = vec![event("gone", n)];
                }
                epochs.push(wal.append(batch).await.unwrap());
            }
            let before = read_all(dir.path(), sealer.as_deref());
            // A reader in the middle of the log keeps its place across the rewrite.
            let mut tail = Tail::new(dir.path(), Epoch(0)).sealed_by(sealer.clone());
            let mut followed = Vec::new();
            tail.read(epochs[14], usize::MAX, |e, _| followed.push(e))
                .unwrap();
            wal.rotate().await.unwrap();
            let sizes: Vec<u64> = segments(dir.path())
                .unwrap()
                .iter()
                .map(|p| std::fs::metadata(p).unwrap().len())
                .collect();
            let mut seen = Vec::new();
            let erased = rewrite(
                dir.path(),
                sealer.as_deref(),
                |e| e.windows(6).any(|w| w == b"\"gone\""),
                |e| seen.push(String::from_utf8(e.to_vec()).unwrap()),
            )
            .unwrap();
            let expected_gone = (0..30).filter(|n| n % 3 == 0 || n % 10 == 0).count();
            assert_eq!(erased.events as usize, expected_gone, "sealed {sealed}");
            assert_eq!(seen.len(), expected_gone);
            assert!(erased.segments > 1);
            let after = read_all(dir.path(), sealer.as_deref());
            assert_eq!(
                after.iter().map(|r| r.0).collect::<Vec<_>>(),
                before.iter().map(|r| r.0).collect::<Vec<_>>(),
                "every epoch stays, emptied ones too"
            );
            for ((_, old), (_, new)) in before.iter().zip(&after) {
                let kept: Vec<&String> = old.iter().filter(|e| e.contains("keep")).collect();
                assert_eq!(new.iter().collect::<Vec<_>>(), kept);
            }
            let resized: Vec<u64> = segments(dir.path())
                .unwrap()
                .iter()
                .map(|p| std::fs::metadata(p).unwrap().len())
                .collect();
            assert_eq!(resized, sizes, "positions do not move");
            for path in segments(dir.path()).unwrap() {
                let bytes = std::fs::read(path).unwrap();
                assert!(!bytes.windows(4).any(|w| w == b"gone"), "no trace in clear");
            }
            tail.read(Epoch(u64::MAX), usize::MAX, |e, _| followed.push(e))
                .unwrap();
            assert_eq!(followed, epochs, "the reader went on where it was");
            // The log goes on after the rewrite, in a new segment, and reopens.
            let next = wal.append(vec![event("keep", 99)]).await.unwrap();
            drop(wal);
            let (_, recovery) = Wal::open(options, |_, _| {}).unwrap();
            assert_eq!(recovery.last_epoch, next);
            assert!(recovery.damaged.is_empty());
        }
    }

    #[test]
    fn a_rewrite_left_by_a_crash_is_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(format!("{:020}.{REWRITING}", 5));
        std::fs::write(&leftover, b"erased data").unwrap();
        remove_leftovers(dir.path()).unwrap();
        assert!(!leftover.exists());
    }
}
