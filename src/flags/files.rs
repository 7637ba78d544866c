//! Reads the flag directory: every `*.json`, `*.yaml` and `*.yml` file, parsed and checked.
//! The only part of `flags` that touches the disk.

use std::path::Path;
use std::time::SystemTime;

use super::FlagFileError;
use super::definition::{Format, ParsedFile, parse};

/// Every file's parse result, in file-name order.
pub type DirContents = Vec<(String, Result<ParsedFile, Vec<FlagFileError>>)>;

/// What identifies the directory's state cheaply: names, sizes and modification times.
pub type Signature = Vec<(String, u64, Option<SystemTime>)>;

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "json" => Some(Format::Json),
        "yaml" | "yml" => Some(Format::Yaml),
        _ => None,
    }
}

fn flag_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, FlagFileError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(FlagFileError {
                file: dir.display().to_string(),
                line: 0,
                reason: format!("cannot read directory: {err}"),
            });
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file() && format_of(path).is_some())
        .collect();
    paths.sort();
    Ok(paths)
}

/// Reads and parses every flag file in `dir`. A missing directory holds no flags; an
/// unreadable one is an error (and the caller keeps what it had).
pub fn read_dir(dir: &Path) -> Result<DirContents, FlagFileError> {
    let mut contents = Vec::new();
    for path in flag_files(dir)? {
        let name = path.display().to_string();
        let format = format_of(&path).expect("filtered by format");
        let result = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&name, &text, format),
            Err(err) => Err(vec![FlagFileError {
                file: name.clone(),
                line: 0,
                reason: format!("cannot read: {err}"),
            }]),
        };
        contents.push((name, result));
    }
    Ok(contents)
}

/// Returns the directory's signature, to notice changes without reading every file.
pub fn signature(dir: &Path) -> Signature {
    flag_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            (
                path.display().to_string(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}
