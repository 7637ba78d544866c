//! The write-ahead log's recovery reader on a corrupted segment: the input is the segment's
//! bytes. Recovery must never panic, must report what it skipped, and a second recovery after
//! the repair must find the same records and nothing torn.
#![no_main]

use std::sync::OnceLock;

use flagstream::wal::recover;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temp dir"))
        .path()
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join(format!("{:020}.wal", 1));
    std::fs::write(&path, data).expect("the segment is written");
    let mut first = Vec::new();
    let Ok(report) = recover(dir(), true, None, |epoch, events| {
        first.push((epoch, events.iter().map(|e| e.to_vec()).collect::<Vec<_>>()))
    }) else {
        return;
    };
    assert_eq!(report.epochs as usize, first.len());
    let mut second = Vec::new();
    let again = recover(dir(), true, None, |epoch, events| {
        second.push((epoch, events.iter().map(|e| e.to_vec()).collect::<Vec<_>>()))
    })
    .expect("a repaired log reads");
    assert_eq!(first, second, "the repair changed what is read");
    assert_eq!(again.truncated_bytes, 0, "a repaired tail is torn again");
});
