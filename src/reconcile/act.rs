//! Acting: carry out a [`Plan`](super::plan::Plan)'s actions against Fly, in order, stopping at the first failure.
//!
//! Every mutation is audited by fly-adapter (one JSON line per call, inside the reconcile span that names the
//! resource) and announced as a Kubernetes Event by the caller from the returned [`Outcome`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fly_adapter::client::lease::LeaseGuard;
use fly_adapter::client::types::{
    AssignIpRequest, CreateAppRequest, CreateMachineRequest, SecretValue,
};
use fly_adapter::client::{FlyClient, FlyError};

use super::desired::metadata;
use super::observe::AppKnown;
use super::plan::Action;

/// How long a lease is requested for; the guard refreshes it at a third of this while held.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// A rolling update gives up holding a machine's lease after this long without it becoming healthy: other
/// writers may act again, and status says which machine is stuck.
const LEASE_HOLD_MAX: Duration = Duration::from_secs(600);
/// Fly's list can lag a create by a moment: within this window a create whose outcome is unknown is looked for,
/// not redone.
const CREATE_CONFIRM_WINDOW: Duration = Duration::from_secs(5);
/// Fly's per-app machine list can lag its writes (REALISM.md §5; flyctl once created duplicates that way): a
/// machine this process created is remembered this long, so a list that does not show it yet means "wait", not
/// "create again" (which would make a duplicate, then destroy it).
const CREATED_REMEMBER_WINDOW: Duration = Duration::from_secs(60);

/// When a create was sent, how long to remember it, and the id Fly returned (none for an ambiguous create).
type RememberedCreate = (Instant, Duration, Option<String>);

/// Leases held across reconciles for rolling updates, keyed by (app, machine id), and creates whose outcome
/// is unknown. Both live in memory: if the process dies, leases expire on Fly by their TTL, and the planner
/// finds ambiguous creates by their deterministic names.
#[derive(Default)]
pub struct InFlight {
    leases: Mutex<HashMap<(String, String), (LeaseGuard, Instant)>>,
    /// (app, machine name) → (since, how long to remember, the id a successful create returned): ambiguous
    /// creates and successful ones.
    unconfirmed_creates: Mutex<HashMap<(String, String), RememberedCreate>>,
    /// Apps this process has seen in our org (app → the generation whose IPs it confirmed, if any): while an app
    /// is known, observation skips the app GET (a machine listing answers 404 if it is gone) and, for that
    /// generation, the IP listing, so a converging deployment is looked at with one call, not three.
    known_apps: Mutex<HashMap<String, Option<i64>>>,
    /// (owner UID, app) → the id our create returned, until status records it: a failed status write right
    /// after a create must not leave this process unable to prove the app its own.
    created_apps: Mutex<HashMap<(String, String), String>>,
    /// (owner UID, app) → when this process created it, until it is first seen: empty by construction then.
    created_unseen: Mutex<HashMap<(String, String), Instant>>,
}

