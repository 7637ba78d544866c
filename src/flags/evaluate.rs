//! Evaluates one flag for a context: the variant, the reason, or the error, as flagd and
//! OpenFeature define them.

use std::borrow::Cow;

use serde_json::Value;

use super::definition::{Flag, Targeting, Variant};
use super::logic::Context;

/// Why a flag resolved as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No targeting: the default variant.
    Static,
    /// Targeting chose the variant.
    TargetingMatch,
    /// Targeting chose nothing: the default variant (or the caller's code default).
    Default,
    /// The flag is disabled: the caller's code default.
    Disabled,
    /// Evaluation failed.
    Error,
}

impl Reason {
    /// Returns the OpenFeature name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
        }
    }
}

/// OpenFeature error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No flag with that key.
    FlagNotFound,
    /// The flag's rule could not be parsed.
    ParseError,
    /// The value is not of the requested type.
    TypeMismatch,
    /// A targeting key was needed and not given.
    TargetingKeyMissing,
    /// The context is not valid.
    InvalidContext,
    /// Anything else.
    General,
}

impl ErrorCode {
    /// Returns the OpenFeature name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// The outcome of evaluating a flag.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution<'a> {
    /// A variant was chosen.
    Variant(&'a Variant, Reason),
    /// The caller's code default applies (disabled flag, or no default variant).
    CodeDefault(Reason),
    /// Evaluation failed.
    Error(ErrorCode, Cow<'static, str>),
}

/// Evaluates `flag` for `context` (an object) at `timestamp` (Unix seconds).
pub fn evaluate<'f>(flag: &'f Flag, context: &Value, timestamp: i64) -> Resolution<'f> {
    if !flag.enabled {
        return Resolution::CodeDefault(Reason::Disabled);
    }
    let default = |reason| match flag.default_variant {
        Some(index) => Resolution::Variant(&flag.variants[index], reason),
        None => Resolution::CodeDefault(Reason::Default),
    };
    let rule = match &flag.targeting {
        Targeting::None => return default(Reason::Static),
        Targeting::Broken(err) => {
            return Resolution::Error(ErrorCode::ParseError, Cow::Owned(err.to_string()));
        }
        Targeting::Rule(rule) => rule,
    };
    let ctx = Context {
        data: context,
        flag_key: &flag.key.0,
        timestamp,
        targeting_key: context.get("targetingKey").and_then(Value::as_str),
    };
    let chosen = rule.evaluate(&ctx);
    let name: Cow<'_, str> = match &*chosen {
        Value::Null => return default(Reason::Default),
        Value::String(name) => Cow::Borrowed(name.as_str()),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Number(n) => Cow::Owned(n.to_string()),
        _ => {
            return Resolution::Error(
                ErrorCode::General,
                Cow::Borrowed("targeting returned neither a variant name nor null"),
            );
        }
    };
    match flag.variant(&name) {
        Some(variant) => Resolution::Variant(variant, Reason::TargetingMatch),
        None => Resolution::Error(
            ErrorCode::General,
            Cow::Owned(format!("targeting chose {name:?}, which is not a variant")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::definition::{Format, parse};
    use serde_json::json;

    fn flag(definition: Value) -> Flag {
        let text = json!({"flags": {"f": definition}}).to_string();
        parse("t.json", &text, Format::Json)
            .unwrap()
            .flags
            .remove(0)
    }

    fn name(resolution: &Resolution<'_>) -> Option<String> {
        match resolution {
            Resolution::Variant(v, _) => Some(v.name.clone()),
            _ => None,
        }
    }

    #[test]
    fn reasons_follow_flagd() {
        let f =
            flag(json!({"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a"}));
        assert!(matches!(
            evaluate(&f, &json!({}), 0),
            Resolution::Variant(_, Reason::Static)
        ));

        let f = flag(json!({"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"}));
        assert_eq!(
            evaluate(&f, &json!({}), 0),
            Resolution::CodeDefault(Reason::Disabled)
        );

        let f = flag(json!({"state": "ENABLED", "variants": {"a": 1}}));
        assert_eq!(
            evaluate(&f, &json!({}), 0),
            Resolution::CodeDefault(Reason::Default)
        );

        let f = flag(
            json!({"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
            "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "b", null]}}),
        );
        let gold = evaluate(&f, &json!({"tier": "gold"}), 0);
        assert!(matches!(
            gold,
            Resolution::Variant(_, Reason::TargetingMatch)
        ));
        assert_eq!(name(&gold).as_deref(), Some("b"));
        assert!(matches!(
            evaluate(&f, &json!({}), 0),
            Resolution::Variant(_, Reason::Default)
        ));
    }

    #[test]
    fn boolean_results_name_variants_and_unknown_names_are_errors() {
        let f = flag(
            json!({"state": "ENABLED", "variants": {"true": "yes", "false": "no"},
            "defaultVariant": "false", "targeting": {"starts_with": [{"var": "id"}, "ab"]}}),
        );
        assert_eq!(
            name(&evaluate(&f, &json!({"id": "abc"}), 0)).as_deref(),
            Some("true")
        );
        let f = flag(
            json!({"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
            "targeting": {"var": "pick"}}),
        );
        assert!(matches!(
            evaluate(&f, &json!({"pick": "zzz"}), 0),
            Resolution::Error(ErrorCode::General, _)
        ));
    }

    proptest::proptest! {
        #[test]
        fn evaluation_is_deterministic(subject in "[a-z0-9-]{0,24}", version in "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}") {
            let f = flag(json!({"state": "ENABLED", "variants": {"a": 1, "b": 2, "c": 3}, "defaultVariant": "a",
                "targeting": {"if": [{"sem_ver": [{"var": "v"}, ">=", "2.0.0"]},
                    {"fractional": [["a", 10], ["b", 45], ["c", 45]]}, "a"]}}));
            let context = json!({"targetingKey": subject, "v": version});
            let first = name(&evaluate(&f, &context, 0));
            for _ in 0..3 {
                proptest::prop_assert_eq!(&name(&evaluate(&f, &context, 0)), &first);
            }
        }
    }

    #[test]
    fn flagd_context_values_are_visible() {
        let f = flag(
            json!({"state": "ENABLED", "variants": {"f": 1, "x": 2}, "defaultVariant": "x",
            "targeting": {"if": [{">": [{"var": "$flagd.timestamp"}, 100]}, {"var": "$flagd.flagKey"}, "x"]}}),
        );
        assert_eq!(name(&evaluate(&f, &json!({}), 200)).as_deref(), Some("f"));
        assert_eq!(name(&evaluate(&f, &json!({}), 50)).as_deref(), Some("x"));
    }
}
