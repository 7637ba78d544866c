//! Benchmarks of the hot paths. Run with `cargo bench --bench hot_paths`; figures go to
//! BENCHMARKS.md.

use criterion::{Criterion, criterion_group, criterion_main};
use flagstream::flags::definition::{Format, parse};
use flagstream::flags::{Resolution, Snapshot, evaluate};
use serde_json::json;
use std::hint::black_box;

const LAUNCH_FLAGS: &str = include_str!("../load-tests/flags/launch-20.json");

fn flag_evaluation(c: &mut Criterion) {
    let snapshot = Snapshot::build(
        vec![(
            "launch-20.json".into(),
            parse("launch-20.json", LAUNCH_FLAGS, Format::Json),
        )],
        None,
    );
    assert_eq!(snapshot.len(), 20);
    let context = json!({
        "targetingKey": "child-7781",
        "app_version": "3.2.0",
        "platform": "android",
        "locale": "fr-FR",
        "country": "FR"
    });
    // sem_ver targeting around a three-way fractional split.
    let experiment = snapshot.get("experiment-0").expect("flag");
    c.bench_function("flags/evaluate targeting+fractional", |b| {
        b.iter(|| {
            let resolution = evaluate(black_box(experiment), black_box(&context), 1_795_000_000);
            assert!(matches!(resolution, Resolution::Variant(..)));
        })
    });
    let rollout = snapshot.get("rollout-2").expect("flag");
    c.bench_function("flags/evaluate fractional only", |b| {
        b.iter(|| evaluate(black_box(rollout), black_box(&context), 1_795_000_000))
    });
    c.bench_function("flags/evaluate all 20 flags", |b| {
        b.iter(|| {
            let mut chosen = 0;
            for flag in snapshot.flags() {
                if let Resolution::Variant(..) = evaluate(flag, black_box(&context), 1_795_000_000)
                {
                    chosen += 1;
                }
            }
            chosen
        })
    });
}

/// Sealing one group commit of the write-ahead log (AES-256-GCM), at two typical sizes.
fn wal_seal(c: &mut Criterion) {
    let sealer = flagstream::crypto::Sealer::new(&flagstream::crypto::KeyRing::single(1, [7; 32]));
    let mut group = c.benchmark_group("wal_seal");
    for size in [4 << 10, 256 << 10] {
        let payload = vec![b'x'; size];
        group.throughput(criterion::Throughput::Bytes(size as u64));
        group.bench_function(format!("{} KiB", size >> 10), |b| {
            let mut epoch = 0u64;
            b.iter(|| {
                epoch += 1;
                std::hint::black_box(sealer.seal(epoch, &payload))
            })
        });
    }
    group.finish();
}

/// Device time of the events below; they are received a minute later.
const NOW_MS: i64 = 1_795_166_043_120;

/// One event as the app sends it (`2026-11-20T09:13:03.120Z` on the device clock).
fn app_event(i: usize) -> String {
    format!(
        r#"{{"event_id":"e-{i}","device_id":"tab-{}","seq":{},"user_id":"child-{}","session_id":"s-{}","type":"exercise_answered","timestamp":"2026-11-20T09:13:03.120Z","context":{{"app_version":"3.2.0","platform":"android","locale":"fr-FR","country":"FR","school_id":"sch-12"}},"properties":{{"lesson_id":"g-14","exercise_id":"x-3","correct":true,"duration_ms":1500}}}}"#,
        i % 40,
        i + 1,
        i % 400,
        i % 80
    )
}

/// An HTTP batch of 100 events split and validated, as `/v1/batch` does before the log
/// (plain JSON, and gzip-compressed).
fn event_decoding(c: &mut Criterion) {
    use flagstream::events::{Limits, Schema, validate};
    use flagstream::ingest::decode::{BodyFormat, DecodeLimits, Encoding, decode, decompress};
    use std::io::Write;
    let events: Vec<String> = (0..100).map(app_event).collect();
    let body = format!(
        r#"{{"sent_at":"2026-11-20T09:13:04.000Z","batch":[{}]}}"#,
        events.join(",")
    );
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(body.as_bytes()).unwrap();
    let gzipped = gzip.finish().unwrap();
    let limits = DecodeLimits {
        max_decompressed: 2 << 20,
        max_event: 32 << 10,
        max_events: 2_000,
    };
    let schema = Schema::reading_app();
    let time = Limits {
        late_horizon: 30 * 86_400_000,
        future_tolerance: 60_000,
    };
    let received = NOW_MS + 60_000;
    let accept = |bytes: &[u8]| {
        let decoded = decode(bytes, BodyFormat::Json, &limits).unwrap();
        let mut ok = 0;
        for event in decoded.events.into_iter().flatten() {
            if validate(&event, decoded.sent_at, received, &schema, &time).is_ok() {
                ok += 1;
            }
        }
        ok
    };
    assert_eq!(accept(body.as_bytes()), 100);
    let mut group = c.benchmark_group("decode");
    group.throughput(criterion::Throughput::Elements(100));
    group.bench_function("100-event batch, JSON", |b| {
        b.iter(|| accept(black_box(body.as_bytes())))
    });
    group.bench_function("100-event batch, gzip", |b| {
        b.iter(|| {
            let bytes =
                decompress(black_box(&gzipped), Encoding::Gzip, limits.max_decompressed).unwrap();
            accept(&bytes)
        })
    });
    group.finish();
}

