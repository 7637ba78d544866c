//! The counter cell model: what is counted (a [`CohortKey`] over a window, see
//! `counters::window`), the fields counted, and what one window of one cohort gains
//! ([`WindowDelta`]). The pipeline produces deltas; the stores add them up. Pure.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

/// A group of subjects whose events are counted together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CohortKey {
    /// Every event.
    All,
    /// Events whose context has this value for a declared segment dimension.
    Segment {
        /// The context key, such as `platform`.
        dimension: String,
        /// Its value, such as `ios`.
        value: String,
    },
    /// Events of subjects assigned to this variant of an experiment.
    Variant {
        /// The experiment's flag key.
        experiment: String,
        /// The variant.
        variant: String,
    },
}

impl CohortKey {
    /// Returns the cohort's name in keys and answers: `all`, `seg:<dimension>:<value>` or
    /// `exp:<experiment>:<variant>`, with `%`, `:`, `{` and `}` percent-encoded inside parts
    /// so that names never collide and never break a Redis hash tag.
    pub fn tag(&self) -> String {
        match self {
            CohortKey::All => "all".into(),
            CohortKey::Segment { dimension, value } => {
                format!("seg:{}:{}", escape(dimension), escape(value))
            }
            CohortKey::Variant {
                experiment,
                variant,
            } => format!("exp:{}:{}", escape(experiment), escape(variant)),
        }
    }

    /// Reads a name made by [`CohortKey::tag`].
    pub fn from_tag(tag: &str) -> Option<Self> {
        if tag == "all" {
            return Some(CohortKey::All);
        }
        let (kind, rest) = tag.split_once(':')?;
        let (first, second) = rest.split_once(':')?;
        let (first, second) = (unescape(first)?, unescape(second)?);
        match kind {
            "seg" => Some(CohortKey::Segment {
                dimension: first,
                value: second,
            }),
            "exp" => Some(CohortKey::Variant {
                experiment: first,
                variant: second,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for CohortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tag())
    }
}

fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for c in part.chars() {
        match c {
            '%' | ':' | '{' | '}' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn unescape(part: &str) -> Option<String> {
    let mut out = String::with_capacity(part.len());
    let mut chars = part.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            out.push(u8::from_str_radix(&hex, 16).ok()? as char);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Returns the hash sketches and routing use for a subject pseudonym.
pub fn subject_hash(subject: &str) -> u64 {
    murmur3::murmur3_x64_128(&mut subject.as_bytes(), 0x5eed).unwrap_or(0) as u64
}

/// The counter field of events of a type.
pub fn events_field(kind: &str) -> String {
    format!("events:{kind}")
}
/// The counter field of sessions started.
pub const SESSIONS_FIELD: &str = "sessions";
/// The counter field of time spent, in milliseconds.
pub const TIME_SPENT_FIELD: &str = "time_spent_ms";

/// Hashes a subject hash by itself: it is already a uniform 64-bit hash, so hashing it again
/// (SipHash, the default) only costs time, and an aggregate inserts each event's subject into
/// a set for every cohort and window it counts in. Subjects are hashes of keyed pseudonyms
/// (HMAC with the pepper), so no client can choose values that collide.
#[derive(Debug, Default, Clone, Copy)]
pub struct SubjectHasher(u64);

impl Hasher for SubjectHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed here; anything else is mixed in byte by byte (FNV-1a).
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A set of subject hashes.
pub type SubjectSet = HashSet<u64, BuildHasherDefault<SubjectHasher>>;

/// What one window of one cohort gained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowDelta {
    /// Additive counters by field.
    pub counts: BTreeMap<String, i64>,
    /// Hashes of the subjects seen.
    pub subjects: SubjectSet,
    /// Hashes of the subjects seen per event type (an experiment's goals are event types).
    pub converted: BTreeMap<String, SubjectSet>,
}

impl WindowDelta {
    /// Adds everything `other` gained.
    pub fn merge(&mut self, other: WindowDelta) {
        for (field, value) in other.counts {
            *self.counts.entry(field).or_default() += value;
        }
        self.subjects.extend(other.subjects);
        for (kind, subjects) in other.converted {
            self.converted.entry(kind).or_default().extend(subjects);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn tags_read_back(kind in 0..3u8, a in ".{0,12}", b in ".{0,12}") {
            let key = match kind {
                0 => CohortKey::All,
                1 => CohortKey::Segment { dimension: a, value: b },
                _ => CohortKey::Variant { experiment: a, variant: b },
            };
            let tag = key.tag();
            let braces = tag.contains('{') || tag.contains('}');
            prop_assert!(!braces);
            prop_assert_eq!(CohortKey::from_tag(&tag), Some(key));
        }
    }
}
