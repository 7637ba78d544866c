//! Per-key event rate limits: a token bucket per client key, counting events. The bucket
//! is pure (the time is passed in); the limiter keeps one per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One key's bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    updated: Duration,
}

impl Bucket {
    /// A full bucket at time `now` (time since any fixed origin).
    pub fn full(burst: usize, now: Duration) -> Self {
        Self {
            tokens: burst as f64,
            updated: now,
        }
    }

    /// Takes `n` tokens, refilling at `rate` per second up to `burst`; when there are not
    /// enough, takes none and returns how long until there will be.
    pub fn take(
        &mut self,
        n: usize,
        rate: usize,
        burst: usize,
        now: Duration,
    ) -> Result<(), Duration> {
        let elapsed = now.saturating_sub(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst as f64);
        self.updated = now;
        let needed = n as f64;
        if self.tokens >= needed {
            self.tokens -= needed;
            Ok(())
        } else {
            let missing = needed - self.tokens;
            Err(Duration::from_secs_f64(missing / rate.max(1) as f64))
        }
    }
}

/// Per-key event rate limits.
pub struct RateLimiter {
    rate: usize,
    burst: usize,
    origin: Instant,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl RateLimiter {
    /// Limits each key to `rate` events a second with bursts of `burst`; a rate of 0 is no limit.
    pub fn new(rate: usize, burst: usize) -> Self {
        Self {
            rate,
            burst,
            origin: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `events` from `key`'s bucket, or says how long to wait.
    pub fn admit(&self, key: &Arc<str>, events: usize) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let now = self.origin.elapsed();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(self.burst, now));
        bucket.take(events, self.rate, self.burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let t = Duration::from_secs;
        let mut bucket = Bucket::full(100, t(0));
        assert!(bucket.take(100, 10, 100, t(0)).is_ok());
        let wait = bucket.take(20, 10, 100, t(0)).unwrap_err();
        assert_eq!(wait, t(2));
        assert!(bucket.take(20, 10, 100, t(2)).is_ok());
        // Idle for an hour: no more than the burst.
        assert!(bucket.take(101, 10, 100, t(3600)).is_err());
        assert!(bucket.take(100, 10, 100, t(3600)).is_ok());
    }
}
