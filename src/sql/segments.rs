//! Parquet segments: events that left the in-memory window, one file per roll, encrypted with
//! AES-256-GCM (Parquet modular encryption, footer included) under the newest data key.
//!
//! A segment's name carries what queries and retention need without opening it: the epochs
//! it holds, its event-time range, its newest receive time and the key version.
//! `events_<first>_<last>_<min time>_<max time>_<max received>_k<version>.parquet`. Files are
//! written beside as `.tmp`, synced, then renamed, so a crash leaves no half segment.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::encryption::encrypt::FileEncryptionProperties;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::WriterProperties;

use super::columns::{Span, schema};
use crate::crypto::KeyRing;

/// Rows per Parquet row group: the unit time pruning skips.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The first write-ahead-log epoch it holds.
    pub first_epoch: u64,
    /// The last write-ahead-log epoch it holds.
    pub last_epoch: u64,
    /// Its event-time range and newest receive time.
    pub span: Span,
    /// The data key version it is encrypted with.
    pub key_version: u32,
}

/// Why a segment could not be written or listed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A file operation failed.
    #[error("segment {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("segment {path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// The cause.
        source: ParquetError,
    },
}

impl Segment {
    fn file_name(&self) -> String {
        format!(
            "events_{}_{}_{}_{}_{}_k{}.parquet",
            self.first_epoch,
            self.last_epoch,
            self.span.min_time,
            self.span.max_time,
            self.span.max_received,
            self.key_version
        )
    }

    /// Reads a segment's description from its file name.
    fn parse(path: &Path, bytes: u64) -> Option<Self> {
        let stem = path.file_name()?.to_str()?.strip_suffix(".parquet")?;
        let mut parts = stem.strip_prefix("events_")?.split('_');
        let mut number = || parts.next()?.parse::<i64>().ok();
        let first_epoch = u64::try_from(number()?).ok()?;
        let last_epoch = u64::try_from(number()?).ok()?;
        let span = Span {
            min_time: number()?,
            max_time: number()?,
            max_received: number()?,
        };
        let key_version = parts.next()?.strip_prefix('k')?.parse().ok()?;
        parts.next().is_none().then(|| Self {
            path: path.to_path_buf(),
            bytes,
            first_epoch,
            last_epoch,
            span,
            key_version,
        })
    }
}

/// Writes `batches` (the epochs `first..=last`, covering `span`) as a new segment in `dir`.
pub fn write(
    dir: &Path,
    batches: &[RecordBatch],
    epochs: (u64, u64),
    span: Span,
    keys: &KeyRing,
) -> Result<Segment, SegmentError> {
    prepare(dir, batches, epochs, span, keys)?.publish()
}

/// A segment written and synced beside its final name, not yet in place.
#[derive(Debug)]
pub struct Prepared {
    segment: Segment,
    tmp: PathBuf,
}

impl Prepared {
    /// The segment it becomes.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// Renames it into place (over a file of the same name) and syncs the directory.
    pub fn publish(self) -> Result<Segment, SegmentError> {
        let io = |source| SegmentError::Io {
            path: self.segment.path.display().to_string(),
            source,
        };
        std::fs::rename(&self.tmp, &self.segment.path).map_err(io)?;
        let dir = self.segment.path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(self.segment)
    }

    /// Deletes the written file instead.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes a segment as [`write`] does, but leaves it beside its final name until
/// [`Prepared::publish`].
pub fn prepare(
    dir: &Path,
    batches: &[RecordBatch],
    (first_epoch, last_epoch): (u64, u64),
    span: Span,
    keys: &KeyRing,
) -> Result<Prepared, SegmentError> {
    let (key_version, key) = keys.newest();
    let mut segment = Segment {
        path: PathBuf::new(),
        bytes: 0,
        first_epoch,
        last_epoch,
        span,
        key_version,
    };
    segment.path = dir.join(segment.file_name());
    let tmp = segment.path.with_extension("parquet.tmp");
    let shown = tmp.display().to_string();
    let io = |source| SegmentError::Io {
        path: shown.clone(),
        source,
    };
    let parquet = |source| SegmentError::Parquet {
        path: shown.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let encryption = FileEncryptionProperties::builder(key.to_vec())
        .build()
        .map_err(parquet)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .with_file_encryption_properties(encryption)
        .build();
    let file = File::create(&tmp).map_err(io)?;
    let mut writer = ArrowWriter::try_new(file, schema(), Some(properties)).map_err(parquet)?;
    for batch in batches {
        writer.write(batch).map_err(parquet)?;
    }
    let file = writer.into_inner().map_err(parquet)?;
    file.sync_all().map_err(io)?;
    segment.bytes = file.metadata().map_err(io)?.len();
    Ok(Prepared { segment, tmp })
}

/// Lists the segments in `dir`, oldest first, and removes files a crash left half written.
pub fn list(dir: &Path) -> Result<Vec<Segment>, SegmentError> {
    let io = |source| SegmentError::Io {
        path: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io(err)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "tmp") {
            std::fs::remove_file(&path).map_err(io)?;
            continue;
        }
        let bytes = entry.metadata().map_err(io)?.len();
        match Segment::parse(&path, bytes) {
            Some(segment) => segments.push(segment),
            None => tracing::warn!(file = %path.display(), "not a segment; left alone"),
        }
    }
    segments.sort_by_key(|s| s.first_epoch);
    Ok(segments)
}

/// Deletes the files of `segments` (a file already gone is fine; a failure is logged, and the
/// file is deleted again at the next start, when it is listed as expired).
pub fn delete(segments: &[Arc<Segment>]) {
    for segment in segments {
        match std::fs::remove_file(&segment.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::error!(error = %err, file = %segment.path.display(), "expired segment not deleted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::columns::EventColumns;

    #[test]
    fn segments_round_trip_their_names_and_only_the_key_opens_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut columns = EventColumns::new();
        for i in 0..10 {
            let event = format!(
                r#"{{"type":"app_opened","subject":"p1_secretsubject","event_time":{},"received_at":{}}}"#,
                1000 + i,
                2000 + i
            );
            assert!(columns.append(event.as_bytes()));
        }
        let span = columns.span().unwrap();
        let keys = KeyRing::single(3, [9; 32]);
        let batch = columns.finish();
        let segment = write(dir.path(), &[batch], (5, 9), span, &keys).unwrap();
        std::fs::write(dir.path().join("events_1_2.parquet.tmp"), b"half").unwrap();
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed, vec![segment.clone()]);
        assert_eq!(segment.key_version, 3);
        assert_eq!(
            (segment.span.min_time, segment.span.max_received),
            (1000, 2009)
        );
        assert!(segment.span.overlaps(1009, 5000) && !segment.span.overlaps(1010, 5000));

        let bytes = std::fs::read(&segment.path).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
        assert!(!bytes.windows(10).any(|w| w == b"app_opened"));
        let file = File::open(&segment.path).unwrap();
        let unkeyed =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                file,
            );
        assert!(
            unkeyed.is_err(),
            "an encrypted segment opened without its key"
        );

        delete(&[Arc::new(segment.clone())]);
        assert!(!segment.path.exists());
        // Already gone: nothing to do, nothing to report.
        delete(&[Arc::new(segment.clone())]);
    }
}
