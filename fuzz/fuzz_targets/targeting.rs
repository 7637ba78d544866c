//! JsonLogic targeting with random contexts: the input is a JSON array `[rule, context]`; the
//! rule becomes a flag's targeting and is evaluated against the context. Nothing may panic.
#![no_main]

use flagstream::flags::definition::{Format, parse};
use flagstream::flags::{Snapshot, evaluate};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(parts)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (Some(rule), Some(context)) = (parts.first(), parts.get(1)) else {
        return;
    };
    let file = json!({"flags": {"f": {
        "state": "ENABLED",
        "variants": {"on": true, "off": false, "a": "a", "b": "b"},
        "defaultVariant": "off",
        "targeting": rule,
    }}});
    let parsed = parse("fuzz.json", &file.to_string(), Format::Json);
    let snapshot = Snapshot::build(vec![("fuzz.json".into(), parsed)], None);
    for flag in snapshot.flags() {
        let _ = evaluate(flag, context, 1_795_000_000);
    }
});
