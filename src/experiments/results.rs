//! From per-variant counts to an experiment's results: rates, lifts against the control with
//! their intervals and p-values, the sample-ratio check and the warnings a reader must see.
//! Pure.

use std::fmt::Write as _;

use serde::Serialize;

use super::Experiment;
use super::stats::{self, Lift, Proportion, Summary, Test};
use crate::events::time::format_rfc3339;

/// Below this sample-ratio p-value the assignment is not trusted.
pub const SRM_THRESHOLD: f64 = 0.001;

/// What the query counted for one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantCounts {
    /// The variant.
    pub variant: String,
    /// Subjects whose first exposure was to this variant.
    pub exposed: u64,
    /// Of those, subjects with a goal event after their exposure, per goal (in the
    /// experiment's goal order).
    pub converted: Vec<u64>,
    /// Time spent per exposed subject after exposure, in milliseconds.
    pub time_spent: Summary,
    /// Of the exposed subjects, those also exposed to another variant.
    pub multiple_variants: u64,
}

/// A lift against the control, with its test.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LiftResult {
    /// `treatment − control`.
    pub absolute: f64,
    /// Its 95% confidence interval (delta method).
    pub absolute_ci: [f64; 2],
    /// `treatment / control − 1`; `null` when the control's value is zero.
    pub relative: Option<f64>,
    /// Its 95% confidence interval (delta method).
    pub relative_ci: Option<[f64; 2]>,
    /// The two-sided p-value: two-proportion z-test for rates, Welch's t-test for means;
    /// `null` when neither arm varies.
    pub p_value: Option<f64>,
    /// `z` or `welch_t`.
    pub test: &'static str,
    /// The test statistic.
    pub statistic: Option<f64>,
    /// Degrees of freedom (Welch–Satterthwaite), for the t-test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub df: Option<f64>,
}

impl LiftResult {
    fn new(lift: Lift, test: Option<Test>, name: &'static str) -> Self {
        Self {
            absolute: lift.absolute.value,
            absolute_ci: [lift.absolute.low, lift.absolute.high],
            relative: lift.relative.map(|r| r.value),
            relative_ci: lift.relative.map(|r| [r.low, r.high]),
            p_value: test.map(|t| t.p_value),
            test: name,
            statistic: test.map(|t| t.statistic),
            df: test.and_then(|t| t.df),
        }
    }
}

/// One goal of one variant.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct GoalResult {
    /// The goal's event type.
    pub goal: String,
    /// Exposed subjects who converted.
    pub converted: u64,
    /// `converted / exposed_subjects`; `null` without exposed subjects.
    pub rate: Option<f64>,
    /// Against the control (absent for the control itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lift: Option<LiftResult>,
}

/// A per-subject mean of one variant.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MeanResult {
    /// The mean over exposed subjects (those with none count as zero).
    pub mean: Option<f64>,
    /// The sample standard deviation.
    pub std_dev: Option<f64>,
    /// Against the control (absent for the control itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lift: Option<LiftResult>,
}

/// One variant's results.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct VariantResult {
    /// The variant.
    pub variant: String,
    /// Whether it is the control.
    pub control: bool,
    /// Subjects whose first exposure was to this variant.
    pub exposed_subjects: u64,
    /// Its share of the exposed subjects.
    pub observed_share: Option<f64>,
    /// Its share in the allocation, when the allocation is known.
    pub expected_share: Option<f64>,
    /// Per goal.
    pub goals: Vec<GoalResult>,
    /// Time spent per exposed subject after exposure (ended sessions), in milliseconds.
    pub time_spent_ms: MeanResult,
}

/// The sample-ratio check: are exposures split as the allocation says?
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SampleRatio {
    /// The chi-square statistic over the allocated variants.
    pub chi_square: f64,
    /// Its degrees of freedom.
    pub df: f64,
    /// The p-value.
    pub p_value: f64,
    /// `p_value < 0.001`: the assignment or the exposure logging is broken.
    pub mismatch: bool,
}

/// An experiment's results.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Results {
    /// The experiment's key.
    pub experiment: String,
    /// The control variant.
    pub control: String,
    /// The start of the range (RFC 3339).
    pub from: String,
    /// The end of the range, exclusive (RFC 3339).
    pub to: String,
    /// Exposed subjects over every variant.
    pub exposed_subjects: u64,
    /// Subjects exposed to more than one variant (each counts in its first).
    pub multiple_variant_subjects: u64,
    /// Per variant: the declared ones first (the control leading), then any other that was
    /// exposed.
    pub variants: Vec<VariantResult>,
    /// `null` when the allocation is not a constant split or nobody was exposed.
    pub sample_ratio: Option<SampleRatio>,
    /// What a reader must know before trusting the numbers.
    pub warnings: Vec<String>,
}

