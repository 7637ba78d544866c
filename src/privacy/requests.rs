//! Data-subject requests: a family asks what is held about a child (access) or asks for it
//! to be erased. Requests are journaled (`<data_dir>/privacy/requests`) before they are
//! acknowledged, carry a due date one calendar month ahead, and are worked off in the
//! background; an access request produces an NDJSON export to download.
//!
//! Subjects are kept as pseudonyms: under every pepper version when the request names a raw
//! id, so that events recorded before a pepper rotation are found too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::erasure::{is_reference, reference};
use super::journal::{Journal, JournalError};
use super::ledger::{ConsentLedger, is_pseudonym};
use super::pseudonym::Pepper;
use crate::crypto::{KeyRing, Sealer};
use crate::events::schema::EXPOSURE_TYPE;
use crate::events::time::{format_rfc3339, parse_rfc3339};

/// What a family asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// A copy of everything held about the child.
    Access,
    /// Erasure of everything that identifies the child.
    Erasure,
}

impl RequestKind {
    /// The kind's name in requests and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Access => "access",
            RequestKind::Erasure => "erasure",
        }
    }
}

/// One entry of the requests journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum RequestRecord {
    /// A request was received.
    Received {
        /// Its id.
        id: String,
        /// Access or erasure.
        kind: RequestKind,
        /// The child's pseudonyms, newest pepper first.
        subjects: Vec<String>,
        /// When it was received (ms since the Unix epoch).
        received_at: i64,
        /// When it must be answered.
        due: i64,
        /// Who filed it, when a signed-in guardian or school did: the reference of their
        /// pseudonym (never their identity), so they can list their own requests.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requester: Option<String>,
    },
    /// A request was carried out.
    Completed {
        /// Its id.
        id: String,
        /// When.
        at: i64,
        /// Events found (access) or removed (erasure).
        events: u64,
    },
    /// A request could not be carried out; it stays to be retried after a restart.
    Failed {
        /// Its id.
        id: String,
        /// When.
        at: i64,
        /// Why.
        reason: String,
    },
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Received, not carried out yet.
    Pending,
    /// Carried out.
    Completed,
    /// The last attempt failed.
    Failed,
}

/// A request and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Its id.
    pub id: String,
    /// Access or erasure.
    pub kind: RequestKind,
    /// The child's pseudonyms, newest pepper first.
    pub subjects: Vec<String>,
    /// When it was received.
    pub received_at: i64,
    /// When it must be answered.
    pub due: i64,
    /// Where it stands.
    pub status: Status,
    /// When it was carried out or last failed.
    pub updated_at: Option<i64>,
    /// Events found or removed, once completed.
    pub events: Option<u64>,
    /// Why the last attempt failed.
    pub reason: Option<String>,
    /// The reference of the signed-in person who filed it, if one did.
    pub requester: Option<String>,
}

impl Request {
    /// Returns whether this is an access request whose subject was erased since (its export
    /// is gone with the subject's data).
    pub fn erased(&self) -> bool {
        self.kind == RequestKind::Access && self.subjects.iter().all(|s| is_reference(s))
    }

    /// The journal records that rebuild this request as it stands.
    fn records(&self) -> Vec<RequestRecord> {
        let mut records = vec![RequestRecord::Received {
            id: self.id.clone(),
            kind: self.kind,
            subjects: self.subjects.clone(),
            received_at: self.received_at,
            due: self.due,
            requester: self.requester.clone(),
        }];
        let at = self.updated_at.unwrap_or(self.received_at);
        match self.status {
            Status::Pending => {}
            Status::Completed => records.push(RequestRecord::Completed {
                id: self.id.clone(),
                at,
                events: self.events.unwrap_or(0),
            }),
            Status::Failed => records.push(RequestRecord::Failed {
                id: self.id.clone(),
                at,
                reason: self.reason.clone().unwrap_or_default(),
            }),
        }
        records
    }

