//! The flag store: the snapshot in force, swapped atomically on reload, and a watcher thread
//! that reloads the directory when it changes. Readers never wait for a reload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::files::{self, Signature};
use super::snapshot::Snapshot;
use crate::server::metrics::{FLAG_PROBLEMS, FLAG_RELOADS_TOTAL, FLAGS_LOADED};

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new snapshot is in force.
    Applied,
    /// The flags did not change.
    Unchanged,
    /// The directory could not be read; the previous snapshot stays.
    Failed,
}

/// The flags in force and their source directory.
pub struct FlagStore {
    dir: PathBuf,
    current: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    signature: Mutex<Signature>,
}

impl FlagStore {
    /// Loads the directory once.
    pub fn load(dir: PathBuf) -> Arc<Self> {
        let signature = files::signature(&dir);
        let snapshot = match files::read_dir(&dir) {
            Ok(contents) => Snapshot::build(contents, None),
            Err(problem) => Snapshot::build(vec![(problem.file.clone(), Err(vec![problem]))], None),
        };
        report(&snapshot);
        let (changes, _) = watch::channel(snapshot.content_hash);
        Arc::new(Self {
            dir,
            current: ArcSwap::from_pointee(snapshot),
            changes,
            signature: Mutex::new(signature),
        })
    }

    /// Returns the snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notifies on every applied reload with the new content hash.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reads the directory again and applies what changed.
    pub fn reload(&self) -> ReloadOutcome {
        let previous = self.current.load_full();
        let contents = match files::read_dir(&self.dir) {
            Ok(contents) => contents,
            Err(problem) => {
                tracing::error!(%problem, "flag directory unreadable; keeping the flags in force");
                metrics::counter!(FLAG_RELOADS_TOTAL, "outcome" => "failed").increment(1);
                return ReloadOutcome::Failed;
            }
        };
        let next = Snapshot::build(contents, Some(&previous));
        report(&next);
        if next.content_hash == previous.content_hash && next.problems == previous.problems {
            metrics::counter!(FLAG_RELOADS_TOTAL, "outcome" => "unchanged").increment(1);
            return ReloadOutcome::Unchanged;
        }
        let hash = next.content_hash;
        tracing::info!(flags = next.len(), version = next.version, "flags reloaded");
        self.current.store(Arc::new(next));
        self.changes.send_replace(hash);
        metrics::counter!(FLAG_RELOADS_TOTAL, "outcome" => "applied").increment(1);
        ReloadOutcome::Applied
    }

    /// Reloads when the directory's signature changed since the last look.
    fn reload_if_changed(&self) {
        let now = files::signature(&self.dir);
        let changed = {
            let mut last = self.signature.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *last != now;
            *last = now;
            changed
        };
        if changed {
            self.reload();
        }
    }

    /// Watches the directory every `interval` on its own thread, which ends once the store
    /// is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let store: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("flag-watcher".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    match store.upgrade() {
                        Some(store) => store.reload_if_changed(),
                        None => break,
                    }
                }
            })
            .map(drop)
    }
}

fn report(snapshot: &Snapshot) {
    for problem in &snapshot.problems {
        tracing::error!(%problem, "flag definition rejected");
    }
    metrics::gauge!(FLAG_PROBLEMS).set(snapshot.problems.len() as f64);
    metrics::gauge!(FLAGS_LOADED).set(snapshot.len() as f64);
}
