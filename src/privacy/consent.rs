//! Consent: what guardians granted or revoked, and whether a subject's events may be kept.
//! Pure: the [`ConsentBook`] is rebuilt from the ledger's records and answers the gate.
//!
//! Subjects and guardians appear only as pseudonyms. For each (subject, scope), the decision
//! that counts is the one the guardian made last — by the time of the decision, then by the
//! order of recording — so a grant that reaches the service after a later revocation does not
//! undo it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What a guardian consents to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentScope {
    /// Usage analytics: storing the child's events at all.
    Analytics,
    /// Taking part in experiments: exposures and the child's place in a variant.
    Experiments,
}

impl ConsentScope {
    /// Every scope.
    pub const ALL: [ConsentScope; 2] = [ConsentScope::Analytics, ConsentScope::Experiments];

    /// The scope's name in requests and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentScope::Analytics => "analytics",
            ConsentScope::Experiments => "experiments",
        }
    }

    fn index(self) -> usize {
        match self {
            ConsentScope::Analytics => 0,
            ConsentScope::Experiments => 1,
        }
    }

    /// The scope an event of `event_type` needs: experiments for exposures, analytics for the
    /// rest.
    pub fn needed_by(event_type: &str) -> Self {
        if event_type == crate::events::schema::EXPOSURE_TYPE {
            ConsentScope::Experiments
        } else {
            ConsentScope::Analytics
        }
    }
}

/// One entry of the consent ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    /// Position in the ledger, from 1.
    pub seq: u64,
    /// The child's pseudonym.
    pub subject: String,
    /// What the decision is about.
    pub scope: ConsentScope,
    /// A grant (`true`) or a revocation (`false`).
    pub granted: bool,
    /// The guardian's pseudonym.
    pub guardian: String,
    /// When the guardian decided, ms since the Unix epoch.
    pub at: i64,
    /// When the service recorded it, ms since the Unix epoch.
    pub recorded_at: i64,
    /// How the guardian was identified: `oidc` (signed in at their identity provider, so the
    /// decision comes from a verified adult) or `operator` (a privacy officer recorded it on
    /// the guardian's behalf). Absent in records made before methods were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<ConsentMethod>,
    /// The identity provider that verified the guardian (`oidc` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The version of the consent text the guardian was shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_version: Option<String>,
}

/// How a guardian's decision reached the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentMethod {
    /// The guardian signed in through OpenID Connect and decided themselves.
    Oidc,
    /// A privacy officer recorded the decision for the guardian.
    Operator,
}

impl ConsentMethod {
    /// The method's name in answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentMethod::Oidc => "oidc",
            ConsentMethod::Operator => "operator",
        }
    }
}

/// The decision in force for one subject and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decision {
    granted: bool,
    at: i64,
    seq: u64,
}

/// Every subject's consents and their history.
#[derive(Debug, Default)]
pub struct ConsentBook {
    /// Per subject, the decision in force per scope (indexed by [`ConsentScope::index`]).
    in_force: HashMap<String, [Option<Decision>; 2]>,
    history: HashMap<String, Vec<ConsentRecord>>,
    last_seq: u64,
}

impl ConsentBook {
    /// Adds a record (in ledger order).
    pub fn apply(&mut self, record: ConsentRecord) {
        let decision = Decision {
            granted: record.granted,
            at: record.at,
            seq: record.seq,
        };
        let slot =
            &mut self.in_force.entry(record.subject.clone()).or_default()[record.scope.index()];
        if slot.is_none_or(|current| (decision.at, decision.seq) > (current.at, current.seq)) {
            *slot = Some(decision);
        }
        self.last_seq = self.last_seq.max(record.seq);
        self.history
            .entry(record.subject.clone())
            .or_default()
            .push(record);
    }

    /// Returns whether `subject` has a grant in force for `scope`.
    pub fn allows(&self, subject: &str, scope: ConsentScope) -> bool {
        self.decision(subject, scope).is_some_and(|d| d.granted)
    }

    fn decision(&self, subject: &str, scope: ConsentScope) -> Option<Decision> {
        self.in_force.get(subject).and_then(|d| d[scope.index()])
    }

    /// Returns the decision in force for `subject` and `scope`: granted or not, and when.
    pub fn in_force(&self, subject: &str, scope: ConsentScope) -> Option<(bool, i64)> {
        self.decision(subject, scope).map(|d| (d.granted, d.at))
    }

    /// Returns the decision in force over several names of one subject (its pseudonyms under
    /// several pepper versions): the latest by time, then by ledger order.
    pub fn latest(&self, names: &[String], scope: ConsentScope) -> Option<(bool, i64)> {
        names
            .iter()
            .filter_map(|name| self.decision(name, scope))
            .max_by_key(|d| (d.at, d.seq))
            .map(|d| (d.granted, d.at))
    }

    /// Returns every record of `subject`, in ledger order.
    pub fn history(&self, subject: &str) -> &[ConsentRecord] {
        self.history.get(subject).map_or(&[], Vec::as_slice)
    }

    /// Returns the sequence number of the last record.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Returns how many subjects have records.
    pub fn subjects(&self) -> usize {
        self.history.len()
    }

