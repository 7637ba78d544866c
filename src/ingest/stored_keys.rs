//! The dedup keys of a stored event (`event_id`, `device_id`, `seq`), read from its JSON
//! record without reading the rest when possible. Pure.
//!
//! Every record the log holds is read for its keys on each start and by the dedup snapshots
//! all the time. The service writes these three fields first, so a scan of the top-level
//! members stops as soon as it has all three; anything it does not expect (an escape, an
//! unusual value, a key seen twice) hands the record to the full JSON reader instead. The scan
//! trusts the record to be the JSON the service wrote (records are CRC-checked before they get
//! here): it does not validate what it skips, nor look past the keys once it has them.

use std::borrow::Cow;

use serde::Deserialize;

/// The fields of a stored event dedup needs.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct Keys<'a> {
    /// The event's id.
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    /// The installation, when sent.
    #[serde(borrow, default)]
    pub device_id: Option<Cow<'a, str>>,
    /// The device's sequence number, when sent.
    #[serde(default)]
    pub seq: Option<u64>,
}

/// Reads the keys of a stored record; `None` when it is not a stored event.
pub fn read(stored: &[u8]) -> Option<Keys<'_>> {
    match scan(stored) {
        Some(keys) => Some(keys),
        None => serde_json::from_slice(stored).ok(),
    }
}

/// The fast path: `None` whenever the record is not plain enough to be sure.
fn scan(bytes: &[u8]) -> Option<Keys<'_>> {
    let mut at = 0;
    let mut event_id = None;
    let mut device_id = None;
    let mut seq = None;
    expect(bytes, &mut at, b'{')?;
    loop {
        let key = plain_string(bytes, &mut at)?;
        expect(bytes, &mut at, b':')?;
        match key {
            "event_id" if event_id.is_none() => event_id = Some(plain_string(bytes, &mut at)?),
            "device_id" if device_id.is_none() => device_id = Some(plain_string(bytes, &mut at)?),
            "seq" if seq.is_none() => seq = Some(number(bytes, &mut at)?),
            "event_id" | "device_id" | "seq" => return None,
            _ => skip_value(bytes, &mut at)?,
        }
        if let (Some(id), Some(device), Some(seq)) = (event_id, device_id, seq) {
            return Some(Keys {
                event_id: Cow::Borrowed(id),
                device_id: Some(Cow::Borrowed(device)),
                seq: Some(seq),
            });
        }
        match next(bytes, &mut at)? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    // The end of the record: trailing bytes mean it is not one JSON value.
    if bytes[at..].iter().any(|b| !b.is_ascii_whitespace()) {
        return None;
    }
    Some(Keys {
        event_id: Cow::Borrowed(event_id?),
        device_id: device_id.map(Cow::Borrowed),
        seq,
    })
}

fn next(bytes: &[u8], at: &mut usize) -> Option<u8> {
    while let Some(byte) = bytes.get(*at) {
        *at += 1;
        if !byte.is_ascii_whitespace() {
            return Some(*byte);
        }
    }
    None
}

fn expect(bytes: &[u8], at: &mut usize, byte: u8) -> Option<()> {
    (next(bytes, at)? == byte).then_some(())
}

/// A string without escapes or control characters, as text.
fn plain_string<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a str> {
    expect(bytes, at, b'"')?;
    let start = *at;
    let len = bytes[start..].iter().position(|b| *b == b'"')?;
    let text = &bytes[start..start + len];
    if text.iter().any(|b| *b == b'\\' || *b < 0x20) {
        return None;
    }
    *at = start + len + 1;
    std::str::from_utf8(text).ok()
}

