//! The pipeline's durable state: each worker's log of first exposures, so that experiment
//! assignments survive restarts after the log segments that created them were deleted.
//!
//! One append-only file per worker of lines `[epoch, "subject hash", "experiment", "variant"]`.
//! On start, entries up to the checkpoint are loaded (later ones are derived again by the
//! replay), by whichever worker now owns the subject.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use super::cohort::{Assignment, Assignments};
use crate::wal::Epoch;

/// One worker's assignment log.
pub struct AssignmentLog {
    file: BufWriter<File>,
    dirty: bool,
}

impl AssignmentLog {
    /// Opens (creating) worker `index`'s log in `dir`.
    pub fn open(dir: &Path, index: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("assignments-{index}.log")))?;
        Ok(Self {
            file: BufWriter::new(file),
            dirty: false,
        })
    }

    /// Appends a first exposure made in `epoch`.
    pub fn append(
        &mut self,
        epoch: u64,
        subject: u64,
        assignment: &Assignment,
    ) -> std::io::Result<()> {
        let line = serde_json::json!([
            epoch,
            format!("{subject:016x}"),
            assignment.experiment,
            assignment.variant
        ]);
        writeln!(self.file, "{line}")?;
        self.dirty = true;
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.file.flush()?;
            self.file.get_ref().sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads every worker's log in `dir`: the assignments made up to `through`, of the
    /// subjects `owns` accepts. A torn last line is ignored.
    pub fn load(
        dir: &Path,
        through: Epoch,
        owns: impl Fn(u64) -> bool,
    ) -> std::io::Result<Assignments> {
        let mut assignments = Assignments::default();
        let mut paths: Vec<_> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("assignments-") && n.ends_with(".log"))
                })
                .collect(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(assignments),
            Err(err) => return Err(err),
        };
        paths.sort();
        let mut entries: Vec<(u64, u64, String, String)> = Vec::new();
        for path in paths {
            for line in BufReader::new(File::open(&path)?).lines() {
                let line = line?;
                let Ok((epoch, subject, experiment, variant)) =
                    serde_json::from_str::<(u64, String, String, String)>(&line)
                else {
                    continue;
                };
                let Ok(subject) = u64::from_str_radix(&subject, 16) else {
                    continue;
                };
                if epoch <= through.0 && owns(subject) {
                    entries.push((epoch, subject, experiment, variant));
                }
            }
        }
        // The earliest exposure wins, whichever file holds it.
        entries.sort();
        for (_, subject, experiment, variant) in entries {
            assignments.expose(subject, &experiment, &variant);
        }
        Ok(assignments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::record::PipelineEvent;

    #[test]
    fn assignments_up_to_the_checkpoint_come_back_for_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AssignmentLog::open(dir.path(), 0).unwrap();
        let a = |e: &str, v: &str| Assignment {
            experiment: e.into(),
            variant: v.into(),
        };
        log.append(10, 4, &a("reward", "stars")).unwrap();
        log.append(20, 5, &a("reward", "confetti")).unwrap();
        log.append(30, 6, &a("reward", "stars")).unwrap();
        log.sync().unwrap();
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("assignments-0.log"))
            .unwrap()
            .write_all(b"[40, \"00")
            .unwrap();
        let loaded = AssignmentLog::load(dir.path(), Epoch(25), |s| s % 2 == 0).unwrap();
        let cohorts = |subject: u64| {
            let event = PipelineEvent {
                subject: Some(subject),
                kind: "lesson_completed".into(),
                event_time: 0,
                duration_ms: None,
                exposure: None,
                segments: vec![],
            };
            let mut out = Vec::new();
            loaded.cohorts_of(&event, |c| out.push(c.tag()));
            out
        };
        assert_eq!(cohorts(4), ["all", "exp:reward:stars"]);
        assert_eq!(cohorts(5), ["all"], "another worker owns it");
        assert_eq!(
            cohorts(6),
            ["all"],
            "after the checkpoint: replayed instead"
        );
    }
}
