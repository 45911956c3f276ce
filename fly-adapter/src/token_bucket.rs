//! The one token-bucket implementation and the table of Fly's documented rate limits.
//!
//! The client and the emulator share this module on purpose: the client throttles itself with the
//! same buckets, keyed the same way, that the emulator enforces, so in normal operation the emulator
//! answers no 429 — and if either side drifts from Fly's documented limits, both drift together in
//! one reviewable place.

use std::collections::HashMap;

/// A refill rate and a burst size: `burst` tokens at most, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: f64,
}

impl Limit {
    pub const fn new(per_second: f64, burst: f64) -> Self {
        Limit { per_second, burst }
    }
}

/// A token bucket driven by an external clock (seconds since an arbitrary origin), so the emulator can
/// run it on its injectable clock and the client on tokio's.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: Limit,
    tokens: f64,
    last: f64,
}

impl TokenBucket {
    pub fn new(limit: Limit, now: f64) -> Self {
        TokenBucket {
            limit,
            tokens: limit.burst,
            last: now,
        }
    }

    fn refill(&mut self, now: f64) {
        if now > self.last {
            self.tokens =
                (self.tokens + (now - self.last) * self.limit.per_second).min(self.limit.burst);
            self.last = now;
        }
    }

    /// Server side: take a token now, or say how long until one is available.
    pub fn try_take(&mut self, now: f64) -> Result<(), f64> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / self.limit.per_second)
        }
    }

    /// Client side: reserve a token (possibly going into debt) and return how long the caller must
    /// wait before using it. Reservation keeps concurrent callers in FIFO order without a lock held
    /// across the wait.
    pub fn reserve(&mut self, now: f64) -> f64 {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.limit.per_second
        }
    }

    /// True when the bucket is full again, so idle buckets can be dropped without changing behaviour.
    pub fn is_full(&mut self, now: f64) -> bool {
        self.refill(now);
        self.tokens >= self.limit.burst
    }
}

/// Per-endpoint limits, shared by client and emulator. Keys are endpoint labels such as
/// `"machines.get"` (see [`crate::client::endpoint`]).
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// Limit for every action without an override: Fly documents 1 req/s, bursts to 3.
    pub default: Limit,
    pub overrides: HashMap<String, Limit>,
    /// Optional limit over all mutations of one org (Fly does not document one; the emulator can
    /// impose one to test the controller's behaviour under a global cap).
    pub org_mutations: Option<Limit>,
    /// Off: no throttling at all (fast tests of other behaviour).
    pub enabled: bool,
}

impl RateLimits {
    /// Fly's documented limits: most actions 1/s burst 3; Get Machine 5/s burst 10; app deletions
    /// 100 per minute.
    pub fn fly() -> Self {
        let mut overrides = HashMap::new();
        overrides.insert("machines.get".to_string(), Limit::new(5.0, 10.0));
        overrides.insert("apps.delete".to_string(), Limit::new(100.0 / 60.0, 100.0));
        RateLimits {
            default: Limit::new(1.0, 3.0),
            overrides,
            org_mutations: None,
            enabled: true,
        }
    }

    /// No limits.
    pub fn disabled() -> Self {
        RateLimits {
            enabled: false,
            ..Self::fly()
        }
    }

    /// The same limits with one token of burst held back (never below 1). The client uses this so
    /// that network jitter, which can bunch requests up on arrival, never pushes the server's bucket
    /// into a 429.
    pub fn with_margin(&self) -> Self {
        let m = |l: Limit| Limit::new(l.per_second, (l.burst - 1.0).max(1.0));
        RateLimits {
            default: m(self.default),
            overrides: self
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), m(*v)))
                .collect(),
            org_mutations: self.org_mutations.map(m),
            enabled: self.enabled,
        }
    }

    pub fn limit_for(&self, label: &str) -> Limit {
        self.overrides.get(label).copied().unwrap_or(self.default)
    }
}

/// The identifier a call is rate-limited by: the machine for machine calls, the app for app-level
/// calls (list, create machine, secrets, ips), the org for org-level calls. App deletions are counted
/// per org because Fly documents them as "100 per minute" without an identifier.
pub fn bucket_identity(label: &str, org: &str, app: Option<&str>, machine: Option<&str>) -> String {
    if label == "apps.delete"
        || label == "apps.list"
        || label == "orgs.machines"
        || label == "regions.list"
    {
        return format!("org:{org}");
    }
    match (machine, app) {
        (Some(m), _) => format!("machine:{m}"),
        (None, Some(a)) => format!("app:{a}"),
        _ => format!("org:{org}"),
    }
}

/// Whether a label names a mutating call (for the optional org-wide mutation limit).
pub fn is_mutation(method: &str) -> bool {
    method != "GET" && method != "HEAD"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(Limit::new(1.0, 3.0), 0.0);
        assert!(b.try_take(0.0).is_ok());
        assert!(b.try_take(0.0).is_ok());
        assert!(b.try_take(0.0).is_ok());
        let wait = b.try_take(0.0).unwrap_err();
        assert!((wait - 1.0).abs() < 1e-9);
        assert!(b.try_take(1.0).is_ok());
    }

    #[test]
    fn reserve_queues_callers() {
        let mut b = TokenBucket::new(Limit::new(2.0, 1.0), 0.0);
        assert_eq!(b.reserve(0.0), 0.0);
        assert!((b.reserve(0.0) - 0.5).abs() < 1e-9);
        assert!((b.reserve(0.0) - 1.0).abs() < 1e-9);
    }
}
