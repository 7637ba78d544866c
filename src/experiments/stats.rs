//! The statistics of experiment results. Pure: no I/O, no async, no dependencies.
//!
//! - Distributions: the standard normal, Student's t and chi-square tail probabilities, from
//!   the regularized incomplete gamma and beta functions (series and continued fractions,
//!   accurate to about 1e-13 relative).
//! - Tests: the two-proportion z-test (pooled variance) for conversion rates, Welch's t-test
//!   for means, and the chi-square goodness-of-fit test for sample-ratio mismatch.
//! - Lift of a treatment over the control, absolute and relative, with 95% confidence
//!   intervals by the delta method (normal approximation, unpooled variances).
//!
//! Every value that cannot be computed (no subjects, a control rate of zero, no variance) is
//! `None`, never NaN or infinity, so answers stay valid JSON.

/// The 97.5th percentile of the standard normal: a 95% two-sided interval is ±Z_95 s.e.
pub const Z_95: f64 = 1.959_963_984_540_054;

const EPSILON: f64 = 1e-16;
const MAX_ITERATIONS: usize = 10_000;
/// Smaller than any value the continued fractions meet, to avoid dividing by zero.
const TINY: f64 = 1e-300;

/// `ln Γ(x)` for `x > 0` (Lanczos approximation, g = 7, nine terms).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized lower incomplete gamma function `P(a, x)`.
pub fn gamma_p(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x < a + 1.0 {
        gamma_series(a, x)
    } else {
        1.0 - gamma_continued_fraction(a, x)
    }
}

/// The regularized upper incomplete gamma function `Q(a, x) = 1 − P(a, x)`.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < a + 1.0 {
        1.0 - gamma_series(a, x)
    } else {
        gamma_continued_fraction(a, x)
    }
}

/// `P(a, x)` by its power series; converges fast for `x < a + 1`.
fn gamma_series(a: f64, x: f64) -> f64 {
    let mut term = 1.0 / a;
    let mut sum = term;
    let mut n = a;
    for _ in 0..MAX_ITERATIONS {
        n += 1.0;
        term *= x / n;
        sum += term;
        if term.abs() < sum.abs() * EPSILON {
            break;
        }
    }
    sum * (a * x.ln() - x - ln_gamma(a)).exp()
}

/// `Q(a, x)` by its continued fraction (modified Lentz); converges fast for `x ≥ a + 1`.
fn gamma_continued_fraction(a: f64, x: f64) -> f64 {
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..MAX_ITERATIONS {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPSILON {
            break;
        }
    }
    (a * x.ln() - x - ln_gamma(a)).exp() * h
}

/// The regularized incomplete beta function `I_x(a, b)`.
pub fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast on this side of the mean; use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0));
    let mut h = d;
    for m in 1..MAX_ITERATIONS {
        let m = m as f64;
        let m2 = 2.0 * m;
        // The even step.
        let aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        h *= d * c;
        // The odd step.
        let aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPSILON {
            break;
        }
    }
    h
}

/// The complementary error function.
pub fn erfc(x: f64) -> f64 {
    if x >= 0.0 {
        gamma_q(0.5, x * x)
    } else {
        1.0 + gamma_p(0.5, x * x)
    }
}

/// The standard normal's cumulative distribution function.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The two-sided p-value of a standard normal statistic.
pub fn normal_two_sided_p(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// The two-sided p-value of Student's t statistic with `df` degrees of freedom.
pub fn student_t_two_sided_p(t: f64, df: f64) -> f64 {
    beta_inc(df / 2.0, 0.5, df / (df + t * t))
}

/// The upper tail `P(X ≥ x)` of a chi-square distribution with `df` degrees of freedom.
pub fn chi_square_sf(x: f64, df: f64) -> f64 {
    gamma_q(df / 2.0, x / 2.0)
}

/// A test's statistic and two-sided p-value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Test {
    /// z, t or chi-square.
    pub statistic: f64,
    /// Degrees of freedom, for t and chi-square.
    pub df: Option<f64>,
    /// The p-value.
    pub p_value: f64,
}

/// Subjects who converted out of subjects exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proportion {
    /// Converted.
    pub successes: u64,
    /// Exposed.
    pub trials: u64,
}

impl Proportion {
    /// The rate, or `None` without trials.
    pub fn rate(self) -> Option<f64> {
        (self.trials > 0).then(|| self.successes as f64 / self.trials as f64)
    }

