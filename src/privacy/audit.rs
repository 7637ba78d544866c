//! The audit log: who did what, when, for every SQL, experiment-result, privacy and admin
//! action and every refused token (the HTTP layer's `http::audit` records them). One JSON
//! entry per action in `<data_dir>/audit/audit.sealed`, each sealed with AES-256-GCM under
//! the data keys in a checksummed frame, appended as the action is answered and fsynced by
//! the upkeep task (every few seconds) and at shutdown. `flagstream audit` prints it; entries
//! an older version wrote in clear (`audit.log`, JSON lines) are read too.
//!
//! Entries name callers by their token's configured name (signed-in people by
//! `<role>:<reference>`) and subjects by reference only; SQL text is kept (capped), since the
//! tables it can read hold no raw ids.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::metrics::AUDIT_WRITE_ERRORS_TOTAL;
use crate::crypto::Sealer;
use crate::events::time::format_rfc3339;
use crate::wal::frame::{Format, Scan, encode_frame, scan};

/// The longest detail kept per entry, in bytes.
const MAX_DETAIL: usize = 4096;

/// One action.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    at: String,
    who: &'a str,
    role: &'a str,
    action: &'a str,
    detail: &'a str,
    status: u16,
}

struct Writer {
    file: File,
    dirty: bool,
}

/// The file of sealed entries.
const SEALED: &str = "audit.sealed";
/// The file an older version wrote entries to in clear.
const CLEAR: &str = "audit.log";

/// The append-only audit file.
pub struct AuditLog {
    path: PathBuf,
    sealer: Arc<Sealer>,
    writer: Mutex<Writer>,
}

/// Why the audit log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditReadError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An entry is damaged or does not open with the data keys.
    #[error("{path}: the entry at byte {offset} is damaged or does not open with the data keys")]
    Entry {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: usize,
    },
}

impl AuditLog {
    /// Opens (or creates) `<dir>/audit.sealed` for appending; entries are sealed by `sealer`.
    pub fn open(dir: &Path, sealer: Arc<Sealer>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SEALED);
        let file = OpenOptions::new().append(true).create(true).open(&path)?;
        Ok(Self {
            path,
            sealer,
            writer: Mutex::new(Writer { file, dirty: false }),
        })
    }

    /// Records that `who` did `action` (with `detail`) at `at_ms`, answered with `status`. A
    /// failed write is logged and counted; it does not fail the action.
    pub fn append(
        &self,
        at_ms: i64,
        who: &str,
        role: &str,
        action: &str,
        detail: &str,
        status: u16,
    ) {
        let detail = crate::privacy::erasure::redact(detail);
        let entry = Entry {
            at: format_rfc3339(at_ms),
            who,
            role,
            action,
            detail: cap(&detail),
            status,
        };
        let json = serde_json::to_vec(&entry).expect("entries serialize");
        let mut frame = Vec::with_capacity(json.len() + 48);
        encode_frame(&mut frame, Format::Sealed, &self.sealer.reseal(&json));
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match writer.file.write_all(&frame) {
            Ok(()) => writer.dirty = true,
            Err(err) => {
                metrics::counter!(AUDIT_WRITE_ERRORS_TOTAL).increment(1);
                tracing::warn!(path = %self.path.display(), error = %err, action, "audit entry not written");
            }
        }
    }

    /// Makes every recorded entry durable. Blocks on the disk.
    pub fn sync(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !writer.dirty {
            return;
        }
        match writer.file.sync_data() {
            Ok(()) => writer.dirty = false,
            Err(err) => {
                metrics::counter!(AUDIT_WRITE_ERRORS_TOTAL).increment(1);
                tracing::warn!(path = %self.path.display(), error = %err, "audit log not synced");
            }
        }
    }
}

/// Every entry of the audit log in `dir`, oldest first: those an older version wrote in clear,
/// then the sealed ones (a torn entry at the end, from a crash mid-write, is left out).
pub fn read_entries(dir: &Path, sealer: &Sealer) -> Result<Vec<serde_json::Value>, AuditReadError> {
    let read = |name: &str| {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok((path, Vec::new())),
            Err(source) => Err(AuditReadError::Io { path, source }),
        }
    };
    let mut entries = Vec::new();
    let (path, clear) = read(CLEAR)?;
    let mut offset = 0;
    for line in clear.split(|b| *b == b'\n') {
        if !line.is_empty() {
            let entry = serde_json::from_slice(line).map_err(|_| AuditReadError::Entry {
                path: path.clone(),
                offset,
            })?;
            entries.push(entry);
        }
        offset += line.len() + 1;
    }
    let (path, sealed) = read(SEALED)?;
    let mut at = 0;
    let mut scratch = Vec::new();
    while at < sealed.len() {
        let damaged = || AuditReadError::Entry {
            path: path.clone(),
            offset: at,
        };
        match scan(&sealed, at) {
            Scan::Frame { payload, next, .. } => {
                let json = sealer.open(payload, &mut scratch).ok_or_else(damaged)?;
                entries.push(serde_json::from_slice(json).map_err(|_| damaged())?);
                at = next;
            }
            Scan::Incomplete => break,
            Scan::Damaged => return Err(damaged()),
        }
    }
    Ok(entries)
}

/// `text` cut to at most [`MAX_DETAIL`] bytes, on a character boundary.
fn cap(text: &str) -> &str {
    if text.len() <= MAX_DETAIL {
        return text;
    }
    let mut end = MAX_DETAIL;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_sealed_with_who_what_and_when() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Arc::new(Sealer::new(&crate::crypto::KeyRing::single(1, [4; 32])));
        // An entry an older version wrote in clear.
        std::fs::write(
            dir.path().join(CLEAR),
            "{\"at\":\"2026-01-01T00:00:00.000Z\",\"who\":\"old\"}\n",
        )
        .unwrap();
        let log = AuditLog::open(dir.path(), sealer.clone()).unwrap();
        log.append(
            1_764_000_000_000,
            "team",
            "analyst",
            "sql.adhoc",
            "SELECT 1",
            200,
        );
        log.append(
            1_764_000_000_000,
            "team",
            "analyst",
            "sql.adhoc",
            &"é".repeat(5000),
            400,
        );
        log.sync();
        let bytes = std::fs::read(dir.path().join(SEALED)).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"SELECT 1"),
            "entries are sealed"
        );
        let mut lines = read_entries(dir.path(), &sealer).unwrap();
        assert_eq!(lines.remove(0)["who"], "old", "clear entries come first");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["who"], "team");
        assert_eq!(lines[0]["role"], "analyst");
        assert_eq!(lines[0]["action"], "sql.adhoc");
        assert_eq!(lines[0]["detail"], "SELECT 1");
        assert_eq!(lines[0]["status"], 200);
        assert!(lines[0]["at"].as_str().unwrap().ends_with('Z'));
        assert!(lines[1]["detail"].as_str().unwrap().len() <= MAX_DETAIL);
        let other = Sealer::new(&crate::crypto::KeyRing::single(2, [5; 32]));
        assert!(
            read_entries(dir.path(), &other).is_err(),
            "without the key nothing is read"
        );
    }
}
