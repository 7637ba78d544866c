//! Privacy: pseudonymous subjects, the consent ledger and gate, data-subject requests and
//! retention.
//!
//! Sits between event validation and the write-ahead log: nothing reaches storage with a raw
//! user id, and nothing from a subject without granted consent (where the project requires it).

pub mod audit;
pub mod consent;
pub mod erasure;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod pseudonym;
pub mod requests;
pub mod retention;
pub mod summary;

pub use consent::ConsentScope;
pub use ledger::{ConsentLedger, LedgerError};
pub use pseudonym::Pepper;

/// A subject's pseudonym: `HMAC-SHA256(pepper, user_id)`, tagged with the pepper version.
/// Raw user ids never leave the ingest path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectId(pub String);
