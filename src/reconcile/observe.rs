//! Observation: what Fly has for one deployment, in as few calls as the API allows.

use fly_adapter::client::FlyClient;
use fly_adapter::client::FlyError;
use fly_adapter::client::types::ListMachinesQuery;

use super::plan::{Observed, ObservedApp};

/// `with_ips`: IPs are listed only until they are confirmed for the generation; afterwards nothing removes
/// them but a person, and listing them on every look would spend the rate budget on looking.
/// `app_known`: this process already saw the app in our org, so its owner needs no second look: the machine
/// listing alone answers (404 when the app is gone).
pub async fn observe(
    fly: &FlyClient,
    app: &str,
    with_ips: bool,
    app_known: bool,
) -> Result<Observed, FlyError> {
    let missing = || Observed {
        app: ObservedApp::Missing,
        machines: Vec::new(),
        ips: None,
    };
    let app_state = if app_known {
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
    let machines = match fly.list_machines(app, &ListMachinesQuery::default()).await {
        Ok(machines) => machines,
        Err(FlyError::NotFound { .. }) if app_known => return Ok(missing()),
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
