//! SQL: DataFusion over the recent window of raw events and older Parquet segments.
//!
//! Read-only and bounded: no DDL, DML or file access; limits on text length, time, memory,
//! concurrency and result size. Saved queries in `queries/*.sql` are named and parameterized.

pub mod saved;
