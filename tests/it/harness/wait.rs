//! The clock and waiting on conditions: a test waits for what it expects with a deadline,
//! never for a fixed time.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits until `done` holds, trying every 50 ms; fails the test with `what` once `within`
/// has passed.
pub async fn eventually<F: Future<Output = bool>>(
    within: Duration,
    what: &str,
    done: impl FnMut() -> F,
) {
    eventually_every(within, Duration::from_millis(50), what, done).await
}

/// [`eventually`], trying every `every`.
pub async fn eventually_every<F: Future<Output = bool>>(
    within: Duration,
    every: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "within {within:?}, never: {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` every 50 ms until it gives `Ok(value)` and returns the value; fails the test
/// with `what` and the last `Err` it saw once `within` has passed.
pub async fn until<T, Seen: Display, F: Future<Output = Result<T, Seen>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "within {within:?}, never: {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
