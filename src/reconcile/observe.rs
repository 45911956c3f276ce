//! Observation: what Fly has for one deployment, in as few calls as the API allows.

use fly_adapter::client::FlyClient;
use fly_adapter::client::FlyError;
use fly_adapter::client::types::ListMachinesQuery;

use super::plan::{Observed, ObservedApp};

/// `with_ips`: IPs are listed only until the deployment has been Ready once for its generation; afterwards
/// nothing removes them but a person, and listing them on every resync would spend the rate budget on looking.
pub async fn observe(fly: &FlyClient, app: &str, with_ips: bool) -> Result<Observed, FlyError> {
    let app_state = match fly.get_app(app).await {
        Ok(found) => ObservedApp::Present {
            org: found.organization.map(|o| o.slug).unwrap_or_default(),
        },
        Err(FlyError::NotFound { .. }) => ObservedApp::Missing,
        Err(FlyError::OwnedByOtherOrg { .. }) => ObservedApp::OwnedByOtherOrg,
        Err(e) => return Err(e),
    };
    if !matches!(app_state, ObservedApp::Present { .. }) {
        return Ok(Observed {
            app: app_state,
            machines: Vec::new(),
            ips: None,
        });
    }
    let machines = fly
        .list_machines(app, &ListMachinesQuery::default())
        .await?;
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
