//! The log's segment files: naming (`<first epoch, 20 digits>.wal`), listing, opening the
//! last one for appending, creating the next one, and retention.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Held while a segment file is deleted or replaced, so that an erasure never brings back a
/// segment the checkpoints just deleted.
pub(super) static SEGMENT_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The suffix of a segment being rewritten by an erasure; one left by a crash is deleted.
pub(super) const REWRITING: &str = "erasing";

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
pub(super) fn first_epoch(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

pub(super) struct Segment {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) len: u64,
}

impl Segment {
    fn path(dir: &Path, first_epoch: u64) -> PathBuf {
        dir.join(format!("{first_epoch:020}.wal"))
    }

    pub(super) fn open_last(dir: &Path) -> std::io::Result<Option<Self>> {
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

    pub(super) fn create(dir: &Path, first_epoch: u64) -> std::io::Result<Self> {
        let path = Self::path(dir, first_epoch);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // Make the new file's name durable too.
        File::open(dir)?.sync_all()?;
        Ok(Self { file, path, len: 0 })
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