impl InFlight {
    pub fn leased_machines(&self, app: &str) -> std::collections::BTreeSet<String> {
        let mut leases = self.leases.lock().unwrap();
        leases.retain(|_, (guard, since)| !guard.is_lost() && since.elapsed() < LEASE_HOLD_MAX);
        leases
            .keys()
            .filter(|(a, _)| a == app)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Names of `app`'s machines created (or maybe created) lately that `listed` does not show yet. A create the
    /// list has shown is forgotten, so a machine destroyed afterwards is recreated at once.
    pub fn unconfirmed_creates(
        &self,
        app: &str,
        listed: &[fly_adapter::client::types::Machine],
    ) -> std::collections::BTreeSet<String> {
        let mut creates = self.unconfirmed_creates.lock().unwrap();
        creates.retain(|(a, name), (since, window, _)| {
            since.elapsed() < *window && !(a == app && listed.iter().any(|m| &m.name == name))
        });
        creates
            .keys()
            .filter(|(a, _)| a == app)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Remembered creates of `app` with a known id that `listed` does not show: to be looked up by id, since a
    /// lagging list is no proof either way (REALISM.md §5) and the machine may be gone (a new machine whose
    /// launch fails is destroyed by Fly, §7).
    pub fn unlisted_creates(
        &self,
        app: &str,
        listed: &[fly_adapter::client::types::Machine],
    ) -> Vec<(String, String)> {
        self.unconfirmed_creates
            .lock()
            .unwrap()
            .iter()
            .filter(|((a, name), _)| a == app && !listed.iter().any(|m| &m.name == name))
            .filter_map(|((_, name), (_, _, id))| Some((name.clone(), id.clone()?)))
            .collect()
    }

    /// Forget a remembered create whose machine is gone, so it is created again at once.
    pub fn forget_create(&self, app: &str, name: &str) {
        self.unconfirmed_creates
            .lock()
            .unwrap()
            .remove(&(app.to_string(), name.to_string()));
    }

    /// What `owner_uid`'s observation may take as known about `app` (see [`AppKnown`]). A create is trusted to
    /// have left the app empty only within Fly's visibility window: an app that took longer is listed.
    pub fn app_known(&self, owner_uid: &str, app: &str) -> AppKnown {
        if self.known_apps.lock().unwrap().contains_key(app) {
            return AppKnown::InOurOrg;
        }
        let mut unseen = self.created_unseen.lock().unwrap();
        unseen.retain(|_, at| at.elapsed() < fly_adapter::client::APP_VISIBILITY_WINDOW);
        if unseen.contains_key(&(owner_uid.to_string(), app.to_string())) {
            AppKnown::CreatedEmpty
        } else {
            AppKnown::Nothing
        }
    }

    /// Our new app answered: from now on it is observed like any other (the plan is about to put things in it).
    pub fn note_seen(&self, app: &str) {
        self.created_unseen
            .lock()
            .unwrap()
            .retain(|(_, a), _| a != app);
    }

    /// Whether the IPs of `app` were confirmed for this generation.
    pub fn ips_known(&self, app: &str, generation: Option<i64>) -> bool {
        generation.is_some()
            && self.known_apps.lock().unwrap().get(app).copied().flatten() == generation
    }

    /// `app` exists in our org; `ips_for`: its IPs are complete for that generation.
    pub fn note_app(&self, app: &str, ips_for: Option<i64>) {
        let mut known = self.known_apps.lock().unwrap();
        let entry = known.entry(app.to_string()).or_default();
        if ips_for.is_some() {
            *entry = ips_for;
        }
    }

    pub fn note_created(&self, owner_uid: &str, app: &str, id: &str) {
        self.created_apps
            .lock()
            .unwrap()
            .insert((owner_uid.to_string(), app.to_string()), id.to_string());
        self.created_unseen
            .lock()
            .unwrap()
            .insert((owner_uid.to_string(), app.to_string()), Instant::now());
    }

    /// The id of `app` as our create returned it to `owner_uid`'s reconcile, if this process created it.
    pub fn created_id(&self, owner_uid: &str, app: &str) -> Option<String> {
        self.created_apps
            .lock()
            .unwrap()
            .get(&(owner_uid.to_string(), app.to_string()))
            .cloned()
    }

    /// Forgets that `app` exists (it was found missing, or is being deleted).
    pub fn forget_known_app(&self, app: &str) {
        self.known_apps.lock().unwrap().remove(app);
    }

    /// Drops every lease held for `app` (deletion, suspension); dropping a guard releases its lease.
    pub fn forget_app(&self, app: &str) {
        self.forget_known_app(app);
        self.note_seen(app);
        self.created_apps
            .lock()
            .unwrap()
            .retain(|(_, a), _| a != app);
        self.leases.lock().unwrap().retain(|(a, _), _| a != app);
        self.unconfirmed_creates
            .lock()
            .unwrap()
            .retain(|(a, _), _| a != app);
    }

    fn hold(&self, app: &str, id: &str, guard: LeaseGuard) {
        self.leases
            .lock()
            .unwrap()
            .insert((app.to_string(), id.to_string()), (guard, Instant::now()));
    }

    fn take(&self, app: &str, id: &str) -> Option<LeaseGuard> {
        self.leases
            .lock()
            .unwrap()
            .remove(&(app.to_string(), id.to_string()))
            .map(|(guard, _)| guard)
    }

    fn mark_unconfirmed(&self, app: &str, name: &str, window: Duration, id: Option<&str>) {
        self.unconfirmed_creates.lock().unwrap().insert(
            (app.to_string(), name.to_string()),
            (Instant::now(), window, id.map(str::to_string)),
        );
    }
}

/// What acting achieved, including when it stopped early.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Human-readable notes for Kubernetes Events, one per mutation that succeeded.
    pub done: Vec<(&'static str, String)>,
    /// The id Fly returned to our create of the app: the proof it is ours.
    pub created_app_id: Option<String>,
    /// The secrets version after a successful secrets call, and the digests that call delivered.
    pub secrets_version: Option<u64>,
    pub applied_secrets: Option<BTreeMap<String, String>>,
    /// The failure that stopped acting, if any.
    pub error: Option<ActError>,
}

impl Outcome {
    /// This outcome followed by `next`'s (acting went on after this part succeeded).
    pub fn then(mut self, next: Outcome) -> Outcome {
        self.done.extend(next.done);
        Outcome {
            done: self.done,
            created_app_id: self.created_app_id.or(next.created_app_id),
            secrets_version: next.secrets_version.or(self.secrets_version),
            applied_secrets: next.applied_secrets.or(self.applied_secrets),
            error: next.error,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// The outcome of a mutation is unknown; the next reconcile observes before doing anything again.
    #[error("{action}: outcome unknown, will look before retrying: {source}")]
    Ambiguous { action: String, source: FlyError },
    /// 403 on create: the name belongs to another organization.
    #[error("app name belongs to another organization")]
    AppNameTaken,
    #[error("{action}: {source}")]
    Fly { action: String, source: FlyError },
}

pub struct Actor<'a> {
    pub fly: &'a FlyClient,
    pub app: &'a str,
    pub in_flight: &'a InFlight,
    /// Values for the secrets call: credentials and the endpoint token.
    pub secret_values: &'a BTreeMap<String, SecretValue>,
    pub desired_secrets: &'a BTreeMap<String, String>,
    /// The secrets version machines must boot with, from status; replaced by a secrets call in this plan.
    pub secrets_version: Option<u64>,
    pub lease_owner: &'a str,
}

impl Actor<'_> {
    /// Carries out `actions` (a plan's, or a part of them) in order.
    pub async fn run(&self, actions: &[Action]) -> Outcome {
        let mut outcome = Outcome {
            secrets_version: None,
            ..Default::default()
        };
        let mut secrets_version = self.secrets_version;
        for action in actions {
            match self.one(action, &mut secrets_version, &mut outcome).await {
                Ok(()) => {}
                Err(error) => {
                    outcome.error = Some(error);
                    break;
                }
            }
        }
        outcome
    }

    async fn one(
        &self,
        action: &Action,
        secrets_version: &mut Option<u64>,
        outcome: &mut Outcome,
    ) -> Result<(), ActError> {
        let app = self.app;
        let fail = |what: &str, source: FlyError| match source {
            FlyError::Ambiguous { .. } => ActError::Ambiguous {
                action: what.to_string(),
                source,
            },
            source => ActError::Fly {
                action: what.to_string(),
                source,
            },
        };
        match action {
            Action::CreateApp { name, org, network } => {
                let request = CreateAppRequest {
                    name: name.clone(),
                    org_slug: org.clone(),
                    network: Some(network.clone()).filter(|n| !n.is_empty()),
                    enable_subdomains: None,
                };
                // Not waited for here: the app becomes visible a while later (REALISM.md §1), and the rest of
                // the plan continues in a later reconcile that sees it.
                match self.fly.send_app_create(&request).await {
                    Ok(created) => {
                        outcome.created_app_id = Some(created.id);
                        outcome
                            .done
                            .push(("AppCreated", format!("created Fly app {name} in org {org}")));
                    }
                    // Already there: ours from an earlier attempt, or taken. The next observation decides.
                    Err(FlyError::NameTaken { .. }) => {
                        return Err(ActError::Ambiguous {
                            action: "create app".into(),
                            source: FlyError::NameTaken {
                                message: "exists".into(),
                                request_id: None,
                            },
                        });
                    }
                    Err(FlyError::OwnedByOtherOrg { .. }) => return Err(ActError::AppNameTaken),
                    Err(e) => return Err(fail("create app", e)),
                }
            }
            Action::AssignIp { kind, org } => {
                let request = AssignIpRequest {
                    kind: kind.as_fly().to_string(),
                    region: None,
                    network: None,
                    org_slug: Some(org.clone()),
                };
                let ip = self
                    .fly
                    .assign_ip(app, &request)
                    .await
                    .map_err(|e| fail("assign IP", e))?;
                outcome.done.push((
                    "IpAssigned",
                    format!("assigned {} address {}", kind.as_fly(), ip.ip),
                ));
            }
            Action::SetSecrets { set, unset } => {
                let mut values: BTreeMap<String, Option<SecretValue>> = BTreeMap::new();
                for name in set {
                    let value = self.secret_values.get(name).cloned();
                    debug_assert!(value.is_some(), "planned secret {name} has a value");
                    values.insert(name.clone(), value);
                }
                for name in unset {
                    values.insert(name.clone(), None);
                }
                let response = self
                    .fly
                    .set_secrets(app, &values)
                    .await
                    .map_err(|e| fail("set secrets", e))?;
                *secrets_version = Some(response.version);
                outcome.secrets_version = Some(response.version);
                outcome.applied_secrets = Some(self.desired_secrets.clone());
                outcome.done.push((
                    "SecretsUpdated",
                    format!(
                        "set {} and unset {} app secret(s); secrets version {}",
                        set.len(),
                        unset.len(),
                        response.version
                    ),
                ));
            }
            Action::DestroyMachine { id, name, reason } => {
                if let Some(guard) = self.in_flight.take(app, id) {
                    let _ = guard.release().await;
                }
                match self.fly.delete_machine(app, id, true, None).await {
                    Ok(()) | Err(FlyError::NotFound { .. }) => {}
                    Err(e) => return Err(fail("destroy machine", e)),
                }
                outcome.done.push((
                    "MachineDestroyed",
                    format!("destroyed machine {id} ({name}): {reason:?}"),
                ));
            }
            Action::CreateMachine { machine } => {
                let mut config = machine.config.clone();
                config
                    .metadata
                    .insert(metadata::LAUNCH_ID.to_string(), launch_id());
                let request = CreateMachineRequest {
                    config,
                    name: Some(machine.name.clone()),
                    region: Some(machine.region.clone()),
                    min_secrets_version: *secrets_version,
                    ..Default::default()
                };
                match self.fly.create_machine(app, &request).await {
                    Ok(created) => {
                        self.in_flight.mark_unconfirmed(
                            app,
                            &machine.name,
                            CREATED_REMEMBER_WINDOW,
                            Some(&created.id),
                        );
                        outcome.done.push((
                            "MachineCreated",
                            format!(
                                "created machine {} ({}) in {}",
                                created.id, machine.name, machine.region
                            ),
                        ))
                    }
                    Err(e @ FlyError::Ambiguous { .. }) => {
                        self.in_flight.mark_unconfirmed(
                            app,
                            &machine.name,
                            CREATE_CONFIRM_WINDOW,
                            None,
                        );
                        return Err(fail("create machine", e));
                    }
                    Err(e) => return Err(fail("create machine", e)),
                }
            }
            Action::UpdateMachine {
                id,
                machine,
                current_version,
                skip_launch,
                hold_lease,
            } => {
                let description = format!("mcpfly rolling update by {}", self.lease_owner);
                let guard = LeaseGuard::acquire(self.fly.clone(), app, id, LEASE_TTL, &description)
                    .await
                    .map_err(|e| fail("lease machine", e))?;
                let request = CreateMachineRequest {
                    config: machine.config.clone(),
                    min_secrets_version: *secrets_version,
                    skip_launch: Some(*skip_launch).filter(|s| *s),
                    current_version: Some(current_version.clone()).filter(|v| !v.is_empty()),
                    ..Default::default()
                };
                let result = self
                    .fly
                    .update_machine(app, id, &request, Some(guard.nonce()))
                    .await;
                match result {
                    Ok(_) if *hold_lease => self.in_flight.hold(app, id, guard),
                    Ok(_) => {
                        let _ = guard.release().await;
                    }
                    Err(e) => {
                        let _ = guard.release().await;
                        return Err(fail("update machine", e));
                    }
                }
                outcome.done.push((
                    "MachineUpdated",
                    format!("updated machine {id} ({})", machine.name),
                ));
            }
            Action::StartMachine { id, name } => {
                self.fly
                    .start_machine(app, id, None)
                    .await
                    .map_err(|e| fail("start machine", e))?;
                outcome
                    .done
                    .push(("MachineStarted", format!("started machine {id} ({name})")));
            }
            Action::ReleaseLease { id } => {
                if let Some(guard) = self.in_flight.take(app, id) {
                    let _ = guard.release().await;
                }
            }
        }
        Ok(())
    }
}

fn launch_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}
