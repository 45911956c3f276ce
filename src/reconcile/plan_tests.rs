use std::collections::BTreeMap;

use fly_adapter::client::types::{CheckStatus, IpAssignment, Machine};

use super::*;
use crate::api::MCPDeploymentSpec;
use crate::packages::{Resolved, ResolvedKind};
use crate::reconcile::desired::{Inputs, Settings, desired};

pub(crate) const UID: &str = "uid-1";
pub(crate) const APP_ID: &str = "app_1";

pub(crate) fn settings() -> Settings {
    Settings {
        app_prefix: "mcpfly".into(),
        cluster_name: "test".into(),
        default_org: "acme".into(),
        runtime_image: "registry.example/mcpfly-runtime:1".into(),
        url_template: "https://{app}.fly.dev/mcp".into(),
        npm_registry: "https://npm.internal/".into(),
        pypi_index: "https://pypi.internal/root/".into(),
        tools_policy: Default::default(),
    }
}

pub(crate) fn spec(yaml: &str) -> MCPDeploymentSpec {
    serde_yaml::from_str(yaml).expect("spec parses")
}

pub(crate) const BASE: &str = r#"
source: {npm: {package: "@acme/server", version: "1.2.3"}}
fly: {regions: [iad, ams], machinesPerRegion: 1}
"#;

pub(crate) fn want(yaml: &str, secrets: &[(&str, &str)]) -> DesiredDeployment {
    let spec = spec(yaml);
    let resolved = Resolved {
        kind: ResolvedKind::Npm {
            package: "@acme/server".into(),
            version: "1.2.3".into(),
            args: vec![],
        },
        integrity: None,
    };
    let secrets: BTreeMap<String, String> = secrets
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    desired(
        &Inputs {
            namespace: "team-a",
            name: "github",
            uid: UID,
            spec: &spec,
            resolved: &resolved,
            secrets,
            approved_tools: None,
        },
        &settings(),
    )
}

/// A machine as Fly would report it after running `machine`'s config.
pub(crate) fn running(id: &str, machine: &DesiredMachine, state: &str) -> Machine {
    Machine {
        id: id.into(),
        name: machine.name.clone(),
        region: machine.region.clone(),
        state: state.into(),
        instance_id: format!("v-{id}"),
        config: Some(machine.config.clone()),
        checks: vec![CheckStatus {
            name: "servicecheck-00-http-8080".into(),
            status: "passing".into(),
            ..Default::default()
        }],
        host_status: Some("ok".into()),
        created_at: "2026-01-01T00:00:00Z".into(),
        ..Default::default()
    }
}

pub(crate) fn public_ips() -> Vec<IpAssignment> {
    vec![
        IpAssignment {
            ip: "2a09:8280::1".into(),
            shared: false,
            ..Default::default()
        },
        IpAssignment {
            ip: "66.241.124.1".into(),
            shared: true,
            ..Default::default()
        },
    ]
}

pub(crate) fn converged_observation(d: &DesiredDeployment) -> Observed {
    Observed {
        app: ObservedApp::Present {
            org: "acme".into(),
            id: APP_ID.into(),
        },
        machines: d
            .machines
            .iter()
            .enumerate()
            .map(|(i, m)| running(&format!("m{i}"), m, "started"))
            .collect(),
        ips: Some(public_ips()),
    }
}

pub(crate) fn applied(d: &DesiredDeployment) -> Progress {
    Progress {
        applied_secrets: d.secrets.clone(),
        ..Default::default()
    }
}

pub(crate) fn kinds(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .map(|a| match a {
            Action::CreateApp { .. } => "create-app".to_string(),
            Action::AssignIp { kind, .. } => format!("ip-{}", kind.as_fly()),
            Action::SetSecrets { set, unset } => format!("secrets set={set:?} unset={unset:?}"),
            Action::DestroyMachine { name, reason, .. } => format!("destroy {name} {reason:?}"),
            Action::CreateMachine { machine } => format!("create {}", machine.name),
            Action::UpdateMachine {
                machine,
                skip_launch,
                hold_lease,
                ..
            } => {
                format!(
                    "update {} skip_launch={skip_launch} lease={hold_lease}",
                    machine.name
                )
            }
            Action::StartMachine { name, .. } => format!("start {name}"),
            Action::ReleaseLease { id } => format!("release {id}"),
        })
        .collect()
}

