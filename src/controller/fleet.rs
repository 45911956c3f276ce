//! Fleet-wide change detection: one org-wide machine listing (`GET /orgs/{org}/machines?updated_after=`) every
//! poll interval replaces per-resource polling. A machine that changed (stopped, destroyed, updated by someone)
//! requeues the resource that owns its app; idle deployments cost nothing per resource.
//!
//! The endpoint is not in Fly's public documentation (it is in Fly's own Go client), so the controller falls
//! back to per-resource resyncs when it fails: [`FleetWatch::healthy`] tells the reconciler which requeue to use.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fly_adapter::client::types::OrgMachinesQuery;
use fly_adapter::client::{FlyClient, FlyError};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::api::MCPDeployment;

/// Page size of the org-wide listing.
const PAGE: u32 = 500;
/// The cursor is moved back by this much, since timestamps have millisecond resolution and Fly's clock
/// ordering is not documented; what was already seen is skipped by (machine, updated_at).
const OVERLAP_MS: i64 = 2_000;

#[derive(Default)]
pub struct FleetWatch {
    healthy: AtomicBool,
}

impl FleetWatch {
    /// Whether the last org-wide listing worked, so Ready resources need no per-resource resync.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Where a changed app's resource is reconciled: each controller's store and its trigger channel.
pub struct Route {
    pub store: Store<MCPDeployment>,
    pub trigger: mpsc::Sender<ObjectRef<MCPDeployment>>,
}

pub async fn run(
    watch: Arc<FleetWatch>,
    fly: FlyClient,
    org: String,
    interval: Duration,
    routes: Vec<Route>,
) {
    let mut cursor: Option<i64> = None;
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match poll(&fly, &org, cursor).await {
            Ok(changes) => {
                if !watch.healthy.swap(true, Ordering::Relaxed) {
                    debug!("org-wide machine listing works: per-resource resyncs are off");
                }
                // The first listing is the baseline: every resource is reconciled at start-up anyway.
                if cursor.is_some() {
                    let fresh: Vec<&Change> = changes
                        .iter()
                        .filter(|c| !seen.contains(&c.key()))
                        .collect();
                    trigger(&routes, fresh.iter().map(|c| c.app.as_str())).await;
                }
                if let Some(latest) = changes.iter().map(|c| c.updated_ms).max() {
                    cursor = Some(cursor.map_or(latest, |c| c.max(latest)));
                } else if cursor.is_none() {
                    cursor = Some(chrono::Utc::now().timestamp_millis());
                }
                seen = changes.iter().map(Change::key).collect();
            }
            Err(e) => {
                if watch.healthy.swap(false, Ordering::Relaxed) || cursor.is_none() {
                    warn!(error = %e, "org-wide machine listing failed; falling back to per-resource resyncs");
                }
            }
        }
    }
}

struct Change {
    app: String,
    id: String,
    updated_at: String,
    updated_ms: i64,
}

impl Change {
    fn key(&self) -> (String, String) {
        (self.id.clone(), self.updated_at.clone())
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
        for machine in page.machines {
            let Some(app) = machine.app_name.clone().filter(|a| !a.is_empty()) else {
                continue;
            };
            let updated_ms = chrono::DateTime::parse_from_rfc3339(&machine.updated_at)
                .map(|t| t.timestamp_millis())
                .unwrap_or_default();
            changes.push(Change {
                app,
                id: machine.id,
                updated_at: machine.updated_at,
                updated_ms,
            });
        }
        match page.next_cursor.filter(|c| !c.is_empty()) {
            Some(next) => page_cursor = Some(next),
            None => break,
        }
    }
    Ok(changes)
}

async fn trigger(routes: &[Route], apps: impl Iterator<Item = &str>) {
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
                let _ = route.trigger.send(owner.clone()).await;
            }
        }
    }
}
