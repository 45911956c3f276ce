//! Planning: a pure function from what should be (the [`DesiredDeployment`]) and what is (the [`Observed`] Fly
//! state plus what this controller already delivered) to an ordered list of [`Action`]s. No I/O happens here,
//! so every case — fresh create, rolling update, drift, duplicates after an ambiguous create — is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use fly_adapter::client::types::{IpAssignment, Machine};

use super::desired::{DesiredDeployment, DesiredMachine, comparable_hash, metadata};
use crate::api::RolloutStrategy;

/// The Fly app as observed.
#[derive(Clone, Debug, PartialEq)]
pub enum ObservedApp {
    Missing,
    /// `org` and `id` are empty when the app was not fetched this time (this process already knows it).
    Present {
        org: String,
        id: String,
    },
    /// The name answers 403: someone else's app.
    OwnedByOtherOrg,
}

#[derive(Clone, Debug)]
pub struct Observed {
    pub app: ObservedApp,
    /// Machines that are not destroyed.
    pub machines: Vec<Machine>,
    /// `None` when IPs were not looked at this time (they are only listed until the deployment is Ready).
    pub ips: Option<Vec<IpAssignment>>,
}

/// What this controller already did, as recorded in status or held in memory.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Secret name → digest of the value last delivered to Fly.
    pub applied_secrets: BTreeMap<String, String>,
    /// Machine ids whose lease this process holds for a rolling update in flight.
    pub leased: BTreeSet<String>,
    /// Machine names whose last create was ambiguous: list again before creating them again.
    pub unconfirmed_creates: BTreeSet<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpKind {
    V6,
    SharedV4,
}

