//! Fleet-wide change detection: one org-wide machine listing (`GET /orgs/{org}/machines?updated_after=`) every
//! poll interval replaces per-resource polling. A machine that changed (stopped, destroyed, updated by someone)
//! requeues the resource that owns its app; idle deployments cost nothing per resource.
//!
//! Most changes a listing reports are the controller's own (a machine it created starting, one it updated
//! restarting), already seen by the reconcile that looked at the app: [`FleetWatch::observed`] records what each
//! look saw, and only machines that changed after it requeue their resource.
//!
//! The endpoint is not in Fly's public documentation (it is in Fly's own Go client), so the controller falls
//! back to per-resource resyncs when it fails: [`FleetWatch::healthy`] tells the reconciler which requeue to use.
//! One failed listing (Fly names `error_regions` now and then) changes nothing at once: the cursor stays, so the
//! next listing reports what this one missed; only a listing that has not worked for [`TOLERATED_POLLS`] intervals
//! turns per-resource resyncs on (otherwise every occasional partial answer sent the fleet polling one by one).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fly_adapter::client::types::{Machine, OrgMachinesQuery};
use fly_adapter::client::{FlyClient, FlyError};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::settled::Settled;
use crate::api::MCPDeployment;

/// Page size of the org-wide listing.
const PAGE: u32 = 500;
/// The cursor is moved back by this much: the listing is a point in time, changes reach it late with their
/// original `updated_at` (Fly: "offset your timestamps to catch late-arriving events"), and timestamps may have
/// whole-second resolution. What was already seen is skipped by (machine, updated_at, state, version).
const OVERLAP_MS: i64 = 60_000;

/// How many poll intervals without a working listing are tolerated before per-resource resyncs take over.
pub const TOLERATED_POLLS: u32 = 3;

#[derive(Default)]
pub struct FleetWatch {
    listing: Mutex<ListingHealth>,
    /// Per app, each machine's (`updated_at` in ms, state, version) as the last reconcile observed it.
    observed: Mutex<HashMap<String, HashMap<String, Seen>>>,
}

/// When the org-wide listing last worked, and how long without one is tolerated.
#[derive(Default)]
struct ListingHealth {
    last_success: Option<Instant>,
    tolerance: Duration,
}

impl FleetWatch {
    /// Whether the org-wide listing works, so Ready resources need no per-resource resync.
    pub fn healthy(&self) -> bool {
        self.healthy_at(Instant::now())
    }

    fn healthy_at(&self, now: Instant) -> bool {
        let listing = self.listing.lock().unwrap();
        listing
            .last_success
            .is_some_and(|at| now.saturating_duration_since(at) <= listing.tolerance)
    }

    /// A listing worked at `now`; until [`TOLERATED_POLLS`] intervals pass without another, it still counts.
    fn listed(&self, now: Instant, interval: Duration) {
        let mut listing = self.listing.lock().unwrap();
        listing.last_success = Some(now);
        listing.tolerance = interval * TOLERATED_POLLS;
    }

    /// A reconcile looked at `app` and saw `machines`.
    pub fn observed(&self, app: &str, machines: &[Machine]) {
        let versions = machines
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    Seen {
                        updated_ms: millis(&m.updated_at),
                        state: m.state.clone(),
                        version: m.instance_id.clone(),
                    },
                )
            })
            .collect();
        self.observed
            .lock()
            .unwrap()
            .insert(app.to_string(), versions);
    }

    /// The app is deleted or no longer ours to watch.
    pub fn forget(&self, app: &str) {
        self.observed.lock().unwrap().remove(app);
    }

    /// Whether the listing reports something about `change`'s machine that no reconcile has seen yet.
    fn is_news(&self, change: &Change) -> bool {
        let observed = self.observed.lock().unwrap();
        let seen = observed.get(&change.app).and_then(|m| m.get(&change.id));
        // Two changes within one whole second share an `updated_at`: state and version tell them apart.
        seen.is_none_or(|seen| {
            change.updated_ms > seen.updated_ms
                || change.state != seen.state
                || change.version != seen.version
        })
    }
}

/// What a look saw of one machine.
struct Seen {
    updated_ms: i64,
    state: String,
    version: String,
}

fn millis(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.timestamp_millis())
        .unwrap_or_default()
}

/// Where a changed app's resource is reconciled: each controller's store and its trigger channel.
pub struct Route {
    pub store: Store<MCPDeployment>,
    pub trigger: mpsc::Sender<ObjectRef<MCPDeployment>>,
}

