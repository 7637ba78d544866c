//! An immutable, versioned set of flags: what every request evaluates against. Built from the
//! parsed files and the previous snapshot, so that a broken file or rule never takes a working
//! flag away.

use std::collections::HashMap;
use std::sync::Arc;

use super::FlagFileError;
use super::definition::{Flag, ParsedFile, Targeting};

/// The flags in force.
#[derive(Debug, Default)]
pub struct Snapshot {
    flags: Vec<Arc<Flag>>,
    index: HashMap<String, usize>,
    /// A hash of every flag's definition; equal content gives an equal hash across restarts.
    pub content_hash: u64,
    /// Increases with every snapshot this process builds.
    pub version: u64,
    /// The problems found while building it (rejected files, broken rules, duplicate keys).
    pub problems: Vec<FlagFileError>,
}

impl Snapshot {
    /// Returns the flag with this key.
    pub fn get(&self, key: &str) -> Option<&Flag> {
        self.index.get(key).map(|&i| self.flags[i].as_ref())
    }

    /// Returns every flag, ordered by key.
    pub fn flags(&self) -> impl ExactSizeIterator<Item = &Flag> {
        self.flags.iter().map(Arc::as_ref)
    }

    /// Returns the number of flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// Returns whether there are no flags.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Builds the next snapshot from every file's parse result (files in name order). A file
    /// that failed keeps the flags it had in `previous`; a flag whose rule is broken keeps its
    /// previous version when there was a working one.
    pub fn build(
        files: Vec<(String, Result<ParsedFile, Vec<FlagFileError>>)>,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mut chosen: Vec<Arc<Flag>> = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut problems = Vec::new();
        let previous_of = |key: &str| previous.and_then(|p| p.index.get(key).map(|&i| &p.flags[i]));
        for (file, result) in files {
            let candidates: Vec<Arc<Flag>> = match result {
                Ok(parsed) => {
                    problems.extend(parsed.problems);
                    parsed
                        .flags
                        .into_iter()
                        .map(|flag| match (&flag.targeting, previous_of(&flag.key.0)) {
                            (Targeting::Broken(_), Some(last))
                                if !matches!(last.targeting, Targeting::Broken(_)) =>
                            {
                                last.clone()
                            }
                            _ => Arc::new(flag),
                        })
                        .collect()
                }
                Err(file_problems) => {
                    problems.extend(file_problems);
                    previous
                        .map(|p| p.flags.iter().filter(|f| f.file == file).cloned().collect())
                        .unwrap_or_default()
                }
            };
            for flag in candidates {
                if let Some(first) = seen.get(&flag.key.0) {
                    problems.push(FlagFileError {
                        file: file.clone(),
                        line: 0,
                        reason: format!("flag {:?} is already defined in {first}", flag.key.0),
                    });
                    continue;
                }
                seen.insert(flag.key.0.clone(), file.clone());
                chosen.push(flag);
            }
        }
        chosen.sort_by(|a, b| a.key.cmp(&b.key));
        let index = chosen
            .iter()
            .enumerate()
            .map(|(i, flag)| (flag.key.0.clone(), i))
            .collect();
        let content_hash = chosen.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, flag| {
            (hash ^ flag.source_hash).wrapping_mul(0x0100_0000_01b3)
        });
        Snapshot {
            flags: chosen,
            index,
            content_hash,
            version: previous.map_or(1, |p| p.version + 1),
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::definition::{Format, parse};

    fn file(name: &str, text: &str) -> (String, Result<ParsedFile, Vec<FlagFileError>>) {
        (name.to_owned(), parse(name, text, Format::Json))
    }

    const GOOD: &str = r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
        "targeting": {"if": [true, "b"]}}}}"#;
    const BROKEN_RULE: &str = r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
        "targeting": {"if": [{"$ref": "gone"}, "b"]}}}}"#;

    #[test]
    fn a_broken_file_keeps_its_last_good_flags() {
        let first = Snapshot::build(vec![file("a.json", GOOD)], None);
        assert_eq!(first.len(), 1);
        let second = Snapshot::build(vec![file("a.json", "{ not json")], Some(&first));
        assert_eq!(second.len(), 1, "the last good flag keeps serving");
        assert_eq!(second.problems.len(), 1);
        assert_eq!(second.content_hash, first.content_hash);
        assert_eq!(second.version, 2);
    }

    #[test]
    fn a_broken_rule_keeps_the_last_good_version_or_answers_parse_error() {
        let fresh = Snapshot::build(vec![file("a.json", BROKEN_RULE)], None);
        assert!(matches!(
            fresh.get("f").unwrap().targeting,
            Targeting::Broken(_)
        ));
        let good = Snapshot::build(vec![file("a.json", GOOD)], None);
        let after = Snapshot::build(vec![file("a.json", BROKEN_RULE)], Some(&good));
        assert!(matches!(
            after.get("f").unwrap().targeting,
            Targeting::Rule(_)
        ));
        assert_eq!(after.problems.len(), 1);
    }

    #[test]
    fn duplicate_keys_keep_the_first_file() {
        let snapshot = Snapshot::build(vec![file("a.json", GOOD), file("b.json", GOOD)], None);
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot.get("f").unwrap().file, "a.json");
        assert!(
            snapshot.problems[0]
                .reason
                .contains("already defined in a.json")
        );
    }

    #[test]
    fn a_removed_file_takes_its_flags_away() {
        let first = Snapshot::build(vec![file("a.json", GOOD)], None);
        let second = Snapshot::build(vec![], Some(&first));
        assert!(second.is_empty());
        assert_ne!(second.content_hash, first.content_hash);
    }
}
