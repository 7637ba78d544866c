//! A flag file in flagd's format (JSON, or YAML when the first byte is odd): parsed, built into
//! a snapshot, and every flag it holds evaluated with a few contexts. Nothing may panic; a
//! flag either resolves to one of its variants or reports an error.
#![no_main]

use flagstream::flags::definition::{Format, parse};
use flagstream::flags::{Resolution, Snapshot, evaluate};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let [kind, text @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let format = if kind % 2 == 0 {
        Format::Json
    } else {
        Format::Yaml
    };
    let parsed = parse("fuzz.json", text, format);
    let snapshot = Snapshot::build(vec![("fuzz.json".into(), parsed)], None);
    let contexts = [
        json!({}),
        json!({"targetingKey": "child-1", "country": "BR", "appVersion": "3.2.1", "age": 7}),
        json!({"targetingKey": "", "email": "x@example.org", "tags": ["a", "b"]}),
    ];
    for flag in snapshot.flags() {
        for context in &contexts {
            if let Resolution::Variant(variant, _) = evaluate(flag, context, 1_795_000_000) {
                assert!(
                    flag.variant(&variant.name).is_some(),
                    "resolved to an unknown variant"
                );
            }
        }
    }
});
