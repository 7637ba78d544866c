//! The query engine: one DataFusion session per query over the shared tables, run on the SQL
//! runtime (its own threads, at a lower priority than ingest), with every limit applied.
//!
//! - Read-only: DDL, DML and statements are refused when planning; no table reads files or
//!   URLs other than the service's own segments.
//! - Bounded: text length, a concurrency limit (more queries get `Busy` at once), a deadline
//!   (the query is cancelled), a memory pool per query with spilling disabled, and a row
//!   limit pushed into the plan (`max_rows + 1`, to tell a full answer from a cut one) plus
//!   a byte cap.

// Long file: about a third of it is the unit tests of the engine's limits and scopes, kept beside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::datasource::ViewTable;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::SqlError;
use super::counters_table::CountersTable;
use super::metrics::{self, QueryKind, SQL_QUERIES_RUNNING};
use super::saved::SavedQuery;
use super::scope::Scope;
use super::table::{EventsTable, RecentEvents};
use crate::counters::{CounterStore, Retention};

/// The limits of the engine.
#[derive(Debug, Clone)]
pub struct SqlOptions {
    /// Longest SQL text, bytes.
    pub max_sql_length: usize,
    /// Deadline of one query.
    pub timeout: Duration,
    /// Memory pool of one query, bytes.
    pub memory_limit: usize,
    /// Queries at once.
    pub max_concurrent: usize,
    /// Threads of the SQL runtime.
    pub threads: usize,
    /// Most rows in an answer.
    pub max_rows: usize,
    /// Most bytes of Arrow data in an answer.
    pub max_result_bytes: usize,
}

/// An answer.
#[derive(Debug)]
pub struct QueryResult {
    /// The columns.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Rows in `batches`.
    pub rows: usize,
    /// Whether rows were left out to stay within the row or byte cap.
    pub truncated: bool,
    /// How long the query took.
    pub elapsed: Duration,
    /// Whether the window held every event acknowledged before the query arrived (false
    /// right after a start, while the window is still reading the log).
    pub complete: bool,
}

/// The definition of the `exposures` view.
const EXPOSURES_SQL: &str = "SELECT event_time, received_at, subject, device_id, session_id, \
    properties['flag'] AS flag, properties['variant'] AS variant, app_version, platform, \
    locale, country, school_id, class_id FROM events WHERE type = '$exposure'";

/// Runs queries over the recent window.
pub struct SqlEngine {
    runtime: SqlRuntime,
    permits: Arc<Semaphore>,
    events: Arc<EventsTable>,
    exposures: Arc<ViewTable>,
    counters: Arc<CountersTable>,
    options: SqlOptions,
    /// The newest durable epoch of the log.
    durable: Option<Box<dyn Fn() -> u64 + Send + Sync>>,
    saved: BTreeMap<String, SavedQuery>,
}

