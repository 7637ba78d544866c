//! Experiments: the experiments the flag definitions declare, and their per-variant results
//! (exposed subjects, goal conversions, time spent, lift, p-values, sample-ratio mismatch).
//!
//! Results are exact: they are counted by DataFusion over the raw events of the SQL window
//! and its segments ([`query`]), not from the counters' HyperLogLog sketches, whose 0.81%
//! error would be of the same size as the lifts being measured. The statistics live in the
//! pure [`stats`] module; [`results`] turns counts into an answer.

pub mod metrics;
pub mod query;
pub mod results;
pub mod stats;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::flags::Flag;
use crate::flags::definition::Targeting;
use crate::flags::logic::Rule;
use crate::flags::snapshot::Snapshot;
use crate::sql::metrics::QueryKind;
use crate::sql::{SqlEngine, SqlError};
use results::{Results, analyze};

/// An experiment as the flag definitions declare it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Experiment {
    /// The key of the flag that assigns its variants.
    pub key: String,
    /// The flag's description, if its metadata has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `running` while the flag is enabled, `stopped` once it is disabled.
    pub status: &'static str,
    /// The control variant.
    pub control: String,
    /// Every variant, by name.
    pub variants: Vec<String>,
    /// The share of subjects each variant should get, when the targeting is a constant
    /// `fractional` split; `null` otherwise (no sample-ratio check is then possible).
    pub allocation: Option<BTreeMap<String, f64>>,
    /// The goal event types; a subject converts with one such event after its exposure.
    pub goals: Vec<String>,
}

impl Experiment {
    /// Reads an experiment from its flag; `None` when the flag is not one.
    pub fn of(flag: &Flag) -> Option<Self> {
        let settings = flag.experiment.as_ref()?;
        Some(Self {
            key: flag.key.0.clone(),
            description: flag
                .metadata
                .get("description")
                .and_then(|d| d.as_str())
                .map(str::to_owned),
            status: if flag.enabled { "running" } else { "stopped" },
            control: settings.control.clone(),
            variants: flag.variants.iter().map(|v| v.name.clone()).collect(),
            allocation: allocation(flag),
            goals: settings.goals.clone(),
        })
    }
}

/// Every experiment in `snapshot`, ordered by key.
pub fn catalog(snapshot: &Snapshot) -> Vec<Experiment> {
    snapshot.flags().filter_map(Experiment::of).collect()
}

/// Counts `experiment`'s variants over `[from, to)` with one SQL query and analyzes them.
pub async fn compute(
    sql: &SqlEngine,
    experiment: &Experiment,
    from: i64,
    to: i64,
    kind: QueryKind,
) -> Result<Results, SqlError> {
    let goals = experiment.goals.len();
    let text = query::sql(goals);
    let params = query::params(&experiment.key, &experiment.goals, from, to);
    let (_, counts) = sql
        .run_counted(kind, &text, &params, None, |result| {
            query::counts(result, goals).map_err(|e| SqlError::internal("experiment counts", e))
        })
        .await?;
    Ok(analyze(experiment, from, to, &counts))
}

/// The shares of a targeting that is one constant `fractional` split.
fn allocation(flag: &Flag) -> Option<BTreeMap<String, f64>> {
    let Targeting::Rule(Rule::Fractional(split)) = &flag.targeting else {
        return None;
    };
    let buckets = split.allocation()?;
    let total: u64 = buckets.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut shares = BTreeMap::new();
    for (variant, weight) in buckets {
        *shares.entry(variant).or_insert(0.0) += weight as f64 / total as f64;
    }
    Some(shares)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::definition::{Format, parse};

    fn experiments(text: &str) -> Vec<Experiment> {
        let file = parse("test.json", text, Format::Json).expect("the file parses");
        let snapshot = Snapshot::build(vec![("test.json".into(), Ok(file))], None);
        catalog(&snapshot)
    }

    #[test]
    fn the_catalog_reads_allocation_goals_and_status() {
        let found = experiments(
            r#"{"flags": {
            "pacing": {"state": "DISABLED", "variants": {"a": 1, "b": 2, "c": 3},
                "defaultVariant": "a",
                "metadata": {"experiment": true, "control": "a", "goals": "lesson_completed",
                             "description": "Pacing."},
                "targeting": {"fractional": [["a", 50], ["b", 25], ["a", 0], ["c", 25]]}},
            "computed": {"state": "ENABLED", "variants": {"x": 1, "y": 2}, "defaultVariant": "x",
                "metadata": {"experiment": true, "control": "x", "goals": "app_opened"},
                "targeting": {"fractional": [["x", {"var": "w"}], ["y", 1]]}},
            "plain": {"state": "ENABLED", "variants": {"on": true, "off": false},
                "defaultVariant": "on"}
        }}"#,
        );
        let keys: Vec<&str> = found.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["computed", "pacing"],
            "plain flags are not experiments"
        );
        let pacing = &found[1];
        assert_eq!(pacing.status, "stopped");
        assert_eq!(pacing.control, "a");
        assert_eq!(pacing.goals, ["lesson_completed"]);
        assert_eq!(pacing.description.as_deref(), Some("Pacing."));
        let shares = pacing.allocation.as_ref().unwrap();
        assert_eq!(shares["a"], 0.5);
        assert_eq!(shares["b"], 0.25);
        assert_eq!(shares["c"], 0.25);
        assert_eq!(found[0].status, "running");
        assert_eq!(
            found[0].allocation, None,
            "a computed weight has no fixed split"
        );
    }
}
