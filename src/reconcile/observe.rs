//! Observation: what Fly has for one deployment, in as few calls as the API allows.

use fly_adapter::client::FlyClient;
use fly_adapter::client::FlyError;
use fly_adapter::client::types::ListMachinesQuery;

use super::plan::{Observed, ObservedApp};

/// What this process already knows about an app, which spares calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKnown {
    /// Nothing: the app GET says whether it exists and whose it is.
    Nothing,
    /// Seen in our org: its owner needs no second look, the machine listing alone answers (404 when the app is
    /// gone).
    InOurOrg,
    /// Created by this process and nothing done in it since: once it is visible (Fly's lag, REALISM.md §1) it
    /// holds no machines and no IPs, so they are not listed.
    CreatedEmpty,
}

/// `with_ips`: IPs are listed only until they are confirmed for the generation; afterwards nothing removes
/// them but a person, and listing them on every look would spend the rate budget on looking.
pub async fn observe(
    fly: &FlyClient,
    app: &str,
    with_ips: bool,
    known: AppKnown,
) -> Result<Observed, FlyError> {
    let missing = || Observed {
        app: ObservedApp::Missing,
        machines: Vec::new(),
        ips: None,
    };
    let app_state = if known == AppKnown::InOurOrg {
        ObservedApp::Present {
            org: String::new(),
            id: String::new(),
        }
    } else {
        match fly.get_app(app).await {
            Ok(found) => ObservedApp::Present {
                org: found.organization.map(|o| o.slug).unwrap_or_default(),
                id: found.id,
            },
            Err(FlyError::NotFound { .. }) => ObservedApp::Missing,
            Err(FlyError::OwnedByOtherOrg { .. }) => ObservedApp::OwnedByOtherOrg,
            Err(e) => return Err(e),
        }
    };
    if !matches!(app_state, ObservedApp::Present { .. }) {
        return Ok(Observed {
            app: app_state,
            machines: Vec::new(),
            ips: None,
        });
    }
    if known == AppKnown::CreatedEmpty {
        return Ok(Observed {
            app: app_state,
            machines: Vec::new(),
            ips: with_ips.then(Vec::new),
        });
    }
    let machines = match fly.list_machines(app, &ListMachinesQuery::default()).await {
        Ok(machines) => machines,
        Err(FlyError::NotFound { .. }) if known == AppKnown::InOurOrg => return Ok(missing()),
        Err(e) => return Err(e),
    };
    let ips = if with_ips {
        Some(fly.list_ips(app).await?)
    } else {
        None
    };
    Ok(Observed {
        app: app_state,
        machines,
        ips,
    })
}