#[test]
fn fresh_deployment_creates_app_ips_secrets_and_every_machine_in_order() {
    let d = want(BASE, &[("GITHUB_TOKEN", "sha256:aa")]);
    let observed = Observed {
        app: ObservedApp::Missing,
        machines: vec![],
        ips: None,
    };
    let plan = plan(&d, &observed, &Progress::default());
    assert_eq!(
        kinds(&plan),
        [
            "create-app",
            "ip-v6",
            "ip-shared_v4",
            r#"secrets set=["GITHUB_TOKEN"] unset=[]"#,
            "create iad-0",
            "create ams-0"
        ]
    );
    assert!(!plan.converged());
    let Action::CreateApp { network, org, .. } = &plan.actions[0] else {
        unreachable!()
    };
    assert_eq!(
        network, &d.app,
        "each app gets a private network of its own by default"
    );
    assert_eq!(org, "acme");
}

#[test]
fn matching_state_needs_nothing() {
    let d = want(BASE, &[("GITHUB_TOKEN", "sha256:aa")]);
    let plan = plan(&d, &converged_observation(&d), &applied(&d));
    assert!(plan.actions.is_empty(), "{:?}", kinds(&plan));
    assert!(plan.converged());
    assert_eq!((plan.ready_machines, plan.desired_machines), (2, 2));
}

#[test]
fn unobserved_ips_are_not_reassigned() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.ips = None;
    assert!(plan(&d, &observed, &applied(&d)).converged());
    observed.ips = Some(vec![]);
    assert_eq!(
        kinds(&plan(&d, &observed, &applied(&d))),
        ["ip-v6", "ip-shared_v4"]
    );
}

/// REALISM.md §7: Fly applies `min_machines_running` in the primary region only and learns it from
/// `PRIMARY_REGION` in the machine env; every machine names the first listed region.
#[test]
fn every_machine_names_the_first_region_as_primary() {
    let d = want(BASE, &[]);
    assert_eq!(d.machines.len(), 2);
    for m in &d.machines {
        assert_eq!(
            m.config.env.get("PRIMARY_REGION").map(String::as_str),
            Some("iad"),
            "{}",
            m.name
        );
    }
}

/// REALISM.md §6: a Flycast address (fc00::/7, Fly's `fdaa:`) or an egress address is not the public v6 the
/// app's hostname needs; the IP request names the org as flyctl does.
#[test]
fn flycast_and_egress_addresses_are_not_a_public_v6() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    let shared_v4 = public_ips().remove(1);
    for private in [
        IpAssignment {
            ip: "fdaa:0:1a2b::3".into(),
            kind: "private_v6".into(),
            ..Default::default()
        },
        IpAssignment {
            ip: "fd00::5".into(),
            ..Default::default()
        },
        IpAssignment {
            ip: "2a09:8280:1::7".into(),
            kind: "egress".into(),
            ..Default::default()
        },
    ] {
        observed.ips = Some(vec![private.clone(), shared_v4.clone()]);
        let p = plan(&d, &observed, &applied(&d));
        assert_eq!(kinds(&p), ["ip-v6"], "{private:?}");
        assert!(
            matches!(&p.actions[0], Action::AssignIp { org, .. } if *org == d.org),
            "{:?}",
            p.actions[0]
        );
    }
}

#[test]
fn env_change_rolls_one_machine_at_a_time_with_a_lease() {
    let old = want(BASE, &[]);
    let new = want(&format!("{BASE}env: {{LOG_LEVEL: debug}}\n"), &[]);
    assert_ne!(old.machines[0].config_hash, new.machines[0].config_hash);
    let observed = converged_observation(&old);
    let plan = plan(&new, &observed, &applied(&new));
    assert_eq!(kinds(&plan), ["update iad-0 skip_launch=false lease=true"]);
    assert_eq!(plan.waiting.len(), 1, "ams-0 waits for its turn");

    // iad-0 updated and still starting: ams-0 must wait (maxUnavailable 1).
    let mut observed = observed;
    observed.machines[0] = running("m0", &new.machines[0], "starting");
    let mut progress = applied(&new);
    progress.leased.insert("m0".into());
    let plan2 = super::plan(&new, &observed, &progress);
    assert!(plan2.actions.is_empty(), "{:?}", kinds(&plan2));

    // iad-0 healthy: its lease is released and ams-0 goes next.
    observed.machines[0] = running("m0", &new.machines[0], "started");
    let plan3 = super::plan(&new, &observed, &progress);
    assert_eq!(
        kinds(&plan3),
        ["release m0", "update ams-0 skip_launch=false lease=true"]
    );
}

