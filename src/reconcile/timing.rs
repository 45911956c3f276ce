//! When to look again at a deployment that is converging. Fly reports a check passing no earlier than its grace
//! period after the machine started, and says when it started (the `start` event), so a machine waiting out its
//! grace period is looked at right when it ends, not at the next tick of a fixed interval: a deployment is
//! Ready within milliseconds of Fly calling it healthy, with one look instead of several.
//!
//! Likewise a machine that is starting is looked at when it has probably started: [`StartTimes`] learns how long
//! Fly takes from launch to started (the `launch` and `start` events), rather than looking every interval.

use std::sync::Mutex;
use std::time::Duration;

use fly_adapter::client::types::Machine;

/// Looked at this long after the grace period ends (timestamps are whole milliseconds).
const AFTER_GRACE: Duration = Duration::from_millis(25);
/// If a check is still not passing just after its grace period, look again this soon for a short while
/// (clock skew between Fly and us), then fall back to the converge interval.
const RETRY_SOON: Duration = Duration::from_millis(250);
const RETRY_SOON_FOR: Duration = Duration::from_secs(2);

/// Starts longer than this are not learned from (a machine that waited for capacity, a clock jump).
const LONGEST_START: Duration = Duration::from_secs(120);

/// A moving average of launch → started durations of the machines observed.
#[derive(Default)]
pub struct StartTimes {
    average_ms: Mutex<Option<f64>>,
}

impl StartTimes {
    pub fn learn(&self, machines: &[Machine]) {
        for took in machines.iter().filter_map(first_start) {
            let mut average = self.average_ms.lock().unwrap();
            let sample = took.as_millis() as f64;
            // Recent starts weigh more: Fly's start time changes with image size, region and load.
            *average = Some(average.map_or(sample, |a| 0.8 * a + 0.2 * sample));
        }
    }

    pub fn expected(&self) -> Option<Duration> {
        self.average_ms
            .lock()
            .unwrap()
            .map(|ms| Duration::from_millis(ms as u64))
    }
}

/// How long the machine took from launch to its first start.
fn first_start(machine: &Machine) -> Option<Duration> {
    let launched = launched_ms(machine)?;
    let started = machine
        .events
        .iter()
        .filter(|e| e.kind == "start" && e.status == "started" && e.timestamp >= launched)
        .map(|e| e.timestamp)
        .min()?;
    let took = Duration::from_millis((started - launched) as u64);
    (took <= LONGEST_START).then_some(took)
}

fn launched_ms(machine: &Machine) -> Option<i64> {
    machine
        .events
        .iter()
        .filter(|e| e.kind == "launch")
        .map(|e| e.timestamp)
        .max()
}

/// The delay before the next look: the earliest of the grace-period ends of started machines whose checks are
/// not yet passing and the expected starts of starting machines (`launched_now`: this reconcile just created
/// one), or `interval` when some machine is in any other transient state, the start time is not known yet, or
/// none of this applies.
pub fn next_look(
    machines: &[Machine],
    launched_now: bool,
    now_ms: i64,
    interval: Duration,
    expected_start: Option<Duration>,
) -> Duration {
    let mut next = None::<Duration>;
    let mut earliest =
        |delay: Duration| next = Some(next.map_or(delay, |n: Duration| n.min(delay)));
    let starting = |launched: i64| -> Option<Duration> {
        let due = launched + (expected_start? + AFTER_GRACE).as_millis() as i64;
        (due > now_ms).then(|| Duration::from_millis((due - now_ms) as u64))
    };
    if launched_now {
        earliest(starting(now_ms).unwrap_or(interval));
    }
    let mut others = false;
    for machine in machines {
        if matches!(machine.state.as_str(), "created" | "starting") {
            match launched_ms(machine).and_then(starting) {
                Some(delay) => earliest(delay),
                None => others = true,
            }
            continue;
        }
        // Fly reports a check only after its first run: no results yet is pending too.
        let pending = machine.state == "started" && !super::plan::is_healthy(machine);
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
        earliest(delay);
    }
    // Machines that are stopping, being replaced, or starting later than expected: the usual interval.
    others |= machines.iter().any(|m| {
        !matches!(
            m.state.as_str(),
            "started" | "stopped" | "suspended" | "destroyed" | "created" | "starting"
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
            next_look(&[m], false, 11_000, SECOND, None),
            Duration::from_millis(4_025)
        );
    }

    #[test]
    fn retries_soon_just_after_the_grace_period_then_falls_back() {
        let m = machine("started", "warning", Some(10_000));
        assert_eq!(
            next_look(std::slice::from_ref(&m), false, 15_100, SECOND, None),
            RETRY_SOON
        );
        assert_eq!(next_look(&[m], false, 30_000, SECOND, None), SECOND);
    }

    #[test]
    fn other_transient_states_keep_the_interval() {
        let waiting = machine("started", "warning", Some(10_000));
        let starting = machine("starting", "critical", None);
        assert_eq!(
            next_look(&[waiting, starting], false, 11_000, SECOND, None),
            SECOND
        );
        assert_eq!(
            next_look(
                &[machine("created", "critical", None)],
                false,
                0,
                SECOND,
                None
            ),
            SECOND
        );
    }

    fn launched(mut m: Machine, at: i64) -> Machine {
        m.events.push(MachineEvent {
            kind: "launch".into(),
            status: "created".into(),
            timestamp: at,
            ..Default::default()
        });
        m
    }

    #[test]
    fn learns_the_start_time_from_launch_and_start_events() {
        let times = StartTimes::default();
        assert_eq!(times.expected(), None);
        // Launched at 8 s, started at 10 s; a machine that has not started teaches nothing.
        let started = launched(machine("started", "passing", Some(10_000)), 8_000);
        let starting = launched(machine("starting", "critical", None), 9_000);
        times.learn(&[started, starting]);
        assert_eq!(times.expected(), Some(Duration::from_secs(2)));
        // A start after a later relaunch (an update) counts from that launch.
        let relaunched = launched(
            launched(machine("started", "passing", Some(23_000)), 1_000),
            20_000,
        );
        times.learn(&[relaunched]);
        assert_eq!(times.expected(), Some(Duration::from_millis(2_200)));
    }

    #[test]
    fn looks_when_a_starting_machine_is_expected_to_have_started() {
        let two = Some(Duration::from_secs(2));
        let starting = launched(machine("starting", "critical", None), 10_000);
        assert_eq!(
            next_look(std::slice::from_ref(&starting), false, 10_500, SECOND, two),
            Duration::from_millis(1_525)
        );
        // Just created by this reconcile: its launch is now.
        assert_eq!(
            next_look(&[], true, 10_000, SECOND, two),
            Duration::from_millis(2_025)
        );
        // Later than expected, or the start time not known yet: every interval.
        assert_eq!(
            next_look(std::slice::from_ref(&starting), false, 13_000, SECOND, two),
            SECOND
        );
        assert_eq!(next_look(&[starting], false, 10_500, SECOND, None), SECOND);
        assert_eq!(next_look(&[], true, 10_000, SECOND, None), SECOND);
    }
}
