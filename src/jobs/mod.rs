//! Background jobs: every task that runs beside the requests, started by one [`Supervisor`]
//! that gives each a stop signal and joins it at shutdown.
//!
//! | job | what it does | how often |
//! |---|---|---|
//! | [`upkeep`] | drains metric histograms, syncs the audit log, expires exports and embedded counters | 5 s |
//! | [`gauges`] | today's per-variant gauges; experiment results for the dashboard | 5 s; `experiments.refresh` |
//! | [`flags`] | reloads the flag directory when it changed | `flags.reload_interval` |
//! | [`keys`] | puts a rotated data key file in force | `privacy.key_reload_interval` |
//! | [`retention`] | deletes what is past its retention | `privacy.retention_check` |
//! | [`privacy_requests`] | carries out access and erasure requests | as they arrive |
//!
//! A job is an async function that takes a [`Stop`] and returns once it fires; blocking work
//! goes to `spawn_blocking`. The log-following threads (pipeline, SQL feeder, dedup
//! snapshots) are the components' own and are stopped by `http::run` after the requests.

pub mod flags;
pub mod gauges;
pub mod issuer_keys;
pub mod keys;
pub mod privacy_requests;
pub mod retention;
pub mod upkeep;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long shutdown waits for a job to end before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Tells a job to stop.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Completes once the job should stop.
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Returns whether the job should stop.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits for the next tick of `tick`; returns false when the job should stop instead.
    pub async fn tick(&mut self, tick: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            _ = tick.tick() => !self.is_stopped(),
            _ = self.stopped() => false,
        }
    }
}

/// Starts jobs, and stops and joins them all at shutdown.
pub struct Supervisor {
    stop: watch::Sender<bool>,
    jobs: Vec<(&'static str, JoinHandle<()>)>,
    grace: Duration,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor with no jobs yet.
    pub fn new() -> Self {
        Self::with_grace(STOP_GRACE)
    }

    /// A supervisor that waits at most `grace` for each job at shutdown.
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            stop: watch::channel(false).0,
            jobs: Vec::new(),
            grace,
        }
    }

    /// The stop signal its jobs get (for tasks that stop with them, such as the listeners).
    pub fn stop_signal(&self) -> Stop {
        Stop(self.stop.subscribe())
    }

    /// Starts `job` on the runtime under `name`.
    pub fn start<F, Fut>(&mut self, name: &'static str, job: F)
    where
        F: FnOnce(Stop) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(job(self.stop_signal()));
        self.jobs.push((name, handle));
    }

    /// Tells every job to stop.
    pub fn signal_stop(&self) {
        self.stop.send_replace(true);
    }

    /// Tells every job to stop and waits for each (at most the grace, [`STOP_GRACE`] by
    /// default; one still running then is aborted and logged).
    pub async fn shutdown(self) {
        self.signal_stop();
        for (name, mut handle) in self.jobs {
            match tokio::time::timeout(self.grace, &mut handle).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) if err.is_panic() => {
                    tracing::error!(job = name, "background job panicked");
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::error!(job = name, "background job did not stop in time; aborted");
                    handle.abort();
                    let _ = handle.await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn shutdown_stops_and_joins_every_job() {
        let ended = Arc::new(AtomicUsize::new(0));
        let mut supervisor = Supervisor::new();
        for name in ["ticking", "waiting"] {
            let ended = ended.clone();
            supervisor.start(name, move |mut stop| async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while stop.tick(&mut tick).await {}
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        supervisor.shutdown().await;
        // Joined: both ran to their end before shutdown returned.
        assert_eq!(ended.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_job_that_ignores_its_stop_is_aborted_after_the_grace() {
        let mut supervisor = Supervisor::with_grace(Duration::from_millis(20));
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Guard(dropped.clone());
        supervisor.start("stubborn", move |_stop| async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        supervisor.shutdown().await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