/// Computes the results of `experiment` over `[from, to)` from the counted variants.
pub fn analyze(experiment: &Experiment, from: i64, to: i64, counted: &[VariantCounts]) -> Results {
    let rows = rows_in_order(experiment, counted);
    let total: u64 = rows.iter().map(|r| r.exposed).sum();
    let control = &rows[0];
    let variants = rows
        .iter()
        .map(|row| variant_result(experiment, row, control, total))
        .collect();
    let sample_ratio = sample_ratio(experiment, &rows);
    let multiple: u64 = rows.iter().map(|r| r.multiple_variants).sum();
    Results {
        experiment: experiment.key.clone(),
        control: experiment.control.clone(),
        from: format_rfc3339(from),
        to: format_rfc3339(to),
        exposed_subjects: total,
        multiple_variant_subjects: multiple,
        variants,
        warnings: warnings(experiment, &rows, sample_ratio.as_ref()),
        sample_ratio,
    }
}

/// A row per variant: the control first, then the other declared variants, then undeclared
/// ones that exposures name; a variant nobody was exposed to has a row of zeros.
fn rows_in_order(experiment: &Experiment, counted: &[VariantCounts]) -> Vec<VariantCounts> {
    let goals = experiment.goals.len();
    let empty = |variant: &str| VariantCounts {
        variant: variant.to_owned(),
        exposed: 0,
        converted: vec![0; goals],
        time_spent: Summary {
            n: 0,
            mean: 0.0,
            variance: 0.0,
        },
        multiple_variants: 0,
    };
    // The control first, then the other declared variants, then undeclared ones.
    let mut order: Vec<String> = vec![experiment.control.clone()];
    order.extend(
        experiment
            .variants
            .iter()
            .filter(|v| **v != experiment.control)
            .cloned(),
    );
    for counts in counted {
        if !order.contains(&counts.variant) {
            order.push(counts.variant.clone());
        }
    }
    order
        .iter()
        .map(|name| {
            counted
                .iter()
                .find(|c| &c.variant == name)
                .cloned()
                .unwrap_or_else(|| empty(name))
        })
        .collect()
}

/// What the product team must know before trusting the numbers.
fn warnings(
    experiment: &Experiment,
    rows: &[VariantCounts],
    sample_ratio: Option<&SampleRatio>,
) -> Vec<String> {
    let total: u64 = rows.iter().map(|r| r.exposed).sum();
    let control = &rows[0];
    let mut warnings = Vec::new();
    if let Some(check) = sample_ratio
        && check.mismatch
    {
        warnings.push(format!(
            "sample ratio mismatch: exposures per variant differ from the allocation \
             (chi-square p = {:.2e} < {SRM_THRESHOLD}); the assignment or the exposure \
             logging is broken, so the lifts cannot be trusted",
            check.p_value
        ));
    }
    if experiment.allocation.is_none() {
        warnings.push(
            "the targeting is not one constant fractional split, so no sample-ratio check is made"
                .into(),
        );
    }
    if total == 0 {
        warnings.push("no subject was exposed in this range".into());
    } else if control.exposed == 0 {
        warnings.push(format!(
            "the control {:?} has no exposed subjects: no lift can be computed",
            experiment.control
        ));
    }
    let undeclared: Vec<&str> = rows
        .iter()
        .filter(|r| r.exposed > 0 && !experiment.variants.contains(&r.variant))
        .map(|r| r.variant.as_str())
        .collect();
    if !undeclared.is_empty() {
        warnings.push(format!(
            "exposures name variants the flag does not declare: {}",
            undeclared.join(", ")
        ));
    }
    let multiple: u64 = rows.iter().map(|r| r.multiple_variants).sum();
    if multiple > 0 {
        warnings.push(format!(
            "{multiple} subjects were exposed to more than one variant; each counts in the \
             variant of its first exposure"
        ));
    }
    warnings
}

