//! Declared event types and their properties. Unknown properties are dropped (data
//! minimization); a property of the wrong type, or a missing required one, rejects the event.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// The type a property must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyKind {
    /// A JSON string.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
}

impl PropertyKind {
    /// Returns whether `value` has this type.
    pub fn admits(self, value: &Value) -> bool {
        match self {
            PropertyKind::String => value.is_string(),
            PropertyKind::Integer => value.is_i64() || value.is_u64(),
            PropertyKind::Number => value.is_number(),
            PropertyKind::Boolean => value.is_boolean(),
        }
    }

    /// Returns whether `json`, the text of one JSON value, has this type; a number must also
    /// be one every reader of stored events can decode (finite, an integer within 64 bits).
    pub fn admits_json(self, json: &str) -> bool {
        match self {
            PropertyKind::String => json.starts_with('"'),
            PropertyKind::Boolean => json == "true" || json == "false",
            // Decoding a number allocates nothing.
            PropertyKind::Integer | PropertyKind::Number => {
                serde_json::from_str::<Value>(json).is_ok_and(|value| self.admits(&value))
            }
        }
    }

    /// Returns the JSON Schema type name.
    pub fn json_type(self) -> &'static str {
        match self {
            PropertyKind::String => "string",
            PropertyKind::Integer => "integer",
            PropertyKind::Number => "number",
            PropertyKind::Boolean => "boolean",
        }
    }
}

/// One declared property.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Property {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: PropertyKind,
    /// Whether an event of the type must carry it.
    #[serde(default)]
    pub required: bool,
}

/// One declared event type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventType {
    /// Its properties by name.
    #[serde(default)]
    pub properties: BTreeMap<String, Property>,
}

/// Every declared event type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// The types by name.
    pub types: BTreeMap<String, EventType>,
}

/// The context keys an event may carry; anything else is dropped.
pub const CONTEXT_KEYS: [&str; 6] = [
    "app_version",
    "platform",
    "locale",
    "country",
    "school_id",
    "class_id",
];

/// The event type of client-reported experiment exposures.
pub const EXPOSURE_TYPE: &str = "$exposure";

/// The event type that opens an app session; the pipeline counts sessions by it.
pub const SESSION_STARTED_TYPE: &str = "session_started";

/// The event type that closes an app session; its `duration_ms` is time spent.
pub const SESSION_ENDED_TYPE: &str = "session_ended";

const READING_APP: &str = r#"{
  "types": {
    "app_opened": {},
    "session_started": {},
    "session_ended": {"properties": {"duration_ms": {"type": "integer"}}},
    "lesson_started": {"properties": {"lesson_id": {"type": "string", "required": true}}},
    "lesson_completed": {"properties": {
      "lesson_id": {"type": "string", "required": true},
      "duration_ms": {"type": "integer"},
      "score": {"type": "number"}
    }},
    "exercise_answered": {"properties": {
      "lesson_id": {"type": "string", "required": true},
      "exercise_id": {"type": "string"},
      "correct": {"type": "boolean"},
      "duration_ms": {"type": "integer"}
    }},
    "reward_shown": {"properties": {"reward": {"type": "string"}, "lesson_id": {"type": "string"}}},
    "$exposure": {"properties": {
      "flag": {"type": "string", "required": true},
      "variant": {"type": "string", "required": true}
    }}
  }
}"#;

/// Why a schema declaration was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid event schema: {0}")]
pub struct SchemaError(String);

impl Schema {
    /// Returns the reading app's schema, the default.
    pub fn reading_app() -> Self {
        Self::parse(READING_APP).expect("the embedded schema is valid")
    }

    /// Parses a declaration (`{"types": {name: {"properties": {…}}}}`).
    pub fn parse(text: &str) -> Result<Self, SchemaError> {
        let schema: Schema = serde_json::from_str(text).map_err(|e| SchemaError(e.to_string()))?;
        if let Some(name) = schema
            .types
            .keys()
            .find(|name| name.is_empty() || name.len() > 64)
        {
            return Err(SchemaError(format!(
                "event type {name:?} must have 1 to 64 characters"
            )));
        }
        Ok(schema)
    }

    /// Returns the declared type called `name`.
    pub fn get(&self, name: &str) -> Option<&EventType> {
        self.types.get(name)
    }

    /// Publishes the schema as JSON Schema (draft 2020-12), for app developers.
    pub fn to_json_schema(&self) -> Value {
        let variants: Vec<Value> = self
            .types
            .iter()
            .map(|(name, event_type)| {
                let properties: serde_json::Map<String, Value> = event_type
                    .properties
                    .iter()
                    .map(|(p, prop)| (p.clone(), json!({"type": prop.kind.json_type()})))
                    .collect();
                let required: Vec<&String> = event_type
                    .properties
                    .iter()
                    .filter(|(_, prop)| prop.required)
                    .map(|(p, _)| p)
                    .collect();
                let mut props = json!({"type": "object", "properties": properties});
                if !required.is_empty() {
                    props["required"] = json!(required);
                }
                json!({
                    "if": {"properties": {"type": {"const": name}}},
                    "then": {"properties": {"properties": props}}
                })
            })
            .collect();
        let names: Vec<&String> = self.types.keys().collect();
        let context: serde_json::Map<String, Value> = CONTEXT_KEYS
            .iter()
            .map(|k| ((*k).to_owned(), json!({"type": "string", "maxLength": 128})))
            .collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "flagstream event",
            "type": "object",
            "required": ["event_id", "type", "timestamp"],
            "properties": {
                "event_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "device_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "seq": {"type": "integer", "minimum": 1},
                "user_id": {"type": "string", "minLength": 1, "maxLength": 256},
                "session_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "type": {"enum": names},
                "timestamp": {"type": "string", "format": "date-time"},
                "sent_at": {"type": "string", "format": "date-time"},
                "context": {"type": "object", "properties": context},
                "properties": {"type": "object"}
            },
            "allOf": variants
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schema_declares_the_reading_app_events() {
        let schema = Schema::reading_app();
        for name in [
            "app_opened",
            "lesson_completed",
            "exercise_answered",
            "$exposure",
        ] {
            assert!(schema.get(name).is_some(), "{name}");
        }
        assert!(schema.get("lesson_completed").unwrap().properties["lesson_id"].required);
        let published = schema.to_json_schema();
        assert!(
            published["properties"]["type"]["enum"]
                .as_array()
                .unwrap()
                .len()
                >= 8
        );
    }

    #[test]
    fn bad_declarations_are_refused() {
        assert!(
            Schema::parse(r#"{"types": {"x": {"properties": {"p": {"type": "date"}}}}}"#).is_err()
        );
        assert!(Schema::parse(r#"{"types": {"x": {"propertys": {}}}}"#).is_err());
        assert!(Schema::parse(r#"{"types": {"": {}}}"#).is_err());
    }

    #[test]
    fn property_types_are_checked_on_the_json_text() {
        use PropertyKind::*;
        let cases = [
            (String, r#""g-14""#, true),
            (String, "14", false),
            (Boolean, "true", true),
            (Boolean, "1", false),
            (Integer, "-41000", true),
            (Integer, "18446744073709551615", true),
            (Integer, "18446744073709551616", false),
            (Integer, "1.0", false),
            (Integer, "1e3", false),
            (Number, "1e3", true),
            (Number, "-0.25", true),
            (Number, "1e400", false),
            (Number, r#""1""#, false),
        ];
        for (kind, json, admitted) in cases {
            assert_eq!(kind.admits_json(json), admitted, "{kind:?} {json}");
        }
    }
}
