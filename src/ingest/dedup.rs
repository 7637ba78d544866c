//! Deduplication. Exact for events with `device_id` + `seq`: per device, a high-water mark and
//! the set of lower sequence numbers not seen yet (memory grows with devices and gaps, not with
//! events). By `event_id` over a bounded horizon for events without `seq`.
//!
//! Pure: the state is rebuilt on start from its last snapshot ([`Dedup::encode`], written by
//! [`super::snapshot`]) and the write-ahead log.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::events::Event;

/// Whether an event was seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: store it.
    New,
    /// Seen before: acknowledge, do not store again.
    Duplicate,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Device {
    high: u64,
    gaps: BTreeSet<u64>,
}

/// The dedup state.
#[derive(Debug, Clone)]
pub struct Dedup {
    devices: HashMap<String, Device>,
    ids: HashSet<u128>,
    order: VecDeque<u128>,
    id_capacity: usize,
    max_gaps: usize,
}

/// The first bytes of an encoded state (and its format's version).
const MAGIC: &[u8] = b"flagstream-dedup 1\n";

/// Reads little-endian numbers and byte runs off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn id_key(event_id: &str) -> u128 {
    murmur3::murmur3_x64_128(&mut event_id.as_bytes(), 0).unwrap_or(0)
}

impl Dedup {
    /// Remembers `id_capacity` event ids (oldest forgotten first) and at most `max_gaps` missing
    /// sequence numbers per device. A device that skips more than `max_gaps` numbers gets the
    /// oldest ones treated as seen: a client bug should not grow memory without bound.
    pub fn new(id_capacity: usize, max_gaps: usize) -> Self {
        Self {
            devices: HashMap::new(),
            ids: HashSet::new(),
            order: VecDeque::new(),
            id_capacity: id_capacity.max(1),
            max_gaps,
        }
    }

    /// Records `event` and says whether it is new.
    pub fn check(&mut self, event: &Event<'_>) -> Seen {
        self.check_keys(&event.event_id, event.device_id.as_deref(), event.seq)
    }

    /// Records an event by the fields dedup reads, and says whether it is new.
    pub fn check_keys(&mut self, event_id: &str, device: Option<&str>, seq: Option<u64>) -> Seen {
        match (device, seq) {
            (Some(device), Some(seq)) => self.check_seq(device, seq),
            _ => self.check_id(event_id),
        }
    }

    fn check_seq(&mut self, device: &str, seq: u64) -> Seen {
        let state = match self.devices.get_mut(device) {
            Some(state) => state,
            None => self.devices.entry(device.to_owned()).or_default(),
        };
        if seq > state.high {
            let first_gap = (state.high + 1).max(seq.saturating_sub(self.max_gaps as u64));
            state.gaps.extend(first_gap..seq);
            while state.gaps.len() > self.max_gaps {
                state.gaps.pop_first();
            }
            state.high = seq;
            Seen::New
        } else if state.gaps.remove(&seq) {
            Seen::New
        } else {
            Seen::Duplicate
        }
    }

    fn check_id(&mut self, event_id: &str) -> Seen {
        self.check_key(id_key(event_id))
    }

    fn check_key(&mut self, key: u128) -> Seen {
        if !self.ids.insert(key) {
            return Seen::Duplicate;
        }
        self.order.push_back(key);
        while self.order.len() > self.id_capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        Seen::New
    }

    /// Forgets `event` after it could not be stored, so that a retry is accepted.
    pub fn forget(&mut self, event: &Event<'_>) {
        match (&event.device_id, event.seq) {
            (Some(device), Some(seq)) => {
                if let Some(state) = self.devices.get_mut(device.as_ref()) {
                    state.gaps.insert(seq);
                }
            }
            _ => {
                self.ids.remove(&id_key(&event.event_id));
            }
        }
    }

    /// Forgets event ids by their key (see [`Dedup::id_key`]).
    pub fn forget_ids(&mut self, keys: &[u128]) {
        for key in keys {
            self.ids.remove(key);
        }
        self.order.retain(|k| self.ids.contains(k));
    }

    /// The key an event id is remembered by.
    pub fn id_key(event_id: &str) -> u128 {
        id_key(event_id)
    }