#[test]
fn max_unavailable_two_updates_two_after_the_first() {
    let yaml = "source: {npm: {package: a, version: 1.0.0}}\nfly: {regions: [iad], machinesPerRegion: 4}\nrollout: {maxUnavailable: 2}\n";
    let old = want(yaml, &[]);
    let new = want(&format!("{yaml}env: {{A: b}}\n"), &[]);
    let mut observed = converged_observation(&old);
    let first = plan(&new, &observed, &applied(&new));
    assert_eq!(kinds(&first).len(), 1, "the first machine goes alone");
    observed.machines[0] = running("m0", &new.machines[0], "started");
    let second = plan(&new, &observed, &applied(&new));
    assert_eq!(
        kinds(&second),
        [
            "update iad-1 skip_launch=false lease=true",
            "update iad-2 skip_launch=false lease=true"
        ]
    );
}

#[test]
fn immediate_strategy_updates_everything_without_holding_leases() {
    let yaml = format!("{BASE}rollout: {{strategy: immediate}}\n");
    let old = want(&yaml, &[]);
    let new = want(&format!("{yaml}env: {{A: b}}\n"), &[]);
    let plan = plan(&new, &converged_observation(&old), &applied(&new));
    assert_eq!(
        kinds(&plan),
        [
            "update iad-0 skip_launch=false lease=false",
            "update ams-0 skip_launch=false lease=false"
        ]
    );
}

#[test]
fn a_new_credential_value_sets_secrets_once_then_rolls_machines() {
    let old = want(BASE, &[("TOKEN", "sha256:old")]);
    let new = want(BASE, &[("TOKEN", "sha256:new")]);
    assert_ne!(
        old.machines[0].config_hash, new.machines[0].config_hash,
        "secret change must roll machines"
    );
    let plan = plan(&new, &converged_observation(&old), &applied(&old));
    assert_eq!(
        kinds(&plan),
        [
            r#"secrets set=["TOKEN"] unset=[]"#,
            "update iad-0 skip_launch=false lease=true"
        ]
    );
}

#[test]
fn removed_credential_is_unset() {
    let old = want(BASE, &[("A", "sha256:1"), ("B", "sha256:2")]);
    let new = want(BASE, &[("A", "sha256:1")]);
    let plan = plan(&new, &converged_observation(&new), &applied(&old));
    assert_eq!(kinds(&plan), [r#"secrets set=[] unset=["B"]"#]);
}

#[test]
fn adding_and_removing_regions() {
    let two = want(BASE, &[]);
    let with_syd = want(
        r#"
source: {npm: {package: "@acme/server", version: "1.2.3"}}
fly: {regions: [iad, ams, syd], machinesPerRegion: 1}
"#,
        &[],
    );
    let plan_add = plan(&with_syd, &converged_observation(&two), &applied(&two));
    assert_eq!(kinds(&plan_add), ["create syd-0"]);

    let only_iad = want(
        r#"
source: {npm: {package: "@acme/server", version: "1.2.3"}}
fly: {regions: [iad], machinesPerRegion: 1}
"#,
        &[],
    );
    let plan_remove = plan(&only_iad, &converged_observation(&two), &applied(&two));
    assert_eq!(kinds(&plan_remove), ["destroy ams-0 NotDesired"]);
}

#[test]
fn autostop_parked_machines_are_not_drift_but_stopped_ones_without_autostop_are_started() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines[0].state = "suspended".into();
    observed.machines[1].state = "stopped".into();
    assert!(plan(&d, &observed, &applied(&d)).converged());

    let off = want(
        &BASE.replace(
            "machinesPerRegion: 1}",
            "machinesPerRegion: 1, autoStop: \"off\"}",
        ),
        &[],
    );
    let mut observed = converged_observation(&off);
    observed.machines[1].state = "stopped".into();
    assert_eq!(
        kinds(&plan(&off, &observed, &applied(&off))),
        ["start ams-0"]
    );
}

#[test]
fn altered_config_is_restored() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines[1]
        .config
        .as_mut()
        .unwrap()
        .env
        .insert("INJECTED".into(), "1".into());
    let plan = plan(&d, &observed, &applied(&d));
    assert_eq!(kinds(&plan), ["update ams-0 skip_launch=false lease=true"]);
}

