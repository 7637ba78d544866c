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
    let sealer =
        flagstream::wal::seal::Sealer::new(&flagstream::privacy::KeyRing::single(1, [7; 32]));
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

criterion_group!(benches, flag_evaluation, wal_seal);
criterion_main!(benches);
