//! What the run sent and what the server acknowledged, per device and sequence number: the
//! expectations `--verify` checks the server's stored events and counters against.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One device's sequence numbers.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceLog {
    /// The highest sequence number sent at least once (sequence numbers start at 1).
    pub sent: u64,
    /// Acknowledged sequence numbers (`ok` or `duplicate`) as sorted, disjoint, non-adjacent
    /// inclusive ranges.
    pub acked: Vec<(u64, u64)>,
    /// Sequence numbers the server answered `rejected` for (never stored).
    pub rejected: Vec<u64>,
}

impl DeviceLog {
    /// Marks `lo..=hi` acknowledged.
    pub fn ack(&mut self, lo: u64, hi: u64) {
        if lo > hi {
            return;
        }
        self.rejected.retain(|seq| !(lo..=hi).contains(seq));
        self.acked.push((lo, hi));
        self.acked.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.acked.len());
        for &(lo, hi) in &self.acked {
            match merged.last_mut() {
                Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        self.acked = merged;
    }

    /// Returns how many sequence numbers are acknowledged.
    pub fn acked_count(&self) -> u64 {
        self.acked.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    /// Returns whether every sequence number sent got an answer (acknowledged or rejected),
    /// so the stored events must be exactly the acknowledged ones.
    pub fn settled(&self) -> bool {
        self.acked_count() + self.rejected.len() as u64 == self.sent
    }

    /// Returns whether `seq` is acknowledged.
    pub fn is_acked(&self, seq: u64) -> bool {
        self.acked.iter().any(|&(lo, hi)| (lo..=hi).contains(&seq))
    }
}

/// Every device of a run.
#[derive(Debug, Default)]
pub struct Ledger {
    devices: Mutex<BTreeMap<String, DeviceLog>>,
}

impl Ledger {
    /// Records that `first..first + count` of `device` were sent.
    pub fn sent(&self, device: &str, first: u64, count: u64) {
        let mut devices = self.devices.lock().expect("ledger");
        let log = devices.entry(device.to_owned()).or_default();
        log.sent = log.sent.max(first + count - 1);
    }

    /// Records the server's answer for the events `first..` of `device`: one status per event,
    /// in order (`ok`, `duplicate` or `rejected`).
    pub fn answered<'a>(&self, device: &str, first: u64, statuses: impl Iterator<Item = &'a str>) {
        let mut devices = self.devices.lock().expect("ledger");
        let log = devices.entry(device.to_owned()).or_default();
        let mut run: Option<(u64, u64)> = None;
        for (offset, status) in statuses.enumerate() {
            let seq = first + offset as u64;
            if matches!(status, "ok" | "duplicate") {
                run = match run {
                    Some((lo, hi)) if hi + 1 == seq => Some((lo, seq)),
                    Some((lo, hi)) => {
                        log.ack(lo, hi);
                        Some((seq, seq))
                    }
                    None => Some((seq, seq)),
                };
            } else if !log.rejected.contains(&seq) && !log.is_acked(seq) {
                log.rejected.push(seq);
            }
        }
        if let Some((lo, hi)) = run {
            log.ack(lo, hi);
        }
    }

    /// Applies an answer's per-event `results` (in order, from `first`; `expected` of them) and
    /// records the `operation` as done since `since`, carrying the events accepted; a short
    /// answer or rejected events also count as errors.
    #[allow(clippy::too_many_arguments)]
    pub fn acknowledge(
        &self,
        device: &str,
        first: u64,
        expected: u64,
        answer: &serde_json::Value,
        recorder: &crate::report::Recorder,
        operation: &'static str,
        since: std::time::Instant,
    ) {
        let statuses: Vec<&str> = answer["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["status"].as_str().unwrap_or("rejected"))
            .collect();
        if statuses.len() as u64 != expected {
            recorder.error(operation, "short_answer");
        }
        self.answered(device, first, statuses.iter().copied());
        let accepted = statuses
            .iter()
            .filter(|s| matches!(**s, "ok" | "duplicate"))
            .count() as u64;
        if accepted < expected {
            recorder.error(operation, "rejected_events");
        }
        recorder.ok(operation, since, accepted);
    }

    /// Returns a copy of every device's log.
    pub fn devices(&self) -> BTreeMap<String, DeviceLog> {
        self.devices.lock().expect("ledger").clone()
    }

    /// Returns a ledger holding `devices` (read back from a file).
    pub fn from_devices(devices: BTreeMap<String, DeviceLog>) -> Self {
        Self {
            devices: Mutex::new(devices),
        }
    }

    /// Returns the events acknowledged in all.
    pub fn acked(&self) -> u64 {
        self.devices
            .lock()
            .expect("ledger")
            .values()
            .map(DeviceLog::acked_count)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_merged_ranges_and_rejections() {
        let ledger = Ledger::default();
        ledger.sent("d", 1, 10);
        ledger.answered("d", 1, ["ok", "ok", "rejected", "duplicate"].into_iter());
        ledger.answered("d", 7, ["ok"; 4].into_iter());
        let log = &ledger.devices()["d"];
        assert_eq!(log.acked, vec![(1, 2), (4, 4), (7, 10)]);
        assert_eq!(log.rejected, vec![3]);
        assert!(!log.settled());
        ledger.answered("d", 5, ["ok", "ok"].into_iter());
        let log = &ledger.devices()["d"];
        assert_eq!(log.acked, vec![(1, 2), (4, 10)]);
        assert!(log.settled());
        assert_eq!(ledger.acked(), 9);
        assert!(log.is_acked(4) && !log.is_acked(3));
    }
}
