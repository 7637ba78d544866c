//! A WebSocket client message: read, then every event validated. Nothing may panic.
#![no_main]

use flagstream::events::{Limits, Schema, validate};
use flagstream::ingest::decode::{DecodeLimits, decode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits {
        max_decompressed: 64 * 1024,
        max_event: 4 * 1024,
        max_events: 200,
    };
    let Ok(message) = decode_message(data, &limits) else {
        return;
    };
    assert!(message.events.len() <= limits.max_events);
    let schema = Schema::reading_app();
    let time = Limits {
        late_horizon: 30 * 86_400_000,
        future_tolerance: 60_000,
    };
    for event in message.events.into_iter().flatten() {
        let _ = validate(&event, message.sent_at, 1_795_000_000_000, &schema, &time);
    }
});
