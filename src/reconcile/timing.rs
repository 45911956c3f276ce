//! When to look again at a deployment that is converging. Fly reports a check passing no earlier than its grace
//! period after the machine started, and says when it started (the `start` event), so a machine waiting out its
//! grace period is looked at right when it ends, not at the next tick of a fixed interval: a deployment is
//! Ready within milliseconds of Fly calling it healthy, with one look instead of several.

use std::time::Duration;

use fly_adapter::client::types::Machine;

/// Looked at this long after the grace period ends (timestamps are whole milliseconds).
const AFTER_GRACE: Duration = Duration::from_millis(25);
/// If a check is still not passing just after its grace period, look again this soon for a short while
/// (clock skew between Fly and us), then fall back to the converge interval.
const RETRY_SOON: Duration = Duration::from_millis(250);
const RETRY_SOON_FOR: Duration = Duration::from_secs(2);

/// The delay before the next look: the earliest grace-period end among started machines whose checks are not
/// yet passing, or `interval` when some machine is in any other transient state (or none of this applies).
pub fn next_look(machines: &[Machine], now_ms: i64, interval: Duration) -> Duration {
    let mut next = None::<Duration>;
    for machine in machines {
        let pending = machine.state == "started"
            && !machine.checks.is_empty()
            && machine.checks.iter().any(|c| c.status != "passing");
        if !pending {
            continue;
        }
        let delay = match (started_ms(machine), grace(machine)) {
            (Some(started), Some(grace)) => {
                let due = started + grace.as_millis() as i64 + AFTER_GRACE.as_millis() as i64;
                if due > now_ms {
                    Duration::from_millis((due - now_ms) as u64)
                } else if now_ms - due < RETRY_SOON_FOR.as_millis() as i64 {
                    RETRY_SOON
                } else {
                    interval
                }
            }
            _ => interval,
        };
        next = Some(next.map_or(delay, |n| n.min(delay)));
    }
    // Machines that are starting, stopping or being replaced: the usual interval.
    let others = machines.iter().any(|m| {
        !matches!(
            m.state.as_str(),
            "started" | "stopped" | "suspended" | "destroyed"
        )
    });
    match next {
        Some(n) if !others => n,
        Some(n) => n.min(interval),
        None => interval,
    }
}

fn started_ms(machine: &Machine) -> Option<i64> {
    machine
        .events
        .iter()
        .filter(|e| e.kind == "start" && e.status == "started")
        .map(|e| e.timestamp)
        .max()
}

/// The longest grace period among the machine's checks (a machine is healthy when all pass).
fn grace(machine: &Machine) -> Option<Duration> {
    let config = machine.config.as_ref()?;
    let service_checks = config.services.iter().flat_map(|s| s.checks.iter());
    config
        .checks
        .values()
        .chain(service_checks)
        .map(|c| {
            c.grace_period
                .as_ref()
                .and_then(|g| g.as_nanos())
                .unwrap_or(0)
        })
        .max()
        .map(|ns| Duration::from_nanos(ns.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_adapter::client::types::{
        CheckConfig, CheckStatus, FlyDuration, MachineConfig, MachineEvent,
    };

    fn machine(state: &str, check: &str, started: Option<i64>) -> Machine {
        let mut config = MachineConfig::default();
        config.checks.insert(
            "ready".into(),
            CheckConfig {
                grace_period: Some(FlyDuration::Text("5s".into())),
                ..Default::default()
            },
        );
        Machine {
            state: state.into(),
            config: Some(config),
            checks: vec![CheckStatus {
                name: "ready".into(),
                status: check.into(),
                ..Default::default()
            }],
            events: started
                .map(|t| MachineEvent {
                    kind: "start".into(),
                    status: "started".into(),
                    timestamp: t,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn looks_when_the_grace_period_ends() {
        let m = machine("started", "warning", Some(10_000));
        assert_eq!(
            next_look(&[m], 11_000, SECOND),
            Duration::from_millis(4_025)
        );
    }

    #[test]
    fn retries_soon_just_after_the_grace_period_then_falls_back() {
        let m = machine("started", "warning", Some(10_000));
        assert_eq!(
            next_look(std::slice::from_ref(&m), 15_100, SECOND),
            RETRY_SOON
        );
        assert_eq!(next_look(&[m], 30_000, SECOND), SECOND);
    }

    #[test]
    fn other_transient_states_keep_the_interval() {
        let waiting = machine("started", "warning", Some(10_000));
        let starting = machine("starting", "critical", None);
        assert_eq!(next_look(&[waiting, starting], 11_000, SECOND), SECOND);
        assert_eq!(
            next_look(&[machine("created", "critical", None)], 0, SECOND),
            SECOND
        );
    }
}
