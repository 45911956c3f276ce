//! The controller's own admission: what a resource may ask for beyond what its namespace's RBAC grants, checked
//! before any Fly call. Pure.

use crate::api::{Auth, MCPDeploymentSpec, OPEN_ENDPOINT_ANNOTATION, reason};

use super::plan::Blocked;

/// Controller-level allowlists (flags `--allowed-orgs`, `--allowed-networks`, `--allowed-app-prefixes`).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The controller's org, always allowed.
    pub default_org: String,
    /// Further orgs `spec.fly.org` may name.
    pub allowed_orgs: Vec<String>,
    /// Shared private networks `spec.fly.network` may name; none by default.
    pub allowed_networks: Vec<String>,
    /// A name chosen in `spec.fly.app` must start with one of these (`{namespace}` is the resource's
    /// namespace); empty: any name.
    pub allowed_app_prefixes: Vec<String>,
}

/// What the resource says beyond its spec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Acknowledgements {
    /// The open-endpoint annotation is `"true"`.
    pub open_endpoint: bool,
}

pub fn admit(
    spec: &MCPDeploymentSpec,
    namespace: &str,
    acknowledged: Acknowledgements,
    policy: &Policy,
) -> Result<(), Blocked> {
    let set = |field: &Option<String>| field.clone().filter(|v| !v.is_empty());
    if let Some(org) = set(&spec.fly.org)
        && org != policy.default_org
        && !policy.allowed_orgs.contains(&org)
    {
        return Err(Blocked {
            reason: reason::ORG_NOT_ALLOWED,
            message: format!(
                "spec.fly.org {org} is not allowed by this controller (allowed: {}); remove spec.fly.org to use \
                 {}, or ask the controller's operator to add {org} to --allowed-orgs",
                listing(std::iter::once(&policy.default_org).chain(&policy.allowed_orgs)),
                policy.default_org
            ),
        });
    }
    if let Some(network) = set(&spec.fly.network)
        && !policy.allowed_networks.contains(&network)
    {
        return Err(Blocked {
            reason: reason::NETWORK_NOT_ALLOWED,
            message: format!(
                "spec.fly.network {network} is not a shared network this controller allows (allowed: {}); remove \
                 spec.fly.network to give the app a private network of its own, or ask the controller's \
                 operator to add {network} to --allowed-networks",
                listing(&policy.allowed_networks)
            ),
        });
    }
    if let Some(app) = set(&spec.fly.app) {
        let prefixes: Vec<String> = policy
            .allowed_app_prefixes
            .iter()
            .map(|p| p.replace("{namespace}", namespace))
            .collect();
        if !prefixes.is_empty() && !prefixes.iter().any(|p| app.starts_with(p.as_str())) {
            return Err(Blocked {
                reason: reason::APP_NAME_NOT_ALLOWED,
                message: format!(
                    "spec.fly.app {app} does not start with a prefix this controller allows in namespace \
                     {namespace} ({}); choose a name with one of them, or remove spec.fly.app to have one derived",
                    listing(&prefixes)
                ),
            });
        }
    }
    if spec.access.auth == Auth::None && !spec.credentials.is_empty() && !acknowledged.open_endpoint
    {
        return Err(Blocked {
            reason: reason::OPEN_ENDPOINT_NOT_ACKNOWLEDGED,
            message: format!(
                "access.auth is none and the server gets {} credential(s): anyone who knows the URL could use \
                 them through its tools. Set access.auth: bearer, or annotate the resource \
                 {OPEN_ENDPOINT_ANNOTATION}=\"true\" to accept that",
                spec.credentials.len()
            ),
        });
    }
    Ok(())
}

fn listing<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<&str> = items.into_iter().map(String::as_str).collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fly: &str, extra: &str) -> MCPDeploymentSpec {
        serde_yaml::from_str(&format!(
            "source: {{npm: {{package: \"@acme/server\", version: \"1.2.3\"}}}}\nfly: {{regions: [iad]{fly}}}\n{extra}"
        ))
        .unwrap()
    }

    fn policy() -> Policy {
        Policy {
            default_org: "acme".into(),
            allowed_orgs: vec!["acme-labs".into()],
            allowed_networks: vec!["shared-tools".into()],
            allowed_app_prefixes: vec!["{namespace}-".into()],
        }
    }

    fn reason_of(fly: &str, extra: &str, ack: Acknowledgements) -> Option<&'static str> {
        admit(&spec(fly, extra), "team-a", ack, &policy())
            .err()
            .map(|b| b.reason)
    }

    #[test]
    fn orgs_networks_and_app_names_outside_the_allowlists_are_refused() {
        let none = Acknowledgements::default();
        assert_eq!(reason_of("", "", none), None);
        assert_eq!(reason_of(", org: acme", "", none), None);
        assert_eq!(reason_of(", org: acme-labs", "", none), None);
        assert_eq!(reason_of(", org: victim", "", none), Some("OrgNotAllowed"));
        assert_eq!(reason_of(", network: shared-tools", "", none), None);
        assert_eq!(
            reason_of(", network: team-b-net", "", none),
            Some("NetworkNotAllowed")
        );
        assert_eq!(reason_of(", app: team-a-github", "", none), None);
        assert_eq!(
            reason_of(", app: team-b-github", "", none),
            Some("AppNameNotAllowed")
        );
        // By default no shared network at all.
        let strict = Policy {
            default_org: "acme".into(),
            ..Default::default()
        };
        let blocked = admit(
            &spec(", network: shared-tools", ""),
            "team-a",
            none,
            &strict,
        )
        .unwrap_err();
        assert!(
            blocked.message.contains("allowed: none"),
            "{}",
            blocked.message
        );
        assert!(admit(&spec(", app: anything", ""), "team-a", none, &strict).is_ok());
    }

    #[test]
    fn an_open_endpoint_with_credentials_needs_an_acknowledgement() {
        let open = "access: {auth: none}\ncredentials: [{name: T, sealed: abc}]\n";
        let blocked = admit(
            &spec("", open),
            "team-a",
            Acknowledgements::default(),
            &policy(),
        )
        .unwrap_err();
        assert_eq!(blocked.reason, "OpenEndpointNotAcknowledged");
        assert!(blocked.message.contains(OPEN_ENDPOINT_ANNOTATION));
        let ack = Acknowledgements {
            open_endpoint: true,
        };
        assert!(admit(&spec("", open), "team-a", ack, &policy()).is_ok());
        // Open without credentials, or bearer with them: nothing to acknowledge.
        assert_eq!(
            reason_of("", "access: {auth: none}\n", Acknowledgements::default()),
            None
        );
        assert_eq!(
            reason_of(
                "",
                "credentials: [{name: T, sealed: abc}]\n",
                Acknowledgements::default()
            ),
            None
        );
    }
}
