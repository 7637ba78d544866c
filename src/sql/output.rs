//! Answers in the three formats a client may ask for by `Accept`: JSON (the default), CSV and
//! an Arrow IPC stream.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::{ArrayWriter, WriterBuilder as JsonWriterBuilder};
use serde::Serialize;
use serde_json::value::RawValue;

use super::{QueryResult, SqlError};

/// The formats of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: columns, rows as objects, `truncated`.
    Json,
    /// `text/csv` with a header line.
    Csv,
    /// `application/vnd.apache.arrow.stream`.
    Arrow,
}

impl Format {
    /// Picks the format from an `Accept` header (JSON when absent or `*/*`); `None` when it
    /// names only formats the service cannot give.
    pub fn from_accept(accept: Option<&str>) -> Option<Self> {
        let Some(accept) = accept else {
            return Some(Format::Json);
        };
        accept
            .split(',')
            .map(|part| part.split(';').next().unwrap_or("").trim())
            .find_map(|media| match media {
                "application/json" | "*/*" | "application/*" => Some(Format::Json),
                "text/csv" | "text/*" => Some(Format::Csv),
                "application/vnd.apache.arrow.stream" => Some(Format::Arrow),
                _ => None,
            })
    }

    /// Picks the format from a `format=` parameter.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "arrow" => Some(Format::Arrow),
            _ => None,
        }
    }

    /// Returns the media type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

#[derive(Serialize)]
struct Column {
    name: String,
    #[serde(rename = "type")]
    data_type: String,
}

#[derive(Serialize)]
struct JsonAnswer<'a> {
    columns: Vec<Column>,
    rows: &'a RawValue,
    row_count: usize,
    truncated: bool,
    complete: bool,
    elapsed_ms: f64,
}

/// Encodes an answer; an answer CSV cannot hold (maps, lists) is an `Invalid` error.
pub fn encode(result: &QueryResult, format: Format) -> Result<Vec<u8>, SqlError> {
    let batches: Vec<_> = result.batches.iter().collect();
    match format {
        Format::Json => {
            let mut writer: ArrayWriter<Vec<u8>> = JsonWriterBuilder::new()
                .with_explicit_nulls(true)
                .build(Vec::new());
            writer
                .write_batches(&batches)
                .map_err(|e| SqlError::internal("json encoding", e))?;
            writer
                .finish()
                .map_err(|e| SqlError::internal("json encoding", e))?;
            let mut rows = writer.into_inner();
            if rows.is_empty() {
                rows = b"[]".to_vec();
            }
            let rows =
                String::from_utf8(rows).map_err(|e| SqlError::internal("json encoding", e))?;
            let rows =
                RawValue::from_string(rows).map_err(|e| SqlError::internal("json encoding", e))?;
            let answer = JsonAnswer {
                columns: result
                    .schema
                    .fields()
                    .iter()
                    .map(|f| Column {
                        name: f.name().clone(),
                        data_type: f.data_type().to_string(),
                    })
                    .collect(),
                rows: &rows,
                row_count: result.rows,
                truncated: result.truncated,
                complete: result.complete,
                elapsed_ms: result.elapsed.as_secs_f64() * 1000.0,
            };
            serde_json::to_vec(&answer).map_err(|e| SqlError::internal("json encoding", e))
        }
        Format::Csv => {
            let mut writer = CsvWriterBuilder::new().with_header(true).build(Vec::new());
            // The header line comes with the first batch, so an empty answer writes an empty one.
            let empty = RecordBatch::new_empty(result.schema.clone());
            let batches = if batches.is_empty() {
                vec![&empty]
            } else {
                batches
            };
            for batch in batches {
                writer.write(batch).map_err(|e| {
                    SqlError::Invalid(format!(
                        "the answer cannot be written as CSV ({e}); select scalar columns, \
                         for example properties['key'], or ask for JSON"
                    ))
                })?;
            }
            Ok(writer.into_inner())
        }
        Format::Arrow => {
            let mut writer = StreamWriter::try_new(Vec::new(), &result.schema)
                .map_err(|e| SqlError::internal("arrow encoding", e))?;
            for batch in batches {
                writer
                    .write(batch)
                    .map_err(|e| SqlError::internal("arrow encoding", e))?;
            }
            writer
                .into_inner()
                .map_err(|e| SqlError::internal("arrow encoding", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_pick_a_format() {
        assert_eq!(Format::from_accept(None), Some(Format::Json));
        assert_eq!(Format::from_accept(Some("*/*")), Some(Format::Json));
        assert_eq!(
            Format::from_accept(Some("text/csv;q=0.9, application/json")),
            Some(Format::Csv)
        );
        assert_eq!(
            Format::from_accept(Some("application/vnd.apache.arrow.stream")),
            Some(Format::Arrow)
        );
        assert_eq!(Format::from_accept(Some("image/png")), None);
        assert_eq!(Format::from_name("csv"), Some(Format::Csv));
        assert_eq!(Format::from_name("xml"), None);
    }
}