    /// The variance of the rate's estimate, `p (1 − p) / n`.
    fn variance_of_rate(self) -> Option<f64> {
        self.rate().map(|p| p * (1.0 - p) / self.trials as f64)
    }
}

/// A sample summarized by its size, mean and (sample, n − 1) variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Subjects.
    pub n: u64,
    /// The mean.
    pub mean: f64,
    /// The sample variance (n − 1 denominator).
    pub variance: f64,
}

impl Summary {
    /// The variance of the mean's estimate, `s² / n`.
    fn variance_of_mean(self) -> Option<f64> {
        (self.n > 0).then(|| self.variance / self.n as f64)
    }
}

/// The two-proportion z-test of `treatment` against `control`, with the pooled variance.
pub fn two_proportion_z_test(treatment: Proportion, control: Proportion) -> Option<Test> {
    let (pt, pc) = (treatment.rate()?, control.rate()?);
    let (nt, nc) = (treatment.trials as f64, control.trials as f64);
    let pooled = (treatment.successes + control.successes) as f64 / (nt + nc);
    let se = (pooled * (1.0 - pooled) * (1.0 / nt + 1.0 / nc)).sqrt();
    finite(se).filter(|se| *se > 0.0).map(|se| {
        let z = (pt - pc) / se;
        Test {
            statistic: z,
            df: None,
            p_value: normal_two_sided_p(z),
        }
    })
}

/// Welch's t-test of `treatment`'s mean against `control`'s (unequal variances).
pub fn welch_t_test(treatment: Summary, control: Summary) -> Option<Test> {
    if treatment.n < 2 || control.n < 2 {
        return None;
    }
    let (vt, vc) = (treatment.variance_of_mean()?, control.variance_of_mean()?);
    let se = finite((vt + vc).sqrt()).filter(|se| *se > 0.0)?;
    let t = (treatment.mean - control.mean) / se;
    let df =
        (vt + vc).powi(2) / (vt * vt / (treatment.n - 1) as f64 + vc * vc / (control.n - 1) as f64);
    let df = finite(df)?;
    Some(Test {
        statistic: t,
        df: Some(df),
        p_value: student_t_two_sided_p(t, df),
    })
}

/// The chi-square goodness-of-fit test of `observed` counts against `weights` (the expected
/// shares, in any unit). Categories of weight zero are left out; `None` with fewer than two
/// categories or no observations.
pub fn chi_square_test(observed: &[u64], weights: &[f64]) -> Option<Test> {
    let pairs: Vec<(f64, f64)> = observed
        .iter()
        .zip(weights)
        .filter(|(_, w)| **w > 0.0)
        .map(|(o, w)| (*o as f64, *w))
        .collect();
    let total: f64 = pairs.iter().map(|(o, _)| o).sum();
    let weight: f64 = pairs.iter().map(|(_, w)| w).sum();
    if pairs.len() < 2 || total <= 0.0 {
        return None;
    }
    let statistic: f64 = pairs
        .iter()
        .map(|(o, w)| {
            let expected = total * w / weight;
            (o - expected).powi(2) / expected
        })
        .sum();
    let df = (pairs.len() - 1) as f64;
    Some(Test {
        statistic,
        df: Some(df),
        p_value: chi_square_sf(statistic, df),
    })
}

/// A difference with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The point estimate.
    pub value: f64,
    /// The interval's lower bound.
    pub low: f64,
    /// The interval's upper bound.
    pub high: f64,
}

impl Estimate {
    fn around(value: f64, variance: f64) -> Option<Self> {
        let half = Z_95 * finite(variance.sqrt())?;
        Some(Self {
            value: finite(value)?,
            low: value - half,
            high: value + half,
        })
    }
}

/// A treatment's lift over the control.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lift {
    /// `treatment − control`.
    pub absolute: Estimate,
    /// `treatment / control − 1`; `None` when the control's value is zero.
    pub relative: Option<Estimate>,
}

/// The lift of a ratio `t / c − 1` by the delta method, from both estimates and their
/// variances: `Var(t/c) ≈ Var(t)/c² + t² Var(c)/c⁴`.
fn relative_lift(t: f64, var_t: f64, c: f64, var_c: f64) -> Option<Estimate> {
    if c == 0.0 {
        return None;
    }
    let variance = var_t / (c * c) + t * t * var_c / (c * c * c * c);
    Estimate::around(t / c - 1.0, variance)
}