impl IpKind {
    pub fn as_fly(self) -> &'static str {
        match self {
            IpKind::V6 => "v6",
            IpKind::SharedV4 => "shared_v4",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestroyReason {
    /// Not among the desired machines (region removed, count lowered, or not ours by name).
    NotDesired,
    /// A second machine with a desired name, e.g. after an ambiguous create.
    Duplicate,
    /// `host_status` is not ok: Fly cannot reach its host, so it is replaced rather than waited on.
    HostUnhealthy,
    /// In `failed` or with no usable config: replaced.
    Broken,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    CreateApp {
        name: String,
        org: String,
        network: String,
    },
    /// `org` goes into the request as flyctl and fly-go send it (REALISM.md §6).
    AssignIp {
        kind: IpKind,
        org: String,
    },
    /// Values are looked up at act time: a plan never holds secret material.
    SetSecrets {
        set: Vec<String>,
        unset: Vec<String>,
    },
    DestroyMachine {
        id: String,
        name: String,
        reason: DestroyReason,
    },
    CreateMachine {
        machine: DesiredMachine,
    },
    /// `hold_lease`: keep the lease until the machine is healthy again (rolling); otherwise release at once.
    UpdateMachine {
        id: String,
        machine: DesiredMachine,
        current_version: String,
        skip_launch: bool,
        hold_lease: bool,
    },
    StartMachine {
        id: String,
        name: String,
    },
    ReleaseLease {
        id: String,
    },
}

impl Action {
    /// Whether the action changes something on Fly (leases are bookkeeping).
    pub fn is_mutation(&self) -> bool {
        !matches!(self, Action::ReleaseLease { .. })
    }
}

/// Why planning cannot proceed without the user changing something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Things in progress that need no action now, only time (e.g. "iad-0 starting").
    pub waiting: Vec<String>,
    pub ready_machines: usize,
    pub desired_machines: usize,
}

impl Plan {
    /// Nothing to do and nothing to wait for: the deployment matches its spec.
    pub fn converged(&self) -> bool {
        self.actions.is_empty()
            && self.waiting.is_empty()
            && self.ready_machines == self.desired_machines
    }
}

/// The actions that bring an app this controller may change (see [`super::ownership`]) to `desired`.
pub fn plan(desired: &DesiredDeployment, observed: &Observed, progress: &Progress) -> Plan {
    let mut plan = Plan {
        desired_machines: desired.machines.len(),
        ..Default::default()
    };
    if observed.app == ObservedApp::Missing {
        plan.actions.push(Action::CreateApp {
            name: desired.app.clone(),
            org: desired.org.clone(),
            network: desired.network.clone(),
        });
    }
    plan_ips(&desired.org, observed, &mut plan);
    plan_secrets(desired, progress, &mut plan);
    plan_machines(desired, observed, progress, &mut plan);
    plan
}

fn plan_ips(org: &str, observed: &Observed, plan: &mut Plan) {
    let ips: &[IpAssignment] = match (&observed.app, &observed.ips) {
        (ObservedApp::Missing, _) => &[],
        (_, Some(ips)) => ips,
        (_, None) => return,
    };
    let has_v6 = ips.iter().any(IpAssignment::is_public_v6);
    let has_shared_v4 = ips.iter().any(|ip| ip.shared && !ip.ip.contains(':'));
    if !has_v6 {
        plan.actions.push(Action::AssignIp {
            kind: IpKind::V6,
            org: org.to_string(),
        });
    }
    if !has_shared_v4 {
        plan.actions.push(Action::AssignIp {
            kind: IpKind::SharedV4,
            org: org.to_string(),
        });
    }
}

fn plan_secrets(desired: &DesiredDeployment, progress: &Progress, plan: &mut Plan) {
    let set: Vec<String> = desired
        .secrets
        .iter()
        .filter(|(name, digest)| progress.applied_secrets.get(*name) != Some(digest))
        .map(|(name, _)| name.clone())
        .collect();
    let unset: Vec<String> = progress
        .applied_secrets
        .keys()
        .filter(|name| !desired.secrets.contains_key(*name))
        .cloned()
        .collect();
    if !set.is_empty() || !unset.is_empty() {
        plan.actions.push(Action::SetSecrets { set, unset });
    }
}

/// A machine serves (or will on the next request): started and healthy, or parked by autostop.
fn is_available(machine: &Machine, autostop: bool) -> bool {
    match machine.state.as_str() {
        "started" => is_healthy(machine),
        "stopped" | "suspended" => autostop,
        _ => false,
    }
}

/// Fly's fake checks (`bg_deployments_compat*`), which fly-go strips on every read.
fn is_compat_check(name: &str) -> bool {
    name.starts_with("bg_deployments_compat")
}

/// A passing result for every configured check (top-level and service checks). Fly reports no entry for a check
/// before its first run, so an empty or short list is not healthy (flyctl: `AllPassing()` is vacuously true
/// when nothing has reported yet); Fly's compat checks do not count.
pub(crate) fn is_healthy(machine: &Machine) -> bool {
    let counts = check_counts(machine);
    machine.config.is_some()
        && counts.passing == counts.reported
        && counts.reported >= counts.configured
}

/// A machine's checks as this controller counts them (Fly's compat checks left out).
pub struct CheckCounts {
    /// Top-level checks plus every service's checks in the machine's config.
    pub configured: usize,
    /// Results Fly reported (none before a check's first run).
    pub reported: usize,
    pub passing: usize,
}

pub fn check_counts(machine: &Machine) -> CheckCounts {
    let configured = machine.config.as_ref().map_or(0, |config| {
        config.checks.len()
            + config
                .services
                .iter()
                .map(|s| s.checks.len())
                .sum::<usize>()
    });
    let results = machine.checks.iter().filter(|c| !is_compat_check(&c.name));
    let (reported, passing) = results.fold((0, 0), |(reported, passing), c| {
        (reported + 1, passing + usize::from(c.status == "passing"))
    });
    CheckCounts {
        configured,
        reported,
        passing,
    }
}

/// Destroyed, or on its way there: not a machine to plan with.
pub fn is_gone(machine: &Machine) -> bool {
    matches!(
        machine.state.as_str(),
        "destroyed" | "destroying" | "replaced" | "migrated"
    )
}

fn host_unhealthy(machine: &Machine) -> bool {
    machine
        .host_status
        .as_deref()
        .is_some_and(|s| !s.is_empty() && s != "ok")
}

fn plan_machines(
    desired: &DesiredDeployment,
    observed: &Observed,
    progress: &Progress,
    plan: &mut Plan,
) {
    let desired_names: BTreeSet<&str> = desired.machines.iter().map(|m| m.name.as_str()).collect();
    let live: Vec<&Machine> = observed.machines.iter().filter(|m| !is_gone(m)).collect();

    // Machines that are not ours by name go first: they free capacity and names.
    for machine in live
        .iter()
        .filter(|m| !desired_names.contains(m.name.as_str()))
    {
        plan.actions.push(Action::DestroyMachine {
            id: machine.id.clone(),
            name: machine.name.clone(),
            reason: DestroyReason::NotDesired,
        });
    }

    let mut outdated: Vec<(&DesiredMachine, &Machine)> = Vec::new();
    let mut updated_count = 0usize; // existing machines already on the desired config
    let mut in_progress = 0usize; // on the desired config but not yet available
    for want in &desired.machines {
        let mut same_name: Vec<&Machine> = live
            .iter()
            .copied()
            .filter(|m| m.name == want.name)
            .collect();
        if same_name.is_empty() {
            if progress.unconfirmed_creates.contains(&want.name) {
                // Fly's list can miss a machine created a moment ago; a second look comes before a second create.
                plan.waiting
                    .push(format!("{}: confirming an earlier create", want.name));
            } else {
                plan.actions.push(Action::CreateMachine {
                    machine: want.clone(),
                });
                in_progress += 1;
            }
            continue;
        }
        // Keep the machine already on the desired config if any, else the oldest; the rest are duplicates.
        same_name.sort_by_key(|m| {
            (
                machine_hash(m).as_deref() != Some(want.config_hash.as_str()),
                m.created_at.clone(),
            )
        });
        let keep = same_name[0];
        for duplicate in &same_name[1..] {
            plan.actions.push(Action::DestroyMachine {
                id: duplicate.id.clone(),
                name: duplicate.name.clone(),
                reason: DestroyReason::Duplicate,
            });
        }
        let broken =
            keep.config.is_none() || matches!(keep.state.as_str(), "failed" | "launch_failed");
        if host_unhealthy(keep) || broken {
            // Fly hides the config of a machine whose host is unreachable: name the cause, not the symptom.
            let reason = if host_unhealthy(keep) {
                DestroyReason::HostUnhealthy
            } else {
                DestroyReason::Broken
            };
            plan.actions.push(Action::DestroyMachine {
                id: keep.id.clone(),
                name: keep.name.clone(),
                reason,
            });
            plan.actions.push(Action::CreateMachine {
                machine: want.clone(),
            });
            in_progress += 1;
            continue;
        }
        if machine_hash(keep).as_deref() != Some(want.config_hash.as_str()) {
            // It may still serve the old config, but it is not ready for this spec.
            outdated.push((want, keep));
            continue;
        }
        updated_count += 1;
        if is_available(keep, desired.autostop) {
            plan.ready_machines += 1;
            if progress.leased.contains(&keep.id) {
                plan.actions.push(Action::ReleaseLease {
                    id: keep.id.clone(),
                });
            }
            continue;
        }
        in_progress += 1;
        match keep.state.as_str() {
            // Not parked by autostop (autostop is off): start it. A `created` machine is not: Fly is still pulling
            // its image and refuses a start until it launches it.
            "stopped" | "suspended" => plan.actions.push(Action::StartMachine {
                id: keep.id.clone(),
                name: keep.name.clone(),
            }),
            state => plan
                .waiting
                .push(format!("{}: {}{}", keep.name, state, checks_summary(keep))),
        }
    }

    let budget = match desired.strategy {
        RolloutStrategy::Immediate => outdated.len(),
        RolloutStrategy::Rolling => {
            let mut budget = (desired.max_unavailable as usize).saturating_sub(in_progress);
            // Like Fly's own deploys: the first machine goes alone, so a bad config stops at one machine.
            if updated_count == 0 && outdated.len() > 1 {
                budget = budget.min(1);
            }
            budget
        }
    };
    for (index, (want, have)) in outdated.iter().enumerate() {
        if index >= budget {
            plan.waiting.push(format!(
                "{}: waiting for its turn in the rolling update",
                have.name
            ));
            continue;
        }
        // The launch id identifies the machine, not its config: an update keeps it.
        let mut machine = (*want).clone();
        if let Some(launch) = have
            .config
            .as_ref()
            .and_then(|c| c.metadata.get(metadata::LAUNCH_ID))
        {
            machine
                .config
                .metadata
                .insert(metadata::LAUNCH_ID.to_string(), launch.clone());
        }
        plan.actions.push(Action::UpdateMachine {
            id: have.id.clone(),
            machine,
            current_version: have.instance_id.clone(),
            // An update of a machine that is not running leaves it stopped; Fly's CLI says so explicitly.
            skip_launch: matches!(have.state.as_str(), "stopped" | "suspended" | "created"),
            hold_lease: desired.strategy == RolloutStrategy::Rolling,
        });
    }
}

fn machine_hash(machine: &Machine) -> Option<String> {
    machine.config.as_ref().map(comparable_hash)
}

fn checks_summary(machine: &Machine) -> String {
    let failing: Vec<&str> = machine
        .checks
        .iter()
        .filter(|c| c.status != "passing" && !is_compat_check(&c.name))
        .map(|c| c.name.as_str())
        .collect();
    if machine.state != "started" {
        String::new()
    } else if !failing.is_empty() {
        format!(", checks not passing: {}", failing.join(", "))
    } else if !is_healthy(machine) {
        ", waiting for the first check results".to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
pub(crate) mod tests;
