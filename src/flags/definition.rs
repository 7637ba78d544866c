//! Flag files in flagd's format, parsed and checked.
//!
//! A file is rejected whole for a syntax error or a schema problem (a wrong `state`, empty or
//! mixed-type `variants`, an unknown `defaultVariant` or bucket variant, bad metadata, an
//! unknown key). A flag whose targeting does not compile (unknown operator, bad `$ref`) is
//! kept apart: the snapshot serves its last good version, or `PARSE_ERROR` if it never had one.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::logic::{self, CompileError, Evaluators, Rule};
use super::{FlagFileError, FlagKey};

/// JSON text made once, when the flags load, and written into answers as it is.
#[derive(Debug, Clone)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// The JSON text of `value`.
    pub fn of(value: &Value) -> Self {
        Self(RawValue::from_string(value.to_string()).expect("a JSON value serializes to JSON"))
    }

    /// The text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// One variant of a flag, with its value pre-serialized for fast responses.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The variant's name.
    pub name: String,
    /// The variant's value.
    pub value: Value,
    /// `value` as JSON text.
    pub json: RawJson,
    /// `name` as a JSON string.
    pub name_json: RawJson,
}

/// What decides a flag's variant.
#[derive(Debug, Clone, PartialEq)]
pub enum Targeting {
    /// No rule: the default variant, reason `STATIC`.
    None,
    /// A compiled rule.
    Rule(Rule),
    /// A rule that did not compile; evaluation answers `PARSE_ERROR`.
    Broken(CompileError),
}

/// A flag marked as an experiment in its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    /// The control variant's name.
    pub control: String,
    /// The event types that count as a conversion.
    pub goals: Vec<String>,
}

/// A flag ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    /// The key.
    pub key: FlagKey,
    /// `key` as a JSON string.
    pub key_json: RawJson,
    /// The file it came from.
    pub file: String,
    /// `false` when its `state` is `DISABLED`.
    pub enabled: bool,
    /// The variants, by name.
    pub variants: Vec<Variant>,
    /// The index of the default variant; `None` defers to the caller's code default.
    pub default_variant: Option<usize>,
    /// The targeting rule.
    pub targeting: Targeting,
    /// Flag-set metadata overlaid by the flag's own.
    pub metadata: Map<String, Value>,
    /// `metadata` as JSON text.
    pub metadata_json: RawJson,
    /// Experiment settings, when the flag is an experiment.
    pub experiment: Option<Experiment>,
    /// A hash of the flag's definition, for ETags.
    pub source_hash: u64,
}

impl Flag {
    /// Returns the variant called `name`.
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants
            .binary_search_by(|v| v.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.variants[i])
    }
}

/// The flags of one file.
#[derive(Debug, Clone, Default)]
pub struct ParsedFile {
    /// Every flag, including those whose targeting is broken.
    pub flags: Vec<Flag>,
    /// Problems with single flags (their targeting), which do not reject the file.
    pub problems: Vec<FlagFileError>,
}

/// The text formats a flag file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.json`
    Json,
    /// `.yaml` or `.yml`
    Yaml,
}

const TOP_LEVEL_KEYS: [&str; 4] = ["flags", "$evaluators", "metadata", "$schema"];
const FLAG_KEYS: [&str; 5] = [
    "state",
    "variants",
    "defaultVariant",
    "targeting",
    "metadata",
];

