//! The write-ahead log: append-only segment files of CRC-framed (and encrypted) records,
//! written by one group-commit thread that fsyncs before any acknowledgement.
//!
//! Input: validated, pseudonymized events from `ingest`. Output: epochs (one per committed
//! batch) for the pipeline and the SQL segment writer, and replay after a crash.

/// The number of a committed WAL batch; timely's timestamp in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);
