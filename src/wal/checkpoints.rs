//! The consumers' checkpoints: how far each consumer of the log (the pipeline, the SQL
//! window, the dedup snapshots) has made its side durable, and the deletion of the segments
//! they all have.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Epoch, SEGMENT_FILES, WalError, first_epoch, segments};

/// The consumers of the log and the last epoch each has made durable on its side. A segment is
/// deleted only when every registered consumer has checkpointed past its last epoch; with no
/// consumer registered, nothing is deleted.
pub struct Checkpoints {
    dir: PathBuf,
    positions: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

const CHECKPOINT_FILE: &str = "checkpoints.json";

impl Checkpoints {
    /// Loads the checkpoints kept beside the segments in `dir`.
    pub fn load(dir: &Path) -> Result<Self, WalError> {
        let positions = match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                WalError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, err))
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(err) => return Err(err.into()),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            positions: std::sync::Mutex::new(positions),
        })
    }

    /// Registers `consumer`, which starts from its saved position (0 when new); returns it.
    pub fn register(&self, consumer: &str) -> Result<Epoch, WalError> {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        let position = *positions.entry(consumer.to_owned()).or_insert(0);
        self.save(&positions)?;
        Ok(Epoch(position))
    }

    /// Records that `consumer` has everything up to `epoch` durable on its side, then deletes
    /// the segments every consumer has passed. Returns how many segments were deleted.
    pub fn advance(&self, consumer: &str, epoch: Epoch) -> Result<usize, WalError> {
        let low = {
            let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
            let position = positions.entry(consumer.to_owned()).or_insert(0);
            *position = (*position).max(epoch.0);
            self.save(&positions)?;
            positions.values().copied().min().unwrap_or(0)
        };
        let _files = SEGMENT_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let paths = segments(&self.dir)?;
        let mut deleted = 0;
        // A segment's last epoch is one less than the next segment's first; the newest segment
        // (being written) is never deleted.
        for pair in paths.windows(2) {
            let next_first = first_epoch(&pair[1]).unwrap_or(0);
            if next_first == 0 || next_first - 1 > low {
                break;
            }
            std::fs::remove_file(&pair[0])?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn save(&self, positions: &std::collections::BTreeMap<String, u64>) -> Result<(), WalError> {
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(positions).expect("a map serializes"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(CHECKPOINT_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}