/// Parses one flag file; `Err` rejects the whole file with every problem found.
pub fn parse(name: &str, text: &str, format: Format) -> Result<ParsedFile, Vec<FlagFileError>> {
    let problem = |line: usize, reason: String| FlagFileError {
        file: name.to_owned(),
        line,
        reason,
    };
    let document: Value = match format {
        Format::Json => serde_json::from_str(text)
            .map_err(|err| vec![problem(err.line(), format!("invalid JSON: {err}"))])?,
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|err| {
            let line = err.location().map_or(0, |l| l.line());
            vec![problem(line, format!("invalid YAML: {err}"))]
        })?,
    };
    let Some(root) = document.as_object() else {
        return Err(vec![problem(1, "the file must hold an object".into())]);
    };
    let mut problems = Vec::new();
    for key in root.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            problems.push(problem(
                line_of(text, key),
                format!("unknown top-level key {key:?}"),
            ));
        }
    }
    let set_metadata = match root.get("metadata") {
        None => Map::new(),
        Some(value) => check_metadata(value).unwrap_or_else(|reason| {
            problems.push(problem(line_of(text, "metadata"), reason));
            Map::new()
        }),
    };
    let evaluators: Evaluators = match root.get("$evaluators") {
        None => Evaluators::new(),
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => {
            problems.push(problem(
                line_of(text, "$evaluators"),
                "$evaluators must be an object".into(),
            ));
            Evaluators::new()
        }
    };
    let Some(flags) = root.get("flags").and_then(Value::as_object) else {
        problems.push(problem(0, "missing the \"flags\" object".into()));
        return Err(problems);
    };

    let mut parsed = ParsedFile::default();
    for (key, definition) in flags {
        let line = line_of(text, key);
        match build_flag(name, key, definition, &set_metadata, &evaluators) {
            Ok(flag) => {
                if let Targeting::Broken(err) = &flag.targeting {
                    parsed
                        .problems
                        .push(problem(line, format!("flag {key:?}: targeting: {err}")));
                }
                parsed.flags.push(flag);
            }
            Err(reason) => problems.push(problem(line, format!("flag {key:?}: {reason}"))),
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

// Long: each check of a flagd flag definition in the order flagd documents its fields.
fn build_flag(
    file: &str,
    key: &str,
    definition: &Value,
    set_metadata: &Map<String, Value>,
    evaluators: &Evaluators,
) -> Result<Flag, String> {
    let object = definition.as_object().ok_or("a flag must be an object")?;
    if let Some(unknown) = object.keys().find(|k| !FLAG_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key {unknown:?}"));
    }
    let enabled = match object.get("state").and_then(Value::as_str) {
        Some("ENABLED") => true,
        Some("DISABLED") => false,
        _ => return Err("state must be \"ENABLED\" or \"DISABLED\"".into()),
    };
    let variants = object
        .get("variants")
        .and_then(Value::as_object)
        .filter(|v| !v.is_empty())
        .ok_or("variants must be a non-empty object")?;
    let kinds: std::collections::BTreeSet<&str> = variants.values().map(kind_of).collect();
    if kinds.len() > 1 {
        return Err(format!(
            "variants mix value types ({}); a flag has one type",
            kinds.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    // serde_json's map is ordered by key, so the variants come out sorted for binary search.
    let variants: Vec<Variant> = variants
        .iter()
        .map(|(name, value)| Variant {
            name: name.clone(),
            json: RawJson::of(value),
            name_json: RawJson::of(&Value::String(name.clone())),
            value: value.clone(),
        })
        .collect();
    let index_of = |name: &str| variants.iter().position(|v| v.name == name);
    let default_variant = match object.get("defaultVariant") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(
            index_of(name)
                .ok_or_else(|| format!("defaultVariant {name:?} is not one of its variants"))?,
        ),
        Some(other) => return Err(format!("defaultVariant must be a string, not {other}")),
    };
    let mut metadata = set_metadata.clone();
    if let Some(own) = object.get("metadata") {
        metadata.extend(check_metadata(own)?);
    }
    let experiment = experiment_of(&metadata, |name| index_of(name).is_some())?;
    let targeting = match object.get("targeting") {
        None | Some(Value::Null) => Targeting::None,
        Some(Value::Object(map)) if map.is_empty() => Targeting::None,
        Some(rule @ Value::Object(_)) => {
            check_bucket_variants(rule, &|name| index_of(name).is_some())?;
            match logic::compile(rule, evaluators) {
                Ok(rule) => Targeting::Rule(rule),
                Err(err) => Targeting::Broken(err),
            }
        }
        Some(_) => return Err("targeting must be a JsonLogic object".into()),
    };
    let source_hash = {
        let text = format!(
            "{file}\u{0}{key}\u{0}{definition}\u{0}{}",
            Value::Object(set_metadata.clone())
        );
        murmur3::murmur3_x64_128(&mut text.as_bytes(), 0).unwrap_or(0) as u64
    };
    Ok(Flag {
        key: FlagKey(key.to_owned()),
        key_json: RawJson::of(&Value::String(key.to_owned())),
        file: file.to_owned(),
        enabled,
        variants,
        default_variant,
        targeting,
        metadata_json: RawJson::of(&Value::Object(metadata.clone())),
        metadata,
        experiment,
        source_hash,
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Metadata values must be booleans, strings or numbers (OFREP's metadata schema).
fn check_metadata(value: &Value) -> Result<Map<String, Value>, String> {
    let map = value.as_object().ok_or("metadata must be an object")?;
    match map
        .iter()
        .find(|(_, v)| !matches!(v, Value::Bool(_) | Value::String(_) | Value::Number(_)))
    {
        Some((key, _)) => Err(format!(
            "metadata {key:?} must be a boolean, string or number"
        )),
        None => Ok(map.clone()),
    }
}

/// Reads `experiment`, `control` and `goals` (comma-separated event types) from metadata.
fn experiment_of(
    metadata: &Map<String, Value>,
    has_variant: impl Fn(&str) -> bool,
) -> Result<Option<Experiment>, String> {
    match metadata.get("experiment") {
        None | Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => {}
        Some(_) => return Err("metadata \"experiment\" must be true or false".into()),
    }
    let control = metadata
        .get("control")
        .and_then(Value::as_str)
        .ok_or("an experiment needs metadata \"control\" naming its control variant")?;
    if !has_variant(control) {
        return Err(format!(
            "experiment control {control:?} is not one of its variants"
        ));
    }
    let goals: Vec<String> = metadata
        .get("goals")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    if goals.is_empty() {
        return Err("an experiment needs metadata \"goals\": event types, comma-separated".into());
    }
    Ok(Some(Experiment {
        control: control.to_owned(),
        goals,
    }))
}

/// Every constant string naming a `fractional` bucket must be a variant.
fn check_bucket_variants(rule: &Value, has_variant: &dyn Fn(&str) -> bool) -> Result<(), String> {
    match rule {
        Value::Object(map) => {
            for (operator, args) in map {
                if operator == "fractional"
                    && let Value::Array(items) = args
                {
                    for bucket in items {
                        if let Some(Value::String(name)) = bucket.as_array().and_then(|b| b.first())
                            && !has_variant(name)
                        {
                            return Err(format!(
                                "fractional bucket {name:?} is not one of its variants"
                            ));
                        }
                    }
                }
                check_bucket_variants(args, has_variant)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_bucket_variants(item, has_variant)),
        _ => Ok(()),
    }
}

/// Returns the 1-based line where `"key"` (JSON) or `key:` (YAML) first appears.
fn line_of(text: &str, key: &str) -> usize {
    let quoted = format!("\"{key}\"");
    let yaml = format!("{key}:");
    text.find(&quoted)
        .or_else(|| text.find(&yaml))
        .map(|at| text[..at].matches('\n').count() + 1)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(text: &str) -> Result<ParsedFile, Vec<FlagFileError>> {
        parse("f.json", text, Format::Json)
    }

    #[test]
    fn a_good_file_parses_with_sorted_variants_and_merged_metadata() {
        let file = parse_json(
            r#"{"metadata": {"team": "reading"}, "flags": {"f": {"state": "ENABLED",
                "variants": {"on": true, "off": false}, "defaultVariant": "on",
                "metadata": {"version": 2}}}}"#,
        )
        .unwrap();
        let flag = &file.flags[0];
        assert_eq!(flag.variants[0].name, "off");
        assert_eq!(flag.variant("on").unwrap().json.get(), "true");
        assert_eq!(
            flag.metadata_json.get(),
            r#"{"team":"reading","version":2}"#
        );
        assert_eq!(flag.targeting, Targeting::None);
    }

    #[test]
    fn every_schema_problem_of_a_file_is_reported_with_its_line() {
        let text = "{\"flags\": {\n\"a\": {\"state\": \"ON\", \"variants\": {\"x\": 1}},\n\"b\": {\"state\": \"ENABLED\", \"variants\": {\"x\": 1}, \"defaultVariant\": \"y\"},\n\"c\": {\"state\": \"ENABLED\", \"variants\": {\"x\": 1, \"y\": \"s\"}},\n\"d\": {\"state\": \"ENABLED\", \"variants\": {\"x\": 1}, \"defualtVariant\": \"x\"}\n}, \"extra\": 1}";
        let problems = parse_json(text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 5, "{shown:#?}");
        assert!(
            shown[0].contains("unknown top-level key \"extra\""),
            "{shown:#?}"
        );
        assert!(
            shown[1].starts_with("f.json:2: flag \"a\": state"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("f.json:3: flag \"b\": defaultVariant"),
            "{shown:#?}"
        );
        assert!(shown[3].contains("mix value types"), "{shown:#?}");
        assert!(
            shown[4].contains("unknown key \"defualtVariant\""),
            "{shown:#?}"
        );
    }

    #[test]
    fn broken_targeting_is_a_flag_problem_not_a_file_problem() {
        let file = parse_json(
            r#"{"flags": {"good": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"},
                "bad": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                        "targeting": {"if": [{"$ref": "nowhere"}, "a"]}}}}"#,
        )
        .unwrap();
        assert_eq!(file.flags.len(), 2);
        assert_eq!(file.problems.len(), 1);
        assert!(
            file.problems[0]
                .reason
                .contains("$ref to unknown evaluator")
        );
    }

    #[test]
    fn unknown_bucket_variants_and_bad_experiments_reject_the_file() {
        let problems = parse_json(
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                "targeting": {"fractional": [["a", 50], ["c", 50]]}}}}"#,
        )
        .unwrap_err();
        assert!(problems[0].reason.contains("bucket \"c\""));
        let problems = parse_json(
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                "metadata": {"experiment": true, "control": "z", "goals": "x"}}}}"#,
        )
        .unwrap_err();
        assert!(problems[0].reason.contains("control \"z\""));
    }

    #[test]
    fn experiments_read_control_and_goals() {
        let file = parse_json(
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                "metadata": {"experiment": true, "control": "a", "goals": "lesson_completed, app_opened"}}}}"#,
        )
        .unwrap();
        let experiment = file.flags[0].experiment.as_ref().unwrap();
        assert_eq!(experiment.goals, ["lesson_completed", "app_opened"]);
    }

    #[test]
    fn yaml_files_parse_like_json() {
        let file = parse(
            "f.yaml",
            "flags:\n  f:\n    state: ENABLED\n    variants:\n      on: true\n      off: false\n    defaultVariant: 'on'\n",
            Format::Yaml,
        )
        .unwrap();
        assert_eq!(file.flags[0].variants.len(), 2);
        let problems = parse("f.yaml", "flags:\n  f: [unclosed\n", Format::Yaml).unwrap_err();
        assert!(problems[0].line >= 2, "{problems:?}");
    }
}
