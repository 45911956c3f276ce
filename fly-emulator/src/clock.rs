//! The emulator's injectable clock.
//!
//! Machine transitions, lease expiry, check grace periods, wait deadlines and rate-limit buckets all
//! read this clock, so a test can run on real time, on accelerated time, or on a manual clock that
//! moves only when the test says so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    /// Wall-clock milliseconds at emulator time zero (for `created_at`, `updated_at`, lease expiry).
    wall_origin_ms: i64,
}

enum Kind {
    Real {
        origin: Instant,
        speed: f64,
    },
    Manual {
        now: Mutex<Duration>,
        advanced: Notify,
    },
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.kind {
            Kind::Real { speed, .. } => write!(f, "Clock::Real(x{speed})"),
            Kind::Manual { .. } => write!(f, "Clock::Manual({:?})", self.now()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::real()
    }
}

fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    /// Real time (tokio's clock, so `tokio::time::pause` also works).
    pub fn real() -> Self {
        Self::accelerated(1.0)
    }

    /// Real time running `speed` times faster: latencies of seconds pass in milliseconds while the
    /// sequence of events stays the same.
    pub fn accelerated(speed: f64) -> Self {
        Clock {
            inner: Arc::new(Inner {
                kind: Kind::Real {
                    origin: Instant::now(),
                    speed: speed.max(1e-6),
                },
                wall_origin_ms: wall_now_ms(),
            }),
        }
    }

    /// Time stands still until [`Clock::advance`].
    pub fn manual() -> Self {
        Clock {
            inner: Arc::new(Inner {
                kind: Kind::Manual {
                    now: Mutex::new(Duration::ZERO),
                    advanced: Notify::new(),
                },
                wall_origin_ms: wall_now_ms(),
            }),
        }
    }

    /// Emulator time since start.
    pub fn now(&self) -> Duration {
        match &self.inner.kind {
            Kind::Real { origin, speed } => origin.elapsed().mul_f64(*speed),
            Kind::Manual { now, .. } => *now.lock().expect("clock poisoned"),
        }
    }

    /// Unix milliseconds of an emulator time.
    pub fn wall_ms(&self, t: Duration) -> i64 {
        self.inner.wall_origin_ms + t.as_millis() as i64
    }

    /// Manual clocks only (no-op on real clocks): move time forward and wake sleepers.
    pub fn advance(&self, by: Duration) {
        if let Kind::Manual { now, advanced } = &self.inner.kind {
            *now.lock().expect("clock poisoned") += by;
            advanced.notify_waiters();
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self.inner.kind, Kind::Manual { .. })
    }

    /// Sleep until emulator time `t`.
    pub async fn sleep_until(&self, t: Duration) {
        match &self.inner.kind {
            Kind::Real { origin, speed } => {
                tokio::time::sleep_until(*origin + t.div_f64(*speed)).await;
            }
            Kind::Manual { advanced, .. } => loop {
                let notified = advanced.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.now() >= t {
                    return;
                }
                notified.await;
            },
        }
    }
}
