//! Pseudonymization: `HMAC-SHA256(pepper, user_id)`, so raw user ids never reach storage.
//!
//! The pepper is versioned: a pepper file holds lines `<version> <64 hex chars>`, and the
//! highest version is used. A missing file is created with a random pepper (version 1).

use std::fmt::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SubjectId;

/// A secret key for pseudonyms, with its version. Never printed.
#[derive(Clone)]
pub struct Pepper {
    version: u32,
    key: [u8; 32],
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pepper(v{}, [redacted])", self.version)
    }
}

/// Why the pepper could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PepperError {
    /// The file could not be read or written.
    #[error("pepper file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file's content is not `<version> <64 hex>` lines.
    #[error("pepper file {path}: line {line} is not `<version> <64 hex characters>`")]
    Format {
        /// The file.
        path: String,
        /// The 1-based line.
        line: usize,
    },
    /// No randomness was available to create one.
    #[error("cannot generate a pepper: {0}")]
    Random(String),
}

impl Pepper {
    /// Builds a pepper from its parts (tests and key rotation).
    pub fn new(version: u32, key: [u8; 32]) -> Self {
        Self { version, key }
    }

    /// Returns the pseudonym of `user_id`: `p<version>_` and 32 hex characters (128 bits).
    pub fn pseudonymize(&self, user_id: &str) -> SubjectId {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(user_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(40);
        let _ = write!(out, "p{}_", self.version);
        for byte in &digest[..16] {
            let _ = write!(out, "{byte:02x}");
        }
        SubjectId(out)
    }

    /// Loads the newest pepper from `path`, creating the file with a random pepper if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, PepperError> {
        let shown = path.display().to_string();
        let io = |source| PepperError::Io {
            path: shown.clone(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|line| PepperError::Format {
                path: shown.clone(),
                line,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| PepperError::Random(e.to_string()))?;
                let pepper = Self::new(1, key);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                write_private(path, &format!("1 {hex}\n")).map_err(io)?;
                Ok(pepper)
            }
            Err(err) => Err(io(err)),
        }
    }

    /// Parses pepper entries (one a line, or separated by `;`); returns the newest, or the
    /// 1-based number of a bad entry.
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut newest: Option<Pepper> = None;
        for (index, line) in text.split(['\n', ';']).enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = index + 1;
            let (version, hex) = line.split_once(' ').ok_or(bad)?;
            let version: u32 = version.parse().map_err(|_| bad)?;
            let hex = hex.trim();
            if hex.len() != 64 {
                return Err(bad);
            }
            let mut key = [0u8; 32];
            for (i, byte) in key.iter_mut().enumerate() {
                *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or(bad)?, 16)
                    .map_err(|_| bad)?;
            }
            if newest.as_ref().is_none_or(|p| version > p.version) {
                newest = Some(Pepper::new(version, key));
            }
        }
        newest.ok_or(1)
    }
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
    fn pseudonyms_are_keyed_stable_and_versioned() {
        let a = Pepper::new(1, [7; 32]);
        let b = Pepper::new(2, [8; 32]);
        let id = a.pseudonymize("child-7781");
        assert_eq!(id, a.pseudonymize("child-7781"));
        assert!(id.0.starts_with("p1_") && id.0.len() == 35, "{id:?}");
        assert!(!id.0.contains("7781"));
        assert_ne!(
            a.pseudonymize("child-7781").0[3..],
            b.pseudonymize("child-7781").0[3..]
        );
        assert!(!format!("{a:?}").contains('7'));
    }

    #[test]
    fn the_pepper_file_is_created_once_and_the_newest_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/pepper");
        let first = Pepper::load_or_create(&path).unwrap();
        let again = Pepper::load_or_create(&path).unwrap();
        assert_eq!(first.pseudonymize("x"), again.pseudonymize("x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let text = format!("1 {}\n2 {}\n", "00".repeat(32), "11".repeat(32));
        assert_eq!(Pepper::parse(&text).unwrap().version, 2);
        assert_eq!(Pepper::parse("1 zz").unwrap_err(), 1);
        assert_eq!(Pepper::parse("# only a comment\n").unwrap_err(), 1);
    }
}
