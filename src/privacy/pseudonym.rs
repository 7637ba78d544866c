//! Pseudonymization: `HMAC-SHA256(pepper, user_id)`, so raw user ids never reach storage.
//!
//! The pepper is versioned (a [`KeyRing`] file); the newest version makes new pseudonyms.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SubjectId;
use crate::crypto::KeyRing;

/// A secret key for pseudonyms, with its version. Never printed.
#[derive(Clone)]
pub struct Pepper {
    version: u32,
    /// HMAC keyed with the pepper, its key schedule done once: each pseudonym clones it.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pepper(v{}, [redacted])", self.version)
    }
}

impl Pepper {
    /// Builds a pepper from its parts (tests and key rotation).
    pub fn new(version: u32, key: [u8; 32]) -> Self {
        let keyed = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        Self { version, keyed }
    }

    /// Returns the pseudonym of `user_id`: `p<version>_` and 32 hex characters (128 bits).
    pub fn pseudonymize(&self, user_id: &str) -> SubjectId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.keyed.clone();
        mac.update(user_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(40);
        let _ = write!(out, "p{}_", self.version);
        for byte in &digest[..16] {
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
        SubjectId(out)
    }

    /// Every pepper of a ring, newest first: a subject's pseudonyms under each version, for
    /// finding what was recorded before a rotation.
    pub fn every(ring: &KeyRing) -> Vec<Self> {
        ring.versions()
            .rev()
            .map(|(version, key)| Self::new(version, *key))
            .collect()
    }

    /// Uses the newest key of a ring.
    pub fn from_ring(ring: &KeyRing) -> Self {
        let (version, key) = ring.newest();
        Self::new(version, *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_keyed_stable_and_versioned() {
        let a = Pepper::new(1, [7; 32]);
        let b = Pepper::new(2, [8; 32]);
        let id = a.pseudonymize("child-7781");
        // The first 128 bits of HMAC-SHA256 (Python's hmac module gives the same): stored
        // pseudonyms must not change with the code that makes them.
        assert_eq!(id.0, "p1_943e602504dc2073593c099666a530bb");
        assert_eq!(id, a.pseudonymize("child-7781"));
        assert!(id.0.starts_with("p1_") && id.0.len() == 35, "{id:?}");
        assert!(!id.0.contains("7781"));
        assert_ne!(
            a.pseudonymize("child-7781").0[3..],
            b.pseudonymize("child-7781").0[3..]
        );
        assert!(!format!("{a:?}").contains('7'));
    }
}