#[test]
fn unhealthy_hosts_and_failed_machines_are_replaced() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines[0].host_status = Some("unreachable".into());
    observed.machines[0].config = None;
    observed.machines[1].state = "failed".into();
    let plan = plan(&d, &observed, &applied(&d));
    assert_eq!(
        kinds(&plan),
        [
            "destroy iad-0 HostUnhealthy",
            "create iad-0",
            "destroy ams-0 Broken",
            "create ams-0"
        ]
    );
    let mut observed = converged_observation(&d);
    observed.machines[0].host_status = Some("unknown".into());
    let plan = super::plan(&d, &observed, &applied(&d));
    assert_eq!(
        kinds(&plan),
        ["destroy iad-0 HostUnhealthy", "create iad-0"]
    );
}

#[test]
fn duplicates_after_an_ambiguous_create_are_destroyed_keeping_the_oldest() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    let mut twin = running("m9", &d.machines[0], "started");
    twin.created_at = "2026-01-01T00:00:05Z".into();
    observed.machines.push(twin);
    let plan = plan(&d, &observed, &applied(&d));
    assert_eq!(kinds(&plan), ["destroy iad-0 Duplicate"]);
    let Action::DestroyMachine { id, .. } = &plan.actions[0] else {
        unreachable!()
    };
    assert_eq!(id, "m9");
}

#[test]
fn an_unconfirmed_create_is_looked_for_before_creating_again() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines.remove(1);
    let mut progress = applied(&d);
    progress.unconfirmed_creates.insert("ams-0".into());
    let plan = plan(&d, &observed, &progress);
    assert!(plan.actions.is_empty(), "{:?}", kinds(&plan));
    assert_eq!(plan.waiting.len(), 1);
}

#[test]
fn an_existing_empty_app_proven_ours_gets_ips_and_machines() {
    let d = want(BASE, &[]);
    let observed = Observed {
        app: ObservedApp::Present {
            org: "acme".into(),
            id: APP_ID.into(),
        },
        machines: vec![],
        ips: Some(vec![]),
    };
    let plan = plan(&d, &observed, &Progress::default());
    assert_eq!(
        kinds(&plan),
        ["ip-v6", "ip-shared_v4", "create iad-0", "create ams-0"]
    );
}

#[test]
fn rate_limits_and_session_isolation_reach_the_bridge_and_defaults_add_nothing() {
    let d = want(
        &format!(
            "{BASE}access: {{rateLimit: {{requestsPerMinute: 0, perAddressBurst: 7}}}}\n\
             runtime: {{sessionIsolation: Shared}}\n"
        ),
        &[],
    );
    let cmd = &d.machines[0].config.init.as_ref().unwrap().cmd;
    let bridge_flags: Vec<&str> = cmd
        .iter()
        .skip(6)
        .take_while(|a| *a != "--")
        .map(String::as_str)
        .collect();
    assert_eq!(
        bridge_flags,
        [
            "--rate-per-token",
            "0",
            "--rate-burst",
            "7",
            "--session-isolation",
            "shared"
        ]
    );
    // Every flag the spec can produce is one `mcpfly bridge` accepts.
    let args: Vec<&str> = cmd[2..].iter().map(String::as_str).collect();
    crate::bridge::BridgeArgs::parse_from(&args).expect("the bridge accepts the flags");
    let plain = want(BASE, &[]);
    assert!(
        !plain.machines[0].config.init.as_ref().unwrap().cmd[..7]
            .iter()
            .any(|a| a.starts_with("--rate") || a == "--session-isolation")
    );
}

