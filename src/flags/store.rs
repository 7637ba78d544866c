//! The flag store: the snapshot in force, swapped atomically on reload. Readers never wait
//! for a reload; the job that watches the directory (`jobs::flags`) calls
//! `reload_if_changed`, and listeners registered with `on_change` hear of every applied one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::files::{self, Signature};
use super::metrics;
use super::snapshot::Snapshot;

/// Hears the content hash of every snapshot put in force.
type Listener = Box<dyn Fn(u64) + Send + Sync>;

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
    listeners: Mutex<Vec<Listener>>,
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
        Arc::new(Self {
            dir,
            current: ArcSwap::from_pointee(snapshot),
            listeners: Mutex::new(Vec::new()),
            signature: Mutex::new(signature),
        })
    }

    /// Returns the snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Calls `listener` with the new content hash on every applied reload.
    pub fn on_change(&self, listener: impl Fn(u64) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(listener));
    }

    /// Reads the directory again and applies what changed.
    pub fn reload(&self) -> ReloadOutcome {
        let previous = self.current.load_full();
        let contents = match files::read_dir(&self.dir) {
            Ok(contents) => contents,
            Err(problem) => {
                tracing::error!(%problem, "flag directory unreadable; keeping the flags in force");
                metrics::reloaded(ReloadOutcome::Failed);
                return ReloadOutcome::Failed;
            }
        };
        let next = Snapshot::build(contents, Some(&previous));
        report(&next);
        if next.content_hash == previous.content_hash && next.problems == previous.problems {
            metrics::reloaded(ReloadOutcome::Unchanged);
            return ReloadOutcome::Unchanged;
        }
        let hash = next.content_hash;
        tracing::info!(flags = next.len(), version = next.version, "flags reloaded");
        self.current.store(Arc::new(next));
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            listener(hash);
        }
        metrics::reloaded(ReloadOutcome::Applied);
        ReloadOutcome::Applied
    }

    /// Reloads when the directory's signature changed since the last look.
    pub fn reload_if_changed(&self) {
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
}

fn report(snapshot: &Snapshot) {
    for problem in &snapshot.problems {
        tracing::error!(%problem, "flag definition rejected");
    }
    metrics::loaded(snapshot.len(), snapshot.problems.len());
}