    /// Writes the state: a magic line, the devices (id, high-water mark, gaps), the event-id
    /// keys oldest first, and a CRC-32 of it all.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.devices.len() * 48 + self.order.len() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.devices.len() as u64).to_le_bytes());
        for (id, device) in &self.devices {
            out.extend_from_slice(&(id.len() as u32).to_le_bytes());
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&device.high.to_le_bytes());
            out.extend_from_slice(&(device.gaps.len() as u32).to_le_bytes());
            for gap in &device.gaps {
                out.extend_from_slice(&gap.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.order.len() as u64).to_le_bytes());
        for key in &self.order {
            out.extend_from_slice(&key.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a state written by [`Dedup::encode`] into `self` (which keeps its limits);
    /// `None` when the bytes are not a whole, intact snapshot.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Option<()> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32fast::hash(body).to_le_bytes() != crc {
            return None;
        }
        let mut reader = Reader(body.strip_prefix(MAGIC)?);
        let mut devices = HashMap::new();
        for _ in 0..reader.u64()? {
            let len = reader.u32()? as usize;
            let id = std::str::from_utf8(reader.take(len)?).ok()?.to_owned();
            let high = reader.u64()?;
            let mut gaps = BTreeSet::new();
            for _ in 0..reader.u32()? {
                gaps.insert(reader.u64()?);
            }
            devices.insert(id, Device { high, gaps });
        }
        let mut order = VecDeque::new();
        for _ in 0..reader.u64()? {
            order.push_back(u128::from_le_bytes(reader.take(16)?.try_into().ok()?));
        }
        if !reader.0.is_empty() {
            return None;
        }
        for (id, device) in devices {
            let state = self.devices.entry(id).or_default();
            if device.high > state.high {
                *state = device;
            }
        }
        for key in order {
            self.check_key(key);
        }
        Some(())
    }

    /// Returns the devices tracked.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Returns the event ids remembered.
    pub fn ids(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event<'a>(device: Option<&'a str>, seq: Option<u64>, id: &'a str) -> Event<'a> {
        Event {
            event_id: id.into(),
            device_id: device.map(Into::into),
            seq,
            subject: None,
            session_id: None,
            event_type: "app_opened".into(),
            event_time: 0,
            device_time: 0,
            sent_at: None,
            received_at: 0,
            context: Default::default(),
            properties: Default::default(),
        }
    }

    #[test]
    fn sequences_are_exact_including_late_gaps() {
        let mut dedup = Dedup::new(10, 100);
        let seq = |dedup: &mut Dedup, n| dedup.check(&event(Some("tab"), Some(n), "x"));
        assert_eq!(seq(&mut dedup, 1), Seen::New);
        assert_eq!(seq(&mut dedup, 5), Seen::New);
        assert_eq!(seq(&mut dedup, 5), Seen::Duplicate);
        assert_eq!(seq(&mut dedup, 3), Seen::New, "a gap filled late");
        assert_eq!(seq(&mut dedup, 3), Seen::Duplicate);
        assert_eq!(seq(&mut dedup, 1), Seen::Duplicate);
        assert_eq!(dedup.check(&event(Some("other"), Some(5), "x")), Seen::New);
    }

    #[test]
    fn forgetting_lets_a_retry_in() {
        let mut dedup = Dedup::new(10, 100);
        let e = event(Some("tab"), Some(9), "x");
        assert_eq!(dedup.check(&e), Seen::New);
        dedup.forget(&e);
        assert_eq!(dedup.check(&e), Seen::New);
        let e = event(None, None, "id-1");
        assert_eq!(dedup.check(&e), Seen::New);
        dedup.forget(&e);
        assert_eq!(dedup.check(&e), Seen::New);
    }

    #[test]
    fn memory_is_bounded() {
        let mut dedup = Dedup::new(3, 10);
        for i in 0..10 {
            assert_eq!(dedup.check(&event(None, None, &format!("e{i}"))), Seen::New);
        }
        assert_eq!(dedup.ids(), 3);
        assert_eq!(
            dedup.check(&event(Some("tab"), Some(1_000_000), "x")),
            Seen::New
        );
        assert_eq!(dedup.devices.get("tab").unwrap().gaps.len(), 10);
    }

    proptest! {
        /// Against a naive model that remembers everything (within the gap bound).
        #[test]
        fn matches_a_set_of_everything_seen(seqs in proptest::collection::vec(1u64..200, 1..300)) {
            let mut dedup = Dedup::new(1000, 1000);
            let mut seen = std::collections::HashSet::new();
            for s in seqs {
                let expected = if seen.insert(s) { Seen::New } else { Seen::Duplicate };
                prop_assert_eq!(dedup.check(&event(Some("d"), Some(s), "x")), expected);
            }
        }
    }
}
