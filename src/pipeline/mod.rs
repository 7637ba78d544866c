//! The pipeline: a timely dataflow from the write-ahead log to the counter store.
//!
//! Timely timestamps are WAL epochs; event time travels as data. Events are exchanged between
//! workers by subject, attributed to cohorts (experiment variants and declared segments), and
//! aggregated per (cohort, window) per epoch. Runs on its own OS threads, never tokio's.

pub mod aggregate;
pub mod cohort;
mod dataflow;
pub mod metrics;
mod operators;
pub mod record;
pub mod state;

pub use dataflow::{Forgetter, Pipeline, PipelineError, PipelineOptions};
