//! The `events` table: the in-memory window (sealed record batches plus the rows still being
//! gathered) and the Parquet segments older events rolled into, read as one table.
//!
//! A query takes a snapshot under the locks (cheap: `Arc` clones, plus a copy of the open
//! batch), so a roll that moves batches into a segment is seen either before or after, never
//! half. Segments and in-memory batches outside a query's `event_time` bounds are skipped
//! before any file is opened; inside a segment, Parquet row-group statistics prune further.

// Long file: the recent-window table is one type (memory, segments, erasure and the scan over both); splitting it would split its locking.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigFileDecryptionProperties;
use datafusion::common::stats::Precision;
use datafusion::common::{DFSchema, ScalarValue, Statistics};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;

use super::columns::{EventColumns, Span, schema};
use super::erase;
use super::segments::{Segment, SegmentError};
use crate::crypto::KeyRing;
use crate::crypto::to_hex;
use crate::privacy::erasure::Suppressions;

/// A sealed record batch and the span of its rows.
#[derive(Clone)]
struct Sealed {
    batch: RecordBatch,
    span: Span,
}

#[derive(Default)]
struct Window {
    sealed: Vec<Sealed>,
    segments: Vec<Arc<Segment>>,
}

/// What a query reads: in-memory batches and segment files.
struct Snapshot {
    batches: Vec<RecordBatch>,
    segments: Vec<Arc<Segment>>,
}

/// The events of the recent window, shared by the feeder that fills it and the queries that
/// read it.
pub struct RecentEvents {
    // Lock order: `open` before `window`.
    open: Mutex<EventColumns>,
    window: RwLock<Window>,
    keys: RwLock<KeyRing>,
    /// The last log epoch read into the window.
    delivered: tokio::sync::watch::Sender<u64>,
    /// Subjects under erasure: their rows are not taken in.
    suppressions: Arc<Suppressions>,
    /// Held from taking batches for a roll until the segment replaces them, and by an
    /// erasure, so that a roll never writes rows an erasure has just removed.
    rolling: Mutex<()>,
    /// Read by every running query, taken whole to replace or delete segment files: a query
    /// never sees a file change under it (DataFusion opens a file again for each range read).
    files: Arc<tokio::sync::RwLock<()>>,
}

impl RecentEvents {
    /// Starts with the segments already on disk and nothing in memory.
    pub fn new(segments: Vec<Segment>, keys: KeyRing) -> Self {
        Self {
            open: Mutex::new(EventColumns::new()),
            window: RwLock::new(Window {
                sealed: Vec::new(),
                segments: segments.into_iter().map(Arc::new).collect(),
            }),
            keys: RwLock::new(keys),
            delivered: tokio::sync::watch::Sender::new(0),
            suppressions: Arc::default(),
            rolling: Mutex::new(()),
            files: Arc::default(),
        }
    }

    /// Leaves out the rows of the subjects `suppressions` hides.
    pub fn hiding(mut self, suppressions: Arc<Suppressions>) -> Self {
        self.suppressions = suppressions;
        self
    }

    /// The lock a query holds (shared) while it may read segment files.
    pub fn files(&self) -> Arc<tokio::sync::RwLock<()>> {
        self.files.clone()
    }

