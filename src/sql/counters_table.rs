//! The `counters` table: the pipeline's per-cohort counters, read from the counter store when
//! a query scans it, one row per window, cohort and metric.
//!
//! A scan reads only the windows its filters allow: `window`, `cohort`, `experiment` and
//! `segment` compared with text, `start` with times. Without a bound on `start`, each window
//! length covers its latest [`MAX_WINDOWS`] windows within the counters' retention; a range
//! longer than that is refused rather than cut.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;

use super::table::column_bounds;
use crate::counters::{CohortKey, Window, WindowStart};
use crate::counters::{CounterStore, Retention, WindowCounts};
use crate::wal::unix_millis;

/// The most windows of one length a scan reads per cohort (as `/v1/cohorts` answers).
pub const MAX_WINDOWS: i64 = 1440;

/// The most rows a scan builds before it asks for narrower filters.
pub const MAX_ROWS: usize = 500_000;

/// The `counters` table over a counter store (empty without one, as in `flagstream check`).
#[derive(Default)]
pub struct CountersTable {
    store: Option<(CounterStore, Retention)>,
}

impl std::fmt::Debug for CountersTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountersTable")
            .field("store", &self.store.as_ref().map(|(s, _)| s.kind()))
            .finish()
    }
}

impl CountersTable {
    /// The table over `store`, whose counters are kept as long as `retention` says.
    pub fn new(store: CounterStore, retention: Retention) -> Self {
        Self {
            store: Some((store, retention)),
        }
    }
}

/// The table's columns.
pub fn counters_schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("window", false),
        Field::new(
            "start",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        text("cohort", false),
        text("experiment", true),
        text("variant", true),
        text("segment", true),
        text("segment_value", true),
        text("metric", false),
        text("event_type", true),
        Field::new("value", DataType::Int64, false),
    ]))
}

#[async_trait]
impl TableProvider for CountersTable {
    fn schema(&self) -> SchemaRef {
        counters_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters choose what is read; DataFusion still applies them to every row.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut rows = Rows::default();
        if let Some((store, retention)) = &self.store {
            let wanted = Wanted::of(filters);
            let windows: Vec<(Window, Vec<WindowStart>)> = Window::ALL
                .into_iter()
                .filter(|w| wanted.allows("window", w.name()))
                .map(|w| Ok((w, wanted.starts(w, retention, unix_millis() as i64)?)))
                .collect::<Result<_>>()?;
            let cohorts = store.cohorts().await.map_err(external)?;
            for cohort in cohorts.iter().filter(|c| wanted.allows_cohort(c)) {
                for (window, starts) in &windows {
                    let counts = store
                        .read(cohort, *window, starts)
                        .await
                        .map_err(external)?;
                    for (start, counts) in starts.iter().zip(&counts) {
                        rows.add(*window, *start, cohort, counts);
                    }
                    if rows.len > MAX_ROWS {
                        return Err(DataFusionError::Execution(format!(
                            "the counters table would hold more than {MAX_ROWS} rows: narrow it \
                             with `window`, `start`, `cohort`, `experiment` or `segment`"
                        )));
                    }
                }
            }
        }
        let batch = rows.finish()?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            counters_schema(),
            projection.cloned(),
        )?)
    }
}

fn external(err: crate::counters::CounterError) -> DataFusionError {
    DataFusionError::External(Box::new(err))
}

/// What a scan's filters allow.
#[derive(Debug, Default)]
struct Wanted {
    /// For text columns compared with constants: the values allowed.
    text: Vec<(&'static str, BTreeSet<String>)>,
    /// Bounds on `start` (inclusive), when given.
    from: Option<i64>,
    to: Option<i64>,
}

impl Wanted {
    fn of(filters: &[Expr]) -> Self {
        let mut wanted = Wanted::default();
        for column in ["window", "cohort", "experiment", "segment"] {
            for filter in filters {
                if let Some(values) = text_values(filter, column) {
                    wanted.text.push((column, values));
                }
            }
        }
        let (from, to) = column_bounds(filters, "start");
        wanted.from = (from != i64::MIN).then_some(from);
        wanted.to = (to != i64::MAX).then_some(to);
        wanted
    }

    fn allows(&self, column: &str, value: &str) -> bool {
        self.text
            .iter()
            .filter(|(c, _)| *c == column)
            .all(|(_, values)| values.contains(value))
    }