    fn apply(requests: &mut BTreeMap<String, Request>, record: RequestRecord) {
        match record {
            RequestRecord::Received {
                id,
                kind,
                subjects,
                received_at,
                due,
                requester,
            } => {
                let request = Request {
                    id: id.clone(),
                    kind,
                    subjects,
                    received_at,
                    due,
                    status: Status::Pending,
                    updated_at: None,
                    events: None,
                    reason: None,
                    requester,
                };
                requests.insert(id, request);
            }
            RequestRecord::Completed { id, at, events } => {
                if let Some(request) = requests.get_mut(&id) {
                    request.status = Status::Completed;
                    request.updated_at = Some(at);
                    request.events = Some(events);
                    request.reason = None;
                }
            }
            RequestRecord::Failed { id, at, reason } => {
                if let Some(request) = requests.get_mut(&id) {
                    request.status = Status::Failed;
                    request.updated_at = Some(at);
                    request.reason = Some(reason);
                }
            }
        }
    }
}

/// The journaled requests.
pub struct Requests {
    journal: Mutex<Journal<RequestRecord>>,
    requests: RwLock<BTreeMap<String, Request>>,
    peppers: Vec<Pepper>,
    exports: PathBuf,
    /// Seals the journal's records and the exports.
    sealer: Arc<Sealer>,
    /// The pseudonyms of the erasure requests received by this process (the journal holds
    /// only their references).
    erasing: Mutex<HashMap<String, Vec<String>>>,
}

impl Requests {
    /// Opens the journal in `dir` (exports go to `dir/exports`); `sealer` seals the journal's
    /// records and the exports under the data keys.
    pub fn open(
        dir: &Path,
        peppers: &KeyRing,
        sealer: Arc<Sealer>,
    ) -> Result<Arc<Self>, JournalError> {
        let (journal, records) = Journal::open(&dir.join("requests"), sealer.clone())?;
        let mut requests = BTreeMap::new();
        for record in records {
            Request::apply(&mut requests, record);
        }
        Ok(Arc::new(Self {
            journal: Mutex::new(journal),
            requests: RwLock::new(requests),
            peppers: Pepper::every(peppers),
            exports: dir.join("exports"),
            sealer,
            erasing: Mutex::default(),
        }))
    }

    /// Journals a request about `subject` (a raw user id or a pseudonym) and returns it.
    /// Blocks on the disk.
    pub fn submit(
        &self,
        kind: RequestKind,
        subject: &str,
        requester: Option<&str>,
        now: i64,
    ) -> Result<Request, JournalError> {
        let names: Vec<String> = if is_pseudonym(subject) {
            vec![subject.to_owned()]
        } else {
            self.peppers
                .iter()
                .map(|p| p.pseudonymize(subject).0)
                .collect()
        };
        let id = format!("dsr-{}", uuid::Uuid::new_v4().simple());
        let subjects = match kind {
            RequestKind::Access => names.clone(),
            // The journal of an erasure must not keep the names it erases.
            RequestKind::Erasure => names.iter().map(|n| reference(n)).collect(),
        };
        self.record(RequestRecord::Received {
            id: id.clone(),
            kind,
            subjects,
            received_at: now,
            due: one_month_after(now),
            requester: requester.map(str::to_owned),
        })?;
        if kind == RequestKind::Erasure {
            let mut erasing = self.erasing.lock().unwrap_or_else(|p| p.into_inner());
            erasing.insert(id.clone(), names);
        }
        Ok(self.get(&id).expect("just recorded"))
    }

    /// Returns the pseudonyms of erasure request `id` when this process received it (after a
    /// restart only its references are known).
    pub fn pseudonyms_of(&self, id: &str) -> Vec<String> {
        let erasing = self.erasing.lock().unwrap_or_else(|p| p.into_inner());
        erasing.get(id).cloned().unwrap_or_default()
    }

