//! flagstream: a streaming analytics and feature-flag edge service.
//!
//! The modules follow the data flow of `DESIGN.md`: events arrive through `ingest`, pass the
//! `privacy` gate, become durable in the `wal`, feed the timely `pipeline` that keeps
//! `counters`, and are queried through `sql` and `experiments`. Apps read `flags` at launch.
//! `server` wires them to HTTP; `config` holds every setting.

pub mod config;
pub mod counters;
pub mod events;
pub mod experiments;
pub mod flags;
pub mod ingest;
pub mod pipeline;
pub mod privacy;
pub mod server;
pub mod sql;
pub mod wal;

pub use server::{Listeners, RunError, run};
