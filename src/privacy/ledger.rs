//! The consent ledger on disk: a [`Journal`] of consent records
//! (`<data_dir>/consent/ledger`), each fsynced before its request is answered, replayed into a
//! [`ConsentBook`] on start. A damaged record stops the start: a lost revocation must not
//! silently turn into a grant, so an operator has to restore the file.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use super::consent::{ConsentBook, ConsentMethod, ConsentRecord, ConsentScope};
use super::journal::{Journal, JournalError};
use super::pseudonym::Pepper;
use crate::crypto::{KeyRing, Sealer};

/// Why the ledger could not be read or written.
pub type LedgerError = JournalError;

/// A decision as a guardian's system sends it: raw ids, pseudonymized before anything is kept.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The child's user id, as in events.
    pub user_id: String,
    /// The guardian's id.
    pub guardian_id: String,
    /// What it is about.
    pub scope: ConsentScope,
    /// Grant or revocation.
    pub granted: bool,
    /// When the guardian decided (ms since the Unix epoch).
    pub at: i64,
    /// How the guardian was identified.
    pub method: ConsentMethod,
    /// The identity provider that verified the guardian (`oidc` only).
    pub issuer: Option<String>,
    /// The version of the consent text the guardian was shown.
    pub text_version: Option<String>,
}

/// A subject's consents as answered.
#[derive(Debug, Clone)]
pub struct SubjectConsents {
    /// The pseudonym (newest pepper).
    pub subject: String,
    /// Per scope, the decision in force: granted or not, and when it was made.
    pub in_force: Vec<(ConsentScope, Option<(bool, i64)>)>,
    /// Every record, in ledger order.
    pub history: Vec<ConsentRecord>,
}

/// The ledger: the file, the book it replays into, and the peppers that name subjects.
pub struct ConsentLedger {
    journal: Mutex<Journal<ConsentRecord>>,
    book: RwLock<ConsentBook>,
    /// Newest first.
    peppers: Vec<Pepper>,
}

impl ConsentLedger {
    /// Opens (or creates) the ledger in `dir` and replays it; `peppers` is the pseudonym key
    /// ring, `sealer` seals the records under the data keys.
    pub fn open(
        dir: &Path,
        peppers: &KeyRing,
        sealer: Arc<Sealer>,
    ) -> Result<Arc<Self>, LedgerError> {
        let (journal, records) = Journal::open(&dir.join("ledger"), sealer)?;
        let mut book = ConsentBook::default();
        for record in records {
            book.apply(record);
        }
        Ok(Arc::new(Self {
            journal: Mutex::new(journal),
            book: RwLock::new(book),
            peppers: Pepper::every(peppers),
        }))
    }

    /// Records `decision` durably and puts it in force; returns the stored record. Blocks on
    /// the disk: call it from a blocking thread.
    pub fn record(&self, decision: &Decision, now: i64) -> Result<ConsentRecord, LedgerError> {
        let newest = &self.peppers[0];
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let record = ConsentRecord {
            seq: self.book().last_seq() + 1,
            subject: newest.pseudonymize(&decision.user_id).0,
            scope: decision.scope,
            granted: decision.granted,
            guardian: newest.pseudonymize(&decision.guardian_id).0,
            at: decision.at,
            recorded_at: now,
            method: Some(decision.method),
            issuer: decision.issuer.clone(),
            text_version: decision.text_version.clone(),
        };
        journal.append(&record)?;
        self.book
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .apply(record.clone());
        Ok(record)
    }

    /// Returns whether the subject of `user_id` (whose newest pseudonym is `pseudonym`) has a
    /// grant in force for `scope`.
    pub fn allows(&self, user_id: &str, pseudonym: &str, scope: ConsentScope) -> bool {
        let book = self.book();
        if self.peppers.len() == 1 {
            return book.allows(pseudonym, scope);
        }
        book.latest(&self.pseudonyms(user_id), scope)
            .is_some_and(|(granted, _)| granted)
    }

    /// Returns whether `user_id` has a grant in force for `scope` (pseudonymizing it here).
    pub fn allows_user(&self, user_id: &str, scope: ConsentScope) -> bool {
        let newest = self.peppers[0].pseudonymize(user_id).0;
        self.allows(user_id, &newest, scope)
    }

