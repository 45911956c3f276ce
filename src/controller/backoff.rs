//! When to try again after a failure, and which failures are worth trying again at all.
//!
//! Every error path of a reconcile (a Kubernetes or Fly error that aborts it, a Fly call that failed while
//! acting, a failed MCP handshake) waits per resource: `base · 2^(n-1)` after the n-th failure in a row, capped,
//! with jitter so a fleet hit by the same Fly incident does not retry in lockstep. Only a reconcile that
//! succeeds resets the count; a retry never does. Errors a person must fix (Fly refusing the config as invalid,
//! a name or app that belongs to someone else) are not retried: they stall until the spec changes. Everything
//! else, including a 404 for a machine that vanished between list and update, 409, 412, 429 and 5xx, is retried
//! and reads as `Reconciling`.
//!
//! Condition messages built here are stable across retries (no request ids, attempt counts or retry-after
//! figures), so an unchanged failure does not rewrite status on every attempt; logs and events carry the rest.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fly_adapter::client::FlyError;

use crate::api::reason;
use crate::reconcile::act::ActError;

/// The longest wait between two attempts.
pub const CAP: Duration = Duration::from_secs(300);

/// Per-resource failure counts (keyed by resource UID).
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(1)),
            cap,
            failures: Mutex::default(),
        }
    }

    /// Counts one more failure of `key` and returns how long to wait before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let failures = {
            let mut all = self.failures.lock().unwrap();
            let n = all.entry(key.to_string()).or_default();
            *n = n.saturating_add(1);
            *n
        };
        delay(self.base, self.cap, failures, rand::random::<f64>())
    }

    /// A reconcile of `key` succeeded: the next failure waits `base` again.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap().remove(key);
    }

    /// Failures of `key` since its last success.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// The wait after the `failures`-th failure in a row: `base · 2^(failures-1)`, capped, scaled into its upper
/// half by `jitter` (0 ≤ jitter < 1). The upper half keeps successive waits from shrinking below the cap: the n-th
/// is at most `base · 2^(n-1)` and the next at least that. At the cap, waits vary between half of it and all of it.
pub fn delay(base: Duration, cap: Duration, failures: u32, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exponent).min(cap);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// What a failed act-phase call means for the resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Try again after the backoff; the message goes into `Reconciling` (and `Ready=False`).
    Retry { message: String },
    /// Only a person can fix it: `Stalled` with this reason and message.
    Stall {
        reason: &'static str,
        message: String,
    },
}

/// Classifies an error of the act phase. `app` names the Fly app for messages.
pub fn classify(error: &ActError, app: &str) -> Verdict {
    match error {
        ActError::AppNameTaken => Verdict::Stall {
            reason: reason::APP_NAME_TAKEN,
            message: format!(
                "Fly app name {app} belongs to another organization; set spec.fly.app to a name that is free on Fly"
            ),
        },
        ActError::Ambiguous { action, source } => Verdict::Retry {
            message: format!(
                "{action}: {}, outcome unknown; looking again before retrying",
                summary(source)
            ),
        },
        ActError::Fly { action, source } => match source {
            // Fly read the request and refused it: the same request will be refused again.
            FlyError::Invalid { message, .. } => Verdict::Stall {
                reason: reason::FLY_REJECTED,
                message: format!(
                    "{action}: Fly rejected the request: {}; fix the spec and apply again",
                    without_request_id(message)
                ),
            },
            FlyError::NameTaken { .. } | FlyError::OwnedByOtherOrg { .. } => Verdict::Stall {
                reason: reason::APP_NAME_TAKEN,
                message: format!(
                    "Fly app name {app} is taken by someone else; set spec.fly.app to a name that is free on Fly"
                ),
            },
            other => Verdict::Retry {
                message: format!("{action}: {}; retrying", summary(other)),
            },
        },
    }
}

/// A description of a Fly error that is the same on every attempt: its class and status, not Fly's message
/// (which may carry request ids, lease holders or timings).
pub fn summary(error: &FlyError) -> String {
    match error {
        FlyError::NotFound { .. } => "Fly answered 404 (gone since it was listed)".into(),
        FlyError::LeaseConflict { .. } => "Fly answered 409 (lease held by another writer)".into(),
        FlyError::VersionConflict { .. } => {
            "Fly answered 409 (machine changed since it was read)".into()
        }
        FlyError::NoCapacity { .. } => {
            "Fly answered 409 (no capacity on the machine's host)".into()
        }
        FlyError::Precondition { .. } => {
            "Fly answered 412 (machine not in the expected state)".into()
        }
        FlyError::RateLimited { .. } => "Fly answered 429 (rate limited)".into(),
        FlyError::Unauthorized { .. } => "Fly answered 401 (token refused)".into(),
        FlyError::Transient {
            status: Some(status),
            ..
        }
        | FlyError::Ambiguous {
            status: Some(status),
            ..
        } => format!("Fly answered {status}"),
        FlyError::Transient { status: None, .. } | FlyError::Ambiguous { status: None, .. } => {
            "no answer from Fly (timeout or connection reset)".into()
        }
        FlyError::Unexpected { status, .. } => format!("Fly answered {status}"),
        other => format!("Fly call failed ({})", other.kind()),
    }
}