/// The SQL runtime, shut down without blocking when dropped (it may be dropped inside
/// another runtime).
struct SqlRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SqlRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl SqlEngine {
    /// Starts the SQL runtime over `events`, with the saved queries.
    pub fn new(
        events: Arc<RecentEvents>,
        saved: Vec<SavedQuery>,
        options: SqlOptions,
    ) -> Result<Self, SqlError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads.max(1))
            .thread_name("sql")
            .on_thread_start(crate::lower_thread_priority)
            .enable_all()
            .build()
            .map_err(|e| SqlError::internal("cannot start the sql runtime", e))?;
        let events = Arc::new(EventsTable::new(events));
        let setup = SessionContext::new();
        setup.register_table("events", events.clone())?;
        let plan = block_on(&runtime, setup.sql(EXPOSURES_SQL))?.into_unoptimized_plan();
        let exposures = Arc::new(ViewTable::new(plan, Some(EXPOSURES_SQL.to_owned())));
        Ok(Self {
            runtime: SqlRuntime(Some(runtime)),
            permits: Arc::new(Semaphore::new(options.max_concurrent)),
            events,
            exposures,
            counters: Arc::new(CountersTable::default()),
            options,
            durable: None,
            saved: saved.into_iter().map(|q| (q.name.clone(), q)).collect(),
        })
    }

    /// Makes queries wait (briefly) until the window holds every epoch that was durable when
    /// they arrived: an event acknowledged before a query is in its answer.
    pub fn read_your_writes(mut self, durable: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.durable = Some(Box::new(durable));
        self
    }

    /// Serves the pipeline's counters from `store` as the `counters` table (empty otherwise).
    pub fn counters(mut self, store: CounterStore, retention: Retention) -> Self {
        self.counters = Arc::new(CountersTable::new(store, retention));
        self
    }

    /// Returns the saved queries by name.
    pub fn saved(&self) -> &BTreeMap<String, SavedQuery> {
        &self.saved
    }

    /// Plans `sql` without running it (and without tables' data); returns the names of its
    /// placeholders. Used to validate saved queries.
    pub fn plan_only(&self, sql: &str) -> Result<Vec<String>, SqlError> {
        let ctx = self.context()?;
        let frame = block_on(self.runtime(), ctx.sql_with_options(sql, read_only()))?;
        let mut names: Vec<String> = frame
            .logical_plan()
            .get_parameter_types()?
            .into_keys()
            .map(|id| id.trim_start_matches('$').to_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Runs a query and `finish` on its answer, recording the query's duration and outcome
    /// under `kind` in the SQL metrics.
    pub async fn run_counted<T>(
        &self,
        kind: QueryKind,
        sql: &str,
        params: &BTreeMap<String, String>,
        scope: Option<&Scope>,
        finish: impl FnOnce(&QueryResult) -> Result<T, SqlError>,
    ) -> Result<(QueryResult, T), SqlError> {
        let started = Instant::now();
        let result = self
            .run(sql, params, scope)
            .await
            .and_then(|result| finish(&result).map(|done| (result, done)));
        let outcome = match &result {
            Ok((result, _)) if result.truncated => "truncated",
            Ok(_) => "ok",
            Err(err) => err.outcome(),
        };
        metrics::query_finished(kind, outcome, started.elapsed());
        result
    }

    /// Runs `sql` with `params` bound to its `$name` placeholders, over every event or, for
    /// a scoped token, over its `scope` (see [`Scope`]); uncounted (see `run_counted`).
    pub async fn run(
        &self,
        sql: &str,
        params: &BTreeMap<String, String>,
        scope: Option<&Scope>,
    ) -> Result<QueryResult, SqlError> {
        if sql.len() > self.options.max_sql_length {
            return Err(SqlError::TooLong {
                length: sql.len(),
                limit: self.options.max_sql_length,
            });
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| SqlError::Busy(self.options.max_concurrent))?;
        let started = Instant::now();
        let complete = self.catch_up().await;
        let ctx = match scope {
            None => self.context()?,
            Some(scope) => self.scoped_context(scope)?,
        };
        let sql = sql.to_owned();
        let params = params.clone();
        let caps = (self.options.max_rows, self.options.max_result_bytes);
        let scope = scope.cloned();
        let files = self.events.events().files();
        let handle = self.runtime().spawn(async move {
            // Dropped when the query ends or is cancelled: the gauge and the permit follow.
            let _running = Running::start(permit);
            // Segment files stay as they are while the query may read them.
            let _reading = files.read_owned().await;
            execute(ctx, sql, params, caps, scope).await
        });
        let task = AbortOnDrop(handle);
        let mut result = match tokio::time::timeout(self.options.timeout, task).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => return Err(SqlError::internal("query task failed", join)),
            Err(_) => return Err(SqlError::Timeout(self.options.timeout)),
        };
        result.elapsed = started.elapsed();
        result.complete = complete;
        Ok(result)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .0
            .as_ref()
            .expect("the runtime lives as long as the engine")
    }

    /// Returns the window the `events` table reads.
    pub fn events(&self) -> &Arc<RecentEvents> {
        self.events.events()
    }

    /// Waits (at most a second) until the window holds every durable epoch; returns whether
    /// it does.
    async fn catch_up(&self) -> bool {
        let Some(durable) = &self.durable else {
            return true;
        };
        let target = durable();
        let mut window = self.events().subscribe();
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                window.wait_for(|epoch| *epoch >= target),
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// A session for a scoped token: its `events` are the scope's only, and there is no
    /// `exposures` view (a subject's first exposure is not an aggregate).
    fn scoped_context(&self, scope: &Scope) -> Result<SessionContext, SqlError> {
        let ctx = self.bare_context()?;
        ctx.register_table("events", scope.events(self.events.clone())?)?;
        Ok(ctx)
    }

    /// A fresh session over the shared tables, with its own memory pool and no disk.
    fn context(&self) -> Result<SessionContext, SqlError> {
        let ctx = self.bare_context()?;
        ctx.register_table("events", self.events.clone() as Arc<dyn TableProvider>)?;
        ctx.register_table(
            "exposures",
            self.exposures.clone() as Arc<dyn TableProvider>,
        )?;
        ctx.register_table("counters", self.counters.clone() as Arc<dyn TableProvider>)?;
        Ok(ctx)
    }

    /// A session with its own memory pool, no disk and no tables.
    fn bare_context(&self) -> Result<SessionContext, SqlError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(self.options.memory_limit)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(self.options.threads.max(1));
        Ok(SessionContext::new_with_config_rt(config, runtime))
    }
}

