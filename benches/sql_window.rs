//! The SQL window at scale: loads N generated events (default 10 million) into the in-memory
//! window exactly as the feeder does, reports the Arrow memory per event, then runs every saved
//! query (one typical ad-hoc aggregate, and the experiment results query) several times and
//! reports the median latency.
//!
//! `cargo bench --bench sql_window -- [--events N] [--runs R] [--parquet PATH]`
//!
//! With `--parquet`, the same rows are also written to an unencrypted Parquet file for the
//! DuckDB baseline (`benches/duckdb_baseline.py`). With `--segments DIR`, they are then rolled
//! into encrypted Parquet segments in `DIR` (as the feeder rolls the window, `--segment-count`
//! of them, default 4) and every query runs again over the segments alone: decryption,
//! decompression and pruning included.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{RecordBatch, TimestampMillisecondArray};
use datafusion::arrow::compute::{max, min};
use flagstream::crypto::KeyRing;
use flagstream::sql::columns::{Span, schema};
use flagstream::sql::segments::{self, Segment};
use flagstream::sql::table::RecentEvents;
use flagstream::sql::{SqlEngine, SqlOptions, saved};

const SUBJECTS: u64 = 100_000;
const HOUR: i64 = 3_600_000;

struct Args {
    events: usize,
    runs: usize,
    parquet: Option<std::path::PathBuf>,
    segments: Option<std::path::PathBuf>,
    segment_count: usize,
}

fn args() -> Args {
    let mut args = Args {
        events: 10_000_000,
        runs: 7,
        parquet: None,
        segments: None,
        segment_count: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--events" => args.events = it.next().and_then(|v| v.parse().ok()).expect("--events N"),
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs R"),
            "--parquet" => args.parquet = it.next().map(Into::into),
            "--segments" => args.segments = it.next().map(Into::into),
            "--segment-count" => {
                args.segment_count = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--segment-count N")
            }
            _ => {} // cargo passes --bench
        }
    }
    args
}

/// A deterministic generator of stored events (the JSON the write-ahead log holds).
/// Events arrive roughly in time order from about a thousand concurrent sessions (20 events
/// each), as a classroom app's traffic does.
struct Generator {
    state: u64,
    now: i64,
    total: usize,
}

impl Generator {
    fn next(&mut self, n: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % n
    }

