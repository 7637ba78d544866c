//! murmur3 bucketing for `fractional`, exactly as flagd does it: MurmurHash3 x86_32 with seed
//! 0 over the UTF-8 bytes of the bucketing value, then `(hash * total_weight) >> 32`, and the
//! first variant whose running weight total exceeds that bucket.

use std::io::{Cursor, Read};

/// A position in `0..total_weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bucket(pub u64);

/// Returns the MurmurHash3 x86_32 (seed 0) of `parts` concatenated, without copying them.
pub fn hash(parts: [&[u8]; 2]) -> u32 {
    let mut reader = Cursor::new(parts[0]).chain(Cursor::new(parts[1]));
    // Reading from memory cannot fail.
    murmur3::murmur3_32(&mut reader, 0).unwrap_or(0)
}

/// Returns the bucket of `hash` among `total_weight` positions.
pub fn bucket(hash: u32, total_weight: u64) -> Bucket {
    Bucket((u64::from(hash) * total_weight) >> 32)
}

/// Returns the index of the weight the bucket falls in: the first whose running total exceeds
/// it. `None` when every weight is zero.
pub fn pick(hash: u32, weights: &[u64]) -> Option<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let Bucket(position) = bucket(hash, total);
    let mut running = 0;
    weights.iter().position(|&weight| {
        running += weight;
        position < running
    })
}

/// Clamps a configured weight: negatives and non-numbers count as zero, fractions round down.
pub fn weight_from(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.min(u32::MAX as f64) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn murmur3_matches_known_vectors() {
        // Reference values of MurmurHash3_x86_32 with seed 0.
        assert_eq!(hash([b"", b""]), 0);
        assert_eq!(hash([b"hello", b""]), 0x248b_fa47);
        assert_eq!(hash([b"hel", b"lo"]), 0x248b_fa47);
        assert_eq!(
            hash([b"The quick brown fox jumps over the lazy dog", b""]),
            0x2e4f_f723
        );
    }

    #[test]
    fn the_extremes_of_the_hash_land_in_the_first_and_last_variant() {
        assert_eq!(pick(0, &[50, 50]), Some(0));
        assert_eq!(pick(u32::MAX, &[50, 50]), Some(1));
        assert_eq!(pick(u32::MAX / 2, &[50, 50]), Some(0));
        assert_eq!(pick(u32::MAX / 2 + 1, &[50, 50]), Some(1));
        assert_eq!(pick(7, &[0, 0]), None);
        assert_eq!(pick(7, &[0, 100]), Some(1));
    }

    #[test]
    fn weights_clamp() {
        assert_eq!(weight_from(-50.0), 0);
        assert_eq!(weight_from(f64::NAN), 0);
        assert_eq!(weight_from(2.9), 2);
    }

    /// Pearson's chi-square statistic of observed counts against expected counts.
    fn chi_square(observed: &[u64], expected: &[f64]) -> f64 {
        observed
            .iter()
            .zip(expected)
            .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
            .sum()
    }

    fn variant_of(flag: &str, subject: &str, weights: &[u64]) -> usize {
        pick(hash([flag.as_bytes(), subject.as_bytes()]), weights).unwrap()
    }

    #[test]
    fn buckets_are_uniform_over_a_million_subjects() {
        let weights = [1u64; 20];
        let mut counts = [0u64; 20];
        let n = 1_000_000;
        for i in 0..n {
            counts[variant_of("phonics-minigame", &format!("child-{i}"), &weights)] += 1;
        }
        let expected = [n as f64 / 20.0; 20];
        // Critical value of chi-square with 19 degrees of freedom at p = 0.001.
        let statistic = chi_square(&counts, &expected);
        assert!(
            statistic < 43.82,
            "chi-square {statistic:.1} rejects uniformity: {counts:?}"
        );
    }

    #[test]
    fn weights_are_respected() {
        let weights = [20u64, 30, 50];
        let mut counts = [0u64; 3];
        let n = 200_000;
        for i in 0..n {
            counts[variant_of("reward-animation", &format!("s{i}"), &weights)] += 1;
        }
        let expected: Vec<f64> = weights
            .iter()
            .map(|&w| n as f64 * w as f64 / 100.0)
            .collect();
        // Two degrees of freedom at p = 0.001.
        let statistic = chi_square(&counts, &expected);
        assert!(statistic < 13.82, "chi-square {statistic:.1}: {counts:?}");
    }

    #[test]
    fn two_flags_bucket_independently() {
        let weights = [50u64, 50];
        let mut table = [[0u64; 2]; 2];
        let n = 200_000;
        for i in 0..n {
            let subject = format!("child-{i}");
            let a = variant_of("flag-a", &subject, &weights);
            let b = variant_of("flag-b", &subject, &weights);
            table[a][b] += 1;
        }
        let rows = [table[0][0] + table[0][1], table[1][0] + table[1][1]];
        let cols = [table[0][0] + table[1][0], table[0][1] + table[1][1]];
        let observed: Vec<u64> = table.iter().flatten().copied().collect();
        let expected: Vec<f64> = (0..4)
            .map(|i| rows[i / 2] as f64 * cols[i % 2] as f64 / n as f64)
            .collect();
        // One degree of freedom at p = 0.001.
        let statistic = chi_square(&observed, &expected);
        assert!(statistic < 10.83, "chi-square {statistic:.1}: {table:?}");
    }

    proptest! {
        #[test]
        fn the_chosen_variant_always_has_weight(hash in any::<u32>(), weights in proptest::collection::vec(0u64..1000, 1..8)) {
            match pick(hash, &weights) {
                Some(i) => prop_assert!(weights[i] > 0),
                None => prop_assert!(weights.iter().all(|&w| w == 0)),
            }
        }

        #[test]
        fn raising_a_rollout_only_adds_subjects(hash in any::<u32>(), low in 0u64..=100, raise in 0u64..=100) {
            let high = (low + raise).min(100);
            let before = pick(hash, &[low, 100 - low]);
            let after = pick(hash, &[high, 100 - high]);
            if before == Some(0) {
                prop_assert_eq!(after, Some(0));
            }
        }
    }
}