    /// Whether a column that is null for this cohort can pass: only without a filter on it.
    fn allows_null(&self, column: &str) -> bool {
        !self.text.iter().any(|(c, _)| *c == column)
    }

    fn allows_cohort(&self, cohort: &CohortKey) -> bool {
        self.allows("cohort", &cohort.tag())
            && match cohort {
                CohortKey::All => self.allows_null("experiment") && self.allows_null("segment"),
                CohortKey::Segment { dimension, .. } => {
                    self.allows_null("experiment") && self.allows("segment", dimension)
                }
                CohortKey::Variant { experiment, .. } => {
                    self.allows("experiment", experiment) && self.allows_null("segment")
                }
            }
    }

    /// The starts of the `window` windows to read, newest last.
    fn starts(&self, window: Window, retention: &Retention, now: i64) -> Result<Vec<WindowStart>> {
        let length = window.millis();
        let kept = i64::try_from(retention.kept(window).as_millis()).unwrap_or(i64::MAX);
        let align_up = |ms: i64| {
            ms.div_euclid(length)
                .saturating_add(1)
                .saturating_mul(length)
        };
        // The oldest window still kept (it ends less than `kept` ago), and the current one.
        let oldest = align_up(now.saturating_sub(kept).saturating_sub(length));
        let newest = now.div_euclid(length) * length;
        let last = self
            .to
            .map_or(newest, |to| to.min(newest))
            .div_euclid(length)
            * length;
        let first = match self.from {
            // Windows that start at or after the bound.
            Some(from) => align_up(from.saturating_sub(1)).max(oldest),
            None => oldest.max(last.saturating_sub((MAX_WINDOWS - 1) * length)),
        };
        if first > last {
            return Ok(Vec::new());
        }
        let count = (last - first) / length + 1;
        if count > MAX_WINDOWS {
            return Err(DataFusionError::Execution(format!(
                "the counters table reads at most {MAX_WINDOWS} windows of each length; \
                 {count} {} windows are in this range: narrow `start` or choose a longer \
                 `window`",
                window.name()
            )));
        }
        Ok((0..count)
            .map(|i| WindowStart(first + i * length))
            .collect())
    }
}

/// The text values `filter` allows for `column`: `column = 'x'`, `'x' = column` or
/// `column IN ('x', 'y')`; `None` when it does not constrain `column` that way.
fn text_values(filter: &Expr, column: &str) -> Option<BTreeSet<String>> {
    let is_column = |e: &Expr| matches!(e, Expr::Column(c) if c.name == column);
    let text = |e: &Expr| match e {
        Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)), _) => {
            Some(s.clone())
        }
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            let value = if is_column(left) {
                text(right)
            } else if is_column(right) {
                text(left)
            } else {
                None
            }?;
            Some(BTreeSet::from([value]))
        }
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) if is_column(expr) => list.iter().map(text).collect(),
        _ => None,
    }
}

/// The rows being built.
#[derive(Default)]
struct Rows {
    window: StringBuilder,
    start: TimestampMillisecondBuilder,
    cohort: StringBuilder,
    experiment: StringBuilder,
    variant: StringBuilder,
    segment: StringBuilder,
    segment_value: StringBuilder,
    metric: StringBuilder,
    event_type: StringBuilder,
    value: Int64Builder,
    len: usize,
}

impl Rows {
    /// Adds one window's counters of `cohort`: a row per counter (none for an empty window).
    fn add(
        &mut self,
        window: Window,
        start: WindowStart,
        cohort: &CohortKey,
        counts: &WindowCounts,
    ) {
        if counts.counts.is_empty() && counts.subjects == 0 {
            return;
        }
        let mut metrics: Vec<(&str, Option<&str>, i64)> = Vec::new();
        for (field, value) in &counts.counts {
            match field.strip_prefix("events:") {
                Some(kind) => metrics.push(("events", Some(kind), *value)),
                None => metrics.push((field.as_str(), None, *value)),
            }
        }
        metrics.push((
            "active_subjects",
            None,
            i64::try_from(counts.subjects).unwrap_or(i64::MAX),
        ));
        for (kind, subjects) in &counts.converted {
            metrics.push((
                "converted",
                Some(kind.as_str()),
                i64::try_from(*subjects).unwrap_or(i64::MAX),
            ));
        }
        let name = cohort.tag();
        let (experiment, variant, segment, segment_value) = match cohort {
            CohortKey::All => (None, None, None, None),
            CohortKey::Segment { dimension, value } => {
                (None, None, Some(dimension.as_str()), Some(value.as_str()))
            }
            CohortKey::Variant {
                experiment,
                variant,
            } => (
                Some(experiment.as_str()),
                Some(variant.as_str()),
                None,
                None,
            ),
        };
        for (metric, event_type, value) in metrics {
            self.window.append_value(window.name());
            self.start.append_value(start.0);
            self.cohort.append_value(&name);
            self.experiment.append_option(experiment);
            self.variant.append_option(variant);
            self.segment.append_option(segment);
            self.segment_value.append_option(segment_value);
            self.metric.append_value(metric);
            self.event_type.append_option(event_type);
            self.value.append_value(value);
            self.len += 1;
        }
    }

