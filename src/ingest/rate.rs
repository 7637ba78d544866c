//! A token bucket per client key, counting events. Pure: the time is passed in.

use std::time::Duration;

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
