//! Ownership: whether this controller may change, or delete, the Fly app a resource names. Pure, and asked
//! before planning: [`plan`](super::plan::plan) acts only on what [`prove`] returns.
//!
//! Fly apps carry no metadata, so an app is ours only by one of these proofs (see [`Proof`]): its id is the
//! one our own create returned (recorded in `status.appId` with the create); its machines carry this
//! resource's owner metadata; a person set the adoption annotation naming it; or, for the moment between a
//! create and its record, the name is derived (its hash includes the cluster identity) and the app holds no
//! machine that is not ours. A name chosen in `spec.fly.app` is never presumed ours for lack of evidence.

use std::collections::BTreeSet;

use fly_adapter::client::types::Machine;

use super::desired::metadata;
use super::plan::{Blocked, Observed, ObservedApp};
use crate::api::{ADOPT_ANNOTATION, reason};

/// What a resource knows that can prove an app its own.
#[derive(Clone, Copy, Debug)]
pub struct Claims<'a> {
    /// The resource's UID: every machine we create carries it (`mcpfly_owner_uid`).
    pub owner_uid: &'a str,
    /// `status.appId`, or an id this process's create returned and has not recorded yet.
    pub created_id: Option<&'a str>,
    /// The adoption annotation names this app.
    pub adopt: bool,
    /// The app name was derived (its hash includes the cluster identity), not chosen in `spec.fly.app`.
    pub derived_name: bool,
    /// Machine ids last seen carrying our owner metadata (`status.machines`): a machine whose config Fly hides
    /// (its host is unreachable) is ours only if it is one of these.
    pub seen_machines: &'a BTreeSet<String>,
}

/// Why an app may be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// There is no app by that name: creating it makes it ours.
    Absent,
    /// Its id is the one our own create returned. (Also when this process already proved it and did not fetch
    /// the app again: the id is then not compared.)
    CreatedByUs,
    /// Its machines carry this resource's owner metadata.
    OurMachines,
    /// A person set the adoption annotation naming it.
    Adopted,
    /// A derived name, no recorded create, and no machine that is not ours: a crash between our create and
    /// its record.
    DerivedName,
}

/// An app proven ours, and the machines in it this resource may change.
#[derive(Clone, Debug)]
pub struct Owned {
    pub proof: Proof,
    /// What was observed, restricted to our machines: the planner never sees, so never destroys or updates,
    /// a machine without our owner metadata.
    pub observed: Observed,
    /// Machines left alone because they are not ours (`id (name)`).
    pub foreign: Vec<String>,
}

/// Whether the app may be changed (or created); `Blocked` when it is not provably ours.
pub fn prove(
    app: &str,
    org: &str,
    observed: &Observed,
    claims: &Claims<'_>,
) -> Result<Owned, Blocked> {
    let id = match &observed.app {
        ObservedApp::Missing => {
            return Ok(Owned {
                proof: Proof::Absent,
                observed: observed.clone(),
                foreign: Vec::new(),
            });
        }
        ObservedApp::OwnedByOtherOrg => return Err(app_taken(app)),
        ObservedApp::Present { org: found, .. } if !found.is_empty() && found != org => {
            return Err(Blocked {
                reason: reason::APP_NAME_TAKEN,
                message: format!(
                    "Fly app {app} belongs to org {found}, not {org}; set spec.fly.app to a free name or \
                     spec.fly.org to the app's org"
                ),
            });
        }
        ObservedApp::Present { id, .. } => id.as_str(),
    };
    // Another resource's machines: not ours, whatever else says so.
    if let Some(other) = observed
        .machines
        .iter()
        .find(|m| owner_of(m).is_some_and(|uid| uid != claims.owner_uid))
    {
        return Err(Blocked {
            reason: reason::APP_NOT_OWNED,
            message: format!(
                "Fly app {app} runs machine {} created for another resource ({}); nothing was changed. Set \
                 spec.fly.app to a free name",
                other.id,
                other
                    .config
                    .as_ref()
                    .and_then(|c| c.metadata.get(metadata::RESOURCE))
                    .map_or("?", |s| s)
            ),
        });
    }
    let (ours, foreign): (Vec<&Machine>, Vec<&Machine>) =
        observed.machines.iter().partition(|m| is_ours(m, claims));
    let proof = match claims.created_id {
        Some(created) if id.is_empty() || id == created => Some(Proof::CreatedByUs),
        _ => None,
    }
    .or_else(|| {
        ours.iter()
            .any(|m| owner_of(m) == Some(claims.owner_uid))
            .then_some(Proof::OurMachines)
    })
    .or_else(|| claims.adopt.then_some(Proof::Adopted))
    .or_else(|| {
        (claims.derived_name && claims.created_id.is_none() && foreign.is_empty())
            .then_some(Proof::DerivedName)
    });
    let Some(proof) = proof else {
        return Err(not_owned(app, id, claims, foreign.len()));
    };
    Ok(Owned {
        proof,
        observed: Observed {
            machines: ours.into_iter().cloned().collect(),
            ..observed.clone()
        },
        foreign: foreign
            .iter()
            .map(|m| format!("{} ({})", m.id, m.name))
            .collect(),
    })
}