    fn finish(mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.window.finish()),
            Arc::new(self.start.finish().with_timezone("UTC")),
            Arc::new(self.cohort.finish()),
            Arc::new(self.experiment.finish()),
            Arc::new(self.variant.finish()),
            Arc::new(self.segment.finish()),
            Arc::new(self.segment_value.finish()),
            Arc::new(self.metric.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.value.finish()),
        ];
        Ok(RecordBatch::try_new(counters_schema(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use datafusion::logical_expr::{col, lit};

    use super::*;

    const HOUR: i64 = 3_600_000;

    fn retention() -> Retention {
        Retention {
            minute: Duration::from_secs(2 * 86_400),
            hour: Duration::from_secs(30 * 86_400),
            day: Duration::from_secs(365 * 86_400),
        }
    }

    fn at(ms: i64) -> Expr {
        lit(ScalarValue::TimestampMillisecond(
            Some(ms),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn text_filters_choose_windows_and_cohorts() {
        let wanted = Wanted::of(&[
            col("window").eq(lit("1h")),
            col("experiment").in_list(vec![lit("a"), lit("b")], false),
        ]);
        assert!(wanted.allows("window", "1h") && !wanted.allows("window", "1d"));
        let variant = |e: &str| CohortKey::Variant {
            experiment: e.into(),
            variant: "v".into(),
        };
        assert!(wanted.allows_cohort(&variant("a")) && wanted.allows_cohort(&variant("b")));
        assert!(!wanted.allows_cohort(&variant("c")));
        assert!(
            !wanted.allows_cohort(&CohortKey::All),
            "experiment is null there"
        );
        let unfiltered = Wanted::of(&[col("value").gt(lit(3))]);
        assert!(unfiltered.allows_cohort(&CohortKey::All));
        assert!(unfiltered.allows_cohort(&variant("c")));
    }

    #[test]
    fn starts_follow_the_bounds_within_retention_and_refuse_too_many() {
        let now = 1_000 * HOUR + 1234;
        let bounded = Wanted::of(&[
            col("start").gt_eq(at(990 * HOUR + 5)),
            col("start").lt(at(995 * HOUR)),
        ]);
        let starts = bounded.starts(Window::Hour, &retention(), now).unwrap();
        assert_eq!(starts.first(), Some(&WindowStart(991 * HOUR)));
        assert_eq!(starts.last(), Some(&WindowStart(995 * HOUR)));
        // Unbounded: the latest 1440 minutes, up to the current one.
        let minutes = Wanted::default()
            .starts(Window::Minute, &retention(), now)
            .unwrap();
        assert_eq!(minutes.len(), 1440);
        assert_eq!(minutes.last(), Some(&WindowStart(now / 60_000 * 60_000)));
        // Unbounded hours stop at the retention: 30 days and the window being kept.
        let hours = Wanted::default()
            .starts(Window::Hour, &retention(), now)
            .unwrap();
        assert_eq!(hours.len(), 721);
        // A lower bound that asks for more than 1440 minutes is refused, not cut.
        let wide = Wanted::of(&[col("start").gt_eq(at(now - 36 * HOUR))]);
        let err = wide.starts(Window::Minute, &retention(), now).unwrap_err();
        assert!(err.to_string().contains("at most 1440"), "{err}");
        // A range entirely in the future or past retention reads nothing.
        let future = Wanted::of(&[col("start").gt(at(now + 10 * HOUR))]);
        assert!(
            future
                .starts(Window::Hour, &retention(), now)
                .unwrap()
                .is_empty()
        );
    }
}