    /// Makes the journal forget the subjects of `references`: the access requests about them
    /// keep only their references, and their exports are deleted. Rewrites the journal when
    /// anything changed; returns how many requests were changed. Blocks on the disk.
    pub fn forget(&self, references: &HashSet<String>) -> Result<usize, JournalError> {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let mut requests = self.requests.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        for request in requests.values_mut() {
            if request.kind == RequestKind::Access
                && request
                    .subjects
                    .iter()
                    .any(|name| references.contains(&reference(name)))
            {
                request.subjects = request.subjects.iter().map(|n| reference(n)).collect();
                changed.push(request.id.clone());
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        let mut ordered: Vec<&Request> = requests.values().collect();
        ordered.sort_by_key(|r| r.received_at);
        let records: Vec<RequestRecord> = ordered.into_iter().flat_map(Request::records).collect();
        journal.rewrite(&records)?;
        for id in &changed {
            self.remove_export(id);
            if self.export_path(id).exists() || self.clear_export_path(id).exists() {
                tracing::error!(id = %id, "an export of an erased subject could not be deleted");
            }
        }
        Ok(changed.len())
    }

    /// Returns every request, oldest first.
    pub fn all(&self) -> Vec<Request> {
        let requests = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Request> = requests.values().cloned().collect();
        all.sort_by_key(|r| r.received_at);
        all
    }

    /// Marks a request carried out. Blocks on the disk.
    pub fn complete(&self, id: &str, events: u64, now: i64) -> Result<(), JournalError> {
        self.record(RequestRecord::Completed {
            id: id.to_owned(),
            at: now,
            events,
        })
    }

    /// Marks a request failed (it is retried after a restart). Blocks on the disk.
    pub fn fail(&self, id: &str, reason: String, now: i64) -> Result<(), JournalError> {
        self.record(RequestRecord::Failed {
            id: id.to_owned(),
            at: now,
            reason,
        })
    }

    fn record(&self, record: RequestRecord) -> Result<(), JournalError> {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.append(&record)?;
        let mut requests = self.requests.write().unwrap_or_else(|p| p.into_inner());
        Request::apply(&mut requests, record);
        Ok(())
    }

    /// Returns the request `id`.
    pub fn get(&self, id: &str) -> Option<Request> {
        self.requests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Returns the requests `requester` filed, oldest first.
    pub fn filed_by(&self, requester: &str) -> Vec<Request> {
        let mut mine = self.all();
        mine.retain(|r| r.requester.as_deref() == Some(requester));
        mine
    }

    /// Returns the requests not carried out yet, oldest first.
    pub fn unfinished(&self) -> Vec<Request> {
        let requests = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let mut open: Vec<Request> = requests
            .values()
            .filter(|r| r.status != Status::Completed)
            .cloned()
            .collect();
        open.sort_by_key(|r| r.received_at);
        open
    }

    /// Returns the requests received and not attempted yet, oldest first.
    pub fn pending(&self) -> Vec<Request> {
        let mut pending = self.unfinished();
        pending.retain(|r| r.status == Status::Pending);
        pending
    }

    /// Deletes the exports of access requests completed before `horizon`; returns how many.
    /// Blocks on the disk.
    pub fn expire_exports(&self, horizon: i64) -> usize {
        let expired: Vec<String> = self
            .requests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| r.kind == RequestKind::Access && r.status == Status::Completed)
            .filter(|r| r.updated_at.is_some_and(|at| at < horizon))
            .map(|r| r.id.clone())
            .collect();
        expired.iter().filter(|id| self.remove_export(id)).count()
    }

    /// Where the export of access request `id` is written.
    pub fn export_path(&self, id: &str) -> PathBuf {
        self.exports.join(format!("{id}.sealed"))
    }

    /// Where an older version kept an export in clear (read, expired and erased like the
    /// sealed ones).
    fn clear_export_path(&self, id: &str) -> PathBuf {
        self.exports.join(format!("{id}.ndjson"))
    }

    /// The NDJSON export of `id`, opened; `None` when there is none. Blocks on the disk.
    pub fn read_export(&self, id: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.export_path(id)) {
            Ok(sealed) => {
                let mut plain = Vec::new();
                self.sealer
                    .open(&sealed, &mut plain)
                    .map(|opened| Some(opened.to_vec()))
                    .ok_or_else(|| {
                        std::io::Error::other(format!(
                            "the export of {id} does not open with the data keys"
                        ))
                    })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::read(self.clear_export_path(id)) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    /// Deletes both forms of an export; whether one was there.
    fn remove_export(&self, id: &str) -> bool {
        let sealed = std::fs::remove_file(self.export_path(id)).is_ok();
        let clear = std::fs::remove_file(self.clear_export_path(id)).is_ok();
        sealed || clear
    }

    /// The sealer of the journal and the exports (shared with the consent ledger; the
    /// data-key watcher rotates it).
    pub fn sealer_handle(&self) -> Arc<Sealer> {
        self.sealer.clone()
    }

    /// The sealer of the exports.
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }
}

/// The same wall-clock time one calendar month later (the 31st becomes the month's last day).
pub fn one_month_after(ms: i64) -> i64 {
    let text = format_rfc3339(ms);
    let (year, month, day) = (
        text[0..4].parse::<i64>().unwrap_or(1970),
        text[5..7].parse::<u32>().unwrap_or(1),
        text[8..10].parse::<u32>().unwrap_or(1),
    );
    let (year, month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let later = format!("{year:04}-{month:02}-{:02}{}", day.min(days), &text[10..]);
    parse_rfc3339(&later).unwrap_or(ms + 30 * 86_400_000)
}

/// Writes the access export of `request` to `out`: a header line, every stored event of the
/// subject (read from the write-ahead log, which holds everything kept), the subject's flag
/// assignments (its first exposure per flag) and its consent history. Returns the number of
/// events. Written to a temporary file, fsynced, then renamed.
pub fn write_access_export(
    request: &Request,
    wal: &crate::wal::Wal,
    consent: &ConsentLedger,
    out: &Path,
    sealer: &Sealer,
    now: i64,
) -> std::io::Result<u64> {
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let partial = out.with_extension("partial");
    // One child's data, read whole at download too; sealed as one piece.
    let mut writer: Vec<u8> = Vec::new();
    let header = json!({"kind": "request", "id": request.id, "subject": request.subjects[0],
        "received_at": format_rfc3339(request.received_at), "generated_at": format_rfc3339(now),
        "contents": "every stored event of the subject, its flag assignments and its consent history"});
    writeln!(writer, "{header}")?;
    let names: HashSet<&str> = request.subjects.iter().map(String::as_str).collect();
    let mut events = 0u64;
    let mut failure = None;
    // Per flag: the first exposure by event time.
    let mut assignments: HashMap<String, (i64, String)> = HashMap::new();
    crate::wal::recover(
        wal.dir(),
        false,
        wal.sealer().map(|s| s.as_ref()),
        |_, stored| {
            for bytes in stored {
                let Ok(event) = serde_json::from_slice::<Value>(bytes) else {
                    continue;
                };
                let Some(subject) = event.get("subject").and_then(Value::as_str) else {
                    continue;
                };
                if !names.contains(subject) {
                    continue;
                }
                if event.get("type").and_then(Value::as_str) == Some(EXPOSURE_TYPE) {
                    note_assignment(&event, &mut assignments);
                }
                if failure.is_none()
                    && let Err(err) =
                        writeln!(writer, "{}", json!({"kind": "event", "event": event}))
                {
                    failure = Some(err);
                }
                events += 1;
            }
        },
    )
    .map_err(std::io::Error::other)?;
    if let Some(err) = failure {
        return Err(err);
    }
    let mut flags: Vec<_> = assignments.into_iter().collect();
    flags.sort();
    for (flag, (at, variant)) in flags {
        let line = json!({"kind": "assignment", "flag": flag, "variant": variant,
            "first_exposed_at": format_rfc3339(at)});
        writeln!(writer, "{line}")?;
    }
    let mut history = Vec::new();
    for name in &request.subjects {
        history.extend(consent.consents_of(name).history);
    }
    history.sort_by_key(|r| r.seq);
    for record in history {
        let line = json!({"kind": "consent", "scope": record.scope.as_str(),
            "granted": record.granted, "guardian": record.guardian,
            "at": format_rfc3339(record.at), "recorded_at": format_rfc3339(record.recorded_at),
            "method": record.method.map(|m| m.as_str()), "text_version": record.text_version});
        writeln!(writer, "{line}")?;
    }
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(&sealer.reseal(&writer))?;
    file.sync_all()?;
    std::fs::rename(&partial, out)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(events)
}

fn note_assignment(event: &Value, assignments: &mut HashMap<String, (i64, String)>) {
    let properties = &event["properties"];
    let (Some(flag), Some(variant)) = (
        properties.get("flag").and_then(Value::as_str),
        properties.get("variant").and_then(Value::as_str),
    ) else {
        return;
    };
    let at = event
        .get("event_time")
        .and_then(Value::as_i64)
        .unwrap_or(i64::MAX);
    let entry = assignments
        .entry(flag.to_owned())
        .or_insert((at, variant.to_owned()));
    if at < entry.0 {
        *entry = (at, variant.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_due_date_is_one_calendar_month_ahead() {
        let at = |text: &str| parse_rfc3339(text).unwrap();
        let cases = [
            ("2026-11-24T09:30:00Z", "2026-12-24T09:30:00Z"),
            ("2026-12-15T00:00:00Z", "2027-01-15T00:00:00Z"),
            ("2027-01-31T12:00:00Z", "2027-02-28T12:00:00Z"),
            ("2028-01-31T12:00:00Z", "2028-02-29T12:00:00Z"),
            ("2026-03-31T23:59:59.500Z", "2026-04-30T23:59:59.500Z"),
        ];
        for (from, to) in cases {
            assert_eq!(one_month_after(at(from)), at(to), "{from}");
        }
    }

    #[test]
    fn requests_are_journaled_and_their_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::single(1, [9; 32]);
        let sealer = Arc::new(Sealer::new(&ring));
        let requests = Requests::open(dir.path(), &ring, sealer.clone()).unwrap();
        let access = requests
            .submit(RequestKind::Access, "child-1", None, 1_000)
            .unwrap();
        assert!(access.id.starts_with("dsr-"));
        assert_eq!(access.status, Status::Pending);
        assert_eq!(
            access.subjects,
            [Pepper::new(1, [9; 32]).pseudonymize("child-1").0]
        );
        let by_pseudonym = requests
            .submit(RequestKind::Access, &access.subjects[0], None, 2_000)
            .unwrap();
        assert_eq!(by_pseudonym.subjects, access.subjects);
        requests
            .fail(&access.id, "disk full".into(), 3_000)
            .unwrap();
        requests.complete(&by_pseudonym.id, 7, 4_000).unwrap();
        drop(requests);
        let text = std::fs::read(dir.path().join("requests")).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("child-1"));
        let pseudonym = &access.subjects[0];
        assert!(
            !String::from_utf8_lossy(&text).contains(pseudonym.as_str()),
            "the journal is sealed: no pseudonym in clear"
        );
        let requests = Requests::open(dir.path(), &ring, sealer).unwrap();
        let failed = requests.get(&access.id).unwrap();
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(failed.reason.as_deref(), Some("disk full"));
        let done = requests.get(&by_pseudonym.id).unwrap();
        assert_eq!((done.status, done.events), (Status::Completed, Some(7)));
        let unfinished: Vec<String> = requests.unfinished().into_iter().map(|r| r.id).collect();
        assert_eq!(unfinished, [access.id]);
        assert!(requests.get("dsr-nope").is_none());

        // Exports of requests completed before the horizon are deleted, others kept.
        std::fs::create_dir_all(dir.path().join("exports")).unwrap();
        std::fs::write(requests.export_path(&done.id), "{}").unwrap();
        assert_eq!(
            requests.expire_exports(4_000),
            0,
            "completed at 4,000: not before it"
        );
        assert!(requests.export_path(&done.id).exists());
        assert_eq!(requests.expire_exports(4_001), 1);
        assert!(!requests.export_path(&done.id).exists());
        assert_eq!(requests.expire_exports(9_999), 0, "already gone");
    }
}
