//! Token-bucket rate limiting, keyed per bearer token and per client address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `per_minute` sustained, bursts up to `burst`. Zero `per_minute` turns the limit off.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Buckets idle this long are full again and are forgotten, so the map cannot grow without bound.
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`. `Err(retry_after)` when the bucket is empty.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.per_minute == 0 {
            return Ok(());
        }
        let per_sec = self.rate.per_minute as f64 / 60.0;
        let burst = self.rate.burst.max(1) as f64;
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.last) < FORGET_AFTER);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * per_sec).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills_at_the_rate() {
        let limiter = Limiter::new(Rate {
            per_minute: 60,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("a", t0).is_ok());
        }
        let retry = limiter.check_at("a", t0).unwrap_err();
        assert!(retry <= Duration::from_secs(1) && retry > Duration::ZERO);
        assert!(limiter.check_at("b", t0).is_ok(), "keys are independent");
        assert!(
            limiter
                .check_at("a", t0 + Duration::from_millis(1010))
                .is_ok()
        );
        assert!(
            limiter
                .check_at("a", t0 + Duration::from_millis(1020))
                .is_err()
        );
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let limiter = Limiter::new(Rate {
            per_minute: 0,
            burst: 0,
        });
        for _ in 0..1000 {
            assert!(limiter.check("a").is_ok());
        }
    }
}