#[test]
fn machine_config_is_ours_and_never_fly_platform() {
    let d = want(
        &format!("{BASE}env: {{LOG_LEVEL: info}}\n"),
        &[("T", "sha256:1")],
    );
    let config = &d.machines[0].config;
    assert_eq!(
        config.init.as_ref().unwrap().cmd,
        [
            "mcpfly",
            "bridge",
            "--port",
            "8080",
            "--path",
            "/mcp",
            "--",
            "npx",
            "-y",
            "@acme/server@1.2.3"
        ]
    );
    assert_eq!(
        config.env.get("LOG_LEVEL").map(String::as_str),
        Some("info")
    );
    assert!(
        !config.env.contains_key("T"),
        "credentials never appear in machine env"
    );
    assert!(!config.metadata.contains_key("fly_platform_version"));
    assert_eq!(
        config.metadata.get(metadata::OWNER_UID).map(String::as_str),
        Some(UID)
    );
    assert_eq!(config.restart.as_ref().unwrap().policy, "always");
    let service = &config.services[0];
    assert_eq!(service.internal_port, 8080);
    assert_eq!(
        service
            .ports
            .iter()
            .filter_map(|p| p.port)
            .collect::<Vec<_>>(),
        [443, 80]
    );
    assert_eq!(d.url, format!("https://{}.fly.dev/mcp", d.app));
}

#[test]
fn machines_fetch_from_the_registry_the_package_was_checked_against() {
    // npm: a deployment cannot point npx elsewhere (its own npm_config_registry is overridden).
    let d = want(
        &format!("{BASE}env: {{npm_config_registry: \"https://registry.npmjs.org\"}}\n"),
        &[],
    );
    let env = &d.machines[0].config.env;
    assert_eq!(
        env.get("npm_config_registry").map(String::as_str),
        Some("https://npm.internal/")
    );
    assert!(!env.contains_key("UV_DEFAULT_INDEX"));

    // PyPI: uv's default index is the index's simple API.
    let spec = spec(
        "source: {pypi: {package: mcp-server-time, version: \"1.0.0\"}}\nfly: {regions: [iad]}\n",
    );
    let resolved = Resolved {
        kind: ResolvedKind::Pypi {
            package: "mcp-server-time".into(),
            version: "1.0.0".into(),
            command: "mcp-server-time".into(),
            args: vec![],
        },
        integrity: None,
    };
    let inputs = Inputs {
        namespace: "team-a",
        name: "time",
        uid: UID,
        spec: &spec,
        resolved: &resolved,
        secrets: BTreeMap::new(),
        approved_tools: None,
    };
    let env = &desired(&inputs, &settings()).machines[0].config.env;
    assert_eq!(
        env.get("UV_DEFAULT_INDEX").map(String::as_str),
        Some("https://pypi.internal/root/simple")
    );
    assert!(!env.contains_key("npm_config_registry"));
}

#[test]
fn machines_get_the_pinned_integrity_to_verify_before_running() {
    let spec = spec(BASE);
    let desired_env = |kind: ResolvedKind, integrity: Option<&str>| {
        let resolved = Resolved {
            kind,
            integrity: integrity.map(str::to_string),
        };
        let inputs = Inputs {
            namespace: "team-a",
            name: "github",
            uid: UID,
            spec: &spec,
            resolved: &resolved,
            secrets: BTreeMap::new(),
            approved_tools: None,
        };
        desired(&inputs, &settings()).machines[0].config.env.clone()
    };
    let npm = ResolvedKind::Npm {
        package: "@acme/server".into(),
        version: "1.2.3".into(),
        args: vec![],
    };
    let sha512 = format!("sha512-{}==", "A".repeat(86));
    let env = desired_env(npm.clone(), Some(&sha512));
    assert_eq!(
        env.get("MCPFLY_ARTIFACT_INTEGRITY"),
        Some(&sha512),
        "the bridge reads the pin from here"
    );
    let sha256 = format!("sha256:{}", "ab".repeat(32));
    let pypi = ResolvedKind::Pypi {
        package: "mcp-server-time".into(),
        version: "1.0.0".into(),
        command: "mcp-server-time".into(),
        args: vec![],
    };
    assert_eq!(
        desired_env(pypi, Some(&sha256)).get("MCPFLY_ARTIFACT_INTEGRITY"),
        Some(&sha256)
    );
    // Nothing to verify against: no pin rather than one that refuses every start.
    assert!(!desired_env(npm.clone(), None).contains_key("MCPFLY_ARTIFACT_INTEGRITY"));
    assert!(
        !desired_env(npm, Some("sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk="))
            .contains_key("MCPFLY_ARTIFACT_INTEGRITY")
    );
}

