//! Client-side throttling: the controller waits here instead of collecting 429s from Fly.

use crate::token_bucket::{RateLimits, TokenBucket};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Token buckets per (endpoint label, identity), plus an optional org-wide mutation bucket. Buckets
/// use reservations, so concurrent callers are ordered without holding a lock across the wait.
#[derive(Debug)]
pub struct ClientRateLimiter {
    limits: RateLimits,
    origin: Instant,
    buckets: Mutex<HashMap<(String, String), TokenBucket>>,
    org: Mutex<Option<TokenBucket>>,
}

/// Above this many buckets, full (idle) ones are dropped: a full bucket behaves like a new one.
const PRUNE_ABOVE: usize = 50_000;

impl ClientRateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let origin = Instant::now();
        let org = limits.org_mutations.map(|l| TokenBucket::new(l, 0.0));
        ClientRateLimiter {
            limits,
            origin,
            buckets: Mutex::new(HashMap::new()),
            org: Mutex::new(org),
        }
    }

    /// How long the caller must wait before sending this call (the token is already taken).
    pub fn delay(&self, label: &str, identity: &str, mutation: bool) -> Duration {
        if !self.limits.enabled {
            return Duration::ZERO;
        }
        let now = self.origin.elapsed().as_secs_f64();
        let mut wait = {
            let mut b = self.buckets.lock().expect("rate limiter poisoned");
            if b.len() > PRUNE_ABOVE {
                b.retain(|_, bucket| !bucket.is_full(now));
            }
            let limit = self.limits.limit_for(label);
            b.entry((label.to_string(), identity.to_string()))
                .or_insert_with(|| TokenBucket::new(limit, now))
                .reserve(now)
        };
        if mutation && let Some(org) = self.org.lock().expect("rate limiter poisoned").as_mut() {
            wait = wait.max(org.reserve(now));
        }
        Duration::from_secs_f64(wait)
    }
}