    /// Returns the subjects whose records have lapsed: no grant in force in any scope, and
    /// nothing recorded since `horizon` (ms). A grant in force never lapses: it is the live
    /// basis for keeping the child's events. The subject of the newest record stays, so that
    /// sequence numbers are never given out twice.
    pub fn lapsed(&self, horizon: i64) -> Vec<String> {
        let mut lapsed: Vec<String> = self
            .history
            .iter()
            .filter(|(subject, records)| {
                let granted = self
                    .in_force
                    .get(*subject)
                    .is_some_and(|scopes| scopes.iter().flatten().any(|d| d.granted));
                !granted
                    && records
                        .iter()
                        .all(|r| r.recorded_at < horizon && r.seq != self.last_seq)
            })
            .map(|(subject, _)| subject.clone())
            .collect();
        lapsed.sort();
        lapsed
    }

    /// Drops every record of `subject`.
    pub fn forget(&mut self, subject: &str) {
        self.in_force.remove(subject);
        self.history.remove(subject);
    }

    /// Returns every record, in ledger order.
    pub fn records(&self) -> Vec<ConsentRecord> {
        let mut records: Vec<ConsentRecord> = self.history.values().flatten().cloned().collect();
        records.sort_by_key(|r| r.seq);
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(seq: u64, scope: ConsentScope, granted: bool, at: i64) -> ConsentRecord {
        ConsentRecord {
            seq,
            subject: "p1_child".into(),
            scope,
            granted,
            guardian: "p1_parent".into(),
            at,
            recorded_at: 1_000 + seq as i64,
            method: None,
            issuer: None,
            text_version: None,
        }
    }

    #[test]
    fn the_latest_decision_counts_and_scopes_are_separate() {
        let mut book = ConsentBook::default();
        assert!(
            !book.allows("p1_child", ConsentScope::Analytics),
            "no record, no consent"
        );
        book.apply(record(1, ConsentScope::Analytics, true, 100));
        assert!(book.allows("p1_child", ConsentScope::Analytics));
        assert!(!book.allows("p1_child", ConsentScope::Experiments));
        book.apply(record(2, ConsentScope::Analytics, false, 200));
        assert!(!book.allows("p1_child", ConsentScope::Analytics), "revoked");
        // A grant decided before the revocation but recorded after it does not undo it.
        book.apply(record(3, ConsentScope::Analytics, true, 150));
        assert!(!book.allows("p1_child", ConsentScope::Analytics));
        assert_eq!(
            book.in_force("p1_child", ConsentScope::Analytics),
            Some((false, 200))
        );
        // Decisions at the same time: the later record wins.
        book.apply(record(4, ConsentScope::Analytics, true, 200));
        assert!(book.allows("p1_child", ConsentScope::Analytics));
        assert_eq!(book.history("p1_child").len(), 4);
        assert!(book.history("p1_other").is_empty());
        assert_eq!(book.last_seq(), 4);
        assert_eq!(book.subjects(), 1);
    }

    #[test]
    fn across_pepper_versions_the_latest_decision_counts() {
        let mut book = ConsentBook::default();
        let mut old = record(1, ConsentScope::Analytics, true, 100);
        old.subject = "p1_child".into();
        let mut new = record(2, ConsentScope::Analytics, false, 100);
        new.subject = "p2_child".into();
        // A later record of another scope under the old name must not win the tie.
        let mut other = record(3, ConsentScope::Experiments, true, 100);
        other.subject = "p1_child".into();
        for r in [old, new, other] {
            book.apply(r);
        }
        let names = ["p2_child".to_owned(), "p1_child".to_owned()];
        assert_eq!(
            book.latest(&names, ConsentScope::Analytics),
            Some((false, 100))
        );
        assert_eq!(
            book.latest(&names, ConsentScope::Experiments),
            Some((true, 100))
        );
        assert_eq!(
            book.latest(&["p9_x".to_owned()], ConsentScope::Analytics),
            None
        );
    }

    #[test]
    fn exposures_need_the_experiments_scope() {
        assert_eq!(
            ConsentScope::needed_by("$exposure"),
            ConsentScope::Experiments
        );
        assert_eq!(
            ConsentScope::needed_by("lesson_completed"),
            ConsentScope::Analytics
        );
    }

    proptest! {
        /// Whatever order records are applied in, the decision in force is the one with the
        /// greatest (time, sequence).
        #[test]
        fn the_order_of_application_does_not_matter(
            decisions in proptest::collection::vec((any::<bool>(), 0i64..50), 1..20),
            seed in any::<u64>(),
        ) {
            let records: Vec<ConsentRecord> = decisions
                .iter()
                .enumerate()
                .map(|(i, (granted, at))| record(i as u64 + 1, ConsentScope::Analytics, *granted, *at))
                .collect();
            let expected = records
                .iter()
                .max_by_key(|r| (r.at, r.seq))
                .map(|r| r.granted)
                .unwrap();
            let mut shuffled = records.clone();
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut book = ConsentBook::default();
            for r in shuffled {
                book.apply(r);
            }
            prop_assert_eq!(book.allows("p1_child", ConsentScope::Analytics), expected);
        }
    }
}
