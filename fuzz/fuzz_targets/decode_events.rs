//! An HTTP batch body, as any client could send it: decompressed (gzip, zstd or none, by the
//! first byte), split into events (JSON or NDJSON, by the second), and each event validated.
//! Nothing may panic, and the decompressed size cap must hold.
#![no_main]

use flagstream::events::{Limits, Schema, validate};
use flagstream::ingest::decode::{BodyFormat, DecodeLimits, Encoding, decode, decompress};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_795_000_000_000;

fuzz_target!(|data: &[u8]| {
    let [encoding, format, body @ ..] = data else {
        return;
    };
    let encoding = match encoding % 3 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Zstd,
    };
    let format = if format % 2 == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let limits = DecodeLimits {
        max_decompressed: 64 * 1024,
        max_event: 4 * 1024,
        max_events: 200,
    };
    let Ok(bytes) = decompress(body, encoding, limits.max_decompressed) else {
        return;
    };
    assert!(bytes.len() <= limits.max_decompressed);
    let Ok(decoded) = decode(&bytes, format, &limits) else {
        return;
    };
    assert!(decoded.events.len() <= limits.max_events);
    let schema = Schema::reading_app();
    let time = Limits {
        late_horizon: 30 * 86_400_000,
        future_tolerance: 60_000,
    };
    for event in decoded.events.into_iter().flatten() {
        if let Ok(valid) = validate(&event, decoded.sent_at, NOW, &schema, &time) {
            // Accepted events are stored as JSON and read back by every consumer.
            let stored = serde_json::to_vec(&valid.event).expect("events serialize");
            let _: flagstream::events::Event =
                serde_json::from_slice(&stored).expect("stored events read back");
            assert!(valid.event.event_time <= NOW + time.future_tolerance);
        }
    }
});
