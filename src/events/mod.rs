//! Events: the envelope apps send, as DESIGN.md defines it.
//!
//! Input: bytes from `ingest` (JSON objects). Output: typed envelopes for the privacy gate and
//! the write-ahead log. Pure: no I/O, no clock (the receive time is passed in).

use serde::{Deserialize, Serialize};

/// The installation that sent an event; with `seq` it gives exact deduplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub String);

/// An event as a device sends it, before validation and pseudonymization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Client-generated unique id.
    pub event_id: String,
    /// The installation, when the client sends it.
    pub device_id: Option<DeviceId>,
    /// Monotonic per device, from 1.
    pub seq: Option<u64>,
    /// Raw user id: pseudonymized at ingest, never stored.
    pub user_id: Option<String>,
    /// The app session.
    pub session_id: Option<String>,
    /// A declared event type such as `lesson_completed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Device clock when it happened (RFC 3339).
    pub timestamp: String,
    /// Device clock when the batch was sent (RFC 3339).
    pub sent_at: Option<String>,
    /// App version, platform, locale, country and the like.
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Properties declared for the event type.
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
}
