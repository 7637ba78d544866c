//! Erasure in the SQL tables: rows of an erased subject leave the in-memory window and the
//! Parquet segments.
//!
//! Input: record batches or a segment file, and which rows to drop (by subject pseudonym and
//! event time). Output: the rows kept; a segment is rewritten whole (encrypted like any new
//! one, written beside and renamed over), since Parquet files cannot drop rows in place.

use std::fs::File;
use std::sync::Arc;

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::array::{AsArray, TimestampMillisecondArray};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, TimestampMillisecondType};
use datafusion::arrow::error::ArrowError;
use datafusion::parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use datafusion::parquet::encryption::decrypt::FileDecryptionProperties;

use super::segments::{self, Prepared, Segment, SegmentError};
use crate::crypto::KeyRing;

/// Which rows go: `(subject pseudonym, event time in ms)` → drop.
pub type Hides<'a> = &'a (dyn Fn(&str, i64) -> bool + Sync);

/// Returns `batch` without the rows `hides` selects, or `None` when it keeps every row.
pub fn filter_batch(batch: &RecordBatch, hides: Hides) -> Result<Option<RecordBatch>, ArrowError> {
    let (Some(subjects), Some(times)) = (
        batch.column_by_name("subject"),
        batch.column_by_name("event_time"),
    ) else {
        return Ok(None);
    };
    let subjects = cast(subjects, &DataType::Utf8)?;
    let subjects: &StringArray = subjects.as_string();
    let times: &TimestampMillisecondArray = times.as_primitive::<TimestampMillisecondType>();
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|row| Some(subjects.is_null(row) || !hides(subjects.value(row), times.value(row))))
        .collect();
    if keep.true_count() == batch.num_rows() {
        return Ok(None);
    }
    filter_record_batch(batch, &keep).map(Some)
}

/// Writes `segment` again without the rows `hides` selects, beside the file; returns the new
/// file (to publish) and the rows dropped, or `None` when it keeps every row.
pub fn rewrite_segment(
    segment: &Segment,
    keys: &KeyRing,
    hides: Hides,
) -> Result<Option<(Prepared, u64)>, SegmentError> {
    let shown = segment.path.display().to_string();
    let parquet = |source| SegmentError::Parquet {
        path: shown.clone(),
        source,
    };
    let key = keys
        .get(segment.key_version)
        .ok_or_else(|| SegmentError::Io {
            path: shown.clone(),
            source: std::io::Error::other(format!(
                "data key version {} is not configured",
                segment.key_version
            )),
        })?;
    let file = File::open(&segment.path).map_err(|source| SegmentError::Io {
        path: shown.clone(),
        source,
    })?;
    let decryption = FileDecryptionProperties::builder(key.to_vec())
        .build()
        .map_err(parquet)?;
    let options = ArrowReaderOptions::new().with_file_decryption_properties(decryption);
    let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .and_then(|b| b.build())
        .map_err(parquet)?;
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| parquet(e.into()))?;
        match filter_batch(&batch, hides).map_err(|e| parquet(e.into()))? {
            Some(filtered) => {
                dropped += (batch.num_rows() - filtered.num_rows()) as u64;
                kept.push(filtered);
            }
            None => kept.push(batch),
        }
    }
    if dropped == 0 {
        return Ok(None);
    }
    let dir = segment.path.parent().unwrap_or(std::path::Path::new("."));
    let prepared = segments::prepare(
        dir,
        &kept,
        (segment.first_epoch, segment.last_epoch),
        segment.span,
        keys,
    )?;
    Ok(Some((prepared, dropped)))
}

/// Each segment and, when it was rewritten, what replaces it (not yet in place).
pub type Rewritten = Vec<(Arc<Segment>, Option<Prepared>)>;

/// The rows of `segments` that `hides` selects, written away into new files beside them;
/// returns every segment with its replacement, and the rows dropped. On an error, the files
/// already written are deleted.
pub fn rewrite_segments(
    segments: &[Arc<Segment>],
    keys: &KeyRing,
    hides: Hides,
) -> Result<(Rewritten, u64), SegmentError> {
    let mut out: Rewritten = Vec::with_capacity(segments.len());
    let mut dropped = 0;
    for segment in segments {
        match rewrite_segment(segment, keys, hides) {
            Ok(Some((new, rows))) => {
                dropped += rows;
                out.push((segment.clone(), Some(new)));
            }
            Ok(None) => out.push((segment.clone(), None)),
            Err(err) => {
                out.into_iter()
                    .filter_map(|(_, new)| new)
                    .for_each(Prepared::discard);
                return Err(err);
            }
        }
    }
    Ok((out, dropped))
}
