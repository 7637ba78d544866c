//! Recovery: reads every intact epoch of the log in order, cuts off a torn tail, and reports,
//! then skips, damage in the middle; a sealed record whose key is missing stops it.

use std::fs::OpenOptions;
use std::path::Path;

use super::frame::{self, Format, Scan};
use super::metrics::{WAL_CORRUPT_RECORDS_TOTAL, WAL_TRUNCATED_BYTES_TOTAL};
use super::{Epoch, Recovery, WalError, segments};
use crate::crypto::Sealer;

/// The epoch and events of a frame's payload, opened first when it is sealed; `None` when
/// it does not decode (or opens with no key of the ring).
pub fn read_epoch<'a>(
    format: Format,
    payload: &'a [u8],
    sealer: Option<&Sealer>,
    scratch: &'a mut Vec<u8>,
) -> Option<(u64, Vec<&'a [u8]>)> {
    match format {
        Format::Plain => frame::decode_epoch(payload),
        Format::Sealed => frame::decode_epoch(sealer?.open(payload, scratch)?),
        Format::Padding => None,
    }
}

/// Reads every intact epoch of the log in `dir`, in order. With `repair`, a torn tail is cut
/// off the last segment; without, nothing is changed (for readers other than the writer).
// Long: one scan of every segment, each branch a kind of damage and what recovery does about it.
pub fn recover(
    dir: &Path,
    repair: bool,
    sealer: Option<&Sealer>,
    mut replay: impl FnMut(Epoch, &[&[u8]]),
) -> Result<Recovery, WalError> {
    let mut report = Recovery::default();
    let mut scratch = Vec::new();
    let paths = segments(dir)?;
    for (index, path) in paths.iter().enumerate() {
        let is_last = index + 1 == paths.len();
        let bytes = std::fs::read(path)?;
        let mut at = 0;
        while at < bytes.len() {
            match frame::scan(&bytes, at) {
                Scan::Frame {
                    format: Format::Padding,
                    next,
                    ..
                } => at = next,
                Scan::Frame {
                    format,
                    payload,
                    next,
                } => {
                    match read_epoch(format, payload, sealer, &mut scratch) {
                        Some((epoch, events)) => {
                            report.epochs += 1;
                            report.events += events.len() as u64;
                            report.last_epoch = report.last_epoch.max(Epoch(epoch));
                            replay(Epoch(epoch), &events);
                        }
                        // The checksum held, so the bytes are as written: the key is wrong.
                        None if format == Format::Sealed => {
                            return Err(WalError::Key {
                                at: format!("{}@{at}", path.display()),
                            });
                        }
                        None => {
                            report
                                .damaged
                                .push(format!("{}@{at} (undecodable record)", path.display()));
                            ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        }
                    }
                    at = next;
                }
                Scan::Incomplete | Scan::Damaged => match frame::resync(&bytes, at) {
                    // Intact frames follow: this is damage in the middle of the log.
                    Some(next) if frame_follows(&bytes, next) => {
                        report.damaged.push(format!(
                            "{}@{at} ({} bytes)",
                            path.display(),
                            next - at
                        ));
                        ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        tracing::error!(segment = %path.display(), offset = at, bytes = next - at, "damaged write-ahead log record skipped");
                        at = next;
                    }
                    // Nothing intact follows: a torn tail.
                    _ => {
                        let torn = (bytes.len() - at) as u64;
                        if is_last {
                            report.truncated_bytes += torn;
                            if repair {
                                let file = OpenOptions::new().write(true).open(path)?;
                                file.set_len(at as u64)?;
                                file.sync_all()?;
                                ::metrics::counter!(WAL_TRUNCATED_BYTES_TOTAL).increment(torn);
                                tracing::warn!(segment = %path.display(), bytes = torn, "torn write-ahead log tail truncated");
                            }
                        } else {
                            report
                                .damaged
                                .push(format!("{}@{at} ({torn} bytes)", path.display()));
                            ::metrics::counter!(WAL_CORRUPT_RECORDS_TOTAL).increment(1);
                        }
                        break;
                    }
                },
            }
        }
    }
    Ok(report)
}

fn frame_follows(bytes: &[u8], at: usize) -> bool {
    let mut at = at;
    loop {
        match frame::scan(bytes, at) {
            Scan::Frame { .. } => return true,
            _ => match frame::resync(bytes, at) {
                Some(next) => at = next,
                None => return false,
            },
        }
    }
}
