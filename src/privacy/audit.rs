//! The audit log: who did what, when, for every SQL, experiment-result, privacy and admin
//! action (the HTTP layer's `http::audit` records them). One JSON line per action in `<data_dir>/audit/audit.log`, appended as the action is
//! answered and fsynced by the upkeep task (every few seconds) and at shutdown.
//!
//! Entries name callers by their token's configured name and subjects by pseudonym only; SQL
//! text is kept (capped), since the tables it can read hold no raw ids.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::metrics::AUDIT_WRITE_ERRORS_TOTAL;
use crate::events::time::format_rfc3339;

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

/// The append-only audit file.
pub struct AuditLog {
    path: PathBuf,
    writer: Mutex<Writer>,
}

impl AuditLog {
    /// Opens (or creates) `<dir>/audit.log` for appending.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("audit.log");
        let file = OpenOptions::new().append(true).create(true).open(&path)?;
        Ok(Self {
            path,
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
        let mut line = serde_json::to_vec(&entry).expect("entries serialize");
        line.push(b'\n');
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match writer.file.write_all(&line) {
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
    fn entries_are_json_lines_with_who_what_and_when() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
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
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["who"], "team");
        assert_eq!(lines[0]["role"], "analyst");
        assert_eq!(lines[0]["action"], "sql.adhoc");
        assert_eq!(lines[0]["detail"], "SELECT 1");
        assert_eq!(lines[0]["status"], 200);
        assert!(lines[0]["at"].as_str().unwrap().ends_with('Z'));
        assert!(lines[1]["detail"].as_str().unwrap().len() <= MAX_DETAIL);
    }
}
