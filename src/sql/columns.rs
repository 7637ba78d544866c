//! Stored events as Arrow columns: the `events` table's schema and the builder that turns the
//! write-ahead log's JSON records into record batches.
//!
//! Strings that repeat (type, subject, device, session, context values) are dictionary-encoded.
//! Keys are 32-bit, except for the type (a handful of declared values): DataFusion concatenates
//! dictionaries across batches in joins and sorts, and 16-bit keys would overflow there for
//! subjects or classes. A batch holds at most [`BATCH_ROWS`] rows.
//! Properties become a `Map<Utf8, Utf8>`: `properties['lesson_id']` in SQL.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Builder, MapBuilder, RecordBatch, StringBuilder, StringDictionaryBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Int16Type, Int32Type, Schema, SchemaRef, TimeUnit,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::events::raw::{Members, json_string};
use crate::events::schema::CONTEXT_KEYS;

/// Rows per record batch; below `i16::MAX`, so the type's 16-bit keys always fit.
pub const BATCH_ROWS: usize = 32_000;

/// The time zone of every timestamp column.
const UTC: &str = "UTC";

/// Returns the schema of the `events` table (and of its Parquet segments).
pub fn schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let time = DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into()));
        let kind = DataType::Dictionary(Box::new(DataType::Int16), Box::new(DataType::Utf8));
        let text = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let mut fields = vec![
            Field::new("event_time", time.clone(), false),
            Field::new("received_at", time, false),
            Field::new("type", kind, false),
            Field::new("subject", text.clone(), true),
            Field::new("device_id", text.clone(), true),
            Field::new("seq", DataType::Int64, true),
            Field::new("session_id", text.clone(), true),
        ];
        fields.extend(
            CONTEXT_KEYS
                .iter()
                .map(|key| Field::new(*key, text.clone(), true)),
        );
        let properties = Array::data_type(&property_builder().finish()).clone();
        fields.push(Field::new("properties", properties, true));
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

fn property_builder() -> MapBuilder<StringBuilder, StringBuilder> {
    MapBuilder::new(None, StringBuilder::new(), StringBuilder::new())
}

/// The fields of a stored event the table keeps, borrowed from the record where possible.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    device_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    event_time: i64,
    received_at: i64,
    #[serde(borrow, default)]
    context: Members<'a>,
    #[serde(borrow, default)]
    properties: Members<'a>,
}

type Kind = StringDictionaryBuilder<Int16Type>;
type Text = StringDictionaryBuilder<Int32Type>;

/// Rows being gathered into the next record batch.
pub struct EventColumns {
    event_time: TimestampMillisecondBuilder,
    received_at: TimestampMillisecondBuilder,
    kind: Kind,
    subject: Text,
    device: Text,
    seq: Int64Builder,
    session: Text,
    context: Vec<Text>,
    properties: MapBuilder<StringBuilder, StringBuilder>,
    rows: usize,
    min_time: i64,
    max_time: i64,
    max_received: i64,
}

impl Default for EventColumns {
    fn default() -> Self {
        Self::new()
    }
}

impl EventColumns {
    /// Starts an empty batch.
    pub fn new() -> Self {
        Self {
            event_time: TimestampMillisecondBuilder::new().with_timezone(UTC),
            received_at: TimestampMillisecondBuilder::new().with_timezone(UTC),
            kind: Kind::new(),
            subject: Text::new(),
            device: Text::new(),
            seq: Int64Builder::new(),
            session: Text::new(),
            context: CONTEXT_KEYS.iter().map(|_| Text::new()).collect(),
            properties: property_builder(),
            rows: 0,
            min_time: i64::MAX,
            max_time: i64::MIN,
            max_received: i64::MIN,
        }
    }

    /// Returns the rows gathered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Returns whether the batch is full.
    pub fn is_full(&self) -> bool {
        self.rows >= BATCH_ROWS
    }

    /// Returns the event-time range and the newest receive time of the rows, when any.
    pub fn span(&self) -> Option<Span> {
        (self.rows > 0).then_some(Span {
            min_time: self.min_time,
            max_time: self.max_time,
            max_received: self.max_received,
        })
    }

    /// Appends one stored event; returns `false` (appending nothing) when the bytes are not
    /// a stored event. The batch must not be full.
    pub fn append(&mut self, stored: &[u8]) -> bool {
        debug_assert!(!self.is_full());
        let Ok(mut record) = serde_json::from_slice::<Record>(stored) else {
            return false;
        };
        // Stored events list their properties by name already; a map's keys are kept in that
        // order whatever wrote the record.
        record.properties.0.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.event_time.append_value(record.event_time);
        self.received_at.append_value(record.received_at);
        // Fewer than 2^15 rows a batch: a key always fits.
        let _ = self.kind.append(&record.kind);
        append_text(&mut self.subject, record.subject.as_deref());
        append_text(&mut self.device, record.device_id.as_deref());
        self.seq.append_option(record.seq);
        append_text(&mut self.session, record.session_id.as_deref());
        for (key, column) in CONTEXT_KEYS.iter().zip(&mut self.context) {
            let value = record.context.0.iter().find(|(k, _)| k == key);
            append_text(column, value.and_then(|(_, v)| json_string(v)).as_deref());
        }
        if record.properties.0.is_empty() {
            let _ = self.properties.append(false);
        } else {
            for (key, value) in &record.properties.0 {
                self.properties.keys().append_value(key);
                match property_text(value) {
                    Some(text) => self.properties.values().append_value(text),
                    None => self.properties.values().append_null(),
                }
            }
            let _ = self.properties.append(true);
        }
        self.rows += 1;
        self.min_time = self.min_time.min(record.event_time);
        self.max_time = self.max_time.max(record.event_time);
        self.max_received = self.max_received.max(record.received_at);
        true
    }

