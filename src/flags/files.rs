//! Reads the flag directory: every `*.json` file, parsed and checked, with every problem.

use std::path::Path;

use super::{FlagFile, FlagFileError, parse_file};

/// The result of reading the flag directory.
#[derive(Debug, Default)]
pub struct DirReport {
    /// Files that parsed, with their names.
    pub files: Vec<(String, FlagFile)>,
    /// Every problem found.
    pub problems: Vec<FlagFileError>,
}

impl DirReport {
    /// Returns the number of flags in the files that parsed.
    pub fn flag_count(&self) -> usize {
        self.files.iter().map(|(_, f)| f.flags.len()).sum()
    }
}

/// Reads every flag file in `dir`. A missing directory holds no flags.
pub fn read_dir(dir: &Path) -> DirReport {
    let mut report = DirReport::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return report,
        Err(err) => {
            report.problems.push(FlagFileError {
                file: dir.display().to_string(),
                line: 0,
                reason: format!("cannot read directory: {err}"),
            });
            return report;
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_file(&name, &text) {
                Ok(file) => report.files.push((name, file)),
                Err(problems) => report.problems.extend(problems),
            },
            Err(err) => report.problems.push(FlagFileError {
                file: name,
                line: 0,
                reason: format!("cannot read: {err}"),
            }),
        }
    }
    report
}
