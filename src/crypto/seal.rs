//! Encryption of write-ahead log records at rest: AES-256-GCM with the data key ring.
//!
//! A sealed payload is `key version (4, LE) | nonce (12) | ciphertext and tag`. The nonce is
//! a per-process random prefix (4 bytes) and the epoch (8, LE): epochs never repeat in a log,
//! and the prefix keeps two logs that share a configured key apart. New records use the
//! newest key; records of older versions stay readable while the ring holds their key.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::crypto::KeyRing;

/// Bound into every record's tag, so a payload sealed for something else does not open.
const AAD: &[u8] = b"flagstream wal v1";
const HEADER: usize = 4 + NONCE_LEN;

/// Seals and opens record payloads.
pub struct Sealer {
    /// Keys by version, newest last; a rotation adds to them while the log runs.
    keys: std::sync::RwLock<Vec<(u32, LessSafeKey)>>,
    prefix: [u8; 4],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<u32> = self.keys().iter().map(|(v, _)| *v).collect();
        write!(f, "Sealer(versions {versions:?})")
    }
}

impl Sealer {
    /// Builds a sealer over every key of `ring`.
    pub fn new(ring: &KeyRing) -> Self {
        let mut prefix = [0u8; 4];
        getrandom::fill(&mut prefix).expect("the system has randomness");
        Self {
            keys: std::sync::RwLock::new(Self::bind(ring)),
            prefix,
        }
    }

    fn bind(ring: &KeyRing) -> Vec<(u32, LessSafeKey)> {
        ring.versions()
            .map(|(version, key)| {
                let key = UnboundKey::new(&AES_256_GCM, key).expect("32-byte keys");
                (version, LessSafeKey::new(key))
            })
            .collect()
    }

    /// Replaces the keys by `ring` (a rotation: the ring holds every earlier version too).
    /// New records use its newest key from now on.
    pub fn rotate(&self, ring: &KeyRing) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Self::bind(ring);
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Vec<(u32, LessSafeKey)>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals the payload of `epoch` with the newest key.
    pub fn seal(&self, epoch: u64, payload: &[u8]) -> Vec<u8> {
        self.sealed(self.epoch_nonce(epoch), payload)
    }

    /// Starts a sealed payload at the end of `out`, its plaintext appended after it in place;
    /// returns where it starts, for [`Sealer::finish`].
    pub fn start(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.resize(start + HEADER, 0);
        start
    }

    /// Seals, in place, the payload of `epoch` started at `start` (everything after its
    /// header) with the newest key.
    pub fn finish(&self, epoch: u64, out: &mut Vec<u8>, start: usize) {
        self.seal_at(self.epoch_nonce(epoch), out, start);
    }

    /// The nonce of an epoch's first sealing: this process's prefix and the epoch.
    fn epoch_nonce(&self, epoch: u64) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&epoch.to_le_bytes());
        nonce
    }

    /// Seals a rewritten payload with the newest key under a wholly random nonce: the epoch
    /// was sealed once already, perhaps by this process with this prefix, and a nonce must
    /// never be used twice under one key.
    pub fn reseal(&self, payload: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the system has randomness");
        self.sealed(nonce, payload)
    }

    fn sealed(&self, nonce: [u8; NONCE_LEN], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + payload.len() + AES_256_GCM.tag_len());
        let start = Self::start(&mut out);
        out.extend_from_slice(payload);
        self.seal_at(nonce, &mut out, start);
        out
    }

    fn seal_at(&self, nonce: [u8; NONCE_LEN], out: &mut Vec<u8>, start: usize) {
        let keys = self.keys();
        let (version, key) = keys.last().expect("a ring holds a key");
        let (header, body) = out[start..].split_at_mut(HEADER);
        header[..4].copy_from_slice(&version.to_le_bytes());
        header[4..].copy_from_slice(&nonce);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), body)
            .expect("payloads fit AES-GCM");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a sealed payload into `scratch` and returns the plaintext; `None` when its key
    /// is not in the ring or it does not authenticate.
    pub fn open<'a>(&self, sealed: &[u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        if sealed.len() < HEADER {
            return None;
        }
        let version = u32::from_le_bytes(sealed[..4].try_into().ok()?);
        let nonce: [u8; NONCE_LEN] = sealed[4..HEADER].try_into().ok()?;
        let keys = self.keys();
        let (_, key) = keys.iter().find(|(v, _)| *v == version)?;
        scratch.clear();
        scratch.extend_from_slice(&sealed[HEADER..]);
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), scratch)
            .ok()?;
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text).unwrap()
    }

    #[test]
    fn sealed_records_open_hide_their_content_and_survive_a_rotation() {
        let one = format!("1 {}", "11".repeat(32));
        let two = format!("{one}\n2 {}", "22".repeat(32));
        let old = Sealer::new(&ring(&one));
        let sealed = old.seal(7, b"child events");
        assert!(
            !sealed.windows(5).any(|w| w == b"child"),
            "the payload shows"
        );
        let mut scratch = Vec::new();
        assert_eq!(old.open(&sealed, &mut scratch), Some(&b"child events"[..]));
        // After a rotation new records use key 2; records of key 1 still open.
        let rotated = Sealer::new(&ring(&two));
        let newer = rotated.seal(8, b"later");
        assert_eq!(u32::from_le_bytes(newer[..4].try_into().unwrap()), 2);
        assert_eq!(
            rotated.open(&sealed, &mut scratch),
            Some(&b"child events"[..])
        );
        assert_eq!(rotated.open(&newer, &mut scratch), Some(&b"later"[..]));
        // Without key 2, or tampered with, a record does not open.
        assert_eq!(old.open(&newer, &mut scratch), None);
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(old.open(&tampered, &mut scratch), None);
        assert_eq!(old.open(&sealed[..10], &mut scratch), None);
        let other = Sealer::new(&ring(&format!("1 {}", "33".repeat(32))));
        assert_eq!(other.open(&sealed, &mut scratch), None, "a wrong key");
    }
}
