//! The proxy's autostop as Fly documents it (REALISM.md §7), used when `Realism::autostop_per_region` is on.
//!
//! Docs (`reference/fly-proxy-autostop-autostart`): the proxy looks every few minutes, region by region; it judges
//! a region's excess capacity with the service's `soft_limit` and stops (or suspends) one machine per region per
//! pass. Docs (`launch/autostop-autostart`): `min_machines_running` holds in the app's primary region only. Here a
//! pass runs every `autostop_interval`, a region's load is the most requests its machines served at once since
//! the previous pass, and a region that had a request (or a start) within `idle_timeout` needs at least one
//! machine. The primary region is the machines' `PRIMARY_REGION` (what flyctl sets); without it no region keeps
//! a minimum.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::Value;

use super::{Inner, autostop_action, min_running, service};

/// Fly's default `soft_limit` when the service sets no `concurrency`.
const DEFAULT_SOFT_LIMIT: usize = 20;

/// Requests a region's machines serve for one app.
#[derive(Clone, Copy)]
pub(super) struct RegionLoad {
    /// In flight now.
    active: usize,
    /// The most in flight at once since the previous pass.
    peak: usize,
    /// When a request last began or ended there, or a machine started there.
    last: Instant,
}

impl RegionLoad {
    fn idle() -> Self {
        RegionLoad {
            active: 0,
            peak: 0,
            last: Instant::now(),
        }
    }
}

/// How many running machines a region keeps after a pass: what its load asks for at `soft_limit` requests each
/// (at least one while it is busy), and never fewer than `minimum` (nonzero in the primary region only).
pub(super) fn region_keeps(peak: usize, busy: bool, soft_limit: usize, minimum: usize) -> usize {
    let needed = if busy {
        peak.div_ceil(soft_limit.max(1)).max(1)
    } else {
        0
    };
    needed.max(minimum)
}

fn soft_limit(config: &Value) -> usize {
    service(config)
        .and_then(|s| s.pointer("/concurrency/soft_limit"))
        .and_then(Value::as_u64)
        .map_or(DEFAULT_SOFT_LIMIT, |n| n as usize)
}

impl Inner {
    /// A request of `app` is being served by a machine in `region` (until [`Inner::served`]).
    pub(super) fn serving(&self, app: &str, region: &str) {
        let mut loads = self.region_load.lock().expect("poisoned");
        let load = loads
            .entry((app.to_string(), region.to_string()))
            .or_insert_with(RegionLoad::idle);
        load.active += 1;
        load.peak = load.peak.max(load.active);
        load.last = Instant::now();
    }

    pub(super) fn served(&self, app: &str, region: &str) {
        let mut loads = self.region_load.lock().expect("poisoned");
        if let Some(load) = loads.get_mut(&(app.to_string(), region.to_string())) {
            load.active = load.active.saturating_sub(1);
            load.last = Instant::now();
        }
    }

    /// A machine started in `region`: give it an idle timeout before a pass may stop it.
    pub(super) fn started_in(&self, app: &str, region: &str) {
        let mut loads = self.region_load.lock().expect("poisoned");
        loads
            .entry((app.to_string(), region.to_string()))
            .or_insert_with(RegionLoad::idle)
            .last = Instant::now();
    }

    /// One pass, if `autostop_interval` has passed since the previous one: per app and region, stops or suspends
    /// one machine above what the region keeps.
    pub(super) fn autostop_by_region(&self) {
        {
            let mut last = self.last_autostop_pass.lock().expect("poisoned");
            if last.elapsed() < self.cfg.autostop_interval {
                return;
            }
            *last = Instant::now();
        }
        let Some(control) = self.control() else {
            return;
        };
        // (app, region) → running machines (id, config), and each app's primary region.
        let mut regions: BTreeMap<(String, String), Vec<(String, Value)>> = BTreeMap::new();
        let mut primary: HashMap<String, String> = HashMap::new();
        {
            let machines = self.machines.lock().expect("poisoned");
            for ((app, id), r) in machines.iter() {
                if r.suspended || r.process.is_none() {
                    continue;
                }
                let region = r.env.get("FLY_REGION").cloned().unwrap_or_default();
                if let Some(p) = r.env.get("PRIMARY_REGION") {
                    primary.insert(app.clone(), p.clone());
                }
                regions
                    .entry((app.clone(), region))
                    .or_default()
                    .push((id.clone(), r.config.clone()));
            }
        }
        let mut started: HashMap<String, Vec<String>> = HashMap::new();
        for ((app, region), mut running) in regions {
            let started = started.entry(app.clone()).or_insert_with(|| {
                control
                    .machines(&app)
                    .into_iter()
                    .filter(|m| m.state == "started")
                    .map(|m| m.id)
                    .collect()
            });
            running.retain(|(id, _)| started.contains(id));
            running.sort_by(|a, b| a.0.cmp(&b.0));
            let Some((_, config)) = running.first() else {
                continue;
            };
            let load = {
                let mut loads = self.region_load.lock().expect("poisoned");
                loads.get_mut(&(app.clone(), region.clone())).map(|l| {
                    let seen = *l;
                    l.peak = l.active;
                    seen
                })
            };
            let busy =
                load.is_some_and(|l| l.active > 0 || l.last.elapsed() < self.cfg.idle_timeout);
            let peak = load.map_or(0, |l| l.peak);
            let minimum = if primary.get(&app) == Some(&region) {
                min_running(config)
            } else {
                0
            };
            let keep = region_keeps(peak, busy, soft_limit(config), minimum);
            if running.len() <= keep {
                continue;
            }
            // One machine per region per pass: the newest by id.
            let (id, config) = running.last().expect("more than keep");
            if let Some(action) = autostop_action(config) {
                tracing::info!(app = %app, region = %region, machine = %id, action, "autostop: excess capacity in the region");
                if let Err(e) = control.platform_action(&app, id, action) {
                    tracing::debug!(app = %app, machine = %id, error = %e, "autostop refused");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::region_keeps;

    /// REALISM.md §7: a region keeps what its load needs at `soft_limit` each, one while busy, and the minimum
    /// only where it applies (the caller passes it for the primary region only).
    #[test]
    fn a_region_keeps_what_its_load_needs_and_the_primary_minimum() {
        assert_eq!(region_keeps(45, true, 20, 0), 3, "45 requests at 20 each");
        assert_eq!(region_keeps(20, true, 20, 0), 1);
        assert_eq!(region_keeps(0, true, 20, 0), 1, "a busy region keeps one");
        assert_eq!(
            region_keeps(0, false, 20, 0),
            0,
            "an idle region may go to zero"
        );
        assert_eq!(
            region_keeps(0, false, 20, 2),
            2,
            "the primary region keeps its minimum"
        );
        assert_eq!(region_keeps(90, true, 20, 2), 5);
    }
}
