//! The on-disk record format. Pure: bytes in, bytes out.
//!
//! A frame is `MAGIC (4) | format (1) | length (4, LE) | crc32 of the payload (4, LE) | payload`.
//! The magic lets recovery find the next frame after a damaged one; the format byte says
//! whether the payload is in clear or sealed (encrypted, see `seal`). A payload (once opened)
//! is one epoch: `epoch (8, LE) | count (4, LE)` then, per event, `length (4, LE) | event
//! JSON`.

/// Marks the start of every frame.
pub const MAGIC: [u8; 4] = *b"FSW1";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 13;
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// How a payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Format {
    /// The epoch encoding above, in clear.
    Plain = 0,
    /// The same, sealed with AES-256-GCM (key id and nonce precede the ciphertext).
    Sealed = 1,
    /// Filler with no meaning, skipped by every reader: an erasure rewrites an epoch shorter
    /// and pads it back to its old length, so that positions in the segment do not move.
    Padding = 2,
}

impl Format {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Format::Plain),
            1 => Some(Format::Sealed),
            2 => Some(Format::Padding),
            _ => None,
        }
    }
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, format: Format, payload: &[u8]) {
    let start = start_frame(out);
    out.extend_from_slice(payload);
    finish_frame(out, start, format);
}

/// Starts a frame at the end of `out` whose payload is appended after it, in place; returns
/// where it starts, for [`finish_frame`].
pub fn start_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    start
}

/// Completes the frame started at `start`: its payload is everything after its header.
pub fn finish_frame(out: &mut [u8], start: usize, format: Format) {
    let (header, payload) = out[start..].split_at_mut(HEADER_LEN);
    header[..4].copy_from_slice(&MAGIC);
    header[4] = format as u8;
    header[5..9].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[9..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
}

/// What was found at a position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan<'a> {
    /// A whole, intact frame, and the position after it.
    Frame {
        /// Its format.
        format: Format,
        /// Its payload.
        payload: &'a [u8],
        /// Where the next frame starts.
        next: usize,
    },
    /// The bytes end inside a frame (a torn write at the tail).
    Incomplete,
    /// The bytes here are not an intact frame.
    Damaged,
}

/// Reads the frame that starts at `at`.
pub fn scan(bytes: &[u8], at: usize) -> Scan<'_> {
    let rest = &bytes[at.min(bytes.len())..];
    if rest.len() < HEADER_LEN {
        return if MAGIC.starts_with(&rest[..rest.len().min(4)]) {
            Scan::Incomplete
        } else {
            Scan::Damaged
        };
    }
    if rest[..4] != MAGIC {
        return Scan::Damaged;
    }
    let Some(format) = Format::from_byte(rest[4]) else {
        return Scan::Damaged;
    };
    let len = u32::from_le_bytes(rest[5..9].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[9..13].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Scan::Damaged;
    }
    if rest.len() < HEADER_LEN + len {
        return Scan::Incomplete;
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return Scan::Damaged;
    }
    Scan::Frame {
        format,
        payload,
        next: at + HEADER_LEN + len,
    }
}

/// Returns the position of the next magic after `at`, where scanning may resume after damage.
pub fn resync(bytes: &[u8], at: usize) -> Option<usize> {
    let start = at + 1;
    bytes
        .get(start..)?
        .windows(MAGIC.len())
        .position(|window| window == MAGIC)
        .map(|offset| start + offset)
}

/// Builds an epoch payload from already-encoded events.
pub fn encode_epoch<'a>(epoch: u64, events: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut batch = Batch::with_capacity(events.len() * 256);
    for event in events {
        batch.push(event);
    }
    encode_epoch_batches(epoch, std::iter::once(&batch))
}

/// Events encoded for one append, already laid out as in an epoch payload (`length (4, LE) |
/// event` each), so a request's events are written into one buffer and the writer only
/// concatenates requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    bytes: Vec<u8>,
    count: u32,
}

impl Batch {
    /// Starts an empty batch with room for about `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Adds one event, written by `write` straight into the batch.
    pub fn push_with<E>(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        if let Err(err) = write(&mut self.bytes) {
            self.bytes.truncate(at);
            return Err(err);
        }
        let len = (self.bytes.len() - at - 4) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Adds one encoded event.
    pub fn push(&mut self, event: &[u8]) {
        let _ = self.push_with(|bytes| {
            bytes.extend_from_slice(event);
            Ok::<_, ()>(())
        });
    }

    /// Returns the number of events.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Returns whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Returns the encoded size in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

impl From<Vec<Vec<u8>>> for Batch {
    fn from(events: Vec<Vec<u8>>) -> Self {
        let mut batch = Batch::with_capacity(events.iter().map(|e| e.len() + 4).sum());
        for event in &events {
            batch.push(event);
        }
        batch
    }
}

/// Builds an epoch payload from the batches of a group commit, in order.
pub fn encode_epoch_batches<'a>(
    epoch: u64,
    batches: impl Iterator<Item = &'a Batch> + Clone,
) -> Vec<u8> {
    let mut out = Vec::new();
    append_epoch_batches(&mut out, epoch, batches);
    out
}

/// Appends the payload of [`encode_epoch_batches`] to `out`.
pub fn append_epoch_batches<'a>(
    out: &mut Vec<u8>,
    epoch: u64,
    batches: impl Iterator<Item = &'a Batch> + Clone,
) {
    let count: u32 = batches.clone().map(|b| b.count).sum();
    let size: usize = batches.clone().map(Batch::size).sum();
    out.reserve(12 + size);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for batch in batches {
        out.extend_from_slice(&batch.bytes);
    }
}