/// `text` without the ` (request id …)` parts the Fly client adds to its messages.
pub fn without_request_id(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(" (request id ") {
        out.push_str(&rest[..start]);
        let tail = &rest[start + 1..];
        let mut depth = 0usize;
        let mut end = tail.len();
        for (i, c) in tail.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);

    #[test]
    fn waits_double_per_failure_up_to_the_cap() {
        let full: Vec<u64> = (1..=12)
            .map(|n| delay(BASE, CAP, n, 1.0).as_secs())
            .collect();
        assert_eq!(full, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(delay(BASE, CAP, u32::MAX, 1.0), CAP);
    }

    #[test]
    fn jitter_stays_in_the_upper_half_so_waits_never_shrink_below_the_cap() {
        let below_cap = (1..).take_while(|&n| delay(BASE, CAP, n + 1, 1.0) < CAP);
        for n in below_cap {
            let low = delay(BASE, CAP, n, 0.0);
            let high = delay(BASE, CAP, n, 0.999);
            assert!(low * 2 >= delay(BASE, CAP, n, 1.0), "{n}");
            assert!(high <= delay(BASE, CAP, n, 1.0));
            assert!(delay(BASE, CAP, 100, 0.0) >= CAP / 2);
            // The next wait, at its lowest, is not shorter than this one at its highest.
            assert!(delay(BASE, CAP, n + 1, 0.0) >= high, "{n}");
        }
    }

    #[test]
    fn only_success_resets_the_count() {
        let backoff = Backoff::new(BASE, CAP);
        let first = backoff.failed("a");
        let second = backoff.failed("a");
        let third = backoff.failed("a");
        assert!(first <= BASE && second >= BASE / 2 * 2 && third >= BASE * 2);
        assert_eq!(backoff.failures("a"), 3);
        assert_eq!(backoff.failures("b"), 0, "per resource");
        backoff.succeeded("a");
        assert_eq!(backoff.failures("a"), 0);
        assert!(backoff.failed("a") <= BASE);
    }

    fn fly(source: FlyError) -> ActError {
        ActError::Fly {
            action: "update machine iad-0".into(),
            source,
        }
    }

    fn rid() -> Option<String> {
        Some(format!("req-{}", rand::random::<u32>()))
    }

    #[test]
    fn only_what_a_person_must_fix_stalls() {
        let retried = [
            FlyError::NotFound {
                message: "machine not found".into(),
                request_id: rid(),
            },
            FlyError::LeaseConflict {
                message: "lease held".into(),
                request_id: rid(),
            },
            FlyError::VersionConflict {
                message: "machine version 01X is not the current version".into(),
                request_id: rid(),
            },
            FlyError::NoCapacity {
                message: "insufficient memory available".into(),
                request_id: rid(),
            },
            FlyError::Precondition {
                message: "machine is starting".into(),
                request_id: rid(),
            },
            FlyError::RateLimited {
                retry_after: Some(Duration::from_millis(rand::random::<u16>() as u64)),
                request_id: rid(),
            },
            FlyError::Unauthorized {
                message: "app not visible yet".into(),
                request_id: rid(),
            },
            FlyError::Transient {
                status: Some(503),
                message: "unavailable".into(),
                request_id: rid(),
            },
            FlyError::Unexpected {
                status: 500,
                message: "boom".into(),
                request_id: rid(),
            },
        ];
        for error in retried {
            let kind = error.kind();
            assert!(
                matches!(classify(&fly(error), "app"), Verdict::Retry { .. }),
                "{kind}"
            );
        }
        let invalid = FlyError::Invalid {
            message: "invalid guest size".into(),
            request_id: rid(),
        };
        match classify(&fly(invalid), "app") {
            Verdict::Stall { reason, message } => {
                assert_eq!(reason, reason::FLY_REJECTED);
                assert!(message.contains("invalid guest size"), "{message}");
                assert!(!message.contains("req-"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(&ActError::AppNameTaken, "app"),
            Verdict::Stall {
                reason: reason::APP_NAME_TAKEN,
                ..
            }
        ));
    }

    #[test]
    fn retry_messages_are_the_same_on_every_attempt() {
        let attempt = || {
            let source = FlyError::Ambiguous {
                status: Some(502),
                message: format!("bad gateway after {} ms", rand::random::<u16>()),
                request_id: rid(),
            };
            classify(
                &ActError::Ambiguous {
                    action: "create machine iad-0".into(),
                    source,
                },
                "app",
            )
        };
        let first = attempt();
        assert_eq!(first, attempt());
        let Verdict::Retry { message } = first else {
            panic!("{first:?}")
        };
        assert!(
            message.contains("502") && message.contains("iad-0"),
            "{message}"
        );
        let rate_limited = |ms| {
            classify(
                &fly(FlyError::RateLimited {
                    retry_after: Some(Duration::from_millis(ms)),
                    request_id: rid(),
                }),
                "app",
            )
        };
        assert_eq!(rate_limited(10), rate_limited(900));
    }

    #[test]
    fn request_ids_are_cut_out_of_messages() {
        assert_eq!(
            without_request_id(
                r#"invalid request: bad cpu (request id Some("01J(x)")) and more (request id None)"#
            ),
            "invalid request: bad cpu and more"
        );
        assert_eq!(without_request_id("plain"), "plain");
    }
}