    /// Returns the consents of `user_id` (a raw id, or a pseudonym the service made).
    pub fn consents_of(&self, user_id: &str) -> SubjectConsents {
        let names = if is_pseudonym(user_id) {
            vec![user_id.to_owned()]
        } else {
            self.pseudonyms(user_id)
        };
        let book = self.book();
        let mut history: Vec<ConsentRecord> = names
            .iter()
            .flat_map(|name| book.history(name).iter().cloned())
            .collect();
        history.sort_by_key(|r| r.seq);
        SubjectConsents {
            subject: names[0].clone(),
            in_force: ConsentScope::ALL
                .iter()
                .map(|scope| (*scope, book.latest(&names, *scope)))
                .collect(),
            history,
        }
    }

    /// The newest pseudonym of `user_id` (for naming a child in the audit trail).
    pub fn pseudonym_of(&self, user_id: &str) -> String {
        self.peppers[0].pseudonymize(user_id).0
    }

    /// Returns how many subjects have records.
    pub fn subjects(&self) -> usize {
        self.book().subjects()
    }

    /// Retention: drops the records of subjects with no grant in force and no decision
    /// recorded since `horizon` (ms) — the ledger is compacted (rewritten beside, synced,
    /// renamed). Returns how many subjects went. Blocks on the disk.
    pub fn expire(&self, horizon: i64) -> Result<usize, LedgerError> {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let mut book = self.book.write().unwrap_or_else(|p| p.into_inner());
        let lapsed = book.lapsed(horizon);
        if lapsed.is_empty() {
            return Ok(0);
        }
        for subject in &lapsed {
            book.forget(subject);
        }
        journal.rewrite(&book.records())?;
        Ok(lapsed.len())
    }

    /// Every pseudonym of `user_id`, one per pepper version, newest first.
    pub fn pseudonyms(&self, user_id: &str) -> Vec<String> {
        self.peppers
            .iter()
            .map(|p| p.pseudonymize(user_id).0)
            .collect()
    }