/// The lift of `treatment`'s rate over `control`'s.
pub fn proportion_lift(treatment: Proportion, control: Proportion) -> Option<Lift> {
    let (pt, pc) = (treatment.rate()?, control.rate()?);
    let (vt, vc) = (treatment.variance_of_rate()?, control.variance_of_rate()?);
    Some(Lift {
        absolute: Estimate::around(pt - pc, vt + vc)?,
        relative: relative_lift(pt, vt, pc, vc),
    })
}

/// The lift of `treatment`'s mean over `control`'s.
pub fn mean_lift(treatment: Summary, control: Summary) -> Option<Lift> {
    let (vt, vc) = (treatment.variance_of_mean()?, control.variance_of_mean()?);
    Some(Lift {
        absolute: Estimate::around(treatment.mean - control.mean, vt + vc)?,
        relative: relative_lift(treatment.mean, vt, control.mean, vc),
    })
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Reference values computed once with scipy by `tests/fixtures/statistics.py`.
    const FIXTURES: &str = include_str!("../../tests/fixtures/statistics.json");

    fn fixtures() -> Value {
        serde_json::from_str(FIXTURES).expect("the fixtures are JSON")
    }

    fn num(value: &Value) -> f64 {
        value
            .as_f64()
            .unwrap_or_else(|| panic!("{value} is not a number"))
    }

    fn close(actual: f64, expected: f64, what: &str) {
        let tolerance = 1e-9 * expected.abs().max(1e-300);
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: {actual:e} is not {expected:e}"
        );
    }

    fn optional(actual: Option<f64>, expected: &Value, what: &str) {
        match (actual, expected) {
            (None, Value::Null) => {}
            (Some(actual), expected) if !expected.is_null() => close(actual, num(expected), what),
            (actual, expected) => panic!("{what}: {actual:?} is not {expected}"),
        }
    }

    fn proportion(value: &Value) -> Proportion {
        Proportion {
            successes: value[0].as_u64().unwrap(),
            trials: value[1].as_u64().unwrap(),
        }
    }

    fn summary(value: &Value) -> Summary {
        Summary {
            n: value[0].as_u64().unwrap(),
            mean: num(&value[1]),
            variance: num(&value[2]),
        }
    }

    fn check_lift(lift: Option<Lift>, expected: &Value, what: &str) {
        let absolute = lift.map(|l| l.absolute);
        optional(absolute.map(|e| e.value), &expected["absolute"], what);
        optional(absolute.map(|e| e.low), &expected["absolute_low"], what);
        optional(absolute.map(|e| e.high), &expected["absolute_high"], what);
        let relative = lift.and_then(|l| l.relative);
        optional(relative.map(|e| e.value), &expected["relative"], what);
        optional(relative.map(|e| e.low), &expected["relative_low"], what);
        optional(relative.map(|e| e.high), &expected["relative_high"], what);
    }

    #[test]
    fn distributions_match_scipy() {
        let fixtures = fixtures();
        for case in fixtures["normal_cdf"].as_array().unwrap() {
            let x = num(&case[0]);
            close(normal_cdf(x), num(&case[1]), &format!("normal_cdf({x})"));
        }
        for case in fixtures["normal_two_sided_p"].as_array().unwrap() {
            let z = num(&case[0]);
            close(
                normal_two_sided_p(z),
                num(&case[1]),
                &format!("normal p({z})"),
            );
        }
        for case in fixtures["student_t_two_sided_p"].as_array().unwrap() {
            let (t, df) = (num(&case[0]), num(&case[1]));
            close(
                student_t_two_sided_p(t, df),
                num(&case[2]),
                &format!("t p({t}, {df})"),
            );
        }
        for case in fixtures["chi_square_sf"].as_array().unwrap() {
            let (x, df) = (num(&case[0]), num(&case[1]));
            close(
                chi_square_sf(x, df),
                num(&case[2]),
                &format!("chi2 sf({x}, {df})"),
            );
        }
        for case in fixtures["ln_gamma"].as_array().unwrap() {
            let x = num(&case[0]);
            let expected = num(&case[1]);
            // ln Γ crosses zero at 1 and 2: compare absolutely near there.
            let error = (ln_gamma(x) - expected).abs();
            assert!(error <= 1e-12 * expected.abs().max(1.0), "ln_gamma({x})");
        }
    }

    #[test]
    fn proportion_tests_and_lifts_match_scipy() {
        for case in fixtures()["proportions"].as_array().unwrap() {
            let (t, c) = (proportion(&case["treatment"]), proportion(&case["control"]));
            let what = format!("{t:?} vs {c:?}");
            let test = two_proportion_z_test(t, c);
            optional(test.map(|t| t.statistic), &case["z"], &what);
            optional(test.map(|t| t.p_value), &case["p_value"], &what);
            check_lift(proportion_lift(t, c), &case["lift"], &what);
        }
    }

    #[test]
    fn mean_tests_and_lifts_match_scipy() {
        for case in fixtures()["means"].as_array().unwrap() {
            let (t, c) = (summary(&case["treatment"]), summary(&case["control"]));
            let what = format!("{t:?} vs {c:?}");
            let test = welch_t_test(t, c);
            optional(test.map(|t| t.statistic), &case["t"], &what);
            optional(test.and_then(|t| t.df), &case["df"], &what);
            optional(test.map(|t| t.p_value), &case["p_value"], &what);
            check_lift(mean_lift(t, c), &case["lift"], &what);
        }
    }

    #[test]
    fn sample_ratio_tests_match_scipy() {
        for case in fixtures()["sample_ratio"].as_array().unwrap() {
            let observed: Vec<u64> = case["observed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let weights: Vec<f64> = case["weights"]
                .as_array()
                .unwrap()
                .iter()
                .map(num)
                .collect();
            let what = format!("{observed:?} by {weights:?}");
            let test = chi_square_test(&observed, &weights);
            optional(test.map(|t| t.statistic), &case["chi_square"], &what);
            optional(test.map(|t| t.p_value), &case["p_value"], &what);
        }
    }

    #[test]
    fn degenerate_samples_give_none_not_nan() {
        let none = Proportion {
            successes: 0,
            trials: 0,
        };
        let some = Proportion {
            successes: 5,
            trials: 10,
        };
        assert!(two_proportion_z_test(none, some).is_none());
        assert!(proportion_lift(some, none).is_none());
        // Both at 0%: no variance, no test; the lift is zero with a zero-width interval.
        let zero = Proportion {
            successes: 0,
            trials: 10,
        };
        assert!(two_proportion_z_test(zero, zero).is_none());
        let lift = proportion_lift(some, zero).unwrap();
        assert!(lift.relative.is_none(), "relative lift over a zero control");
        let one = Summary {
            n: 1,
            mean: 3.0,
            variance: 0.0,
        };
        assert!(welch_t_test(one, one).is_none());
        let flat = Summary {
            n: 10,
            mean: 3.0,
            variance: 0.0,
        };
        assert!(welch_t_test(flat, flat).is_none());
        assert!(chi_square_test(&[0, 0], &[1.0, 1.0]).is_none());
        assert!(chi_square_test(&[10], &[1.0]).is_none());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn p_values_are_probabilities(
                x in 0u64..10_000, n in 1u64..10_000, y in 0u64..10_000, m in 1u64..10_000,
            ) {
                let t = Proportion { successes: x.min(n), trials: n };
                let c = Proportion { successes: y.min(m), trials: m };
                if let Some(test) = two_proportion_z_test(t, c) {
                    prop_assert!((0.0..=1.0).contains(&test.p_value), "{test:?}");
                }
                if let Some(lift) = proportion_lift(t, c) {
                    prop_assert!(lift.absolute.low <= lift.absolute.value);
                    prop_assert!(lift.absolute.value <= lift.absolute.high);
                }
            }

            #[test]
            fn swapping_arms_mirrors_the_test(
                m1 in -1e6f64..1e6, v1 in 0.1f64..1e8, n1 in 2u64..100_000,
                m2 in -1e6f64..1e6, v2 in 0.1f64..1e8, n2 in 2u64..100_000,
            ) {
                let a = Summary { n: n1, mean: m1, variance: v1 };
                let b = Summary { n: n2, mean: m2, variance: v2 };
                let (ab, ba) = (welch_t_test(a, b).unwrap(), welch_t_test(b, a).unwrap());
                prop_assert!((ab.statistic + ba.statistic).abs() <= 1e-9 * ab.statistic.abs().max(1.0));
                prop_assert!((ab.p_value - ba.p_value).abs() <= 1e-12);
                prop_assert!((0.0..=1.0).contains(&ab.p_value));
            }

            #[test]
            fn tails_are_monotonic(x in 0.0f64..200.0, dx in 0.001f64..10.0, df in 1.0f64..50.0) {
                prop_assert!(chi_square_sf(x + dx, df) <= chi_square_sf(x, df));
                prop_assert!(student_t_two_sided_p(x + dx, df) <= student_t_two_sided_p(x, df));
                prop_assert!(normal_cdf(x + dx) >= normal_cdf(x));
            }
        }
    }
}
