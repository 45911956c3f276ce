//! Ownership and tenant isolation on the real control plane and the Fly emulator (issue 15): nothing on Fly or
//! in Kubernetes is adopted, changed or deleted unless it is provably this resource's, and a manifest cannot
//! reach beyond what its namespace grants.

use std::time::Duration;

use fly_adapter::client::types::{CreateAppRequest, CreateMachineRequest, MachineConfig};
use fly_emulator::DEFAULT_ORG;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mcpfly::api::{ADOPT_ANNOTATION, ALLOW_REFERENCE_LABEL, MCPDeployment, reason};
use mcpfly::local_cluster::stack::{Stack, StackOptions};
use mcpfly::local_cluster::{ControlPlane, ControlPlaneOptions};

mod controller_support;
use controller_support::{READY, app_of, fly_client, mutations};

/// A deployment with its `metadata` and `fly` given as YAML flow mappings' insides.
fn deployment(name: &str, metadata: &str, fly: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mcpfly.dev/v1alpha1
kind: MCPDeployment
metadata: {{name: {name}{metadata}}}
spec:
  source: {{npm: {{package: "@acme/server", version: "1.2.3"}}}}
  fly: {{regions: [iad], machinesPerRegion: 1{fly}}}
{extra}"#
    )
}

/// An app in our org made by someone else, optionally running a machine named `web` without mcpfly metadata.
async fn foreign_app(stack: &Stack, name: &str, with_machine: bool) -> anyhow::Result<()> {
    let fly = fly_client(stack);
    fly.create_app(&CreateAppRequest {
        name: name.into(),
        org_slug: DEFAULT_ORG.into(),
        network: None,
        enable_subdomains: None,
    })
    .await?;
    if with_machine {
        fly.create_machine(
            name,
            &CreateMachineRequest {
                name: Some("web".into()),
                region: Some("iad".into()),
                config: MachineConfig {
                    image: "someone/else:1".into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(())
}

/// Mutating Fly calls about `app` in the emulator's log.
fn touched(stack: &Stack, app: &str) -> Vec<String> {
    mutations(&stack.emulator.event_log())
        .into_iter()
        .filter(|e| e.app.as_deref() == Some(app))
        .map(|e| format!("{} {}", e.method, e.path))
        .collect()
}

/// Fly calls of any kind about `app`: the controller looked (a positive control for "it changed nothing").
fn looked_at(stack: &Stack, app: &str) -> usize {
    stack
        .emulator
        .event_log()
        .iter()
        .filter(|e| e.app.as_deref() == Some(app))
        .count()
}

#[tokio::test]
async fn a_foreign_app_is_never_adopted_changed_or_deleted() -> anyhow::Result<()> {
    let stack = Stack::start("own-foreign", StackOptions::default()).await?;
    foreign_app(&stack, "their-tools", true).await?;
    foreign_app(&stack, "their-empty", false).await?;
    stack.emulator.reset_counters();

    for (name, app) in [("busy", "their-tools"), ("empty", "their-empty")] {
        stack
            .apply(&deployment(name, "", &format!(", app: {app}"), ""))
            .await?;
        let stalled = stack.wait_stalled(name, READY).await?;
        assert_eq!(stalled.reason, reason::APP_NOT_OWNED, "{app}");
        assert!(
            stalled
                .message
                .contains(&format!("{ADOPT_ANNOTATION}={app}")),
            "says how to adopt deliberately: {}",
            stalled.message
        );
        assert!(looked_at(&stack, app) > 0, "the controller looked at {app}");
        assert_eq!(touched(&stack, app), Vec::<String>::new(), "{app} changed");
    }

    // Deleting the resources releases their finalizers and nothing else.
    for name in ["busy", "empty"] {
        stack.delete(name).await?;
        stack.wait_gone(name, READY).await?;
    }
    let inventory = stack.emulator.inventory();
    let tools = inventory
        .app("their-tools")
        .expect("the foreign app survives");
    assert!(!tools.deleting);
    assert_eq!(tools.machines.len(), 1);
    assert!(!tools.machines[0].gone, "its machine survives");
    assert!(inventory.app("their-empty").is_some_and(|a| !a.deleting));
    for app in ["their-tools", "their-empty"] {
        assert_eq!(touched(&stack, app), Vec::<String>::new(), "{app} changed");
    }
    Ok(())
}

#[tokio::test]
async fn the_adoption_annotation_takes_an_app_but_never_its_foreign_machines() -> anyhow::Result<()>
{
    let stack = Stack::start("own-adopt", StackOptions::default()).await?;
    foreign_app(&stack, "legacy-tools", true).await?;
    let id = fly_client(&stack).get_app("legacy-tools").await?.id;
    stack
        .apply(&deployment(
            "legacy",
            &format!(", annotations: {{{ADOPT_ANNOTATION}: legacy-tools}}"),
            ", app: legacy-tools",
            "",
        ))
        .await?;
    let ready = stack.wait_ready("legacy", READY).await?;
    let status = ready.status.unwrap();
    assert_eq!(status.app_id.as_deref(), Some(id.as_str()), "recorded");
    let app = stack
        .emulator
        .inventory()
        .app("legacy-tools")
        .cloned()
        .unwrap();
    let web = app.machines.iter().find(|m| m.name == "web").unwrap();
    assert!(!web.gone, "the machine mcpfly did not create still runs");
    assert!(app.machines.iter().any(|m| m.name == "iad-0" && !m.gone));

    // Deleting the app would destroy `web`: only our machine goes.
    stack.delete("legacy").await?;
    stack.wait_gone("legacy", READY).await?;
    let deadline = std::time::Instant::now() + READY;
    loop {
        let app = stack
            .emulator
            .inventory()
            .app("legacy-tools")
            .cloned()
            .unwrap();
        assert!(
            !app.deleting,
            "the adopted app with a foreign machine stays"
        );
        assert!(app.machines.iter().any(|m| m.name == "web" && !m.gone));
        if app.machines.iter().all(|m| m.name == "web" || m.gone) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ours not destroyed: {app:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// REALISM.md §1 across a restart: the controller created an app (its id is in status) and restarted before Fly
/// showed it, so its client no longer remembers the create, and Fly's lag answers 404, then 401. That 401 is not
/// another org's app: the resource waits for it and becomes Ready instead of stalling as `AppNameTaken`.
#[tokio::test]
async fn our_own_app_answering_401_after_a_restart_is_waited_for() -> anyhow::Result<()> {
    let lagging = LaggingApp::created_before_a_restart("own-restart").await?;
    let stack = &lagging.stack;
    stack.apply(&lagging.manifest("")).await?;

    let ready = stack.wait_ready("lagging", READY + LaggingApp::LAG).await?;
    assert_eq!(
        ready.status.unwrap().app_id.as_deref(),
        Some(lagging.id.as_str())
    );
    // Positive control: the controller did meet the lag's 401 for this app.
    let answers = lagging.answers_to("apps.get");
    assert!(answers.contains(&401), "looks at the app: {answers:?}");
    Ok(())
}

/// The same restart, then the resource is deleted before Fly shows the app: the lag's 404 and 401 do not make the
/// controller conclude "gone" or "someone else's" and leave our app behind; it waits and deletes it.
#[tokio::test]
async fn our_own_app_deleted_within_the_lag_after_a_restart_is_still_deleted() -> anyhow::Result<()>
{
    let lagging = LaggingApp::created_before_a_restart("own-restart-delete").await?;
    let stack = &lagging.stack;
    stack.delete("lagging").await?;
    stack.wait_gone("lagging", READY + LaggingApp::LAG).await?;
    let answers = lagging.answers_to("apps.get");
    assert!(
        answers.iter().any(|status| matches!(status, 401 | 404)),
        "the deletion met the lag: {answers:?}"
    );
    // Deletion is asynchronous on Fly: a look that still finds the app asks again.
    let deletes = lagging.answers_to("apps.delete");
    assert!(
        !deletes.is_empty() && deletes.iter().all(|status| *status == 202),
        "our app was deleted: {deletes:?}"
    );
    Ok(())
}

/// A suspended resource whose app an earlier controller process created moments ago: the create went through
/// another client (which the running controller's does not share) and is recorded in status as the controller
/// records it. Fly's lag is `LAG`.
struct LaggingApp {
    stack: Stack,
    app: String,
    id: String,
}

impl LaggingApp {
    const LAG: Duration = Duration::from_secs(6);

    async fn created_before_a_restart(namespace: &str) -> anyhow::Result<Self> {
        let mut emulator = fly_emulator::EmulatorConfig::default();
        emulator.realism.app_visibility_lag = Self::LAG;
        let stack = Stack::start(
            namespace,
            StackOptions {
                emulator,
                ..Default::default()
            },
        )
        .await?;
        let app = format!("{namespace}-lagging");
        let lagging = LaggingApp {
            stack,
            app,
            id: String::new(),
        };
        lagging
            .stack
            .apply(&lagging.manifest("  suspend: true"))
            .await?;
        lagging
            .stack
            .wait_for("lagging", READY, "Suspended", |d| {
                d.status.as_ref().and_then(|s| s.phase) == Some(mcpfly::api::Phase::Suspended)
            })
            .await?;
        let created = fly_client(&lagging.stack)
            .send_app_create(&CreateAppRequest {
                name: lagging.app.clone(),
                org_slug: DEFAULT_ORG.into(),
                network: Some(lagging.app.clone()),
                enable_subdomains: None,
            })
            .await?;
        let status = serde_json::json!({"status": {"app": lagging.app, "appId": created.id}});
        lagging
            .stack
            .deployments()
            .await?
            .patch_status("lagging", &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(LaggingApp {
            id: created.id,
            ..lagging
        })
    }

    /// The resource, with `extra` in its spec.
    fn manifest(&self, extra: &str) -> String {
        deployment("lagging", "", &format!(", app: {}", self.app), extra)
    }

    /// Fly's answers to the controller's `label` calls about the app.
    fn answers_to(&self, label: &str) -> Vec<u16> {
        self.stack
            .emulator
            .event_log()
            .iter()
            .filter(|e| e.label == label && e.app.as_deref() == Some(self.app.as_str()))
            .map(|e| e.status)
            .collect()
    }
}

#[tokio::test]
async fn our_create_is_recorded_and_proves_the_app_ours_at_deletion() -> anyhow::Result<()> {
    let stack = Stack::start("own-create", StackOptions::default()).await?;
    stack
        .apply(&deployment("mine", "", ", app: own-create-mine", ""))
        .await?;
    let ready = stack.wait_ready("mine", READY).await?;
    let id = fly_client(&stack).get_app("own-create-mine").await?.id;
    assert_eq!(ready.status.unwrap().app_id.as_deref(), Some(id.as_str()));
    stack.delete("mine").await?;
    stack.wait_gone("mine", READY).await?;
    assert!(
        stack
            .emulator
            .inventory()
            .app("own-create-mine")
            .is_none_or(|a| a.deleting),
        "our own app is deleted"
    );
    Ok(())
}

#[tokio::test]
async fn two_clusters_sharing_one_org_never_touch_each_others_apps() -> anyhow::Result<()> {
    // Two real clusters, each with the default cluster identity (its kube-system UID), syncing one manifest
    // into one Fly org.
    let ns = "own-twins";
    let first = Stack::start(
        ns,
        StackOptions {
            cluster_name: None,
            ..Default::default()
        },
    )
    .await?;
    let other_cluster: &'static ControlPlane = Box::leak(Box::new(
        ControlPlane::start(ControlPlaneOptions::default()).await?,
    ));
    let second = Stack::start(
        ns,
        StackOptions {
            cluster_name: None,
            control_plane: Some(other_cluster),
            fly_api_base_url: Some(first.emulator.base_url()),
            ..Default::default()
        },
    )
    .await?;
    let manifest = deployment("server", "", "", "");
    first.apply(&manifest).await?;
    let ours = app_of(&first.wait_ready("server", READY).await?);
    first
        .apply(&deployment("pinned", "", ", app: own-twins-pinned", ""))
        .await?;
    first.wait_ready("pinned", READY).await?;
    let before = first.emulator.inventory();

    second.apply(&manifest).await?;
    let theirs = app_of(&second.wait_ready("server", READY).await?);
    assert_ne!(ours, theirs, "derived names differ per cluster");
    second
        .apply(&deployment("pinned", "", ", app: own-twins-pinned", ""))
        .await?;
    assert_eq!(
        second.wait_stalled("pinned", READY).await?.reason,
        reason::APP_NOT_OWNED
    );
    for name in ["server", "pinned"] {
        second.delete(name).await?;
        second.wait_gone(name, READY).await?;
    }
    let after = first.emulator.inventory();
    assert!(
        after.app(&theirs).is_none_or(|a| a.deleting),
        "its own app is gone"
    );
    for app in [ours.as_str(), "own-twins-pinned"] {
        let (was, is) = (before.app(app).unwrap(), after.app(app).unwrap());
        assert!(!is.deleting, "{app} survives the other cluster's deletion");
        let ids = |a: &fly_emulator::InventoryApp| {
            a.machines
                .iter()
                .filter(|m| !m.gone)
                .map(|m| (m.id.clone(), m.instance_id.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(was), ids(is), "{app}'s machines are untouched");
    }
    Ok(())
}

#[tokio::test]
async fn the_connection_secret_is_written_only_when_absent_or_ours() -> anyhow::Result<()> {
    let stack = Stack::start("own-conn", StackOptions::default()).await?;
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    let theirs: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "app-config", "namespace": "own-conn"},
        "stringData": {"token": "someone-elses-canary", "url": "https://elsewhere"},
    }))?;
    let theirs = secrets
        .patch(
            "app-config",
            &PatchParams::apply("someone").force(),
            &Patch::Apply(&theirs),
        )
        .await?;
    stack.emulator.reset_counters();
    stack
        .apply(&deployment(
            "thief",
            "",
            "",
            "  access: {connectionSecret: app-config}\n",
        ))
        .await?;
    let stalled = stack.wait_stalled("thief", READY).await?;
    assert_eq!(stalled.reason, reason::CONNECTION_SECRET_NOT_OWNED);
    let now = secrets.get("app-config").await?;
    assert_eq!(
        now.metadata.resource_version, theirs.metadata.resource_version,
        "neither written nor owned"
    );
    assert!(now.metadata.owner_references.is_none());
    let about_apps: Vec<_> = stack
        .emulator
        .event_log()
        .into_iter()
        .filter(|e| e.app.is_some())
        .collect();
    assert!(
        about_apps.is_empty(),
        "its token went nowhere near Fly: {about_apps:?}"
    );

    // Two resources naming one Secret: the first owns it, the second stalls and never writes it.
    stack
        .apply(&deployment(
            "first",
            "",
            "",
            "  access: {connectionSecret: shared-conn}\n",
        ))
        .await?;
    stack.wait_ready("first", READY).await?;
    let owned = secrets.get("shared-conn").await?;
    stack
        .apply(&deployment(
            "second",
            "",
            "",
            "  access: {connectionSecret: shared-conn}\n",
        ))
        .await?;
    assert_eq!(
        stack.wait_stalled("second", READY).await?.reason,
        reason::CONNECTION_SECRET_NOT_OWNED
    );
    // A write loop would show within a few reconciles of the second resource (requeued by every change).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = secrets.get("shared-conn").await?;
    assert_eq!(
        later.metadata.resource_version,
        owned.metadata.resource_version
    );
    Ok(())
}

#[tokio::test]
async fn a_secret_that_did_not_opt_in_is_never_read() -> anyhow::Result<()> {
    let stack = Stack::start("own-optin", StackOptions::default()).await?;
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    let db = |labels: serde_json::Value| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db", "namespace": "own-optin", "labels": labels},
            "stringData": {"password": "db-canary"},
        }))?)
    };
    let pp = PatchParams::apply("owner").force();
    secrets
        .patch("db", &pp, &Patch::Apply(&db(serde_json::json!({}))?))
        .await?;
    stack.emulator.reset_counters();
    let steal = "  credentials: [{name: DB_PASSWORD, secretKeyRef: {name: db, key: password}}]\n";
    stack.apply(&deployment("steal", "", "", steal)).await?;
    let stalled = stack.wait_stalled("steal", READY).await?;
    assert_eq!(stalled.reason, reason::CREDENTIAL_SECRET_NOT_OPTED_IN);
    assert!(
        stalled
            .message
            .contains(&format!("{ALLOW_REFERENCE_LABEL}=true")),
        "says how to opt in: {}",
        stalled.message
    );
    assert!(
        stack.emulator.event_log().iter().all(|e| e.app.is_none()),
        "nothing asked of Fly"
    );

    // The Secret's owner opts in: the same resource proceeds.
    secrets
        .patch(
            "db",
            &pp,
            &Patch::Apply(&db(serde_json::json!({ALLOW_REFERENCE_LABEL: "true"}))?),
        )
        .await?;
    stack.wait_ready("steal", READY).await?;
    Ok(())
}