    /// Holds off erasures while a roll moves batches into a segment.
    pub fn rolling(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rolling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the rows the suppression list hides from memory and from every segment (each
    /// rewritten); returns the rows removed. Blocks on the disk.
    pub fn erase(&self) -> Result<u64, SegmentError> {
        let _rolling = self.rolling();
        let suppressions = self.suppressions.clone();
        let hides = move |subject: &str, time: i64| suppressions.hides(subject, time);
        let mut removed = 0u64;
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            self.seal(&mut open);
            let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
            for sealed in &mut window.sealed {
                let filtered = erase::filter_batch(&sealed.batch, &hides).map_err(|e| {
                    SegmentError::Parquet {
                        path: "memory".into(),
                        source: e.into(),
                    }
                })?;
                if let Some(batch) = filtered {
                    removed += (sealed.batch.num_rows() - batch.num_rows()) as u64;
                    sealed.batch = batch;
                }
            }
        }
        let segments = self
            .window
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .segments
            .clone();
        let (rewritten, dropped) = erase::rewrite_segments(&segments, &self.keys(), &hides)?;
        removed += dropped;
        // The new files go in place once no query reads segment files any more.
        let _no_readers = self.files.blocking_write();
        let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
        let mut failed = None;
        for (old, new) in rewritten {
            let Some(new) = new else { continue };
            let Some(slot) = window.segments.iter_mut().find(|s| s.path == old.path) else {
                // Expired meanwhile: the rewrite goes too.
                new.discard();
                continue;
            };
            if failed.is_some() {
                new.discard();
                continue;
            }
            match new.publish() {
                Ok(new) => {
                    // A newer data key names the file differently: the old one goes.
                    if new.path != old.path
                        && let Err(source) = std::fs::remove_file(&old.path)
                    {
                        failed = Some(SegmentError::Io {
                            path: old.path.display().to_string(),
                            source,
                        });
                    }
                    *slot = Arc::new(new);
                }
                Err(err) => failed = Some(err),
            }
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(removed),
        }
    }

    /// Records that every epoch up to `epoch` is in the window.
    pub fn mark_delivered(&self, epoch: u64) {
        self.delivered.send_if_modified(|last| {
            let newer = epoch > *last;
            *last = (*last).max(epoch);
            newer
        });
    }

    /// Returns a receiver of the last log epoch in the window.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.delivered.subscribe()
    }

    /// Returns the last log epoch any segment holds.
    pub fn newest_segment_epoch(&self) -> Option<u64> {
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        window.segments.iter().map(|s| s.last_epoch).max()
    }

    /// Returns the data keys segments are written and read with.
    pub fn keys(&self) -> KeyRing {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the data keys (a rotation: the ring holds every earlier version too); the
    /// next segment is written with its newest key.
    pub fn rotate_keys(&self, ring: KeyRing) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = ring;
    }

    /// Appends stored events; returns how many were not stored events.
    pub fn append<'a>(&self, events: impl IntoIterator<Item = &'a [u8]>) -> usize {
        let mut unreadable = 0;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for event in events {
            if self.suppressions.hides_stored(event) {
                continue;
            }
            if !open.append(event) {
                unreadable += 1;
            }
            if open.is_full() {
                self.seal(&mut open);
            }
        }
        unreadable
    }

    fn seal(&self, open: &mut EventColumns) {
        if let Some(span) = open.span() {
            let batch = open.finish();
            let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
            window.sealed.push(Sealed { batch, span });
        }
    }

    /// Returns the rows held in memory.
    pub fn rows_in_memory(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        open.rows()
            + window
                .sealed
                .iter()
                .map(|s| s.batch.num_rows())
                .sum::<usize>()
    }

    /// Returns the bytes of Arrow memory the window holds, and the number of segments.
    pub fn footprint(&self) -> (usize, usize) {
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        let bytes = window
            .sealed
            .iter()
            .map(|s| s.batch.get_array_memory_size())
            .sum();
        (bytes, window.segments.len())
    }

    /// Seals the open rows and returns everything in memory with its span, for a roll.
    pub fn take_for_roll(&self) -> Option<(Vec<RecordBatch>, Span)> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        self.seal(&mut open);
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        let span = window.sealed.iter().map(|s| s.span).reduce(Span::union)?;
        let batches = window.sealed.iter().map(|s| s.batch.clone()).collect();
        Some((batches, span))
    }

    /// Replaces the first `rolled` sealed batches by the segment they were written to.
    pub fn rolled(&self, rolled: usize, segment: Segment) {
        let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
        let rolled = rolled.min(window.sealed.len());
        window.sealed.drain(..rolled);
        window.segments.push(Arc::new(segment));
    }

    /// Deletes segments whose newest event was received before `horizon` (ms).
    /// New queries no longer see them at once; their files go once no query reads segment
    /// files, on a thread of their own, so the feeder never waits for a long query.
    pub fn expire(&self, horizon: i64) {
        let expired: Vec<Arc<Segment>> = {
            let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
            let (kept, expired) = std::mem::take(&mut window.segments)
                .into_iter()
                .partition(|s| s.span.max_received >= horizon);
            window.segments = kept;
            expired
        };
        if expired.is_empty() {
            return;
        }
        let files = self.files.clone();
        let delete = move || {
            let _no_readers = files.blocking_write();
            super::segments::delete(&expired);
        };
        if let Err(err) = std::thread::Builder::new()
            .name("sql-expire".into())
            .spawn(delete)
        {
            tracing::error!(error = %err, "expired segments not deleted (retried at the next start)");
        }
    }

    fn snapshot(&self, from: i64, to: i64) -> Snapshot {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        let mut batches: Vec<RecordBatch> = window
            .sealed
            .iter()
            .filter(|s| s.span.overlaps(from, to))
            .map(|s| s.batch.clone())
            .collect();
        if let Some(span) = open.span()
            && span.overlaps(from, to)
        {
            batches.push(open.snapshot());
        }
        let segments = window
            .segments
            .iter()
            .filter(|s| s.span.overlaps(from, to))
            .cloned()
            .collect();
        Snapshot { batches, segments }
    }
}

