//! flagstream: a streaming analytics and feature-flag edge service.
//!
//! The modules follow the data flow of ARCHITECTURE.md: events arrive through `ingest`, pass
//! the `privacy` gate, become durable in the `wal`, feed the timely `pipeline` that keeps
//! `counters`, and are queried through `sql` and `experiments`. Apps read `flags` at launch.
//! The shell around them: `http` (router, handlers, errors, serving), `jobs` (background
//! tasks under one supervisor), `telemetry` (logs and the metrics recorder) and `config`
//! (every setting). Nothing below `http` imports it.

pub mod config;
pub mod counters;
pub mod crypto;
pub mod events;
pub mod experiments;
pub mod flags;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod jobs;
pub mod pipeline;
pub mod privacy;
pub mod sql;
pub mod telemetry;
pub mod wal;

pub use http::{Listeners, RunError, run};

/// Lowers the calling thread's scheduling priority (nice 10), so that work the write-ahead log
/// buffers (the SQL window, the dedup snapshots) or that analysts wait for (queries) yields the
/// cores to ingest and flag evaluation.
pub(crate) fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority with PRIO_PROCESS and who = 0 changes only the calling thread on
    // Linux (threads are tasks); it touches no memory.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}
