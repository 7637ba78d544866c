//! What a family downloads for an access request: the export (NDJSON, for machines) and a
//! short summary in plain words (for the parent), in one zip archive. Pure, but for the zip
//! encoding.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::Value;

use crate::events::time::format_rfc3339;

/// A summary of an export, in plain words: what is held, since when, the flag assignments and
/// the consent history. `expires_at` is when the export is deleted.
pub fn summarize(ndjson: &[u8], expires_at: Option<i64>) -> String {
    let mut id = String::new();
    let mut subject = String::new();
    let mut generated = String::new();
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut first: Option<i64> = None;
    let mut last: Option<i64> = None;
    let mut flags = Vec::new();
    let mut consents = Vec::new();
    for line in ndjson.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(item) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        match item["kind"].as_str() {
            Some("request") => {
                id = text(&item["id"]);
                subject = text(&item["subject"]);
                generated = text(&item["generated_at"]);
            }
            Some("event") => {
                let event = &item["event"];
                *by_type.entry(text(&event["type"])).or_default() += 1;
                if let Some(at) = event["event_time"].as_i64() {
                    first = Some(first.map_or(at, |f| f.min(at)));
                    last = Some(last.map_or(at, |l| l.max(at)));
                }
            }
            Some("assignment") => flags.push(format!(
                "- {}: variant \"{}\" since {}",
                text(&item["flag"]),
                text(&item["variant"]),
                text(&item["first_exposed_at"])
            )),
            Some("consent") => {
                let decision = if item["granted"].as_bool() == Some(true) {
                    "granted"
                } else {
                    "revoked"
                };
                let how = match item["method"].as_str() {
                    Some("oidc") => " (by the guardian, signed in)",
                    Some("operator") => " (recorded by the privacy office)",
                    _ => "",
                };
                consents.push(format!(
                    "- {}: {} {decision}{how}",
                    text(&item["at"]),
                    text(&item["scope"])
                ));
            }
            _ => {}
        }
    }
    let events: u64 = by_type.values().sum();
    let mut out = String::new();
    out.push_str("What flagstream holds about your child\n");
    out.push_str("======================================\n\n");
    out.push_str(&format!(
        "Request {id}, made on {generated}.\nYour child is known here only by a pseudonym: {subject}.\n\n"
    ));
    match (first, last) {
        (Some(first), Some(last)) => out.push_str(&format!(
            "Events stored: {events}, from {} to {}.\n",
            format_rfc3339(first),
            format_rfc3339(last)
        )),
        _ => out.push_str(&format!("Events stored: {events}.\n")),
    }
    for (kind, count) in &by_type {
        out.push_str(&format!("- {kind}: {count}\n"));
    }
    out.push_str("\nExperiments your child took part in:\n");
    if flags.is_empty() {
        out.push_str("- none\n");
    }
    for line in &flags {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("\nConsent decisions:\n");
    if consents.is_empty() {
        out.push_str("- none recorded\n");
    }
    for line in &consents {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(
        "\nThe file export.ndjson holds every item above in full, one JSON object a line.\n",
    );
    if let Some(at) = expires_at {
        out.push_str(&format!(
            "This download is deleted on {}; ask again for a new one.\n",
            format_rfc3339(at)
        ));
    }
    out
}

/// The zip a family downloads: `export.ndjson` and `summary.txt`.
pub fn archive(ndjson: &[u8], summary: &str) -> zip::result::ZipResult<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("summary.txt", options)?;
    zip.write_all(summary.as_bytes())?;
    zip.start_file("export.ndjson", options)?;
    zip.write_all(ndjson)?;
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: &str = concat!(
        r#"{"kind":"request","id":"dsr-1","subject":"p1_ab","generated_at":"2026-12-01T10:00:00.000Z"}"#,
        "\n",
        r#"{"kind":"event","event":{"type":"app_opened","event_time":1764583200000}}"#,
        "\n",
        r#"{"kind":"event","event":{"type":"lesson_completed","event_time":1764586800000}}"#,
        "\n",
        r#"{"kind":"event","event":{"type":"app_opened","event_time":1764590400000}}"#,
        "\n",
        r#"{"kind":"assignment","flag":"reward-animation","variant":"stars","first_exposed_at":"2026-12-01T09:00:00.000Z"}"#,
        "\n",
        r#"{"kind":"consent","scope":"analytics","granted":false,"at":"2026-12-01T09:30:00.000Z","method":"oidc"}"#,
        "\n",
    );

    #[test]
    fn the_summary_says_what_is_held_in_plain_words() {
        let text = summarize(EXPORT.as_bytes(), Some(1_765_000_000_000));
        for expected in [
            "Request dsr-1",
            "pseudonym: p1_ab",
            "Events stored: 3, from 2025-12-01T10:00:00.000Z to 2025-12-01T12:00:00.000Z",
            "- app_opened: 2",
            "- lesson_completed: 1",
            "- reward-animation: variant \"stars\"",
            "analytics revoked (by the guardian, signed in)",
            "deleted on 2025-12-06",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
        let empty = summarize(b"", None);
        assert!(
            empty.contains("Events stored: 0.") && empty.contains("- none"),
            "{empty}"
        );
    }

    #[test]
    fn the_archive_holds_the_export_and_the_summary() {
        let bytes = archive(EXPORT.as_bytes(), "hello").unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut names: Vec<String> = zip
            .file_names()
            .map(|name| name.unwrap().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["export.ndjson", "summary.txt"]);
        let mut export = String::new();
        std::io::Read::read_to_string(&mut zip.by_name("export.ndjson").unwrap(), &mut export)
            .unwrap();
        assert_eq!(export, EXPORT);
    }
}
