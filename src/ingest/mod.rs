//! Ingest: `POST /v1/batch` and the `/v1/stream` WebSocket.
//!
//! Decodes and validates events, applies the privacy gate, deduplicates, appends to the
//! write-ahead log and acknowledges only once the record is durable. Every event gets its own
//! outcome; one bad event never loses the others.

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in the write-ahead log.
    Ok,
    /// Seen before; not stored again.
    Duplicate,
    /// Not stored, for this reason.
    Rejected(String),
}
