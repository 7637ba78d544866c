//! Experiments: per-variant results from the counters and the SQL tables, with the statistics
//! (rates, lift, confidence intervals, p-values, sample-ratio mismatch) in a pure submodule.

/// The key of an experiment: the key of the flag that assigns its variants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExperimentKey(pub String);
