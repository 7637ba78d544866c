//! Erasure: the suppression list that takes effect the moment an erasure request is received.
//!
//! A subject under erasure is known by its *reference*, a one-way digest of its pseudonym, so
//! that the list (journaled with the request) holds no pseudonym: it matches an event only for
//! whoever already holds the event. While the erasure is pending, every event of the subject
//! is hidden (ingest refuses it, the SQL window drops it, the log rewrite removes it). Once it
//! is carried out, events timed before the request stay refused — a tablet that syncs a week
//! later must not bring the erased data back — until the late-arrival horizon has passed
//! (older events are refused anyway); events timed after the request are the child's new
//! data, governed by consent like any other.
//!
//! Pure apart from its lock.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use super::requests::{Request, RequestKind, Status};

/// Returns the reference of a pseudonym: `r_` and 32 hex digits of its SHA-256.
pub fn reference(pseudonym: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, pseudonym.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("r_{hex}")
}

/// Replaces every pseudonym in `text` (a query, say) by its reference, for records that
/// outlive an erasure (the audit log).
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let starts_word = at == 0 || !is_word(bytes[at - 1]);
        if bytes[at] == b'p' && starts_word {
            let digits = bytes[at + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let end = at + 1 + digits + 1 + 32;
            let hex = at + 1 + digits + 1;
            if digits > 0
                && end <= bytes.len()
                && bytes[hex - 1] == b'_'
                && bytes[hex..end]
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
                && (end == bytes.len() || !is_word(bytes[end]))
            {
                out.push_str(&text[copied..at]);
                out.push_str(&reference(&text[at..end]));
                copied = end;
                at = end;
                continue;
            }
        }
        at += 1;
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

fn is_word(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Returns whether `text` has the form of a reference.
pub fn is_reference(text: &str) -> bool {
    text.strip_prefix("r_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// When the erasure was requested (ms).
    since: i64,
    /// Whether it was carried out.
    done: bool,
}

/// The subjects under erasure.
///
/// Checks run on every ingested and every stored event, so a summary kept beside the list
/// answers most of them without a digest or a lock: while no erasure is pending, an event
/// timed at or after the newest carried-out request cannot be hidden.
#[derive(Debug)]
pub struct Suppressions {
    /// Some erasure is not carried out yet.
    pending: AtomicBool,
    /// The newest `since` of the carried-out erasures (`i64::MIN` with none).
    refused_before: AtomicI64,
    entries: RwLock<HashMap<String, Entry>>,
}

impl Default for Suppressions {
    fn default() -> Self {
        Self {
            pending: AtomicBool::new(false),
            refused_before: AtomicI64::new(i64::MIN),
            entries: RwLock::default(),
        }
    }
}

impl Suppressions {
    /// Starts from the erasure requests of the journal still in force at `now`: pending ones,
    /// and completed ones received less than `horizon_ms` ago.
    pub fn from_requests(requests: &[Request], now: i64, horizon_ms: i64) -> Self {
        let list = Self::default();
        for request in requests.iter().filter(|r| r.kind == RequestKind::Erasure) {
            let done = request.status == Status::Completed;
            if done && request.received_at < now.saturating_sub(horizon_ms) {
                continue;
            }
            for name in &request.subjects {
                list.insert(name, request.received_at, done);
            }
        }
        list
    }

    fn insert(&self, reference: &str, since: i64, done: bool) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let entry = entries
            .entry(reference.to_owned())
            .or_insert(Entry { since, done });
        // A second request keeps the subject hidden until it too is carried out.
        entry.since = entry.since.max(since);
        entry.done &= done;
        self.summarize(&entries);
    }

    /// Updates the summary; called under the write lock after every change.
    fn summarize(&self, entries: &HashMap<String, Entry>) {
        let pending = entries.values().any(|e| !e.done);
        let refused_before = entries
            .values()
            .filter(|e| e.done)
            .map(|e| e.since)
            .max()
            .unwrap_or(i64::MIN);
        self.pending.store(pending, Ordering::Release);
        self.refused_before.store(refused_before, Ordering::Release);
    }

    /// Hides the subject of `reference` from now on: an erasure was received at `since`.
    pub fn suppress(&self, reference: &str, since: i64) {
        self.insert(reference, since, false);
    }

    /// Records that the erasure of `reference` requested at `since` was carried out.
    pub fn settle(&self, reference: &str, since: i64) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.get_mut(reference)
            && entry.since == since
        {
            entry.done = true;
        }
        self.summarize(&entries);
    }

    /// Forgets the carried-out erasures requested before `horizon` (ms): events that old are
    /// refused as too late anyway.
    pub fn expire(&self, horizon: i64) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| !e.done || e.since >= horizon);
        self.summarize(&entries);
    }

    /// Returns whether no subject is under erasure.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the subjects listed.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Returns whether an event of the subject `pseudonym` timed `event_time` must not be
    /// kept.
    pub fn hides(&self, pseudonym: &str, event_time: i64) -> bool {
        if !self.pending.load(Ordering::Acquire)
            && event_time >= self.refused_before.load(Ordering::Acquire)
        {
            return false;
        }
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&reference(pseudonym))
            .is_some_and(|e| !e.done || event_time < e.since)
    }

    /// Returns whether a stored event (the JSON the log holds) must not be kept. Only a
    /// pending erasure hides stored events: a carried-out one has removed its subject's
    /// events already, and ingest refuses the rest, so no JSON is read without one.
    pub fn hides_stored(&self, stored: &[u8]) -> bool {
        if !self.pending.load(Ordering::Acquire) {
            return false;
        }
        #[derive(serde::Deserialize)]
        struct Stored<'a> {
            #[serde(borrow)]
            subject: Option<std::borrow::Cow<'a, str>>,
            #[serde(default)]
            event_time: i64,
        }
        serde_json::from_slice::<Stored>(stored)
            .ok()
            .and_then(|s| Some(self.hides(&s.subject?, s.event_time)))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_stable_one_way_and_recognizable() {
        let r = reference("p1_0123456789abcdef0123456789abcdef");
        assert!(is_reference(&r), "{r}");
        assert_eq!(r, reference("p1_0123456789abcdef0123456789abcdef"));
        assert_ne!(r, reference("p1_0123456789abcdef0123456789abcdee"));
        assert!(!r.contains("0123456789abcdef0123"));
        assert!(!is_reference("p1_0123"));
    }

    #[test]
    fn pseudonyms_in_text_become_references() {
        let name = "p12_0123456789abcdef0123456789abcdef";
        let sql = format!("SELECT * FROM events WHERE subject IN ('{name}', \"{name}\") -- {name}");
        let redacted = redact(&sql);
        assert!(!redacted.contains(name), "{redacted}");
        assert_eq!(redacted.matches(&reference(name)).count(), 3);
        for kept in [
            "no pseudonym here",
            "xp1_0123456789abcdef0123456789abcdef",
            "p1_0123456789abcdef0123456789abcdef0",
            "p1_0123456789ABCDEF0123456789abcdef",
            "p_0123456789abcdef0123456789abcdef",
            "é p1_0123",
        ] {
            assert_eq!(redact(kept), kept);
        }
        assert_eq!(
            redact("é p1_0123456789abcdef0123456789abcdef"),
            format!("é {}", reference("p1_0123456789abcdef0123456789abcdef"))
        );
    }

    #[test]
    fn pending_hides_everything_then_only_what_is_older_than_the_request() {
        let list = Suppressions::default();
        assert!(list.is_empty());
        assert!(!list.hides("p1_a", 0));
        list.suppress(&reference("p1_a"), 1_000);
        assert!(list.hides("p1_a", 500));
        assert!(list.hides("p1_a", 5_000), "pending: everything");
        assert!(!list.hides("p1_b", 500));
        let stored = br#"{"subject":"p1_a","event_time":5000,"type":"x"}"#;
        assert!(list.hides_stored(stored));
        assert!(!list.hides_stored(br#"{"event_time":5000}"#));
        list.settle(&reference("p1_a"), 999);
        assert!(list.hides("p1_a", 5_000), "another request's settling");
        list.settle(&reference("p1_a"), 1_000);
        assert!(list.hides("p1_a", 999));
        let old = br#"{"subject":"p1_a","event_time":500}"#;
        assert!(
            !list.hides_stored(old),
            "carried out: its stored events are gone, no JSON is read"
        );
        assert!(
            !list.hides("p1_b", 999),
            "another subject, before the request"
        );
        assert!(!list.hides("p1_a", 1_000), "new data after the request");
        assert!(!list.hides_stored(stored));
        list.expire(1_000);
        assert_eq!(list.len(), 1);
        list.expire(1_001);
        assert!(list.is_empty());
    }

    #[test]
    fn the_journal_restores_what_is_still_in_force() {
        let request = |id: &str, status, received_at| Request {
            id: id.into(),
            kind: RequestKind::Erasure,
            subjects: vec![reference(id)],
            received_at,
            due: received_at + 1,
            status,
            updated_at: None,
            events: None,
            reason: None,
            requester: None,
        };
        let mut access = request("access", Status::Pending, 0);
        access.kind = RequestKind::Access;
        let list = Suppressions::from_requests(
            &[
                request("old-done", Status::Completed, 0),
                request("old-pending", Status::Failed, 0),
                request("recent-done", Status::Completed, 9_000),
                access,
            ],
            10_000,
            5_000,
        );
        assert!(!list.hides("old-done", 0));
        assert!(list.hides("old-pending", 50_000));
        assert!(list.hides("recent-done", 8_000));
        assert!(!list.hides("recent-done", 9_000));
        assert!(!list.hides("access", 0));
    }
}