/// The `events` table as DataFusion sees it.
#[derive(Clone)]
pub struct EventsTable {
    events: Arc<RecentEvents>,
}

impl std::fmt::Debug for EventsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventsTable")
    }
}

impl EventsTable {
    /// Reads `events`.
    pub fn new(events: Arc<RecentEvents>) -> Self {
        Self { events }
    }

    /// Returns the window it reads.
    pub fn events(&self) -> &Arc<RecentEvents> {
        &self.events
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters prune; DataFusion still applies them to every row that remains.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (from, to) = time_bounds(filters);
        let snapshot = self.events.snapshot(from, to);
        let partitions = state.config().target_partitions().max(1);
        let mut plans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if !snapshot.batches.is_empty() || snapshot.segments.is_empty() {
            let mut groups = vec![Vec::new(); partitions.min(snapshot.batches.len()).max(1)];
            let count = groups.len();
            for (i, batch) in snapshot.batches.into_iter().enumerate() {
                groups[i % count].push(batch);
            }
            plans.push(MemorySourceConfig::try_new_exec(
                &groups,
                schema(),
                projection.cloned(),
            )?);
        }
        let mut by_key: BTreeMap<u32, Vec<Arc<Segment>>> = BTreeMap::new();
        for segment in snapshot.segments {
            by_key.entry(segment.key_version).or_default().push(segment);
        }
        let predicate = match conjunction(filters.to_vec()) {
            Some(expr) => {
                let df_schema = DFSchema::try_from(schema())?;
                Some(state.create_physical_expr(expr, &df_schema)?)
            }
            None => None,
        };
        for (version, segments) in by_key {
            let key = self.events.keys().get(version).copied().ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "a segment is encrypted with data key version {version}, which the key ring does not hold"
                ))
            })?;
            let mut options = TableParquetOptions::default();
            options.crypto.file_decryption = Some(ConfigFileDecryptionProperties {
                footer_key_as_hex: to_hex(&key),
                ..Default::default()
            });
            let mut source = ParquetSource::new(schema()).with_table_parquet_options(options);
            if let Some(predicate) = &predicate {
                source = source.with_predicate(predicate.clone());
            }
            let mut groups = vec![(Vec::new(), 0u64); partitions.min(segments.len())];
            let count = groups.len();
            for (i, segment) in segments.iter().enumerate() {
                let group = &mut groups[i % count];
                group.0.push(PartitionedFile::new(
                    segment.path.to_string_lossy(),
                    segment.bytes,
                ));
                group.1 += segment.bytes;
            }
            let total: u64 = groups.iter().map(|g| g.1).sum();
            let groups = groups
                .into_iter()
                .map(|(files, bytes)| {
                    FileGroup::new(files).with_statistics(Arc::new(estimated_statistics(bytes)))
                })
                .collect();
            let config =
                FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source))
                    .with_file_groups(groups)
                    .with_statistics(estimated_statistics(total))
                    .with_projection_indices(projection.cloned())?
                    .with_limit(limit)
                    .build();
            plans.push(DataSourceExec::from_data_source(config));
        }
        UnionExec::try_new(plans)
    }
}

/// Bytes of a segment file per event, about (zstd-compressed Parquet: 17 measured).
const SEGMENT_BYTES_PER_EVENT: u64 = 16;

/// Estimated statistics of segment files totalling `bytes`: the planner needs an idea of
/// their size to put the small side of a join in its hash table (without any, it may hash
/// millions of events to probe a few thousand subjects, many times slower).
fn estimated_statistics(bytes: u64) -> Statistics {
    let rows = usize::try_from(bytes / SEGMENT_BYTES_PER_EVENT).unwrap_or(usize::MAX);
    let mut statistics = Statistics::new_unknown(&schema());
    statistics.num_rows = Precision::Inexact(rows);
    // Decoded, an event takes about 90 bytes of Arrow memory (BENCHMARKS.md).
    statistics.total_byte_size = Precision::Inexact(rows.saturating_mul(90));
    statistics
}