/// Appending to the write-ahead log, each append acknowledged once fsynced: one appender at
/// a time (the fsync latency floor), and 16 at once (group commit), sealed with AES-256-GCM.
fn wal_append(c: &mut Criterion) {
    use flagstream::wal::{Wal, WalOptions};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sealer = flagstream::crypto::Sealer::new(&flagstream::crypto::KeyRing::single(1, [7; 32]));
    let (wal, _) = Wal::open(
        WalOptions {
            dir: dir.path().to_path_buf(),
            segment_bytes: 64 << 20,
            queue: 4_096,
            group_bytes: 1 << 20,
            commit_delay: std::time::Duration::ZERO,
            commit_siblings: 1,
            sealer: Some(std::sync::Arc::new(sealer)),
        },
        |_, _| {},
    )
    .unwrap();
    // Stored events are about this size once pseudonymized and corrected.
    let batch: Vec<Vec<u8>> = (0..100).map(|i| app_event(i).into_bytes()).collect();
    let mut group = c.benchmark_group("wal_append");
    group.sample_size(20);
    group.throughput(criterion::Throughput::Elements(100));
    group.bench_function("100 events, one appender", |b| {
        b.iter(|| runtime.block_on(wal.append(batch.clone())).unwrap())
    });
    group.throughput(criterion::Throughput::Elements(1_600));
    group.bench_function("100 events x 16 appenders", |b| {
        b.iter(|| {
            runtime.block_on(futures_util::future::join_all(
                (0..16).map(|_| wal.append(batch.clone())),
            ))
        })
    });
    group.finish();
}

/// The pipeline's per-event work: reading a stored event and counting it in its cohorts'
/// minute, hour and day windows (all events, three segments, one experiment variant).
fn window_aggregation(c: &mut Criterion) {
    use flagstream::counters::CohortKey;
    use flagstream::pipeline::aggregate::Aggregate;
    use flagstream::pipeline::record::PipelineEvent;
    let segments: Vec<String> = ["platform", "app_version", "country"]
        .map(String::from)
        .to_vec();
    let stored: Vec<Vec<u8>> = (0..1_000)
        .map(|i| {
            format!(
                r#"{{"event_id":"e-{i}","subject":"p1_{:032x}","device_id":"tab-{}","seq":{i},"session_id":"s-{}","type":"{}","event_time":{},"device_time":{},"received_at":{},"context":{{"app_version":"3.2.0","platform":"{}","country":"FR"}},"properties":{{"lesson_id":"g-14","duration_ms":1500}}}}"#,
                i % 300,
                i % 40,
                i % 80,
                ["exercise_answered", "lesson_completed", "session_started"][i % 3],
                NOW_MS + i as i64 * 250,
                NOW_MS + i as i64 * 250,
                NOW_MS + i as i64 * 250 + 60_000,
                ["ios", "android"][i % 2],
            )
            .into_bytes()
        })
        .collect();
    let count =
        |stored: &[Vec<u8>]| {
            let mut aggregate = Aggregate::default();
            for bytes in stored {
                let event = PipelineEvent::decode(bytes, &segments).unwrap();
                let mut cohorts = vec![CohortKey::All];
                cohorts.extend(event.segments.iter().map(|(dimension, value)| {
                    CohortKey::Segment {
                        dimension: dimension.clone(),
                        value: value.clone(),
                    }
                }));
                cohorts.push(CohortKey::Variant {
                    experiment: "reading-path".into(),
                    variant: ["control", "guided"][event.subject.unwrap_or(0) as usize % 2].into(),
                });
                aggregate.add(&event, &cohorts);
            }
            aggregate
        };
    // 5 cohorts x 3 windows, over about four minutes of event time.
    assert!(count(&stored).windows.len() >= 15);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(criterion::Throughput::Elements(1_000));
    group.bench_function("decode and aggregate 1,000 events", |b| {
        b.iter(|| count(black_box(&stored)))
    });
    group.finish();
}

criterion_group!(
    benches,
    flag_evaluation,
    wal_seal,
    event_decoding,
    wal_append,
    window_aggregation
);
criterion_main!(benches);