    fn event(&mut self, i: usize) -> String {
        let session = (i as u64 / 20_000) * 1000 + self.next(1000);
        let subject = session.wrapping_mul(0x2545_F491_4F6C_DD1D) % SUBJECTS;
        let at = self.now - HOUR + (i as i64 * HOUR) / self.total as i64;
        let platform = ["ios", "android", "web"][(subject % 3) as usize];
        let version = ["3.0.0", "3.1.0", "3.1.1", "3.2.0", "3.2.1"][(subject % 5) as usize];
        let country =
            ["BR", "PT", "MZ", "AO", "US", "GB", "FR", "ES", "DE", "IN"][(subject % 10) as usize];
        let locale = [
            "pt-BR", "pt-PT", "en-US", "en-GB", "fr-FR", "es-ES", "de-DE", "hi-IN",
        ][(subject % 8) as usize];
        let (kind, properties) = match self.next(100) {
            0..=9 => ("session_started", String::new()),
            10..=19 => (
                "session_ended",
                format!(r#""duration_ms":{}"#, 30_000 + self.next(900_000)),
            ),
            20..=39 => (
                "lesson_started",
                format!(r#""lesson_id":"l{}""#, self.next(40)),
            ),
            40..=54 => (
                "lesson_completed",
                format!(
                    r#""lesson_id":"l{}","score":{}"#,
                    self.next(40),
                    self.next(100)
                ),
            ),
            55..=89 => (
                "exercise_answered",
                format!(r#""correct":{}"#, self.next(2) == 1),
            ),
            90..=95 => ("app_opened", String::new()),
            _ => (
                "$exposure",
                format!(
                    r#""flag":"reward-animation","variant":"{}""#,
                    ["control", "stars", "confetti"][(subject % 3) as usize]
                ),
            ),
        };
        format!(
            r#"{{"event_id":"e-{i:016x}","device_id":"tab-{subject:08x}","seq":{i},"subject":"p1_{s1:016x}{s2:016x}","session_id":"s-{session:012x}","type":"{kind}","event_time":{at},"device_time":{at},"received_at":{at},"context":{{"app_version":"{version}","country":"{country}","locale":"{locale}","platform":"{platform}"}},"properties":{{{properties}}}}}"#,
            s1 = subject.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            s2 = subject ^ 0x5555_5555,
        )
    }
}

fn main() {
    let args = args();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events = Arc::new(RecentEvents::new(Vec::new(), KeyRing::single(1, [7; 32])));
    let mut generator = Generator {
        state: 0x2545_f491_4f6c_dd1d,
        now,
        total: args.events,
    };
    let started = Instant::now();
    let mut chunk = Vec::with_capacity(65_536);
    let mut loaded = 0;
    while loaded < args.events {
        chunk.clear();
        let n = 65_536.min(args.events - loaded);
        chunk.extend((loaded..loaded + n).map(|i| generator.event(i)));
        let unreadable = events.append(chunk.iter().map(String::as_bytes));
        assert_eq!(unreadable, 0);
        loaded += n;
    }
    let load = started.elapsed();
    let (batches, span) = events.take_for_roll().expect("rows");
    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    println!("events: {}", args.events);
    println!(
        "load: {:.1} s ({:.0} events/s, JSON decode included)",
        load.as_secs_f64(),
        args.events as f64 / load.as_secs_f64()
    );
    println!(
        "memory: {:.1} MiB in {} batches, {:.1} bytes per event",
        bytes as f64 / (1 << 20) as f64,
        batches.len(),
        bytes as f64 / args.events as f64
    );
    if let Some(path) = &args.parquet {
        let file = std::fs::File::create(path).expect("parquet file");
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, schema(), None).unwrap();
        for batch in &batches {
            writer.write(batch).unwrap();
        }
        writer.close().unwrap();
        println!(
            "parquet for the DuckDB baseline: {} (span {span:?})",
            path.display()
        );
    }

    let keys = KeyRing::single(1, [7; 32]);
    let on_disk = args
        .segments
        .as_ref()
        .map(|dir| roll_into_segments(dir, &batches, args.segment_count, &keys));
    drop(batches);
    println!("\nIn memory (the recent window):");
    run_cases(&engine_over(events), now, args.runs);
    if let Some(segments) = on_disk {
        println!("\nOver the encrypted Parquet segments only:");
        let events = Arc::new(RecentEvents::new(segments, keys));
        run_cases(&engine_over(events), now, args.runs);
    }
}

/// Writes `batches` as `count` segments in `dir` (emptied first); returns them.
fn roll_into_segments(
    dir: &std::path::Path,
    batches: &[RecordBatch],
    count: usize,
    keys: &KeyRing,
) -> Vec<Segment> {
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let per = batches.len().div_ceil(count.max(1));
    let mut written = Vec::new();
    for (n, part) in batches.chunks(per).enumerate() {
        let epoch = n as u64 * 10;
        let segment = segments::write(dir, part, (epoch, epoch + 9), span_of(part), keys)
            .expect("segment written");
        written.push(segment);
    }
    let bytes: u64 = written.iter().map(|s| s.bytes).sum();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    println!(
        "segments: {} in {} ({:.1} MiB, {:.1} bytes per event on disk, written in {:.1} s)",
        written.len(),
        dir.display(),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / rows as f64,
        started.elapsed().as_secs_f64()
    );
    segments::list(dir).expect("segments listed")
}

/// The event-time and receive-time span of `batches`.
fn span_of(batches: &[RecordBatch]) -> Span {
    let mut span = Span {
        min_time: i64::MAX,
        max_time: i64::MIN,
        max_received: i64::MIN,
    };
    for batch in batches {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
                .cloned()
                .expect("a timestamp column")
        };
        let (time, received) = (column("event_time"), column("received_at"));
        span.min_time = span.min_time.min(min(&time).unwrap_or(i64::MAX));
        span.max_time = span.max_time.max(max(&time).unwrap_or(i64::MIN));
        span.max_received = span.max_received.max(max(&received).unwrap_or(i64::MIN));
    }
    span
}

fn engine_over(events: Arc<RecentEvents>) -> SqlEngine {
    let (queries, problems) = saved::read_dir(std::path::Path::new("queries"));
    assert!(problems.is_empty(), "{problems:?}");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    SqlEngine::new(
        events,
        queries,
        SqlOptions {
            max_sql_length: 1 << 16,
            timeout: Duration::from_secs(600),
            memory_limit: 8 << 30,
            max_concurrent: 1,
            threads,
            max_rows: 100_000,
            max_result_bytes: 1 << 30,
        },
    )
    .expect("engine")
}

/// Runs every saved query, one ad-hoc aggregate and the experiment results query `runs`
/// times each; prints their median and fastest times.
fn run_cases(engine: &SqlEngine, now: i64, runs: usize) {
    let mut cases: Vec<(String, String, BTreeMap<String, String>)> = engine
        .saved()
        .values()
        .map(|q| {
            let given = BTreeMap::from([("experiment".to_owned(), "reward-animation".to_owned())]);
            let given: BTreeMap<_, _> = given
                .into_iter()
                .filter(|(k, _)| q.params.iter().any(|p| &p.name == k))
                .collect();
            (
                q.name.clone(),
                q.sql.clone(),
                q.bind(&given).expect("parameters"),
            )
        })
        .collect();
    cases.push((
        "adhoc: events by type, last hour".into(),
        "SELECT type, count(*) AS n, count(DISTINCT subject) AS s FROM events \
         WHERE event_time >= now() - INTERVAL '1 hour' GROUP BY type"
            .into(),
        BTreeMap::new(),
    ));
    let goals = ["lesson_completed".to_owned(), "session_started".to_owned()];
    cases.push((
        "experiment results: reward-animation, 2 goals".into(),
        flagstream::experiments::query::sql(goals.len()),
        flagstream::experiments::query::params("reward-animation", &goals, now - 2 * HOUR, now + 1),
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("\n| query | p50 | min | rows |\n|---|---|---|---|");
    for (name, sql, params) in cases {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let result = runtime
                .block_on(engine.run(&sql, &params, None))
                .expect("query runs");
            times.push(started.elapsed());
            rows = result.rows;
        }
        times.sort();
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {rows} |",
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[0].as_secs_f64() * 1000.0
        );
    }
}