fn not_owned(app: &str, id: &str, claims: &Claims<'_>, foreign: usize) -> Blocked {
    let why = match claims.created_id {
        Some(created) => format!("its id {id} is not {created}, the app this resource created"),
        None if foreign > 0 => format!(
            "this resource did not create it and it runs {foreign} machine(s) that mcpfly did not create"
        ),
        None => "this resource did not create it and none of its machines are this resource's"
            .to_string(),
    };
    Blocked {
        reason: reason::APP_NOT_OWNED,
        message: format!(
            "Fly app {app} exists but is not provably ours ({why}); nothing was changed, and deleting this \
             resource leaves the app alone. Set spec.fly.app to a free name, or, to take this app over \
             deliberately, annotate the resource {ADOPT_ANNOTATION}={app} (machines mcpfly did not create are \
             never changed)"
        ),
    }
}

/// The 403 Fly answers for a name another organization holds.
pub fn app_taken(app: &str) -> Blocked {
    Blocked {
        reason: reason::APP_NAME_TAKEN,
        message: format!(
            "Fly app name {app} belongs to another organization; set spec.fly.app to a name that is free on Fly"
        ),
    }
}

/// Ours: carries our owner metadata, or its config is hidden (host unreachable) and it was ours when last seen.
fn is_ours(machine: &Machine, claims: &Claims<'_>) -> bool {
    match &machine.config {
        Some(_) => owner_of(machine) == Some(claims.owner_uid),
        None => claims.seen_machines.contains(&machine.id),
    }
}