/// Returns the `event_time` range (ms, inclusive) that the filters allow; the whole range
/// when they do not bound it.
fn time_bounds(filters: &[Expr]) -> (i64, i64) {
    column_bounds(filters, "event_time")
}

/// The bounds `[from, to]` in ms that `filters` put on the timestamp column `column` (the
/// widest possible where they put none), for pruning.
pub(super) fn column_bounds(filters: &[Expr], column: &str) -> (i64, i64) {
    let mut from = i64::MIN;
    let mut to = i64::MAX;
    for filter in filters {
        for (op, ms) in comparisons(filter, column) {
            match op {
                Operator::Gt | Operator::GtEq => from = from.max(ms),
                Operator::Lt | Operator::LtEq => to = to.min(ms),
                Operator::Eq => {
                    from = from.max(ms);
                    to = to.min(ms);
                }
                _ => {}
            }
        }
    }
    (from, to)
}

/// The comparisons of `column` with a constant in a filter's conjunction, as
/// `column <op> ms`.
fn comparisons(filter: &Expr, column: &str) -> Vec<(Operator, i64)> {
    match filter {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut found = comparisons(left, column);
            found.extend(comparisons(right, column));
            found
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            match (is_column(left, column), is_column(right, column)) {
                (true, false) => millis(right).map(|ms| vec![(*op, ms)]),
                (false, true) => {
                    let swapped = op.swap();
                    millis(left).zip(swapped).map(|(ms, op)| vec![(op, ms)])
                }
                _ => None,
            }
            .unwrap_or_default()
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_column(expr, column) => millis(low)
            .map(|ms| (Operator::GtEq, ms))
            .into_iter()
            .chain(millis(high).map(|ms| (Operator::LtEq, ms)))
            .collect(),
        _ => Vec::new(),
    }
}

fn is_column(expr: &Expr, name: &str) -> bool {
    match expr {
        Expr::Column(column) => column.name == name,
        Expr::Cast(cast) => is_column(&cast.expr, name),
        _ => false,
    }
}

/// The value of a timestamp literal in ms, rounded outward so pruning never drops a match.
fn millis(expr: &Expr) -> Option<i64> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    match value {
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1000),
        ScalarValue::TimestampMillisecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some(v.div_euclid(1000)),
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v.div_euclid(1_000_000)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn at(ms: i64) -> Expr {
        lit(ScalarValue::TimestampMillisecond(
            Some(ms),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn expired_segments_leave_queries_at_once_and_the_disk_once_no_query_reads() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyRing::single(1, [3; 32]);
        let span = |received| Span {
            min_time: 0,
            max_time: 10,
            max_received: received,
        };
        let old = super::super::segments::write(dir.path(), &[], (1, 2), span(100), &keys).unwrap();
        let new = super::super::segments::write(dir.path(), &[], (3, 4), span(900), &keys).unwrap();
        let events = RecentEvents::new(vec![old.clone(), new.clone()], keys);
        let files = events.files();
        let running_query = files.clone().try_read_owned().unwrap();
        events.expire(500);
        let listed = events.snapshot(i64::MIN, i64::MAX).segments;
        assert_eq!(listed.len(), 1, "new queries see the newer segment only");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(old.path.exists(), "a running query may still read it");
        drop(running_query);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while old.path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "deleted after the query"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(new.path.exists());
    }

    #[test]
    fn time_bounds_come_from_comparisons_with_event_time_only() {
        let filters = vec![
            col("event_time").gt_eq(at(1000)),
            at(5000).gt(col("event_time")),
            col("received_at").lt(at(10)),
        ];
        assert_eq!(time_bounds(&filters), (1000, 5000));
        let between = col("event_time").between(at(7), at(9));
        assert_eq!(time_bounds(&[between]), (7, 9));
        let nanos =
            col("event_time").lt(lit(ScalarValue::TimestampNanosecond(Some(1_999_999), None)));
        assert_eq!(time_bounds(&[nanos]), (i64::MIN, 1));
        let either = col("event_time").lt(at(3)).or(col("event_time").gt(at(9)));
        assert_eq!(time_bounds(&[either]), (i64::MIN, i64::MAX));
    }
}