    /// Returns the rows as a record batch and starts over.
    pub fn finish(&mut self) -> RecordBatch {
        let batch = self.snapshot();
        *self = Self::new();
        batch
    }

    /// Returns the rows as a record batch and keeps gathering.
    pub fn snapshot(&self) -> RecordBatch {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_time.finish_cloned()),
            Arc::new(self.received_at.finish_cloned()),
            Arc::new(self.kind.finish_cloned()),
            Arc::new(self.subject.finish_cloned()),
            Arc::new(self.device.finish_cloned()),
            Arc::new(self.seq.finish_cloned()),
            Arc::new(self.session.finish_cloned()),
        ];
        columns.extend(
            self.context
                .iter()
                .map(|c| Arc::new(c.finish_cloned()) as ArrayRef),
        );
        columns.push(Arc::new(self.properties.finish_cloned()));
        RecordBatch::try_new(schema(), columns).expect("columns follow the schema")
    }
}

/// The event-time range and newest receive time of a set of rows, ms since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The oldest event time.
    pub min_time: i64,
    /// The newest event time.
    pub max_time: i64,
    /// The newest receive time.
    pub max_received: i64,
}

impl Span {
    /// Returns whether rows with event times in `[from, to]` may be among these.
    pub fn overlaps(&self, from: i64, to: i64) -> bool {
        self.max_time >= from && self.min_time <= to
    }

    /// Returns the span covering both.
    pub fn union(self, other: Span) -> Span {
        Span {
            min_time: self.min_time.min(other.min_time),
            max_time: self.max_time.max(other.max_time),
            max_received: self.max_received.max(other.max_received),
        }
    }
}

fn append_text(column: &mut Text, value: Option<&str>) {
    match value {
        // Fewer than 2^31 rows a batch: a key always fits.
        Some(value) => {
            let _ = column.append(value);
        }
        None => column.append_null(),
    }
}

/// A property as text: strings unquoted, numbers and booleans as written, nested values as
/// JSON; `None` for null.
fn property_text(value: &RawValue) -> Option<Cow<'_, str>> {
    let raw = value.get();
    match raw.as_bytes().first() {
        Some(b'"') => json_string(value),
        Some(b'n') if raw == "null" => None,
        _ => Some(Cow::Borrowed(raw)),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{AsArray, MapArray};
    use datafusion::arrow::datatypes::{Int64Type, TimestampMillisecondType};

    use super::*;

    const STORED: &[u8] = br#"{"event_id":"e1","subject":"p1_ab","device_id":"d1","seq":3,
        "session_id":"s1","type":"lesson_completed","event_time":1795166043120,
        "device_time":1,"received_at":1795166044000,
        "context":{"platform":"ios","country":"BR"},
        "properties":{"lesson_id":"14","score":3,"perfect":true,"note":null,"tags":["a"]}}"#;

    #[test]
    fn a_stored_event_becomes_one_typed_row() {
        let mut columns = EventColumns::new();
        assert!(columns.append(STORED));
        assert!(!columns.append(b"not json"));
        assert!(columns.append(br#"{"type":"app_opened","event_time":5,"received_at":6}"#));
        let batch = columns.finish();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), schema());
        let times = batch.column(0).as_primitive::<TimestampMillisecondType>();
        assert_eq!(times.value(0), 1_795_166_043_120);
        let kind = batch
            .column_by_name("type")
            .unwrap()
            .as_dictionary::<Int16Type>();
        let values = kind.values().as_string::<i32>();
        assert_eq!(values.value(kind.keys().value(1) as usize), "app_opened");
        assert!(batch.column_by_name("subject").unwrap().is_null(1));
        let seq = batch
            .column_by_name("seq")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!((seq.value(0), seq.is_null(1)), (3, true));
        assert!(batch.column_by_name("locale").unwrap().is_null(0));
        let country = batch
            .column_by_name("country")
            .unwrap()
            .as_dictionary::<Int32Type>();
        assert_eq!(country.values().as_string::<i32>().value(0), "BR");
        let properties: &MapArray = batch.column_by_name("properties").unwrap().as_map();
        let first = properties.value(0);
        let keys = first.column(0).as_string::<i32>();
        let values = first.column(1).as_string::<i32>();
        let pairs: Vec<_> = (0..keys.len())
            .map(|i| (keys.value(i), values.is_valid(i).then(|| values.value(i))))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("lesson_id", Some("14")),
                ("note", None),
                ("perfect", Some("true")),
                ("score", Some("3")),
                ("tags", Some(r#"["a"]"#)),
            ]
        );
        assert!(properties.is_null(1));
    }

    #[test]
    fn snapshots_leave_the_rows_in_place_and_spans_cover_them() {
        let mut columns = EventColumns::new();
        assert_eq!(columns.span(), None);
        columns.append(STORED);
        columns.append(br#"{"type":"app_opened","event_time":5,"received_at":6}"#);
        assert_eq!(columns.snapshot().num_rows(), 2);
        assert_eq!(columns.rows(), 2);
        let span = columns.span().unwrap();
        assert_eq!((span.min_time, span.max_time), (5, 1_795_166_043_120));
        assert_eq!(span.max_received, 1_795_166_044_000);
        assert_eq!(columns.finish().num_rows(), 2);
        assert_eq!(columns.rows(), 0);
    }
}
