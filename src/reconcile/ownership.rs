//! Ownership: whether the Fly app a resource names may be changed by this controller. Pure, and asked before
//! planning: [`plan`](super::plan::plan) assumes its answer.

use fly_adapter::client::types::Machine;

use super::desired::{DesiredDeployment, metadata};
use super::plan::{Blocked, Observed, ObservedApp};
use crate::api::reason;

/// `Ok` when the app may be changed (or created); `Blocked` when it belongs to someone else.
pub fn check(
    desired: &DesiredDeployment,
    observed: &Observed,
    owner_uid: &str,
) -> Result<(), Blocked> {
    match &observed.app {
        ObservedApp::OwnedByOtherOrg => Err(app_taken(&desired.app)),
        ObservedApp::Present { org } if !org.is_empty() && org != &desired.org => Err(Blocked {
            reason: reason::APP_NAME_TAKEN,
            message: format!(
                "Fly app {} belongs to org {org}, not {}; set spec.fly.app to a free name or spec.fly.org to \
                 the app's org",
                desired.app, desired.org
            ),
        }),
        ObservedApp::Present { .. } => match observed
            .machines
            .iter()
            .find(|m| owner_of(m).is_some_and(|uid| uid != owner_uid))
        {
            Some(foreign) => Err(Blocked {
                reason: reason::APP_NOT_OWNED,
                message: format!(
                    "Fly app {} already runs machine {} created for another resource ({}); set spec.fly.app to \
                     a free name",
                    desired.app,
                    foreign.id,
                    foreign
                        .config
                        .as_ref()
                        .and_then(|c| c.metadata.get(metadata::RESOURCE))
                        .map_or("?", |s| s)
                ),
            }),
            None => Ok(()),
        },
        ObservedApp::Missing => Ok(()),
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
    use crate::reconcile::plan::tests::{BASE, UID, converged_observation, want};

    #[test]
    fn someone_elses_app_blocks_with_no_actions() {
        let d = want(BASE, &[]);
        let observed = Observed {
            app: ObservedApp::OwnedByOtherOrg,
            machines: vec![],
            ips: None,
        };
        assert_eq!(
            check(&d, &observed, UID).unwrap_err().reason,
            "AppNameTaken"
        );

        let other_org = Observed {
            app: ObservedApp::Present {
                org: "other".into(),
            },
            machines: vec![],
            ips: None,
        };
        assert_eq!(
            check(&d, &other_org, UID).unwrap_err().reason,
            "AppNameTaken"
        );

        let mut foreign = converged_observation(&d);
        foreign.machines[0]
            .config
            .as_mut()
            .unwrap()
            .metadata
            .insert(metadata::OWNER_UID.into(), "someone".into());
        assert_eq!(check(&d, &foreign, UID).unwrap_err().reason, "AppNotOwned");
    }
}
