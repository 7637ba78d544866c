//! Exposure records: a subject saw a variant of an experiment flag. They give experiments
//! their denominators even when the app reports nothing, and go into the ingest path.
//! Deduplicated per subject, flag and variant per UTC day, in bounded memory.

use std::collections::HashSet;

use super::FlagKey;

/// One exposure of a subject to an experiment's variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// The experiment's flag.
    pub flag: FlagKey,
    /// The variant the subject got.
    pub variant: String,
    /// The targeting key as the app sent it; ingest pseudonymizes it before storing.
    pub subject: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

const DAY_MS: i64 = 86_400_000;

/// Remembers which (subject, flag, variant) were already recorded today.
#[derive(Debug)]
pub struct DailyDedup {
    day: i64,
    seen: HashSet<u128>,
    capacity: usize,
}

impl DailyDedup {
    /// Remembers at most `capacity` exposures a day; past that, repeats are let through (the
    /// ingest path deduplicates again) rather than growing without bound.
    pub fn new(capacity: usize) -> Self {
        Self {
            day: i64::MIN,
            seen: HashSet::new(),
            capacity,
        }
    }

    /// Returns whether this is the first such exposure of its day, and remembers it.
    pub fn first_today(&mut self, exposure: &Exposure) -> bool {
        let day = exposure.at_ms.div_euclid(DAY_MS);
        if day != self.day {
            self.day = day;
            self.seen.clear();
        }
        let key = format!(
            "{}\u{0}{}\u{0}{}",
            exposure.subject, exposure.flag.0, exposure.variant
        );
        let digest = murmur3::murmur3_x64_128(&mut key.as_bytes(), 0).unwrap_or(0);
        if self.seen.contains(&digest) {
            return false;
        }
        if self.seen.len() < self.capacity {
            self.seen.insert(digest);
        }
        true
    }

    /// Returns how many exposures are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Returns whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure(subject: &str, variant: &str, at_ms: i64) -> Exposure {
        Exposure {
            flag: FlagKey("reward-animation".into()),
            variant: variant.into(),
            subject: subject.into(),
            at_ms,
        }
    }

    #[test]
    fn one_exposure_per_subject_flag_and_variant_per_day() {
        let mut dedup = DailyDedup::new(100);
        let noon = 12 * 3_600_000;
        assert!(dedup.first_today(&exposure("c1", "stars", noon)));
        assert!(!dedup.first_today(&exposure("c1", "stars", noon + 1000)));
        assert!(dedup.first_today(&exposure("c1", "mascot", noon)));
        assert!(dedup.first_today(&exposure("c2", "stars", noon)));
        assert!(dedup.first_today(&exposure("c1", "stars", noon + DAY_MS)));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut dedup = DailyDedup::new(10);
        for i in 0..100 {
            assert!(dedup.first_today(&exposure(&format!("c{i}"), "stars", 0)));
        }
        assert_eq!(dedup.len(), 10);
    }
}
