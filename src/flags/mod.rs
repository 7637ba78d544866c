//! Flags: flag definitions in flagd's format, their evaluation and murmur3 bucketing.
//!
//! Input: the files of `flags/` (read by [`files`], the only part that touches the disk).
//! Output: an immutable snapshot that request handlers evaluate without locks or parsing.
//! Everything but `files` is pure.

pub mod files;

use std::collections::BTreeMap;

/// The key of a flag, unique across all files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlagKey(pub String);

/// A problem in one flag file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct FlagFileError {
    /// The file name.
    pub file: String,
    /// The 1-based line, or 0 when the problem is not tied to one line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The flags of one file, checked for structure.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagFile {
    /// The flags by key.
    pub flags: BTreeMap<FlagKey, serde_json::Value>,
}

/// Parses one flagd flag file and checks its structure: a `flags` object whose every flag has a
/// `state` of `ENABLED` or `DISABLED`, non-empty `variants`, and a `defaultVariant` among them.
pub fn parse_file(name: &str, text: &str) -> Result<FlagFile, Vec<FlagFileError>> {
    let problem = |line: usize, reason: String| FlagFileError {
        file: name.to_owned(),
        line,
        reason,
    };
    let document: serde_json::Value = serde_json::from_str(text)
        .map_err(|err| vec![problem(err.line(), format!("invalid JSON: {err}"))])?;
    let Some(flags) = document.get("flags").and_then(|f| f.as_object()) else {
        return Err(vec![problem(0, "missing the \"flags\" object".into())]);
    };
    let mut problems = Vec::new();
    let mut parsed = BTreeMap::new();
    for (key, flag) in flags {
        let line = line_of(text, key);
        match check_flag(flag) {
            Ok(()) => {
                parsed.insert(FlagKey(key.clone()), flag.clone());
            }
            Err(reason) => problems.push(problem(line, format!("flag {key:?}: {reason}"))),
        }
    }
    if problems.is_empty() {
        Ok(FlagFile { flags: parsed })
    } else {
        Err(problems)
    }
}

fn check_flag(flag: &serde_json::Value) -> Result<(), String> {
    let state = flag.get("state").and_then(|s| s.as_str());
    if !matches!(state, Some("ENABLED" | "DISABLED")) {
        return Err("state must be \"ENABLED\" or \"DISABLED\"".into());
    }
    let variants = flag
        .get("variants")
        .and_then(|v| v.as_object())
        .filter(|v| !v.is_empty())
        .ok_or("variants must be a non-empty object")?;
    match flag.get("defaultVariant") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(default)) if variants.contains_key(default) => Ok(()),
        Some(other) => Err(format!("defaultVariant {other} is not one of its variants")),
    }
}

/// Returns the 1-based line where `"key"` first appears, for error messages.
fn line_of(text: &str, key: &str) -> usize {
    let needle = format!("\"{key}\"");
    text.find(&needle)
        .map(|at| text[..at].matches('\n').count() + 1)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_file_parses() {
        let file = parse_file(
            "a.json",
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}}}"#,
        )
        .unwrap();
        assert_eq!(file.flags.len(), 1);
    }

    #[test]
    fn every_broken_flag_is_reported_with_its_line() {
        let text = "{\"flags\": {\n\"a\": {\"state\": \"ON\", \"variants\": {\"x\": 1}},\n\"b\": {\"state\": \"ENABLED\", \"variants\": {\"x\": 1}, \"defaultVariant\": \"y\"}\n}}";
        let problems = parse_file("f.json", text).unwrap_err();
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].line, 2);
        assert!(problems[1].to_string().starts_with("f.json:3: flag \"b\""));
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let problems = parse_file("f.json", "{\n\"flags\": {,}\n}").unwrap_err();
        assert_eq!(problems[0].line, 2);
    }
}