fn variant_result(
    experiment: &Experiment,
    row: &VariantCounts,
    control: &VariantCounts,
    total: u64,
) -> VariantResult {
    let is_control = row.variant == experiment.control;
    let goals = experiment
        .goals
        .iter()
        .enumerate()
        .map(|(i, goal)| {
            let arm = |c: &VariantCounts| Proportion {
                successes: c.converted.get(i).copied().unwrap_or(0),
                trials: c.exposed,
            };
            let (treatment, baseline) = (arm(row), arm(control));
            let lift = (!is_control)
                .then(|| stats::proportion_lift(treatment, baseline))
                .flatten()
                .map(|lift| {
                    let test = stats::two_proportion_z_test(treatment, baseline);
                    LiftResult::new(lift, test, "z")
                });
            GoalResult {
                goal: goal.clone(),
                converted: treatment.successes,
                rate: treatment.rate(),
                lift,
            }
        })
        .collect();
    let time = row.time_spent;
    let time_lift = (!is_control)
        .then(|| stats::mean_lift(time, control.time_spent))
        .flatten()
        .map(|lift| {
            let test = stats::welch_t_test(time, control.time_spent);
            LiftResult::new(lift, test, "welch_t")
        });
    VariantResult {
        variant: row.variant.clone(),
        control: is_control,
        exposed_subjects: row.exposed,
        observed_share: (total > 0).then(|| row.exposed as f64 / total as f64),
        expected_share: experiment
            .allocation
            .as_ref()
            .map(|shares| shares.get(&row.variant).copied().unwrap_or(0.0)),
        goals,
        time_spent_ms: MeanResult {
            mean: (time.n > 0).then_some(time.mean),
            std_dev: (time.n > 1).then(|| time.variance.sqrt()),
            lift: time_lift,
        },
    }
}

fn sample_ratio(experiment: &Experiment, rows: &[VariantCounts]) -> Option<SampleRatio> {
    let shares = experiment.allocation.as_ref()?;
    let (observed, weights): (Vec<u64>, Vec<f64>) = shares
        .iter()
        .map(|(variant, share)| {
            let exposed = rows
                .iter()
                .find(|r| &r.variant == variant)
                .map_or(0, |r| r.exposed);
            (exposed, *share)
        })
        .unzip();
    let test = stats::chi_square_test(&observed, &weights)?;
    Some(SampleRatio {
        chi_square: test.statistic,
        df: test.df.unwrap_or(0.0),
        p_value: test.p_value,
        mismatch: test.p_value < SRM_THRESHOLD,
    })
}

impl Results {
    /// The results as CSV: one row per variant and metric (each goal's conversion rate, then
    /// time spent), for an offline report.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "experiment,variant,control,metric,exposed_subjects,converted,value,\
             absolute_lift,absolute_ci_low,absolute_ci_high,relative_lift,relative_ci_low,\
             relative_ci_high,p_value,srm_p_value\n",
        );
        let srm = number(self.sample_ratio.as_ref().map(|s| s.p_value));
        for variant in &self.variants {
            let metrics = variant
                .goals
                .iter()
                .map(|g| {
                    (
                        format!("conversion:{}", g.goal),
                        g.converted.to_string(),
                        g.rate,
                        g.lift.as_ref(),
                    )
                })
                .chain(std::iter::once((
                    "time_spent_ms".to_owned(),
                    String::new(),
                    variant.time_spent_ms.mean,
                    variant.time_spent_ms.lift.as_ref(),
                )));
            for (metric, converted, value, lift) in metrics {
                let cells = [
                    csv_field(&self.experiment),
                    csv_field(&variant.variant),
                    variant.control.to_string(),
                    csv_field(&metric),
                    variant.exposed_subjects.to_string(),
                    converted,
                    number(value),
                    number(lift.map(|l| l.absolute)),
                    number(lift.map(|l| l.absolute_ci[0])),
                    number(lift.map(|l| l.absolute_ci[1])),
                    number(lift.and_then(|l| l.relative)),
                    number(lift.and_then(|l| l.relative_ci.map(|ci| ci[0]))),
                    number(lift.and_then(|l| l.relative_ci.map(|ci| ci[1]))),
                    number(lift.and_then(|l| l.p_value)),
                    srm.clone(),
                ];
                let _ = writeln!(out, "{}", cells.join(","));
            }
        }
        out
    }
}