/// Splits an epoch payload into its number and its encoded events.
pub fn decode_epoch(payload: &[u8]) -> Option<(u64, Vec<&[u8]>)> {
    let epoch = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let count = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?) as usize;
    let mut at = 12;
    let mut events = Vec::with_capacity(count.min(payload.len() / 4));
    for _ in 0..count {
        let len = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        events.push(payload.get(at..at + len)?);
        at += len;
    }
    (at == payload.len()).then_some((epoch, events))
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn batches_concatenate_into_the_epoch_layout() {
        let mut first = Batch::with_capacity(64);
        first.push(b"{\"a\":1}");
        first
            .push_with(|out| serde_json::to_writer(out, &serde_json::json!({"b": 2})))
            .unwrap();
        // A failed write leaves nothing behind.
        assert!(
            first
                .push_with(|out| {
                    out.extend_from_slice(b"partial");
                    Err::<(), _>("no")
                })
                .is_err()
        );
        let second = Batch::from(vec![b"{}".to_vec()]);
        assert_eq!((first.len(), second.len()), (2, 1));
        let joined = encode_epoch_batches(7, [&first, &second].into_iter());
        let events: Vec<&[u8]> = vec![b"{\"a\":1}", b"{\"b\":2}", b"{}"];
        assert_eq!(decode_epoch(&joined), Some((7, events)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in payloads {
            encode_frame(&mut out, Format::Plain, payload);
        }
        out
    }

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let bytes = frames(&[b"one", b"two"]);
        let Scan::Frame { payload, next, .. } = scan(&bytes, 0) else {
            panic!()
        };
        assert_eq!(payload, b"one");
        assert!(matches!(
            scan(&bytes, next),
            Scan::Frame {
                payload: b"two",
                ..
            }
        ));
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN] ^= 0xff;
        assert_eq!(scan(&damaged, 0), Scan::Damaged);
        assert_eq!(resync(&damaged, 0), Some(next));
    }

    #[test]
    fn a_frame_cut_at_every_byte_is_incomplete_never_a_frame() {
        let bytes = frames(&[b"the last record"]);
        for cut in 0..bytes.len() {
            assert_eq!(scan(&bytes[..cut], 0), Scan::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn epochs_round_trip() {
        let events: Vec<&[u8]> = vec![b"{\"a\":1}", b"", b"{}"];
        let payload = encode_epoch(42, events.iter().copied());
        let (epoch, decoded) = decode_epoch(&payload).unwrap();
        assert_eq!(epoch, 42);
        assert_eq!(decoded, events);
        assert!(decode_epoch(&payload[..payload.len() - 1]).is_none());
    }

    fn format_of(n: u8) -> Format {
        [Format::Plain, Format::Sealed, Format::Padding][usize::from(n % 3)]
    }

    fn payloads() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)),
            1..6,
        )
    }

    fn encoded(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (format, payload) in frames {
            encode_frame(&mut bytes, format_of(*format), payload);
        }
        bytes
    }

    proptest! {
        #[test]
        fn scanning_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), at in 0usize..220) {
            let _ = scan(&bytes, at);
            let _ = resync(&bytes, at);
            let _ = decode_epoch(&bytes);
        }

        /// Frames read back as written, in order, ending exactly at the end.
        #[test]
        fn frames_round_trip(frames in payloads()) {
            let bytes = encoded(&frames);
            let mut at = 0;
            for (format, payload) in &frames {
                match scan(&bytes, at) {
                    Scan::Frame { format: read, payload: got, next } => {
                        prop_assert_eq!(read, format_of(*format));
                        prop_assert_eq!(got, payload.as_slice());
                        at = next;
                    }
                    other => prop_assert!(false, "at {}: {:?}", at, other),
                }
            }
            prop_assert_eq!(at, bytes.len());
        }

        /// A torn tail (the bytes cut anywhere inside the last frame) reads as incomplete,
        /// never as a frame or as damage, after the intact frames before it.
        #[test]
        fn a_torn_tail_is_incomplete(frames in payloads(), cut in 1usize..1000) {
            let bytes = encoded(&frames);
            let last = encoded(&frames[..frames.len() - 1]).len();
            let cut = last + cut % (bytes.len() - last);
            prop_assert_eq!(scan(&bytes[..cut], last), Scan::Incomplete);
        }

        /// Any one changed byte of a frame is seen: the frame is never read with another
        /// format or payload than it was written with.
        #[test]
        fn a_changed_byte_is_never_read_as_data(payload in proptest::collection::vec(any::<u8>(), 0..64), format in any::<u8>(), at in 0usize..1000, flip in 1u8..=255) {
            let mut bytes = Vec::new();
            encode_frame(&mut bytes, format_of(format), &payload);
            let at = at % bytes.len();
            bytes[at] ^= flip;
            if let Scan::Frame { format: read, payload: got, .. } = scan(&bytes, 0) {
                prop_assert!(false, "a changed byte at {} read as {:?} {:?}", at, read, got);
            }
        }

        /// Epochs round trip: the number and every event, in order.
        #[test]
        fn any_epoch_round_trips(epoch in any::<u64>(), events in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let payload = encode_epoch(epoch, events.iter().map(Vec::as_slice));
            let (read, got) = decode_epoch(&payload).expect("an encoded epoch decodes");
            prop_assert_eq!(read, epoch);
            prop_assert_eq!(got, events.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
    }
}