/// Runs a future to completion on the SQL runtime from synchronous code, even inside another
/// runtime (a scoped thread has no runtime of its own).
fn block_on<F>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .expect("planning does not panic")
    })
}

/// The statements a query may be: no DDL, DML or `SET`.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

async fn execute(
    ctx: SessionContext,
    sql: String,
    params: BTreeMap<String, String>,
    (max_rows, max_bytes): (usize, usize),
    scope: Option<Scope>,
) -> Result<QueryResult, SqlError> {
    let frame = ctx.sql_with_options(&sql, read_only()).await?;
    let frame = bind(frame, params)?;
    let frame = match &scope {
        None => frame,
        Some(scope) => {
            let (state, plan) = frame.into_parts();
            DataFrame::new(state, scope.restrict(plan)?)
        }
    };
    // EXPLAIN, DESCRIBE and SHOW must stay the root of their plan; their answers are small.
    let frame = match frame.logical_plan() {
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => frame,
        _ => frame.limit(0, Some(max_rows.saturating_add(1)))?,
    };
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let mut stream = frame.execute_stream().await?;
    let mut batches = Vec::new();
    let (mut rows, mut bytes, mut truncated) = (0usize, 0usize, false);
    while let Some(batch) = stream.next().await {
        let mut batch = batch?;
        if rows + batch.num_rows() > max_rows {
            batch = batch.slice(0, max_rows - rows);
            truncated = true;
        }
        bytes += batch.get_array_memory_size();
        if bytes > max_bytes && !batches.is_empty() {
            truncated = true;
            break;
        }
        rows += batch.num_rows();
        batches.push(batch);
        if truncated {
            break;
        }
    }
    Ok(QueryResult {
        schema,
        batches,
        rows,
        truncated,
        elapsed: Duration::ZERO,
        complete: true,
    })
}

/// Binds `$name` placeholders, each value parsed as the type its use implies (text when the
/// use implies none).
fn bind(frame: DataFrame, mut params: BTreeMap<String, String>) -> Result<DataFrame, SqlError> {
    let wanted = frame.logical_plan().get_parameter_types()?;
    if wanted.is_empty() && params.is_empty() {
        return Ok(frame);
    }
    let mut values = std::collections::HashMap::new();
    for (id, data_type) in wanted {
        let name = id.trim_start_matches('$').to_owned();
        let Some(text) = params.remove(&name) else {
            return Err(SqlError::Invalid(format!(
                "the query needs parameter {name:?}"
            )));
        };
        let value = match data_type {
            Some(data_type) => {
                ScalarValue::try_from_string(text.clone(), &data_type).map_err(|_| {
                    SqlError::Invalid(format!(
                        "parameter {name:?}: {text:?} is not a valid {data_type}"
                    ))
                })?
            }
            None => ScalarValue::Utf8(Some(text)),
        };
        values.insert(name, value);
    }
    if let Some(unknown) = params.keys().next() {
        return Err(SqlError::Invalid(format!(
            "the query takes no parameter {unknown:?}"
        )));
    }
    Ok(frame.with_param_values(ParamValues::from(values))?)
}

