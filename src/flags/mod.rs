//! Flags: flag definitions in flagd's format, their evaluation and murmur3 bucketing.
//!
//! Input: the files of `flags/`. Output: an immutable [`Snapshot`] that request handlers
//! evaluate without locks or parsing, swapped atomically when a file changes.
//!
//! `definition`, `logic`, `bucket`, `semver`, `evaluate`, `snapshot` and `exposure` are pure;
//! `files` (the disk) and `store` (the swap and the watcher thread) are the shell.

pub mod bucket;
pub mod definition;
pub mod evaluate;
pub mod exposure;
pub mod files;
pub mod logic;
pub mod metrics;
pub mod semver;
pub mod snapshot;
pub mod store;

pub use definition::{Experiment, Flag, Variant};
pub use evaluate::{ErrorCode, Reason, Resolution, evaluate};
pub use snapshot::Snapshot;
pub use store::FlagStore;

/// The key of a flag, unique across all files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlagKey(pub String);

/// A problem in one flag file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct FlagFileError {
    /// The file name.
    pub file: String,
    /// The 1-based line, or 0 when the problem is not tied to one line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}