pub async fn run(
    watch: Arc<FleetWatch>,
    settled: Arc<Settled>,
    fly: FlyClient,
    org: String,
    interval: Duration,
    routes: Vec<Route>,
) {
    let mut cursor: Option<i64> = None;
    let mut seen: HashSet<(String, String, String, String)> = HashSet::new();
    let mut warned = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let polled_at = chrono::Utc::now().timestamp_millis();
        match poll(&fly, &org, cursor).await {
            Ok(changes) => {
                if !watch.healthy() {
                    debug!("org-wide machine listing works: per-resource resyncs are off");
                }
                watch.listed(Instant::now(), interval);
                warned = false;
                // The first listing is the baseline: every resource is reconciled at start-up anyway.
                if cursor.is_some() {
                    let fresh: Vec<&Change> = changes
                        .iter()
                        .filter(|c| !seen.contains(&c.key()) && watch.is_news(c))
                        .collect();
                    trigger(&routes, &settled, fresh.iter().map(|c| c.app.as_str())).await;
                }
                cursor = Some(next_cursor(
                    cursor,
                    changes.iter().map(|c| c.updated_ms).max(),
                    polled_at,
                ));
                seen = changes.iter().map(Change::key).collect();
            }
            // The cursor stays where it was: the next listing that works reports what this one missed.
            Err(e) if watch.healthy() => {
                debug!(error = %e, "org-wide machine listing failed; the next poll covers what it missed");
            }
            Err(e) if !warned => {
                warned = true;
                warn!(error = %e, "org-wide machine listing is failing; falling back to per-resource resyncs");
            }
            Err(e) => debug!(error = %e, "org-wide machine listing still failing"),
        }
    }
}

/// Where the next listing starts (less [`OVERLAP_MS`]): the later of when this one was sent and the newest change
/// it reported. It follows the clock, not only the changes: anchored at the newest change, every poll of an idle
/// fleet listed again whatever changed in the minute before that change (1,000 machines that started within a
/// minute cost 3-4 pages per poll for as long as nothing else happened). Changes reach the listing late, with their
/// original `updated_at`: the overlap catches those that arrive within it, less any skew between our clock and Fly's.
fn next_cursor(cursor: Option<i64>, newest_change: Option<i64>, polled_at: i64) -> i64 {
    [cursor, newest_change, Some(polled_at)]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(polled_at)
}

struct Change {
    app: String,
    id: String,
    updated_at: String,
    updated_ms: i64,
    state: String,
    version: String,
}

impl Change {
    fn key(&self) -> (String, String, String, String) {
        (
            self.id.clone(),
            self.updated_at.clone(),
            self.state.clone(),
            self.version.clone(),
        )
    }
}

async fn poll(fly: &FlyClient, org: &str, cursor: Option<i64>) -> Result<Vec<Change>, FlyError> {
    let updated_after = cursor.map(|ms| {
        chrono::DateTime::from_timestamp_millis(ms - OVERLAP_MS)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    });
    let mut changes = Vec::new();
    let mut page_cursor = None;
    loop {
        let query = OrgMachinesQuery {
            updated_after: updated_after.clone(),
            cursor: page_cursor.take(),
            limit: Some(PAGE),
            include_deleted: true,
            summary: true,
        };
        let page = fly.list_org_machines(org, &query).await?;
        // A partial listing cannot prove that nothing changed: a failed poll (per-resource resyncs take over).
        if !page.error_regions.is_empty() {
            return Err(FlyError::Transient {
                status: None,
                message: format!(
                    "org-wide machine listing is partial: regions {} did not answer",
                    page.error_regions.join(", ")
                ),
                request_id: None,
            });
        }
        for machine in page.machines {
            let Some(app) = machine.app_name.clone().filter(|a| !a.is_empty()) else {
                continue;
            };
            changes.push(Change {
                app,
                updated_ms: millis(&machine.updated_at),
                id: machine.id,
                updated_at: machine.updated_at,
                state: machine.state,
                version: machine.instance_id,
            });
        }
        match page.next_cursor.filter(|c| !c.is_empty()) {
            Some(next) => page_cursor = Some(next),
            None => break,
        }
    }
    Ok(changes)
}