/// A running query: counted in the gauge and holding its permit until dropped.
struct Running(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Running {
    fn start(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        ::metrics::gauge!(SQL_QUERIES_RUNNING).increment(1.0);
        Self(permit)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        ::metrics::gauge!(SQL_QUERIES_RUNNING).decrement(1.0);
    }
}

/// Cancels a spawned query when its caller stops waiting (deadline or disconnect).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;

    use super::*;
    use crate::crypto::KeyRing;

    fn options() -> SqlOptions {
        SqlOptions {
            max_sql_length: 4096,
            timeout: Duration::from_secs(60),
            memory_limit: 1 << 30,
            max_concurrent: 1,
            threads: 2,
            max_rows: 10,
            max_result_bytes: 1 << 20,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joins_across_many_batches_of_distinct_subjects_do_not_overflow_keys() {
        let events = Arc::new(RecentEvents::new(Vec::new(), KeyRing::single(1, [1; 32])));
        let rows: Vec<String> = (0..70_000)
            .map(|i| {
                format!(
                    r#"{{"type":"$exposure","subject":"p1_{i:032x}","context":{{"class_id":"c{i}"}},"event_time":{i},"received_at":{i},"properties":{{"flag":"f","variant":"v{}"}}}}"#,
                    i % 2
                )
            })
            .collect();
        assert_eq!(events.append(rows.iter().map(String::as_bytes)), 0);
        let engine = SqlEngine::new(events, Vec::new(), options()).unwrap();
        let result = engine
            .run(
                "SELECT count(*) AS n, count(DISTINCT e.class_id) AS c FROM events e \
                 JOIN exposures x ON e.subject = x.subject",
                &BTreeMap::new(),
                None,
            )
            .await
            .unwrap();
        let batch = &result.batches[0];
        assert_eq!(batch.column(0).as_primitive::<Int64Type>().value(0), 70_000);
        assert_eq!(batch.column(1).as_primitive::<Int64Type>().value(0), 70_000);
        let sorted = engine
            .run(
                "SELECT subject FROM events ORDER BY subject DESC",
                &BTreeMap::new(),
                None,
            )
            .await
            .unwrap();
        assert!(sorted.truncated);
        assert_eq!(sorted.rows, 10);
        // EXPLAIN stays the root of its plan (the row cap is not wrapped around it).
        let explained = engine
            .run(
                "EXPLAIN SELECT count(*) FROM exposures",
                &BTreeMap::new(),
                None,
            )
            .await
            .unwrap();
        assert!(explained.rows > 0);
        let columns = engine
            .run("SHOW COLUMNS FROM events", &BTreeMap::new(), None)
            .await
            .unwrap();
        assert!(columns.rows > 0);
    }

    /// Class 4A: 6 children; 4B: 3 children (under k = 5); another school's class 9Z: 8.
    fn classes() -> Arc<RecentEvents> {
        let events = Arc::new(RecentEvents::new(Vec::new(), KeyRing::single(1, [1; 32])));
        let mut rows = Vec::new();
        for (school, class, children) in [("s1", "4A", 6), ("s1", "4B", 3), ("s2", "9Z", 8)] {
            for child in 0..children {
                for lesson in 0..2 {
                    rows.push(format!(
                        r#"{{"type":"lesson_completed","subject":"p1_{class}{child:030x}","device_id":"tablet-{class}","context":{{"school_id":"{school}","class_id":"{class}","country":"BR"}},"event_time":{lesson},"received_at":{lesson},"properties":{{"lesson_id":"l{lesson}"}}}}"#
                    ));
                }
            }
        }
        assert_eq!(events.append(rows.iter().map(String::as_bytes)), 0);
        events
    }

    fn int(result: &QueryResult, column: usize) -> Vec<i64> {
        result
            .batches
            .iter()
            .flat_map(|b| {
                b.column(column)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    // Long: one scenario, each query building on the data of the one before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scoped_token_sees_its_school_in_groups_of_enough_children_only() {
        let mut options = options();
        options.max_rows = 1000;
        let engine = SqlEngine::new(classes(), Vec::new(), options).unwrap();
        let school = Scope {
            rows: Some(("school_id", "s1".into())),
            min_group: 5,
        };
        let none = BTreeMap::new();
        let run = |sql: &'static str| engine.run(sql, &none, Some(&school));

        // Its own school only, beneath any WHERE: 9 children, 18 events.
        let all = run("SELECT count(*) AS n, count(DISTINCT subject) AS c FROM events WHERE school_id = 's2' OR true")
            .await
            .unwrap();
        assert_eq!((int(&all, 0), int(&all, 1)), (vec![18], vec![9]));
        // Groups of fewer than 5 children are left out: 4B (3 children) goes.
        let by_class =
            run("SELECT class_id, count(*) AS n FROM events GROUP BY class_id ORDER BY class_id")
                .await
                .unwrap();
        assert_eq!(by_class.rows, 1);
        assert_eq!(int(&by_class, 1), [12]);
        let having = run(
            "SELECT properties['lesson_id'] AS lesson, count(*) AS n FROM events \
             WHERE class_id = '4B' GROUP BY 1 HAVING count(*) > 0",
        )
        .await
        .unwrap();
        assert_eq!(having.rows, 0, "a class of 3 children is not answered");

        // What could reveal a child or another school is refused, with the reason.
        for (sql, why) in [
            ("SELECT subject FROM events", "one aggregation"),
            ("SELECT * FROM events LIMIT 1", "one aggregation"),
            ("SELECT DISTINCT class_id FROM events", "one aggregation"),
            (
                "SELECT subject, count(*) FROM events GROUP BY subject",
                "groups by subject",
            ),
            (
                "SELECT device_id, count(*) FROM events GROUP BY device_id",
                "groups by device_id",
            ),
            ("SELECT min(subject) FROM events", "min of subject"),
            (
                "SELECT array_agg(subject) FROM events",
                "array_agg is not allowed",
            ),
            ("SELECT count(*) FROM exposures", "exposures"),
            (
                "SELECT count(*) FROM (SELECT subject, class_id FROM events) t",
                "rather than the events table",
            ),
            (
                "SELECT n, count(*) FROM (SELECT subject, count(*) AS n FROM events GROUP BY subject) t GROUP BY n",
                "one aggregation",
            ),
            ("EXPLAIN SELECT count(*) FROM events", "EXPLAIN"),
            ("EXPLAIN ANALYZE SELECT count(*) FROM events", "EXPLAIN"),
        ] {
            let err = run(sql).await.unwrap_err();
            assert!(
                matches!(&err, SqlError::Forbidden(text) if text.contains(why))
                    || (why == "exposures"
                        && matches!(&err, SqlError::Invalid(text) if text.contains(why))),
                "{sql}: {err}"
            );
        }
        // Counting identifiers is fine: it reveals none.
        let counted = run("SELECT count(DISTINCT device_id) AS d FROM events")
            .await
            .unwrap();
        assert_eq!(int(&counted, 0), [2]);

        // A class scope; and the unscoped engine still sees everything.
        let class = Scope {
            rows: Some(("class_id", "4B".into())),
            min_group: 3,
        };
        let small = engine
            .run(
                "SELECT count(*) AS n FROM events",
                &BTreeMap::new(),
                Some(&class),
            )
            .await
            .unwrap();
        assert_eq!(int(&small, 0), [6]);
        let everyone = engine
            .run("SELECT count(*) AS n FROM events", &BTreeMap::new(), None)
            .await
            .unwrap();
        assert_eq!(int(&everyone, 0), [34]);
    }
}