fn number(value: Option<f64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Quotes a field when it holds a separator, a quote or a line break; a leading `=`, `+`,
/// `-` or `@` is prefixed with `'` so that spreadsheets do not run it as a formula.
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn experiment(allocation: Option<&[(&str, f64)]>) -> Experiment {
        Experiment {
            key: "reward".into(),
            description: None,
            status: "running",
            control: "stars".into(),
            variants: vec!["confetti".into(), "stars".into()],
            allocation: allocation.map(|a| {
                a.iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect::<BTreeMap<_, _>>()
            }),
            goals: vec!["lesson_completed".into()],
        }
    }

    fn counts(variant: &str, exposed: u64, converted: u64, mean: f64) -> VariantCounts {
        VariantCounts {
            variant: variant.into(),
            exposed,
            converted: vec![converted],
            time_spent: Summary {
                n: exposed,
                mean,
                variance: 100.0,
            },
            multiple_variants: 0,
        }
    }

    #[test]
    fn the_control_leads_and_treatments_carry_lifts() {
        let experiment = experiment(Some(&[("stars", 0.5), ("confetti", 0.5)]));
        let results = analyze(
            &experiment,
            0,
            3_600_000,
            &[
                counts("confetti", 1000, 300, 12.0),
                counts("stars", 1000, 200, 10.0),
            ],
        );
        assert_eq!(results.variants[0].variant, "stars");
        assert!(results.variants[0].control);
        assert!(results.variants[0].goals[0].lift.is_none());
        let confetti = &results.variants[1];
        let lift = confetti.goals[0].lift.as_ref().unwrap();
        assert!((lift.absolute - 0.1).abs() < 1e-12);
        assert!((lift.relative.unwrap() - 0.5).abs() < 1e-12);
        assert!(lift.p_value.unwrap() < 1e-6);
        assert_eq!(confetti.observed_share, Some(0.5));
        assert_eq!(confetti.expected_share, Some(0.5));
        let time = confetti.time_spent_ms.lift.as_ref().unwrap();
        assert_eq!(time.test, "welch_t");
        assert!((time.absolute - 2.0).abs() < 1e-12);
        assert!(!results.sample_ratio.unwrap().mismatch);
        assert!(results.warnings.is_empty(), "{:?}", results.warnings);
    }

    #[test]
    fn a_skewed_split_warns_and_missing_pieces_are_said() {
        let experiment = experiment(Some(&[("stars", 0.5), ("confetti", 0.5)]));
        let mut skewed = counts("confetti", 800, 10, 1.0);
        skewed.multiple_variants = 3;
        let results = analyze(
            &experiment,
            0,
            1,
            &[
                skewed,
                counts("stars", 1000, 10, 1.0),
                counts("rogue", 5, 0, 0.0),
            ],
        );
        assert!(results.sample_ratio.as_ref().unwrap().mismatch);
        let text = results.warnings.join("\n");
        assert!(text.contains("sample ratio mismatch"), "{text}");
        assert!(text.contains("rogue"), "{text}");
        assert!(text.contains("3 subjects"), "{text}");
        assert_eq!(results.variants.last().unwrap().expected_share, Some(0.0));

        let nobody = analyze(&experiment, 0, 1, &[]);
        assert_eq!(
            nobody.variants.len(),
            2,
            "declared variants are listed even when empty"
        );
        assert!(nobody.sample_ratio.is_none());
        assert!(nobody.warnings.iter().any(|w| w.contains("no subject")));

        let unknown = analyze(
            &self::experiment(None),
            0,
            1,
            &[counts("confetti", 5, 1, 1.0)],
        );
        assert!(unknown.sample_ratio.is_none());
        let text = unknown.warnings.join("\n");
        assert!(text.contains("no sample-ratio check"), "{text}");
        assert!(text.contains("control \"stars\" has no exposed"), "{text}");
        assert!(unknown.variants[1].goals[0].lift.is_none());
    }

    #[test]
    fn csv_has_a_row_per_variant_and_metric_and_defuses_formulas() {
        let mut experiment = experiment(None);
        experiment.variants.push("=cmd|x,y".into());
        let results = analyze(
            &experiment,
            0,
            1,
            &[counts("stars", 10, 2, 1.0), counts("=cmd|x,y", 10, 5, 2.0)],
        );
        let csv = results.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 1 + 3 * 2, "{csv}");
        assert!(lines[0].starts_with("experiment,variant,control,metric"));
        assert!(lines[1].starts_with("reward,stars,true,conversion:lesson_completed,10,2,0.2,"));
        assert!(csv.contains("\"'=cmd|x,y\""), "{csv}");
        let header_cells = lines[0].split(',').count();
        for line in lines.iter().skip(1).filter(|l| !l.contains('"')) {
            assert_eq!(line.split(',').count(), header_cells, "{line}");
        }
    }
}
