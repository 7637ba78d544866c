//! Events: the envelope apps send (ARCHITECTURE.md), its validation against the declared schema,
//! and clock-skew correction.
//!
//! Input: each event as a [`RawEvent`] (its fields as sent, borrowed from the request) from
//! `ingest`. Output: a typed, minimized [`Event`] (or a [`Rejection`] with a reason) for the
//! privacy gate and the write-ahead log. Pure: no I/O and no clock — the receive time is
//! passed in.

pub mod raw;
pub mod schema;
pub mod time;
pub mod validate;

pub use raw::RawEvent;
pub use schema::Schema;
pub use validate::{Event, Limits, Properties, RejectReason, Rejection, Validated, validate};
