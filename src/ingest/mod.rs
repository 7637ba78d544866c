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

/// Where server-side exposure records go: the ingest path stores them like any event. Until
/// the write-ahead log exists, [`CountingExposureSink`] only counts them.
pub trait ExposureSink: Send + Sync + 'static {
    /// Takes one exposure (already deduplicated per subject, flag and variant per day).
    fn submit(&self, exposure: crate::flags::exposure::Exposure);
}

/// Counts exposures in `flagstream_exposures_total` and keeps nothing.
#[derive(Debug, Default)]
pub struct CountingExposureSink;

impl ExposureSink for CountingExposureSink {
    fn submit(&self, _exposure: crate::flags::exposure::Exposure) {
        metrics::counter!(crate::server::metrics::EXPOSURES_TOTAL).increment(1);
    }
}