#[tokio::test]
async fn controller_allowlists_stall_before_any_fly_call() -> anyhow::Result<()> {
    let stack = Stack::start(
        "own-policy",
        StackOptions {
            allowed_app_prefixes: vec!["{namespace}-".into()],
            ..Default::default()
        },
    )
    .await?;
    stack.emulator.reset_counters();
    let cases = [
        ("org", ", org: victim-org", "", reason::ORG_NOT_ALLOWED),
        (
            "network",
            ", network: team-b-net",
            "",
            reason::NETWORK_NOT_ALLOWED,
        ),
        (
            "squat",
            ", app: team-b-github",
            "",
            reason::APP_NAME_NOT_ALLOWED,
        ),
        (
            "open",
            "",
            "  access: {auth: none}\n  credentials: [{name: T, sealed: gAAAAABaaaa}]\n",
            reason::OPEN_ENDPOINT_NOT_ACKNOWLEDGED,
        ),
    ];
    for (name, fly, extra, _) in &cases {
        stack.apply(&deployment(name, "", fly, extra)).await?;
    }
    // A positive control in the same window: an allowed name goes all the way.
    stack
        .apply(&deployment("fine", "", ", app: own-policy-fine", ""))
        .await?;
    stack.wait_ready("fine", READY).await?;
    for (name, _, _, expected) in &cases {
        let stalled = stack.wait_stalled(name, READY).await?;
        assert_eq!(&stalled.reason, expected, "{name}");
        let d: MCPDeployment = stack.deployments().await?.get(name).await?;
        assert!(
            d.status.and_then(|s| s.app).is_none(),
            "{name}: no app recorded"
        );
    }
    let elsewhere: Vec<_> = stack
        .emulator
        .event_log()
        .into_iter()
        .filter(|e| e.app.as_deref().is_some_and(|a| a != "own-policy-fine"))
        .collect();
    assert!(elsewhere.is_empty(), "{elsewhere:?}");
    Ok(())
}
