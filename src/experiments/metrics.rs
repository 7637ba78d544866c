//! The experiments' gauges: live per-variant counts of today, and the results recomputed
//! every `experiments.refresh`, for the product team's dashboard.

use super::results::Results;

crate::telemetry::catalog! {
    /// Distinct subjects today (UTC) by experiment and variant; capped in number.
    gauge EXPERIMENT_SUBJECTS_TODAY = "flagstream_experiment_subjects_today";
    /// Events today (UTC) by experiment and variant; capped in number.
    gauge EXPERIMENT_EVENTS_TODAY = "flagstream_experiment_events_today";
    /// Subjects whose first exposure was to this variant, over the SQL retention.
    gauge EXPERIMENT_EXPOSED_SUBJECTS = "flagstream_experiment_exposed_subjects";
    /// Share of a variant's exposed subjects with a goal event after exposure.
    gauge EXPERIMENT_CONVERSION_RATE = "flagstream_experiment_conversion_rate";
    /// Relative lift of a goal's conversion rate over the control; bound is estimate, low or
    /// high (95% interval).
    gauge EXPERIMENT_RELATIVE_LIFT = "flagstream_experiment_relative_lift";
    /// Two-sided p-value of a goal's lift over the control (two-proportion z-test).
    gauge EXPERIMENT_P_VALUE = "flagstream_experiment_p_value";
    /// Sample-ratio-mismatch chi-square p-value; below 0.001 the assignment is broken.
    gauge EXPERIMENT_SRM_P_VALUE = "flagstream_experiment_srm_p_value";
    /// Recomputations of experiment results for the gauges, by outcome (ok, failed, busy).
    counter EXPERIMENT_REFRESHES_TOTAL = "flagstream_experiment_refreshes_total";
}

/// How one recomputation of an experiment's results for the gauges ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// The gauges show the new results.
    Ok,
    /// The query failed.
    Failed,
    /// The SQL engine was busy; tried at the next refresh.
    Busy,
}

/// Counts one recomputation.
pub fn refreshed(outcome: Refresh) {
    let outcome = match outcome {
        Refresh::Ok => "ok",
        Refresh::Failed => "failed",
        Refresh::Busy => "busy",
    };
    metrics::counter!(EXPERIMENT_REFRESHES_TOTAL, "outcome" => outcome).increment(1);
}

/// Sets today's live counts of one variant.
pub fn variant_today(experiment: &str, variant: &str, subjects: u64, events: i64) {
    let labels = [
        ("experiment", experiment.to_owned()),
        ("variant", variant.to_owned()),
    ];
    metrics::gauge!(EXPERIMENT_SUBJECTS_TODAY, &labels).set(subjects as f64);
    metrics::gauge!(EXPERIMENT_EVENTS_TODAY, &labels).set(events as f64);
}

/// Sets the gauges of an experiment's results.
pub fn publish(results: &Results) {
    let experiment = results.experiment.clone();
    if let Some(check) = &results.sample_ratio {
        metrics::gauge!(EXPERIMENT_SRM_P_VALUE, "experiment" => experiment.clone())
            .set(check.p_value);
    }
    for variant in &results.variants {
        let labels = [
            ("experiment", experiment.clone()),
            ("variant", variant.variant.clone()),
        ];
        metrics::gauge!(EXPERIMENT_EXPOSED_SUBJECTS, &labels).set(variant.exposed_subjects as f64);
        for goal in &variant.goals {
            let labels = [
                ("experiment", experiment.clone()),
                ("variant", variant.variant.clone()),
                ("goal", goal.goal.clone()),
            ];
            if let Some(rate) = goal.rate {
                metrics::gauge!(EXPERIMENT_CONVERSION_RATE, &labels).set(rate);
            }
            let Some(lift) = &goal.lift else {
                continue;
            };
            if let Some(p) = lift.p_value {
                metrics::gauge!(EXPERIMENT_P_VALUE, &labels).set(p);
            }
            if let (Some(value), Some([low, high])) = (lift.relative, lift.relative_ci) {
                for (bound, v) in [("estimate", value), ("low", low), ("high", high)] {
                    let mut labels = labels.to_vec();
                    labels.push(("bound", bound.to_owned()));
                    metrics::gauge!(EXPERIMENT_RELATIVE_LIFT, &labels).set(v);
                }
            }
        }
    }
}