/// REALISM.md §2: Fly reports no check result before a check's first run, so a started machine with an empty (or
/// short) `checks` list is not serving yet; a rolling update must not count it.
#[test]
fn a_started_machine_without_check_results_is_not_ready() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines[0].checks.clear();
    let plan = plan(&d, &observed, &applied(&d));
    assert_eq!(plan.ready_machines, 1, "{plan:?}");
    assert!(!plan.converged());
    assert!(
        plan.waiting
            .iter()
            .any(|w| w.contains("waiting for the first check results")),
        "{:?}",
        plan.waiting
    );
}

/// REALISM.md §2: Fly's fake `bg_deployments_compat` check neither makes a machine healthy nor unhealthy.
#[test]
fn compat_checks_do_not_count() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    let compat = |status: &str| CheckStatus {
        name: "bg_deployments_compat".into(),
        status: status.into(),
        ..Default::default()
    };
    // Only the compat check reported: not healthy yet.
    observed.machines[0].checks = vec![compat("passing")];
    // A failing compat check next to a passing real one: healthy.
    observed.machines[1].checks.push(compat("critical"));
    let plan = plan(&d, &observed, &applied(&d));
    assert_eq!(plan.ready_machines, 1, "{plan:?}");
    assert!(
        plan.waiting.iter().any(|w| w.starts_with("iad-0")),
        "{:?}",
        plan.waiting
    );
}

/// REALISM.md §2: a machine sits in `created` while Fly pulls its image and refuses a start meanwhile: wait.
#[test]
fn a_created_machine_is_waited_on_not_started() {
    let d = want(BASE, &[]);
    let mut observed = converged_observation(&d);
    observed.machines[0].state = "created".into();
    observed.machines[0].checks.clear();
    let plan = plan(&d, &observed, &applied(&d));
    assert!(plan.actions.is_empty(), "{:?}", kinds(&plan));
    assert!(
        plan.waiting.iter().any(|w| w.starts_with("iad-0: created")),
        "{:?}",
        plan.waiting
    );
}

/// Tool policy reaches the bridge in the machine env only when `spec.tools` (or `block`) asks for something, so a
/// deployment without it keeps its config (no rollout on upgrade); `block` carries the approved digests.
#[test]
fn tools_policy_reaches_the_bridge_only_when_asked_for() {
    use crate::bridge::tools_policy::{POLICY_ENV, ToolsPolicy};
    let env_for = |tools: &str, approved: Option<&crate::api::ToolSet>| {
        let spec = spec(&format!(
            "{{source: {{npm: {{package: p, version: 1.0.0}}}}, fly: {{regions: [iad]}}, tools: {tools}}}"
        ));
        let resolved = Resolved {
            kind: ResolvedKind::Npm {
                package: "p".into(),
                version: "1.0.0".into(),
                args: vec![],
            },
            integrity: None,
        };
        let inputs = Inputs {
            namespace: "team-a",
            name: "p",
            uid: UID,
            spec: &spec,
            resolved: &resolved,
            secrets: BTreeMap::new(),
            approved_tools: approved,
        };
        desired(&inputs, &settings()).machines[0]
            .config
            .env
            .get(POLICY_ENV)
            .map(|v| ToolsPolicy::parse(v).unwrap())
    };
    assert_eq!(env_for("{}", None), None);
    assert_eq!(
        env_for("{pinned: \"sha256:x\"}", None),
        None,
        "warn needs nothing in the bridge"
    );
    let set = crate::bridge::tools_policy::tool_set(&[
        serde_json::json!({"name": "echo", "inputSchema": {}}),
    ]);
    let block = env_for("{policy: block}", Some(&set)).unwrap();
    assert_eq!(
        block.approved.unwrap().get("echo"),
        Some(&set.tools[0].digest)
    );
    assert_eq!(
        env_for("{policy: block}", None).unwrap().approved,
        Some(Default::default())
    );
    assert_eq!(
        env_for("{deny: [\"x*\"]}", None).unwrap().deny,
        vec!["x*".to_string()]
    );
}
