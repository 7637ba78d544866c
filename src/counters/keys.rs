//! Redis key names. Pure.
//!
//! Every key of a cohort carries the cohort's tag as a hash tag (`{…}`), so all of them live in
//! one Redis Cluster slot and one Lua script may touch them together.

use super::{CohortKey, Window, WindowStart};

/// The set of every cohort tag ever written.
pub const COHORTS: &str = "fs:cohorts";

/// The last cell applied to a cohort (its idempotency high-water mark).
pub fn high_water(cohort: &CohortKey) -> String {
    format!("fs:{{{}}}:hw", cohort.tag())
}

/// The hash of additive counters of one window.
pub fn counts(cohort: &CohortKey, window: Window, start: WindowStart) -> String {
    format!("fs:{{{}}}:{}:{}", cohort.tag(), window.name(), start.0)
}

/// The sketch of distinct subjects of one window.
pub fn subjects(cohort: &CohortKey, window: Window, start: WindowStart) -> String {
    format!("{}:s", counts(cohort, window, start))
}

/// The sketch of distinct subjects with an event of `kind` in one window.
pub fn converted(cohort: &CohortKey, window: Window, start: WindowStart, kind: &str) -> String {
    format!("{}:s:{kind}", counts(cohort, window, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_cohort_share_one_hash_tag() {
        let cohort = CohortKey::Variant {
            experiment: "reward-animation".into(),
            variant: "stars".into(),
        };
        let start = WindowStart(1_795_165_200_000);
        assert_eq!(
            counts(&cohort, Window::Hour, start),
            "fs:{exp:reward-animation:stars}:1h:1795165200000"
        );
        for key in [
            high_water(&cohort),
            subjects(&cohort, Window::Hour, start),
            converted(&cohort, Window::Minute, start, "lesson_completed"),
        ] {
            assert!(key.starts_with("fs:{exp:reward-animation:stars}:"), "{key}");
        }
    }
}
