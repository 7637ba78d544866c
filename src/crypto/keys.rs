//! Versioned secret keys: the pseudonymization pepper and the data key that encrypts storage
//! at rest share one file format, `<version> <64 hex characters>` a line (or separated by `;`
//! when passed in the environment), so either can be rotated by adding a newer line.
//!
//! A missing key file is created on first start with one random key (version 1), readable by
//! its owner only.

use std::collections::BTreeMap;
use std::path::Path;

/// A set of 32-byte keys by version. Never printed.
#[derive(Clone)]
pub struct KeyRing {
    keys: BTreeMap<u32, [u8; 32]>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<_> = self.keys.keys().collect();
        write!(f, "KeyRing(versions {versions:?}, [redacted])")
    }
}

/// Why a key file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The content is not `<version> <64 hex>` lines.
    #[error("key file {path}: entry {line} is not `<version> <64 hex characters>`")]
    Format {
        /// The file (or the configuration key the keys came from).
        path: String,
        /// The 1-based entry.
        line: usize,
    },
    /// No randomness was available to create one.
    #[error("cannot generate a key: {0}")]
    Random(String),
}

impl KeyRing {
    /// Builds a ring of one key.
    pub fn single(version: u32, key: [u8; 32]) -> Self {
        Self {
            keys: BTreeMap::from([(version, key)]),
        }
    }

    /// Returns the newest key and its version.
    pub fn newest(&self) -> (u32, &[u8; 32]) {
        let (version, key) = self.keys.last_key_value().expect("a ring holds a key");
        (*version, key)
    }

    /// Returns every version and key, oldest first.
    pub fn versions(&self) -> impl DoubleEndedIterator<Item = (u32, &[u8; 32])> {
        self.keys.iter().map(|(version, key)| (*version, key))
    }

    /// Returns this ring with the keys of `newer` added (a rotation), and whether any was
    /// new. A version that `newer` gives a different key is refused (its data would no longer
    /// open); versions missing from `newer` are kept.
    pub fn extended_with(&self, newer: &KeyRing) -> Result<(KeyRing, bool), u32> {
        let mut keys = self.keys.clone();
        let mut added = false;
        for (version, key) in &newer.keys {
            match keys.get(version) {
                Some(known) if known != key => return Err(*version),
                Some(_) => {}
                None => {
                    keys.insert(*version, *key);
                    added = true;
                }
            }
        }
        Ok((KeyRing { keys }, added))
    }

    /// Returns the versions of this ring missing from `other`.
    pub fn missing_from(&self, other: &KeyRing) -> Vec<u32> {
        self.keys
            .keys()
            .filter(|v| !other.keys.contains_key(v))
            .copied()
            .collect()
    }

    /// Returns the key of `version`, if the ring holds it.
    pub fn get(&self, version: u32) -> Option<&[u8; 32]> {
        self.keys.get(&version)
    }

    /// Parses entries (one a line, or separated by `;`); returns the ring, or the 1-based
    /// number of a bad entry (1 when there is none at all).
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut keys = BTreeMap::new();
        for (index, line) in text.split(['\n', ';']).enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = index + 1;
            let (version, hex) = line.split_once(' ').ok_or(bad)?;
            let version: u32 = version.parse().map_err(|_| bad)?;
            keys.insert(version, parse_hex_key(hex.trim()).ok_or(bad)?);
        }
        if keys.is_empty() {
            return Err(1);
        }
        Ok(Self { keys })
    }

    /// Loads the ring from `path`, creating the file with one random key if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let io = |source| KeyError::Io {
            path: shown.clone(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|line| KeyError::Format {
                path: shown.clone(),
                line,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| KeyError::Random(e.to_string()))?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                write_private(path, &format!("1 {}\n", to_hex(&key))).map_err(io)?;
                Ok(Self::single(1, key))
            }
            Err(err) => Err(io(err)),
        }
    }

    /// Loads the ring from inline text when given (`source` names it in errors), else from
    /// the file, created when absent.
    pub fn from_config(inline: Option<&str>, source: &str, file: &Path) -> Result<Self, KeyError> {
        match inline {
            Some(text) => Self::parse(text).map_err(|line| KeyError::Format {
                path: source.to_owned(),
                line,
            }),
            None => Self::load_or_create(file),
        }
    }
}

/// Returns the lowercase hex form of a key.
pub fn to_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_adds_keys_and_never_changes_one() {
        let one = KeyRing::parse(&format!("1 {}", "11".repeat(32))).unwrap();
        let two = KeyRing::parse(&format!("1 {}\n2 {}", "11".repeat(32), "22".repeat(32))).unwrap();
        let (rotated, added) = one.extended_with(&two).unwrap();
        assert!(added);
        assert_eq!(rotated.newest().0, 2);
        assert!(!rotated.extended_with(&two).unwrap().1, "nothing new");
        let only_two = KeyRing::parse(&format!("2 {}", "22".repeat(32))).unwrap();
        let (kept, added) = rotated.extended_with(&only_two).unwrap();
        assert!(!added);
        assert_eq!(
            kept.get(1),
            one.get(1),
            "a version left out of the file is kept"
        );
        assert_eq!(kept.missing_from(&only_two), [1]);
        let changed = KeyRing::parse(&format!("1 {}", "33".repeat(32))).unwrap();
        assert_eq!(rotated.extended_with(&changed).err(), Some(1));
    }

    #[test]
    fn the_key_file_is_created_once_private_and_the_newest_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/data");
        let first = KeyRing::load_or_create(&path).unwrap();
        let again = KeyRing::load_or_create(&path).unwrap();
        assert_eq!(first.newest(), again.newest());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let text = format!("2 {}\n1 {}\n", "11".repeat(32), "00".repeat(32));
        let ring = KeyRing::parse(&text).unwrap();
        assert_eq!(ring.newest(), (2, &[0x11; 32]));
        assert_eq!(ring.get(1), Some(&[0; 32]));
        assert_eq!(KeyRing::parse("1 zz").unwrap_err(), 1);
        assert_eq!(KeyRing::parse("1 00;2 0").unwrap_err(), 1);
        assert_eq!(KeyRing::parse("# only a comment\n").unwrap_err(), 1);
        assert!(!format!("{ring:?}").contains("11"));
    }
}