    fn book(&self) -> std::sync::RwLockReadGuard<'_, ConsentBook> {
        self.book.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `text` has the shape of a pseudonym: `p<version>_` and 32 hex characters.
pub fn is_pseudonym(text: &str) -> bool {
    let Some((version, hex)) = text.strip_prefix('p').and_then(|t| t.split_once('_')) else {
        return false;
    };
    !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_sealer() -> Arc<Sealer> {
        Arc::new(Sealer::new(&KeyRing::single(1, [5; 32])))
    }

    fn decision(user: &str, scope: ConsentScope, granted: bool, at: i64) -> Decision {
        Decision {
            user_id: user.into(),
            guardian_id: "parent-1".into(),
            scope,
            granted,
            at,
            method: ConsentMethod::Operator,
            issuer: None,
            text_version: None,
        }
    }

    #[test]
    fn decisions_survive_a_restart_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::single(1, [3; 32]);
        let pepper = Pepper::new(1, [3; 32]);
        let child = pepper.pseudonymize("child-1").0;
        {
            let ledger = ConsentLedger::open(dir.path(), &ring, test_sealer()).unwrap();
            assert!(!ledger.allows("child-1", &child, ConsentScope::Analytics));
            let record = ledger
                .record(&decision("child-1", ConsentScope::Analytics, true, 10), 20)
                .unwrap();
            assert_eq!(record.seq, 1);
            assert_eq!(record.subject, child);
            assert!(ledger.allows("child-1", &child, ConsentScope::Analytics));
            ledger
                .record(
                    &decision("child-1", ConsentScope::Experiments, true, 11),
                    21,
                )
                .unwrap();
        }
        let path = dir.path().join("ledger");
        let text = std::fs::read(&path).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains("child-1"),
            "raw id on disk"
        );
        assert!(
            !String::from_utf8_lossy(&text).contains("parent-1"),
            "raw guardian id on disk"
        );
        // A crash in the middle of a third record.
        let mut torn = text.clone();
        torn.extend_from_slice(&text[..text.len() / 3]);
        std::fs::write(&path, &torn).unwrap();
        let ledger = ConsentLedger::open(dir.path(), &ring, test_sealer()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), text.len() as u64);
        assert!(ledger.allows("child-1", &child, ConsentScope::Experiments));
        let next = ledger
            .record(&decision("child-1", ConsentScope::Analytics, false, 30), 31)
            .unwrap();
        assert_eq!(next.seq, 3, "numbering continues after a restart");
        assert!(!ledger.allows("child-1", &child, ConsentScope::Analytics));
        let view = ledger.consents_of("child-1");
        assert_eq!(view.history.len(), 3);
        assert_eq!(
            view.in_force[0],
            (ConsentScope::Analytics, Some((false, 30)))
        );
        assert_eq!(
            ledger.consents_of(&child).history.len(),
            3,
            "by pseudonym too"
        );
    }

    #[test]
    fn only_lapsed_subjects_leave_the_ledger_and_the_compaction_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::single(1, [3; 32]);
        let (analytics, experiments) = (ConsentScope::Analytics, ConsentScope::Experiments);
        let ledger = ConsentLedger::open(dir.path(), &ring, test_sealer()).unwrap();
        // Revoked long ago: lapses.
        ledger
            .record(&decision("gone", analytics, true, 1), 1)
            .unwrap();
        ledger
            .record(&decision("gone", analytics, false, 2), 2)
            .unwrap();
        // Granted long ago and still in force: the live basis, kept.
        ledger
            .record(&decision("granted", analytics, true, 3), 3)
            .unwrap();
        // One scope revoked, the other still granted: kept.
        ledger
            .record(&decision("mixed", analytics, false, 4), 4)
            .unwrap();
        ledger
            .record(&decision("mixed", experiments, true, 5), 5)
            .unwrap();
        // Revoked recently: kept.
        ledger
            .record(&decision("recent", analytics, false, 50), 50)
            .unwrap();
        // Revoked long ago, but another decision since the horizon: kept.
        ledger
            .record(&decision("again", analytics, false, 6), 6)
            .unwrap();
        ledger
            .record(&decision("again", experiments, false, 60), 60)
            .unwrap();
        // The newest record's subject stays, whatever its age: numbers are not reused.
        ledger
            .record(&decision("last", analytics, false, 7), 7)
            .unwrap();

        assert_eq!(ledger.expire(40).unwrap(), 1);
        assert!(ledger.consents_of("gone").history.is_empty());
        for kept in ["granted", "mixed", "recent", "again", "last"] {
            assert!(!ledger.consents_of(kept).history.is_empty(), "{kept}");
        }
        assert_eq!(ledger.expire(40).unwrap(), 0, "nothing more lapsed");
        let next = ledger
            .record(&decision("new", analytics, true, 70), 70)
            .unwrap();
        assert_eq!(next.seq, 10);
        drop(ledger);
        let ledger = ConsentLedger::open(dir.path(), &ring, test_sealer()).unwrap();
        assert_eq!(ledger.subjects(), 6);
        assert!(ledger.consents_of("gone").history.is_empty());
        assert!(ledger.allows_user("granted", analytics));
        assert!(ledger.allows_user("mixed", experiments));
        assert_eq!(
            ledger
                .record(&decision("new", analytics, false, 80), 80)
                .unwrap()
                .seq,
            11
        );
    }

    #[test]
    fn damage_before_the_end_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::single(1, [3; 32]);
        {
            let ledger = ConsentLedger::open(dir.path(), &ring, test_sealer()).unwrap();
            for at in 0..3 {
                ledger
                    .record(
                        &decision("child-2", ConsentScope::Analytics, at % 2 == 0, at),
                        at,
                    )
                    .unwrap();
            }
        }
        let path = dir.path().join("ledger");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        match ConsentLedger::open(dir.path(), &ring, test_sealer()) {
            Err(err @ JournalError::Damaged { .. }) => {
                assert!(err.to_string().contains("restore"), "{err}")
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a damaged ledger was accepted"),
        }
    }

    #[test]
    fn a_rotated_pepper_keeps_earlier_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let old = KeyRing::single(1, [3; 32]);
        ConsentLedger::open(dir.path(), &old, test_sealer())
            .unwrap()
            .record(&decision("child-3", ConsentScope::Analytics, true, 5), 5)
            .unwrap();
        let rotated = KeyRing::parse(&format!(
            "1 {}\n2 {}",
            crate::crypto::to_hex(&[3; 32]),
            crate::crypto::to_hex(&[4; 32])
        ))
        .unwrap();
        let ledger = ConsentLedger::open(dir.path(), &rotated, test_sealer()).unwrap();
        let newest = Pepper::new(2, [4; 32]).pseudonymize("child-3").0;
        assert!(ledger.allows("child-3", &newest, ConsentScope::Analytics));
        ledger
            .record(&decision("child-3", ConsentScope::Analytics, false, 6), 6)
            .unwrap();
        assert!(!ledger.allows("child-3", &newest, ConsentScope::Analytics));
        let view = ledger.consents_of("child-3");
        assert_eq!(view.subject, newest);
        assert_eq!(view.history.len(), 2);
    }

    #[test]
    fn pseudonyms_are_recognized() {
        let pseudonym = Pepper::new(12, [1; 32]).pseudonymize("x").0;
        assert!(is_pseudonym(&pseudonym));
        for text in [
            "child-1",
            "p1_",
            "p_0123",
            "px_00000000000000000000000000000000",
        ] {
            assert!(!is_pseudonym(text), "{text}");
        }
    }
}
