//! Random SQL at the SQL engine, over a small window of events: it must answer or refuse,
//! never bring the process down. A panic inside a query task is contained by the engine (the
//! answer is an internal error) exactly as in the service, so only panics outside it count.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flagstream::privacy::KeyRing;
use flagstream::sql::table::RecentEvents;
use flagstream::sql::{SqlEngine, SqlOptions};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    engine: SqlEngine,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // As in the service: a panic inside a query task is reported, not fatal.
        std::panic::set_hook(Box::new(|info| eprintln!("contained: {info}")));
        let events = Arc::new(RecentEvents::new(Vec::new(), KeyRing::single(1, [1; 32])));
        let rows: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    r#"{{"type":"lesson_completed","subject":"p1_{i:032x}","context":{{"country":"BR","class_id":"c{}"}},"event_time":{i},"received_at":{i},"properties":{{"lesson_id":"l{}","score":"{}"}}}}"#,
                    i % 7,
                    i % 3,
                    i % 11
                )
            })
            .collect();
        events.append(rows.iter().map(String::as_bytes));
        let options = SqlOptions {
            max_sql_length: 4096,
            timeout: Duration::from_secs(2),
            memory_limit: 64 << 20,
            max_concurrent: 1,
            threads: 1,
            max_rows: 100,
            max_result_bytes: 1 << 20,
        };
        let engine = SqlEngine::new(events, Vec::new(), options).expect("the engine starts");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        Fixture { runtime, engine }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let fixture = fixture();
    let _ = fixture
        .runtime
        .block_on(fixture.engine.run(sql, &BTreeMap::new(), None));
});