async fn trigger(routes: &[Route], settled: &Settled, apps: impl Iterator<Item = &str>) {
    let apps: HashSet<&str> = apps.collect();
    if apps.is_empty() {
        return;
    }
    for route in routes {
        let owners: HashMap<String, ObjectRef<MCPDeployment>> = route
            .store
            .state()
            .iter()
            .filter_map(|d| {
                Some((
                    d.status.as_ref()?.app.clone()?,
                    ObjectRef::from_obj(d.as_ref()),
                ))
            })
            .collect();
        for app in &apps {
            if let Some(owner) = owners.get(*app) {
                debug!(app, resource = %owner, "machine changed on Fly");
                settled.touch(owner);
                let _ = route.trigger.send(owner.clone()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, updated_at: &str) -> Machine {
        Machine {
            id: id.into(),
            updated_at: updated_at.into(),
            state: "started".into(),
            ..Default::default()
        }
    }

    fn change(app: &str, id: &str, updated_at: &str) -> Change {
        Change {
            app: app.into(),
            id: id.into(),
            updated_at: updated_at.into(),
            updated_ms: millis(updated_at),
            state: "started".into(),
            version: String::new(),
        }
    }

    /// An idle fleet costs one single-page listing per poll once the overlap has passed its last change (run G
    /// in BENCHMARKS.md measured 17 calls in 5 polls with the cursor anchored at the last change).
    #[test]
    fn an_idle_fleets_listing_moves_on_from_the_last_change() {
        let burst_ends = 1_000_000;
        // A poll a minute and a half after the last change: the next one must not reach back to that change.
        let polled_at = burst_ends + 90_000;
        let cursor = next_cursor(Some(burst_ends), Some(burst_ends), polled_at);
        assert!(
            cursor - OVERLAP_MS > burst_ends,
            "the next listing starts at {} ms, still covering the change at {burst_ends} ms",
            cursor - OVERLAP_MS
        );
        // A change stamped later than our clock (Fly's clock ahead of ours) is not listed again either.
        assert_eq!(
            next_cursor(Some(burst_ends), Some(polled_at + 500), polled_at),
            polled_at + 500
        );
        // The cursor never goes back.
        assert_eq!(
            next_cursor(Some(polled_at), None, polled_at - 1_000),
            polled_at
        );
    }

    /// REALISM.md §5: Fly answers a listing with `error_regions` now and then. One failed listing must not turn on
    /// per-resource polling for the whole fleet; a listing failing for longer than the tolerance must.
    #[test]
    fn an_occasional_failed_listing_keeps_the_fleet_watch_healthy() {
        let watch = FleetWatch::default();
        let start = Instant::now();
        let interval = Duration::from_secs(60);
        assert!(!watch.healthy_at(start), "no listing has worked yet");
        watch.listed(start, interval);
        // A failed poll records nothing: the next one comes an interval later.
        assert!(watch.healthy_at(start + interval));
        assert!(watch.healthy_at(start + interval * TOLERATED_POLLS));
        assert!(!watch.healthy_at(start + interval * TOLERATED_POLLS + Duration::from_millis(1)));
        watch.listed(start + interval * 4, interval);
        assert!(watch.healthy_at(start + interval * 4));
    }

    /// REALISM.md §5: the listing may have whole-second timestamps, so a second change within the same second has
    /// the same `updated_at`; its state (or version) still makes it news.
    #[test]
    fn a_change_within_the_same_second_is_news() {
        let watch = FleetWatch::default();
        let at = "2026-11-24T10:00:00Z";
        watch.observed("a", &[machine("m1", at)]);
        let mut stopped = change("a", "m1", at);
        stopped.state = "stopped".into();
        assert!(watch.is_news(&stopped));
        let mut updated = change("a", "m1", at);
        updated.version = "v2".into();
        assert!(watch.is_news(&updated));
        assert!(!watch.is_news(&change("a", "m1", at)));
    }

    #[test]
    fn only_changes_after_the_last_look_are_news() {
        let watch = FleetWatch::default();
        let at = "2026-11-24T10:00:00.500Z";
        let later = "2026-11-24T10:00:01.000Z";
        // Nothing looked at the app yet: everything is news.
        assert!(watch.is_news(&change("a", "m1", at)));
        watch.observed("a", &[machine("m1", at)]);
        assert!(!watch.is_news(&change("a", "m1", at)));
        assert!(watch.is_news(&change("a", "m1", later)));
        assert!(
            watch.is_news(&change("a", "m2", at)),
            "a machine the look did not see"
        );
        assert!(watch.is_news(&change("b", "m1", at)), "another app");
        watch.forget("a");
        assert!(watch.is_news(&change("a", "m1", at)));
    }
}
