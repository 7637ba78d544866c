//! The pipeline's durable state: each worker's log of first exposures, so that experiment
//! assignments survive restarts after the log segments that created them were deleted.
//!
//! One append-only file per worker of lines `[epoch, "subject hash", "experiment", "variant"]`.
//! On start, entries up to the checkpoint are loaded (later ones are derived again by the
//! replay), by whichever worker now owns the subject.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cohort::{Assignment, Assignments};
use crate::wal::Epoch;

/// How many times an erasure has replaced the log files; held while one writes or replaces
/// them, so that a worker never appends to a file that was just replaced.
static LOG_FILES: Mutex<u64> = Mutex::new(0);

/// One worker's assignment log.
pub struct AssignmentLog {
    path: PathBuf,
    file: File,
    /// Lines appended and not written yet.
    buffer: Vec<u8>,
    /// The value of `LOG_FILES` when `file` was opened.
    opened: u64,
}

impl AssignmentLog {
    /// Opens (creating) worker `index`'s log in `dir`.
    pub fn open(dir: &Path, index: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("assignments-{index}.log"));
        let opened = *LOG_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let file = Self::open_file(&path)?;
        Ok(Self {
            path,
            file,
            buffer: Vec::new(),
            opened,
        })
    }

    fn open_file(path: &Path) -> std::io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    /// Drops the lines not written yet of `subjects` (being erased).
    pub fn forget_unwritten(&mut self, subjects: &HashSet<u64>) {
        if self.buffer.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buffer).into_owned();
        self.buffer.clear();
        for line in text.lines().filter(|l| !names_any(l, subjects)) {
            self.buffer.extend_from_slice(line.as_bytes());
            self.buffer.push(b'\n');
        }
    }

    /// Removes every line of `subjects` from the logs in `dir` (each file rewritten beside,
    /// synced and renamed over); returns the lines removed. Blocks on the disk.
    pub fn forget(dir: &Path, subjects: &HashSet<u64>) -> std::io::Result<usize> {
        Self::rewrite(dir, |_, subject| subjects.contains(&subject))
    }

    /// Retention: removes the assignments made in epochs (commit times, ms) before `horizon`.
    /// The running pipeline keeps them in memory until its next start. Blocks on the disk.
    pub fn expire(dir: &Path, horizon: u64) -> std::io::Result<usize> {
        Self::rewrite(dir, |epoch, _| epoch < horizon)
    }

    fn rewrite(dir: &Path, drops: impl Fn(u64, u64) -> bool) -> std::io::Result<usize> {
        let mut replaced = LOG_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0;
        for path in log_files(dir)? {
            let text = std::fs::read_to_string(&path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !entry(l).is_some_and(|(epoch, subject)| drops(epoch, subject)))
                .collect();
            let gone = text.lines().count() - kept.len();
            if gone == 0 {
                continue;
            }
            let tmp = path.with_extension("rewrite");
            let mut file = File::create(&tmp)?;
            for line in kept {
                writeln!(file, "{line}")?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            removed += gone;
        }
        if removed > 0 {
            File::open(dir)?.sync_all()?;
            *replaced += 1;
        }
        Ok(removed)
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
        writeln!(self.buffer, "{line}")?;
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let replaced = LOG_FILES.lock().unwrap_or_else(|p| p.into_inner());
        if *replaced != self.opened {
            self.file = Self::open_file(&self.path)?;
            self.opened = *replaced;
        }
        self.file.write_all(&self.buffer)?;
        self.file.sync_data()?;
        self.buffer.clear();
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
        let paths = log_files(dir)?;
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

/// The assignment logs in `dir`, in order.
fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("assignments-") && n.ends_with(".log"))
            })
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    paths.sort();
    Ok(paths)
}

/// The epoch and subject of an assignment line.
fn entry(line: &str) -> Option<(u64, u64)> {
    let (epoch, subject, _, _) =
        serde_json::from_str::<(u64, String, String, String)>(line).ok()?;
    Some((epoch, u64::from_str_radix(&subject, 16).ok()?))
}

/// Returns whether an assignment line names one of `subjects`.
fn names_any(line: &str, subjects: &HashSet<u64>) -> bool {
    entry(line).is_some_and(|(_, s)| subjects.contains(&s))
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

    #[test]
    fn an_erased_subject_leaves_the_logs_and_appends_go_on_in_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = |v: &str| Assignment {
            experiment: "reward".into(),
            variant: v.into(),
        };
        let mut log = AssignmentLog::open(dir.path(), 0).unwrap();
        log.append(10, 4, &a("stars")).unwrap();
        log.append(11, 5, &a("confetti")).unwrap();
        log.sync().unwrap();
        log.append(12, 5, &a("stars")).unwrap();
        log.append(13, 6, &a("stars")).unwrap();
        let erased: HashSet<u64> = [5].into();
        log.forget_unwritten(&erased);
        assert_eq!(AssignmentLog::forget(dir.path(), &erased).unwrap(), 1);
        log.sync().unwrap();
        log.append(14, 7, &a("confetti")).unwrap();
        log.sync().unwrap();
        let text = std::fs::read_to_string(dir.path().join("assignments-0.log")).unwrap();
        let subjects: Vec<&str> = text.lines().map(|l| l.split('"').nth(1).unwrap()).collect();
        assert_eq!(
            subjects,
            ["0000000000000004", "0000000000000006", "0000000000000007"]
        );
        assert_eq!(AssignmentLog::forget(dir.path(), &erased).unwrap(), 0);
        // Retention goes by the epoch of the assignment.
        assert_eq!(AssignmentLog::expire(dir.path(), 13).unwrap(), 1);
        let text = std::fs::read_to_string(dir.path().join("assignments-0.log")).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with("[13,"), "{text}");
    }
}
