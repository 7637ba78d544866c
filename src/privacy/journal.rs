//! An append-only journal of JSON records in one file: each record a checksummed frame (the
//! write-ahead log's framing), fsynced before `append` returns, replayed by `open`. Records
//! are sealed with AES-256-GCM under the data keys (they name children and guardians by
//! pseudonym); records written in clear by an older version stay readable, and a record
//! whose key version is missing stops the open (it must not be skipped).
//!
//! A torn record at the end (a crash mid-write, never acknowledged) is cut off at open. A
//! damaged record anywhere else is an error: the journals hold decisions (consent, data-subject
//! requests) whose loss must be seen by an operator, not skipped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::Sealer;
use crate::wal::frame::{Format, Scan, encode_frame, scan};

/// Why a journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record before the end is damaged.
    #[error(
        "{path} is damaged at byte {offset}; restore it from a backup (its records must not be lost silently)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: usize,
    },
    /// An earlier write failed and could not be undone; no more writes are taken.
    #[error("{0} failed earlier and takes no more writes until a restart")]
    Failed(PathBuf),
    /// A sealed record does not open: its data key is not in the ring (or it was altered).
    #[error(
        "{path}: the record at byte {offset} does not open with the data keys (privacy.data_key_file); restore the key it was sealed with"
    )]
    Sealed {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: usize,
    },
}

/// An open journal of records of type `T`. Not synchronized: wrap it in a mutex to share it.
pub struct Journal<T> {
    path: PathBuf,
    sealer: Arc<Sealer>,
    file: File,
    len: u64,
    failed: bool,
    _records: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens (or creates) the journal at `path` and returns it with every record it holds,
    /// in order; new records are sealed by `sealer`.
    pub fn open(path: &Path, sealer: Arc<Sealer>) -> Result<(Self, Vec<T>), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let bytes = std::fs::read(path).map_err(io)?;
        let mut records = Vec::new();
        let mut at = 0;
        let mut scratch = Vec::new();
        while at < bytes.len() {
            match scan(&bytes, at) {
                Scan::Frame {
                    format,
                    payload,
                    next,
                } => {
                    let plain = match format {
                        Format::Sealed => sealer.open(payload, &mut scratch).ok_or_else(|| {
                            JournalError::Sealed {
                                path: path.to_path_buf(),
                                offset: at,
                            }
                        })?,
                        _ => payload,
                    };
                    let record =
                        serde_json::from_slice(plain).map_err(|_| JournalError::Damaged {
                            path: path.to_path_buf(),
                            offset: at,
                        })?;
                    records.push(record);
                    at = next;
                }
                Scan::Incomplete => {
                    tracing::warn!(path = %path.display(), bytes = bytes.len() - at, "cutting a torn record off a journal");
                    file.set_len(at as u64).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    break;
                }
                Scan::Damaged => {
                    return Err(JournalError::Damaged {
                        path: path.to_path_buf(),
                        offset: at,
                    });
                }
            }
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        let journal = Self {
            path: path.to_path_buf(),
            sealer,
            file,
            len: at as u64,
            failed: false,
            _records: PhantomData,
        };
        Ok((journal, records))
    }