fn owner_of(machine: &Machine) -> Option<&str> {
    machine
        .config
        .as_ref()?
        .metadata
        .get(metadata::OWNER_UID)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::plan::tests::{APP_ID, BASE, UID, converged_observation, want};

    const APP: &str = "acme-app";

    fn claims(seen: &BTreeSet<String>) -> Claims<'_> {
        Claims {
            owner_uid: UID,
            created_id: None,
            adopt: false,
            derived_name: false,
            seen_machines: seen,
        }
    }

    fn prove_on(observed: &Observed, claims: &Claims<'_>) -> Result<Owned, Blocked> {
        prove(APP, "acme", observed, claims)
    }

    /// An app in our org running one machine someone else made with `fly machine run` (no metadata).
    fn foreign_app() -> Observed {
        let d = want(BASE, &[]);
        let mut observed = converged_observation(&d);
        observed.machines.truncate(1);
        let config = observed.machines[0].config.as_mut().unwrap();
        config.metadata.clear();
        observed.machines[0].name = "web".into();
        observed
    }

    fn empty_app() -> Observed {
        Observed {
            machines: vec![],
            ..converged_observation(&want(BASE, &[]))
        }
    }

    #[test]
    fn another_orgs_app_and_another_resources_machines_are_never_ours() {
        let seen = BTreeSet::new();
        let taken = Observed {
            app: ObservedApp::OwnedByOtherOrg,
            ..empty_app()
        };
        let adopt = Claims {
            adopt: true,
            created_id: Some(APP_ID),
            ..claims(&seen)
        };
        assert_eq!(prove_on(&taken, &adopt).unwrap_err().reason, "AppNameTaken");
        let other_org = Observed {
            app: ObservedApp::Present {
                org: "other".into(),
                id: APP_ID.into(),
            },
            ..empty_app()
        };
        assert_eq!(
            prove_on(&other_org, &adopt).unwrap_err().reason,
            "AppNameTaken"
        );

        let mut other_resource = converged_observation(&want(BASE, &[]));
        other_resource.machines[0]
            .config
            .as_mut()
            .unwrap()
            .metadata
            .insert(metadata::OWNER_UID.into(), "someone".into());
        assert_eq!(
            prove_on(&other_resource, &adopt).unwrap_err().reason,
            "AppNotOwned"
        );
    }

    #[test]
    fn an_app_we_did_not_create_is_not_ours_for_lack_of_evidence() {
        let seen = BTreeSet::new();
        for observed in [foreign_app(), empty_app()] {
            let blocked = prove_on(&observed, &claims(&seen)).unwrap_err();
            assert_eq!(blocked.reason, "AppNotOwned");
            assert!(
                blocked.message.contains("mcpfly.dev/adopt-app=acme-app"),
                "says how to adopt: {}",
                blocked.message
            );
        }
        // A derived name covers the crash window only while no machine is someone else's.
        let derived = Claims {
            derived_name: true,
            ..claims(&seen)
        };
        assert_eq!(
            prove_on(&empty_app(), &derived).unwrap().proof,
            Proof::DerivedName
        );
        assert_eq!(
            prove_on(&foreign_app(), &derived).unwrap_err().reason,
            "AppNotOwned"
        );
    }

    #[test]
    fn our_create_our_machines_or_an_adoption_prove_it() {
        let seen = BTreeSet::new();
        let created = Claims {
            created_id: Some(APP_ID),
            ..claims(&seen)
        };
        assert_eq!(
            prove_on(&empty_app(), &created).unwrap().proof,
            Proof::CreatedByUs
        );
        // Same name, another app (ours was deleted and the name reused): not ours, derived name or not.
        let replaced = Claims {
            created_id: Some("app_other"),
            derived_name: true,
            ..claims(&seen)
        };
        let blocked = prove_on(&empty_app(), &replaced).unwrap_err();
        assert!(blocked.message.contains("app_other"), "{}", blocked.message);

        let ours = converged_observation(&want(BASE, &[]));
        assert_eq!(
            prove_on(&ours, &claims(&seen)).unwrap().proof,
            Proof::OurMachines
        );

        let adopt = Claims {
            adopt: true,
            ..claims(&seen)
        };
        let owned = prove_on(&foreign_app(), &adopt).unwrap();
        assert_eq!(owned.proof, Proof::Adopted);
        assert!(
            owned.observed.machines.is_empty(),
            "a machine without our metadata is never planned for"
        );
        assert_eq!(owned.foreign.len(), 1);
    }

    #[test]
    fn a_machine_with_a_hidden_config_is_ours_only_if_it_was_before() {
        let mut observed = converged_observation(&want(BASE, &[]));
        observed.machines[0].config = None;
        observed.machines[0].host_status = Some("unreachable".into());
        let id = observed.machines[0].id.clone();
        let none = BTreeSet::new();
        let owned = prove_on(&observed, &claims(&none)).unwrap();
        assert_eq!(owned.observed.machines.len(), 1);
        assert_eq!(owned.foreign, [format!("{id} (iad-0)")]);
        let seen = BTreeSet::from([id]);
        let owned = prove_on(&observed, &claims(&seen)).unwrap();
        assert_eq!(owned.observed.machines.len(), 2);
    }
}