/// A whole number from 0 to `u64::MAX` written plainly (what the service writes for `seq`).
fn number(bytes: &[u8], at: &mut usize) -> Option<u64> {
    next(bytes, at)?;
    *at -= 1;
    let start = *at;
    let len = bytes[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let digits = &bytes[start..start + len];
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    if matches!(bytes.get(start + len), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    *at = start + len;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Skips one value of any kind, checking only what it must to find its end.
fn skip_value(bytes: &[u8], at: &mut usize) -> Option<()> {
    let mut depth = 0usize;
    loop {
        match next(bytes, at)? {
            b'"' => {
                // To the closing quote, past escaped characters.
                loop {
                    match bytes.get(*at)? {
                        b'\\' => *at += 2,
                        b'"' => {
                            *at += 1;
                            break;
                        }
                        _ => *at += 1,
                    }
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            _ => {
                // A number or literal: to the next delimiter.
                while let Some(byte) = bytes.get(*at) {
                    if matches!(byte, b',' | b'}' | b']' | b':') || byte.is_ascii_whitespace() {
                        break;
                    }
                    *at += 1;
                }
            }
        }
        if depth == 0 {
            return Some(());
        }
        // Inside a container: members and elements are separated by ',' and ':'.
        while let Some(byte) = bytes.get(*at) {
            if matches!(byte, b',' | b':') || byte.is_ascii_whitespace() {
                *at += 1;
            } else {
                break;
            }
        }
        if matches!(bytes.get(*at), Some(b'}' | b']')) {
            *at += 1;
            depth -= 1;
            if depth == 0 {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(stored: &[u8]) -> Option<Keys<'_>> {
        serde_json::from_slice(stored).ok()
    }

    #[test]
    fn the_scan_agrees_with_the_full_reader() {
        let cases: &[&[u8]] = &[
            br#"{"event_id":"e1","device_id":"tab-1","seq":5,"subject":"p1_ab","type":"x"}"#,
            br#"{"event_id":"e2","subject":"p1_ab","properties":{"seq":3,"a":[1,{"b":"}"}]}}"#,
            br#"{"event_id":"e3","device_id":"tab-1","type":"x"}"#,
            br#"{"type":"x","properties":{"q":"a\"b"},"seq":7,"device_id":"d","event_id":"e4"}"#,
            br#"{"event_id":"e\u00e95","device_id":"d","seq":1}"#,
            br#"{"event_id":"e6","seq":1,"seq":2,"device_id":"d"}"#,
            br#"{"event_id":"e7","device_id":"d","seq":1.5}"#,
            br#"{"event_id":"e8","device_id":"d","seq":01}"#,
            br#"{"event_id":"e9","device_id":"d","seq":null}"#,
            br#"{"event_id":"e10","device_id":"d","seq":18446744073709551616}"#,
            br#" { "event_id" : "e11" , "n" : -1.5e3 , "t" : true , "z" : null } "#,
            br#"{"event_id":"e12"} trailing"#,
            br#"{"event_id":"e13","n":3"#,
            br#"{"device_id":"d","seq":3}"#,
            br#"{"event_id":5}"#,
            b"not json",
            b"",
        ];
        for stored in cases {
            assert_eq!(
                read(stored),
                full(stored),
                "{}",
                String::from_utf8_lossy(stored)
            );
        }
        // The plain records the service writes take the fast path.
        assert!(scan(cases[0]).is_some() && scan(cases[1]).is_some());
        assert!(scan(cases[2]).is_some() && scan(cases[10]).is_some());
    }

    #[test]
    fn stored_events_lead_with_their_keys() {
        // The scan stops early only because events are written with these fields first.
        let event = crate::events::Event {
            event_id: "e".into(),
            device_id: Some("d".into()),
            seq: Some(9),
            subject: Some("p1_ab".into()),
            session_id: None,
            event_type: "app_opened".into(),
            event_time: 1,
            device_time: 1,
            sent_at: None,
            received_at: 1,
            context: Default::default(),
            properties: Default::default(),
        };
        let stored = serde_json::to_vec(&event).unwrap();
        assert!(stored.starts_with(br#"{"event_id":"e","device_id":"d","seq":9,"#));
        assert_eq!(read(&stored), full(&stored));
    }
}