    /// Appends `record` and returns once it is durable. A failed write is undone (the file
    /// is cut back), so later records never follow damage.
    pub fn append(&mut self, record: &T) -> Result<(), JournalError> {
        if self.failed {
            return Err(JournalError::Failed(self.path.clone()));
        }
        let payload = self.sealed(record);
        let mut frame = Vec::with_capacity(payload.len() + 16);
        encode_frame(&mut frame, Format::Sealed, &payload);
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.failed = true;
            }
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += frame.len() as u64;
        Ok(())
    }

    /// A record's JSON, sealed under the newest data key with a random nonce.
    fn sealed(&self, record: &T) -> Vec<u8> {
        let payload = serde_json::to_vec(record).expect("records serialize");
        self.sealer.reseal(&payload)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the whole journal by `records` (a compaction that drops what must not be kept
    /// any more): written beside, synced, then renamed over, so a crash leaves either the old
    /// journal or the new one.
    pub fn rewrite(&mut self, records: &[T]) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        for record in records {
            encode_frame(&mut bytes, Format::Sealed, &self.sealed(record));
        }
        let tmp = self.path.with_extension("rewrite");
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        self.len = bytes.len() as u64;
        self.failed = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Arc<Sealer> {
        Arc::new(Sealer::new(&crate::crypto::KeyRing::single(1, [9; 32])))
    }

    #[test]
    fn records_are_sealed_and_older_clear_records_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        // A record in clear, as an older version wrote it.
        let mut old = Vec::new();
        encode_frame(&mut old, Format::Plain, br#""child-in-clear""#);
        std::fs::write(&path, &old).unwrap();
        {
            let (mut journal, records) = Journal::<String>::open(&path, sealer()).unwrap();
            assert_eq!(records, ["child-in-clear"]);
            journal.append(&"p1_secret-pseudonym".to_owned()).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(6).any(|w| w == b"secret"),
            "appended records are sealed"
        );
        let (_, records) = Journal::<String>::open(&path, sealer()).unwrap();
        assert_eq!(records, ["child-in-clear", "p1_secret-pseudonym"]);
        let other_key = Arc::new(Sealer::new(&crate::crypto::KeyRing::single(2, [7; 32])));
        let err = Journal::<String>::open(&path, other_key)
            .err()
            .expect("a record whose key is missing stops the open");
        assert!(err.to_string().contains("data keys"), "{err}");
    }

    #[test]
    fn a_key_rotation_keeps_older_records_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let old = crate::crypto::KeyRing::single(1, [9; 32]);
        let sealer = Arc::new(Sealer::new(&old));
        let (mut journal, _) = Journal::<String>::open(&path, sealer.clone()).unwrap();
        journal.append(&"before".to_owned()).unwrap();
        let rotated = crate::crypto::KeyRing::parse(&format!(
            "1 {}\n2 {}\n",
            crate::crypto::to_hex(&[9; 32]),
            crate::crypto::to_hex(&[8; 32])
        ))
        .unwrap();
        sealer.rotate(&rotated);
        journal.append(&"after".to_owned()).unwrap();
        drop(journal);
        let (_, records) = Journal::<String>::open(&path, Arc::new(Sealer::new(&rotated))).unwrap();
        assert_eq!(records, ["before", "after"]);
        let err = Journal::<String>::open(&path, Arc::new(Sealer::new(&old)))
            .err()
            .expect("the newer record needs the newer key");
        assert!(err.to_string().contains("does not open"), "{err}");
    }

    #[test]
    fn records_survive_a_reopen_a_torn_tail_is_cut_and_damage_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("journal");
        {
            let (mut journal, records) = Journal::<String>::open(&path, sealer()).unwrap();
            assert!(records.is_empty());
            for text in ["one", "two", "three"] {
                journal.append(&text.to_owned()).unwrap();
            }
        }
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&whole[..7]);
        std::fs::write(&path, &torn).unwrap();
        {
            let (mut journal, records) = Journal::<String>::open(&path, sealer()).unwrap();
            assert_eq!(records, ["one", "two", "three"]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64);
            journal.append(&"four".to_owned()).unwrap();
        }
        let (mut journal, records) = Journal::<String>::open(&path, sealer()).unwrap();
        assert_eq!(records.len(), 4);
        // A compaction replaces everything; appends go on after it.
        journal
            .rewrite(&["one".to_owned(), "FOUR".to_owned()])
            .unwrap();
        journal.append(&"five".to_owned()).unwrap();
        drop(journal);
        let (_, records) = Journal::<String>::open(&path, sealer()).unwrap();
        assert_eq!(records, ["one", "FOUR", "five"]);
        assert!(
            !std::fs::read(&path)
                .unwrap()
                .windows(3)
                .any(|w| w == b"two")
        );
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[15] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let err = Journal::<String>::open(&path, sealer())
            .err()
            .expect("damage is refused");
        assert!(err.to_string().contains("restore"), "{err}");
    }
}
