//! The controller against the real control plane and the Fly emulator (issue 5's scenarios).

use std::collections::BTreeSet;
use std::time::Duration;

use fly_emulator::EmulatorConfig;
use fly_emulator::{EventRecord, Fault, ScriptedFault};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams};
use mcpfly::api::{ConditionType, Phase, reason};
use mcpfly::local_cluster::stack::{Stack, StackOptions};

mod controller_support;
use controller_support::{READY, app_of, fly_client, manifest, mutations};

#[tokio::test]
async fn create_becomes_ready_with_url_machines_digests_and_connection_secret() -> anyhow::Result<()>
{
    let stack = Stack::start("ctl-create", StackOptions::default()).await?;
    stack
        .apply(&manifest("github", "  env: {LOG_LEVEL: info}\n"))
        .await?;
    let ready = stack.wait_ready("github", READY).await?;
    let status = ready.status.clone().unwrap();
    let app = app_of(&ready);

    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(
        status.url.as_deref(),
        Some(format!("https://{app}.fly.dev/mcp").as_str())
    );
    assert_eq!(status.machines_summary.as_deref(), Some("2/2"));
    assert_eq!(status.machines.len(), 2);
    assert!(status.machines.iter().all(|m| m.state == "started"));
    assert_eq!(
        status.source.as_ref().unwrap().resolved,
        "@acme/server@1.2.3"
    );
    let token_status = status
        .credentials
        .iter()
        .find(|c| c.name == "MCP_AUTH_TOKEN")
        .expect("token digest");
    assert!(token_status.digest.starts_with("sha256:"));
    assert_eq!(status.secrets_version, Some(1));

    // Fly: one app on its own network, v6 + shared v4, the token as a secret, machines booted with it.
    let inventory = stack.emulator.inventory();
    let fly_app = inventory.app(&app).expect("app on the emulator");
    assert_eq!(fly_app.network, app, "a private network of its own");
    assert_eq!(fly_app.ips.len(), 2);
    assert_eq!(fly_app.secret_names, ["MCP_AUTH_TOKEN"]);
    let names: BTreeSet<&str> = fly_app.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["ams-0", "iad-0"]));
    for machine in &fly_app.machines {
        assert_eq!(machine.booted_secrets_version, Some(1));
        let env = &machine.config["env"];
        assert_eq!(env["LOG_LEVEL"], "info");
        assert!(
            env.get("MCP_AUTH_TOKEN").is_none(),
            "the token is never machine env"
        );
        assert!(
            machine.config["metadata"]
                .get("fly_platform_version")
                .is_none()
        );
    }

    // The connection Secret: URL and token, owned by the resource.
    let secret = Api::<Secret>::namespaced(stack.cp.client().await?, &stack.namespace)
        .get("github-mcp-connection")
        .await?;
    let data = secret.data.clone().unwrap();
    assert_eq!(
        String::from_utf8(data["url"].0.clone())?,
        status.url.unwrap()
    );
    assert_eq!(String::from_utf8(data["token"].0.clone())?.len(), 43);
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "MCPDeployment");
    assert_eq!(owner.controller, Some(true));

    // Events tell the story on the resource.
    let events = Api::<Event>::namespaced(stack.cp.client().await?, &stack.namespace)
        .list(&ListParams::default())
        .await?;
    let reasons: BTreeSet<String> = events
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    for expected in [
        "AppCreated",
        "IpAssigned",
        "SecretsUpdated",
        "MachineCreated",
    ] {
        assert!(
            reasons.contains(expected),
            "missing event {expected}: {reasons:?}"
        );
    }
    Ok(())
}

/// REALISM.md §1: a new app answers 404, then 401, for a while. The controller does not hold a worker through that
/// lag: with a single worker, the second deployment's app is created while the first app is still invisible (the
/// worker used to wait for the app inside the create, so every deployment queued behind it for the whole lag).
#[tokio::test]
async fn a_worker_is_not_held_while_a_new_app_becomes_visible() -> anyhow::Result<()> {
    // Long enough that the second create cannot miss it on a loaded machine: it needs a handful of apiserver
    // round trips after the first.
    let lag = Duration::from_secs(8);
    let mut emulator = EmulatorConfig::default();
    emulator.realism.app_visibility_lag = lag;
    let stack = Stack::start(
        "ctl-app-lag",
        StackOptions {
            emulator,
            concurrency: 1,
            ..Default::default()
        },
    )
    .await?;
    stack.apply(&manifest("first", "")).await?;
    stack.apply(&manifest("second", "")).await?;
    stack.wait_ready("first", READY + lag).await?;
    stack.wait_ready("second", READY + lag).await?;

    let log = stack.emulator.event_log();
    // Fly's create answer names no app in the path; the two creates in time order suffice.
    let creates: Vec<i64> = log
        .iter()
        .filter(|e| e.label == "apps.create" && e.status < 300)
        .map(|e| e.time_ms)
        .collect();
    assert_eq!(creates.len(), 2, "two apps created");
    let looks_after_create: Vec<(i64, u16)> = log
        .iter()
        .filter(|e| e.label == "apps.get" && e.time_ms > creates[0])
        .map(|e| (e.time_ms, e.status))
        .collect();
    // The lag was in force: looks after the first create met Fly's 401 (the lag's second half; a free name
    // answers 404) before any app answered 200.
    let first_visible_at = looks_after_create
        .iter()
        .find(|(_, status)| *status == 200)
        .map(|(at, _)| *at)
        .expect("an app was seen");
    assert!(
        looks_after_create
            .iter()
            .any(|(at, status)| *at < first_visible_at && *status == 401),
        "looked before the first app was visible: {looks_after_create:?}"
    );
    assert!(
        creates[1] < first_visible_at,
        "the one worker created the second app at {} ms, only after the first became visible at \
         {first_visible_at} ms (created at {} ms): it was held through the lag",
        creates[1],
        creates[0]
    );
    // The reconcile that first saw each new app took it as empty: neither its machines nor its IPs were listed
    // before the controller made them.
    let mut apps_seen = BTreeSet::new();
    let first_machine_creates = log
        .iter()
        .filter(|e| e.label == "machines.create" && apps_seen.insert(e.app.clone()));
    for create in first_machine_creates {
        let listed_before: Vec<&str> = log
            .iter()
            .filter(|e| e.app == create.app && e.time_ms < create.time_ms)
            .filter(|e| e.label == "machines.list" || e.label == "ips.list")
            .map(|e| e.label.as_str())
            .collect();
        assert!(
            listed_before.is_empty(),
            "{:?} listed before its first machine: {listed_before:?}",
            create.app
        );
    }
    Ok(())
}

fn position(events: &[EventRecord], label: &str, machine: &str) -> Vec<usize> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.label == label && e.machine.as_deref() == Some(machine) && e.status < 300
        })
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn env_change_rolls_machines_one_at_a_time_holding_a_lease_until_healthy()
-> anyhow::Result<()> {
    let stack = Stack::start("ctl-rolling", StackOptions::default()).await?;
    stack.apply(&manifest("roll", "")).await?;
    let ready = stack.wait_ready("roll", READY).await?;
    let app = app_of(&ready);
    let before = stack
        .emulator
        .inventory()
        .app(&app)
        .unwrap()
        .machines
        .clone();
    stack.emulator.reset_counters();

    stack
        .apply(&manifest("roll", "  env: {LOG_LEVEL: debug}\n"))
        .await?;
    let ready = stack.wait_ready("roll", READY).await?;
    assert_eq!(ready.status.as_ref().unwrap().phase, Some(Phase::Ready));

    let events = stack.emulator.event_log();
    let ids: Vec<String> = before.iter().map(|m| m.id.clone()).collect();
    let updates: Vec<usize> = ids
        .iter()
        .flat_map(|id| position(&events, "machines.update", id))
        .collect();
    assert_eq!(
        updates.len(),
        2,
        "each machine updated exactly once: {:?}",
        mutations(&events)
    );
    // One at a time: the first machine's lease is released (it became healthy) before the second is leased.
    let (first, second) = if updates[0] < updates[1] {
        (&ids[0], &ids[1])
    } else {
        (&ids[1], &ids[0])
    };
    let first_release = position(&events, "leases.release", first);
    let second_acquire = position(&events, "leases.acquire", second);
    assert_eq!(first_release.len(), 1, "lease released once");
    assert!(
        first_release[0] < second_acquire[0],
        "second machine leased (event {}) before the first was healthy and released (event {})",
        second_acquire[0],
        first_release[0]
    );
    let after = stack
        .emulator
        .inventory()
        .app(&app)
        .unwrap()
        .machines
        .clone();
    for machine in after.iter().filter(|m| !m.gone) {
        assert_eq!(machine.config["env"]["LOG_LEVEL"], "debug");
        assert_eq!(machine.state, "started");
    }
    assert_eq!(
        mutations(&events)
            .iter()
            .filter(|e| e.label == "machines.create")
            .count(),
        0,
        "updated in place"
    );
    Ok(())
}

#[tokio::test]
async fn credential_change_sets_secrets_once_then_updates_machines_with_min_secrets_version()
-> anyhow::Result<()> {
    let stack = Stack::start("ctl-secrets", StackOptions::default()).await?;
    let client = stack.cp.client().await?;
    let secrets: Api<Secret> = Api::namespaced(client, &stack.namespace);
    let put = |value: &str| {
        serde_json::from_value::<Secret>(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "gh", "namespace": "ctl-secrets",
                "labels": {mcpfly::api::ALLOW_REFERENCE_LABEL: "true"}},
            "stringData": {"token": value},
        }))
        .unwrap()
    };
    let pp = kube::api::PatchParams::apply("test").force();
    secrets
        .patch("gh", &pp, &kube::api::Patch::Apply(&put("first-value")))
        .await?;
    let extra = "  credentials: [{name: GITHUB_TOKEN, secretKeyRef: {name: gh, key: token}}]\n";
    stack.apply(&manifest("creds", extra)).await?;
    let ready = stack.wait_ready("creds", READY).await?;
    let app = app_of(&ready);
    let digest_before = ready
        .status
        .as_ref()
        .unwrap()
        .credentials
        .iter()
        .find(|c| c.name == "GITHUB_TOKEN")
        .unwrap()
        .digest
        .clone();
    assert_eq!(
        stack
            .emulator
            .inventory()
            .app(&app)
            .unwrap()
            .secrets_version,
        1
    );
    stack.emulator.reset_counters();

    // Changing only the referenced Secret must be noticed (the Secret watch requeues the resource).
    secrets
        .patch("gh", &pp, &kube::api::Patch::Apply(&put("second-value")))
        .await?;
    let changed = stack
        .wait_for("creds", READY, "Ready on the new credential", |d| {
            let s = d.status.as_ref().unwrap();
            s.secrets_version == Some(2) && s.phase == Some(Phase::Ready)
        })
        .await?;
    let digest_after = changed
        .status
        .as_ref()
        .unwrap()
        .credentials
        .iter()
        .find(|c| c.name == "GITHUB_TOKEN")
        .unwrap()
        .digest
        .clone();
    assert_ne!(digest_before, digest_after);

    let events = stack.emulator.event_log();
    assert_eq!(
        events.iter().filter(|e| e.label == "secrets.set").count(),
        1,
        "exactly one secrets call"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.label == "machines.update")
            .count(),
        2
    );
    let inventory = stack.emulator.inventory();
    let fly_app = inventory.app(&app).unwrap();
    assert_eq!(fly_app.secrets_version, 2);
    for machine in fly_app.machines.iter().filter(|m| !m.gone) {
        assert_eq!(
            machine.booted_secrets_version,
            Some(2),
            "machine {} rebooted with the new secrets",
            machine.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn adding_and_removing_a_region() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-regions", StackOptions::default()).await?;
    stack.apply(&manifest("regions", "")).await?;
    let app = app_of(&stack.wait_ready("regions", READY).await?);
    let live = |stack: &Stack| -> BTreeSet<String> {
        stack
            .emulator
            .inventory()
            .app(&app)
            .unwrap()
            .machines
            .iter()
            .filter(|m| !m.gone)
            .map(|m| m.name.clone())
            .collect()
    };

    let three = manifest("regions", "").replace("[iad, ams]", "[iad, ams, syd]");
    stack.apply(&three).await?;
    stack.wait_ready("regions", READY).await?;
    assert_eq!(
        live(&stack),
        BTreeSet::from(["ams-0".into(), "iad-0".into(), "syd-0".into()])
    );

    let one = manifest("regions", "").replace("[iad, ams]", "[syd]");
    stack.apply(&one).await?;
    let ready = stack.wait_ready("regions", READY).await?;
    assert_eq!(live(&stack), BTreeSet::from(["syd-0".to_string()]));
    assert_eq!(
        ready.status.unwrap().machines_summary.as_deref(),
        Some("1/1")
    );
    Ok(())
}

#[tokio::test]
async fn delete_destroys_the_app_then_releases_the_finalizer() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-delete", StackOptions::default()).await?;
    stack.apply(&manifest("doomed", "")).await?;
    let app = app_of(&stack.wait_ready("doomed", READY).await?);
    stack.delete("doomed").await?;
    stack.wait_gone("doomed", READY).await?;
    assert!(
        stack.emulator.inventory().app(&app).is_none(),
        "app still on Fly after the finalizer was released"
    );
    Ok(())
}

#[tokio::test]
async fn orphan_policy_leaves_fly_alone() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-orphan", StackOptions::default()).await?;
    stack
        .apply(&manifest("kept", "  deletionPolicy: Orphan\n"))
        .await?;
    let app = app_of(&stack.wait_ready("kept", READY).await?);
    stack.emulator.reset_counters();
    stack.delete("kept").await?;
    stack.wait_gone("kept", READY).await?;
    let inventory = stack.emulator.inventory();
    let fly_app = inventory.app(&app).expect("app left in place");
    assert_eq!(fly_app.machines.iter().filter(|m| !m.gone).count(), 2);
    assert!(
        mutations(&stack.emulator.event_log()).is_empty(),
        "no mutation on Fly: {:?}",
        stack.emulator.event_log()
    );
    Ok(())
}

#[tokio::test]
async fn suspend_touches_nothing_on_fly() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-suspend", StackOptions::default()).await?;
    stack.apply(&manifest("paused", "")).await?;
    stack.wait_ready("paused", READY).await?;

    // Suspend and change the spec at once: the change must not reach Fly.
    stack
        .apply(&manifest("paused", "  suspend: true\n  env: {A: b}\n"))
        .await?;
    stack
        .wait_for("paused", READY, "Suspended", |d| {
            d.status.as_ref().and_then(|s| s.phase) == Some(Phase::Suspended)
        })
        .await?;
    // A reconcile started before the suspension was seen may still finish; count from here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.emulator.reset_counters();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stack.emulator.total_calls(),
        0,
        "calls while suspended: {:?}",
        stack.emulator.event_log()
    );

    stack.apply(&manifest("paused", "  env: {A: b}\n")).await?;
    stack.wait_ready("paused", READY).await?;
    assert_eq!(
        stack.emulator.count("machines.update"),
        2,
        "resuming applies the held change"
    );
    Ok(())
}

#[tokio::test]
async fn drift_is_repaired_but_autostop_is_left_alone() -> anyhow::Result<()> {
    let options = StackOptions {
        resync: Duration::from_secs(1),
        ..Default::default()
    };
    let stack = Stack::start("ctl-drift", options).await?;
    stack.apply(&manifest("drifty", "")).await?;
    let app = app_of(&stack.wait_ready("drifty", READY).await?);
    let fly = fly_client(&stack);
    // Observed through the emulator's inventory: test polling must not eat the controller's rate budget.
    let live = |stack: &Stack| {
        stack
            .emulator
            .inventory()
            .app(&app)
            .unwrap()
            .machines
            .iter()
            .filter(|m| !m.gone)
            .cloned()
            .collect::<Vec<_>>()
    };
    let machines = live(&stack);
    let (victim, other) = (machines[0].clone(), machines[1].clone());

    // A machine destroyed behind our back is recreated under the same name.
    fly.delete_machine(&app, &victim.id, true, None).await?;
    let deadline = std::time::Instant::now() + READY;
    while !live(&stack)
        .iter()
        .any(|m| m.name == victim.name && m.id != victim.id && m.state == "started")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{} was not recreated",
            victim.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A config altered behind our back is restored.
    let mut altered: fly_adapter::client::types::MachineConfig =
        serde_json::from_value(other.config.clone())?;
    altered.env.insert("INJECTED".into(), "by-someone".into());
    let request = fly_adapter::client::types::CreateMachineRequest {
        config: altered,
        ..Default::default()
    };
    fly.update_machine(&app, &other.id, &request, None).await?;
    let deadline = std::time::Instant::now() + READY;
    loop {
        let restored = live(&stack)
            .into_iter()
            .find(|m| m.id == other.id)
            .expect("machine kept, updated in place");
        if restored.config["env"].get("INJECTED").is_none() && restored.state == "started" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "altered config not restored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.wait_ready("drifty", READY).await?;

    // Fly's proxy parking a machine (autostop: suspend by default) is not drift.
    let parked = live(&stack)[0].id.clone();
    fly.suspend_machine(&app, &parked, None).await?;
    stack.emulator.reset_counters();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = stack.emulator.event_log();
    assert!(
        events.iter().any(|e| e.label == "machines.list"),
        "resync looked at Fly"
    );
    assert!(
        mutations(&events).is_empty(),
        "autostop treated as drift: {:?}",
        mutations(&events)
    );
    let state = live(&stack)
        .into_iter()
        .find(|m| m.id == parked)
        .unwrap()
        .state;
    assert_eq!(state, "suspended");
    Ok(())
}

#[tokio::test]
async fn ambiguous_create_never_duplicates_a_machine() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-ambiguous", StackOptions::default()).await?;
    // The first machine create commits on Fly but the client sees a 408.
    stack.emulator.script_faults([ScriptedFault {
        label: Some("machines.create".into()),
        fault: Fault::CommitThenStatus(408),
    }]);
    stack.apply(&manifest("twice", "")).await?;
    let app = app_of(&stack.wait_ready("twice", READY).await?);
    let inventory = stack.emulator.inventory();
    let live: Vec<_> = inventory
        .app(&app)
        .unwrap()
        .machines
        .iter()
        .filter(|m| !m.gone)
        .collect();
    let names: BTreeSet<&str> = live.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(live.len(), 2, "exactly the desired machines: {live:?}");
    assert_eq!(names.len(), 2);
    let creates = stack
        .emulator
        .event_log()
        .iter()
        .filter(|e| e.label == "machines.create")
        .count();
    assert_eq!(creates, 2, "the ambiguous create was found, not repeated");
    Ok(())
}

#[tokio::test]
async fn app_name_owned_by_another_org_stalls_without_mutation() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-taken", StackOptions::default()).await?;
    let app = mcpfly::reconcile::naming::app_name("mcpfly", "test", "ctl-taken", "taken");
    stack.emulator.add_foreign_app(&app, "someone-else");
    stack.emulator.reset_counters();
    stack.apply(&manifest("taken", "")).await?;
    let condition = stack.wait_stalled("taken", READY).await?;
    assert_eq!(condition.reason, reason::APP_NAME_TAKEN);
    assert!(
        condition.message.contains("spec.fly.app"),
        "message tells what to do: {}",
        condition.message
    );
    let phase = stack
        .deployments()
        .await?
        .get("taken")
        .await?
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase, Some(Phase::Failed));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        mutations(&stack.emulator.event_log()).is_empty(),
        "{:?}",
        stack.emulator.event_log()
    );
    Ok(())
}

#[tokio::test]
async fn credential_sealed_for_another_namespace_stalls_without_mutation() -> anyhow::Result<()> {
    use mcpfly::sealing::{Binding, KeyRing, SecretValue, Target, keyring::generate_key, seal};
    let key = generate_key();
    let ring = KeyRing::parse(&key, "test")?;
    let sealed = seal(
        &ring,
        Binding::Strict(Target::new("team-b", "scoped", "TOKEN")),
        SecretValue::new("canary-3f1c".into()),
    )?;
    let options = StackOptions {
        keyring: Some(key.to_string()),
        ..Default::default()
    };
    let stack = Stack::start("ctl-scope", options).await?;
    stack.emulator.reset_counters();
    stack
        .apply(&manifest(
            "scoped",
            &format!("  credentials: [{{name: TOKEN, sealed: \"{sealed}\"}}]\n"),
        ))
        .await?;
    assert_eq!(
        stack.wait_stalled("scoped", READY).await?.reason,
        reason::CREDENTIAL_SCOPE_MISMATCH
    );
    let status = stack
        .deployments()
        .await?
        .get("scoped")
        .await?
        .status
        .unwrap();
    assert_eq!(
        status
            .condition(ConditionType::CredentialsReady)
            .unwrap()
            .reason,
        reason::CREDENTIAL_SCOPE_MISMATCH
    );
    assert!(!serde_json::to_string(&status)?.contains("canary-3f1c"));
    // The controller's start-up token check (apps.list) may land here; nothing may concern this app.
    let about_apps: Vec<_> = stack
        .emulator
        .event_log()
        .into_iter()
        .filter(|e| e.app.is_some())
        .collect();
    assert!(
        about_apps.is_empty(),
        "nothing asked of Fly about the app: {about_apps:?}"
    );
    Ok(())
}

/// Waits (bounded) until the controller is idle: two `look` calls on Fly with nothing but `quiet` calls in
/// between, and none of `deployments` written meanwhile. A fixed pause was too short on a loaded machine.
async fn settle(
    stack: &Stack,
    deployments: &[&str],
    look: &str,
    quiet: &[&str],
) -> anyhow::Result<()> {
    let api = stack.deployments().await?;
    let versions = || async {
        let mut versions = Vec::new();
        for name in deployments {
            versions.push(api.get(name).await?.metadata.resource_version);
        }
        anyhow::Ok(versions)
    };
    let deadline = std::time::Instant::now() + READY;
    loop {
        let before = versions().await?;
        stack.emulator.reset_counters();
        while stack.emulator.count(look) < 2 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no two {look} calls within {READY:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls = stack.emulator.event_log();
        if calls.iter().all(|e| quiet.contains(&e.label.as_str())) && versions().await? == before {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never idle within {READY:?}: {calls:?}"
        );
    }
}

/// The most periodic looks a window of `window` can hold: they are scheduled at least `period` apart, so
/// window/period + 1 of them, plus one scheduled before the window whose call landed late, in it.
fn at_most_one_per(period: Duration, window: Duration) -> f64 {
    window.as_secs_f64() / period.as_secs_f64() + 2.0
}

#[tokio::test]
async fn idle_ready_deployment_makes_no_kubernetes_writes_and_only_observes_fly()
-> anyhow::Result<()> {
    let options = StackOptions {
        resync: Duration::from_secs(1),
        ..Default::default()
    };
    let resync = options.resync;
    let stack = Stack::start("ctl-idle", options).await?;
    stack.apply(&manifest("quiet", "")).await?;
    let ready = stack.wait_ready("quiet", READY).await?;
    settle(
        &stack,
        &["quiet"],
        "machines.list",
        &["apps.get", "machines.list"],
    )
    .await?;
    let api = stack.deployments().await?;
    let before = api.get("quiet").await?.metadata.resource_version;
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    let secret_before = secrets
        .get("quiet-mcp-connection")
        .await?
        .metadata
        .resource_version;
    let window = std::time::Instant::now();
    stack.emulator.reset_counters();
    tokio::time::sleep(Duration::from_secs(4)).await;

    assert_eq!(
        api.get("quiet").await?.metadata.resource_version,
        before,
        "status written while idle"
    );
    assert_eq!(
        secrets
            .get("quiet-mcp-connection")
            .await?
            .metadata
            .resource_version,
        secret_before
    );
    let events = stack.emulator.event_log();
    let window = window.elapsed();
    let labels: BTreeSet<&str> = events.iter().map(|e| e.label.as_str()).collect();
    let observation = BTreeSet::from(["apps.get", "machines.list"]);
    assert!(
        labels.is_subset(&observation),
        "only observation calls while idle: {labels:?}"
    );
    let resyncs = events.iter().filter(|e| e.label == "machines.list").count();
    assert!(
        resyncs >= 1 && resyncs as f64 <= at_most_one_per(resync, window),
        "about one look per resync second, saw {resyncs} in {window:?}"
    );
    let _ = ready;
    Ok(())
}

#[tokio::test]
async fn key_ring_rotation_in_the_secret_requeues_and_unstalls() -> anyhow::Result<()> {
    use mcpfly::sealing::{Binding, KeyRing, SecretValue, Target, keyring::generate_key, seal};
    let (old_key, new_key) = (generate_key(), generate_key());
    let new_ring = KeyRing::parse(&new_key, "test")?;
    let sealed = seal(
        &new_ring,
        Binding::Strict(Target::new("ctl-rotate", "rotated", "TOKEN")),
        SecretValue::new("rotation-value".into()),
    )?;
    let options = StackOptions {
        keyring: Some(old_key.to_string()),
        ..Default::default()
    };
    let stack = Stack::start("ctl-rotate", options).await?;
    stack
        .apply(&manifest(
            "rotated",
            &format!("  credentials: [{{name: TOKEN, sealed: \"{sealed}\"}}]\n"),
        ))
        .await?;
    assert_eq!(
        stack.wait_stalled("rotated", READY).await?.reason,
        reason::CREDENTIAL_UNKNOWN_KEY
    );

    // Only the key-ring Secret changes; the resource itself is untouched.
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    let ring: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "keyring", "namespace": "ctl-rotate"},
        "stringData": {"keys": format!("{}\n{}\n", new_key.as_str(), old_key.as_str())},
    }))?;
    secrets
        .patch(
            "keyring",
            &kube::api::PatchParams::apply("test").force(),
            &kube::api::Patch::Apply(&ring),
        )
        .await?;
    let ready = stack.wait_ready("rotated", READY).await?;
    let status = ready.status.unwrap();
    let token = status
        .credentials
        .iter()
        .find(|c| c.name == "TOKEN")
        .unwrap();
    assert_eq!(
        token.key.as_deref(),
        Some(new_ring.primary_id().as_str()),
        "status names the key that unsealed it"
    );
    assert!(
        status.condition(ConditionType::Stalled).is_none(),
        "Stalled is removed once resolved"
    );
    Ok(())
}

#[tokio::test]
async fn an_existing_app_is_adopted_only_when_it_is_provably_ours() -> anyhow::Result<()> {
    use fly_adapter::client::types::{CreateAppRequest, CreateMachineRequest, MachineConfig};
    let stack = Stack::start("ctl-adopt", StackOptions::default()).await?;
    let fly = fly_client(&stack);
    let create = |name: &str| CreateAppRequest {
        name: name.to_string(),
        org_slug: fly_emulator::DEFAULT_ORG.into(),
        network: None,
        enable_subdomains: None,
    };

    // Left over from a crash between "create app" and anything else: empty, in our org. Adopted.
    let leftover = mcpfly::reconcile::naming::app_name("mcpfly", "test", "ctl-adopt", "leftover");
    fly.create_app(&create(&leftover)).await?;
    stack.emulator.reset_counters();
    stack.apply(&manifest("leftover", "")).await?;
    let ready = stack.wait_ready("leftover", READY).await?;
    assert_eq!(app_of(&ready), leftover);
    assert_eq!(
        stack.emulator.count("apps.create"),
        0,
        "adopted, not created again"
    );

    // Same org, but running a machine created for another resource: not ours.
    let foreign = mcpfly::reconcile::naming::app_name("mcpfly", "test", "ctl-adopt", "foreign");
    fly.create_app(&create(&foreign)).await?;
    let mut config = MachineConfig {
        image: "someone/else:1".into(),
        ..Default::default()
    };
    config
        .metadata
        .insert("mcpfly_owner_uid".into(), "another-resource-uid".into());
    fly.create_machine(
        &foreign,
        &CreateMachineRequest {
            config,
            ..Default::default()
        },
    )
    .await?;
    // The premise is a foreign machine Fly lists: wait out the per-app list lag (REALISM.md §5). Until Fly lists
    // it, only proof of ownership (not an empty listing) may let the controller touch the app.
    tokio::time::sleep(fly_emulator::Realism::fly().list_lag + Duration::from_millis(200)).await;
    stack.emulator.reset_counters();
    stack.apply(&manifest("foreign", "")).await?;
    assert_eq!(
        stack.wait_stalled("foreign", READY).await?.reason,
        reason::APP_NOT_OWNED
    );
    let touched: Vec<_> = mutations(&stack.emulator.event_log())
        .into_iter()
        .filter(|e| e.app.as_deref() == Some(foreign.as_str()))
        .cloned()
        .collect();
    assert!(
        touched.is_empty(),
        "mutated someone else's app: {touched:?}"
    );
    Ok(())
}

#[tokio::test]
async fn fleet_wide_listing_finds_drift_and_idles_on_one_call_per_poll() -> anyhow::Result<()> {
    // Per-resource resync far away: only the org-wide listing can notice what happens on Fly.
    let options = StackOptions {
        resync: Duration::from_secs(3600),
        fleet_poll: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let stack = Stack::start("ctl-fleet", options).await?;
    stack.apply(&manifest("fleet-a", "")).await?;
    stack.apply(&manifest("fleet-b", "")).await?;
    let app = app_of(&stack.wait_ready("fleet-a", READY).await?);
    stack.wait_ready("fleet-b", READY).await?;
    settle(
        &stack,
        &["fleet-a", "fleet-b"],
        "orgs.machines",
        &["orgs.machines"],
    )
    .await?;

    let window = std::time::Instant::now();
    stack.emulator.reset_counters();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = stack.emulator.event_log();
    let window = window.elapsed();
    let labels: BTreeSet<String> = events.iter().map(|e| e.label.clone()).collect();
    assert_eq!(
        labels,
        BTreeSet::from(["orgs.machines".to_string()]),
        "idle fleet: only the org-wide listing"
    );
    let polls = events.iter().filter(|e| e.label == "orgs.machines").count();
    assert!(
        polls >= 1 && polls as f64 <= at_most_one_per(Duration::from_secs(1), window),
        "about one listing per second for the whole fleet, saw {polls} in {window:?}"
    );

    // A machine destroyed behind our back is noticed through the listing and recreated.
    let victim = stack
        .emulator
        .inventory()
        .app(&app)
        .unwrap()
        .machines
        .iter()
        .find(|m| !m.gone)
        .unwrap()
        .clone();
    fly_client(&stack)
        .delete_machine(&app, &victim.id, true, None)
        .await?;
    let deadline = std::time::Instant::now() + READY;
    loop {
        let inventory = stack.emulator.inventory();
        let machines = &inventory.app(&app).unwrap().machines;
        if machines
            .iter()
            .any(|m| !m.gone && m.name == victim.name && m.id != victim.id && m.state == "started")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "destroyed machine not noticed through the fleet listing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// REALISM.md §5: Fly answers the org-wide listing with `error_regions` now and then. Each such answer used to turn
/// the whole fleet over to per-resource polling; the next listing covers what a partial one missed instead.
#[tokio::test]
async fn partial_listings_now_and_then_do_not_turn_on_per_resource_polling() -> anyhow::Result<()> {
    let mut emulator = EmulatorConfig::default();
    // Every other listing is partial: whenever a reconcile asks, the last listing may have failed.
    emulator.realism.org_listing_error_every = 2;
    let options = StackOptions {
        emulator,
        resync: Duration::from_secs(3600),
        fallback_resync: Some(Duration::from_secs(1)),
        fleet_poll: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let stack = Stack::start("ctl-fleet-partial", options).await?;
    let names = ["partial-a", "partial-b", "partial-c"];
    for name in names {
        stack.apply(&manifest(name, "")).await?;
    }
    for name in names {
        stack.wait_ready(name, READY).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A touch reconciles a Ready resource: one look (one machine listing), after which it picks its next look by
    // the listing's health. Touches 350 ms apart land all over the 1 s poll cycle, so with half the listings
    // failing some land right after a failed one.
    stack.emulator.reset_counters();
    let touches: usize = 9;
    for touch in 0..touches {
        let name = names[touch % names.len()];
        let touched = manifest(name, "").replace(
            &format!("metadata: {{name: {name}}}"),
            &format!("metadata: {{name: {name}, annotations: {{test-touch: \"{touch}\"}}}}"),
        );
        stack.apply(&touched).await?;
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let polls = stack.emulator.count("orgs.machines");
    assert!(polls >= 5, "the listing ran all along (saw {polls})");
    assert_eq!(
        stack.emulator.count("machines.list") as usize,
        touches,
        "one look per touch and none after: Ready resources must not be polled one by one while the \
         org-wide listing works most of the time"
    );
    Ok(())
}

#[tokio::test]
async fn rotate_token_annotation_replaces_the_endpoint_token_everywhere() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-rotate-token", StackOptions::default()).await?;
    stack.apply(&manifest("tokened", "")).await?;
    let ready = stack.wait_ready("tokened", READY).await?;
    let app = app_of(&ready);
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    let token_of =
        |s: &Secret| String::from_utf8(s.data.as_ref().unwrap()["token"].0.clone()).unwrap();
    let before = token_of(&secrets.get("tokened-mcp-connection").await?);

    let rotated = manifest("tokened", "").replace(
        "metadata: {name: tokened}",
        "metadata: {name: tokened, annotations: {mcpfly.dev/rotate-token: \"2026-11-24\"}}",
    );
    stack.apply(&rotated).await?;
    let done = stack
        .wait_for("tokened", READY, "Ready with the rotated token", |d| {
            let s = d.status.as_ref().unwrap();
            s.token_rotation.as_deref() == Some("2026-11-24")
                && s.phase == Some(Phase::Ready)
                && s.secrets_version == Some(2)
        })
        .await?;
    let after = token_of(&secrets.get("tokened-mcp-connection").await?);
    assert_ne!(before, after, "a new token in the connection Secret");
    let inventory = stack.emulator.inventory();
    for machine in inventory
        .app(&app)
        .unwrap()
        .machines
        .iter()
        .filter(|m| !m.gone)
    {
        assert_eq!(
            machine.booted_secrets_version,
            Some(2),
            "machines rebooted with the new token"
        );
    }
    // Handled once: a later reconcile with the same annotation does not rotate again.
    stack
        .apply(&rotated.replace("regions: [iad, ams]", "regions: [ams, iad]"))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        token_of(&secrets.get("tokened-mcp-connection").await?),
        after
    );
    let later = stack.deployments().await?.get("tokened").await?;
    assert_eq!(
        later.status.unwrap().secrets_version,
        done.status.unwrap().secrets_version,
        "no second secrets call"
    );
    Ok(())
}

#[tokio::test]
async fn a_label_selector_shards_which_resources_a_controller_reconciles() -> anyhow::Result<()> {
    let options = StackOptions {
        label_selector: Some("shard=a".into()),
        ..Default::default()
    };
    let stack = Stack::start("ctl-shard", options).await?;
    let labelled = |name: &str, shard: &str| {
        manifest(name, "").replace(
            &format!("metadata: {{name: {name}}}"),
            &format!("metadata: {{name: {name}, labels: {{shard: {shard}}}}}"),
        )
    };
    stack.apply(&labelled("mine", "a")).await?;
    stack.apply(&labelled("theirs", "b")).await?;
    let mine = stack.wait_ready("mine", READY).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let theirs = stack.deployments().await?.get("theirs").await?;
    // Only the CRD's status default, nothing the controller wrote.
    let untouched = mcpfly::api::MCPDeploymentStatus {
        observed_generation: Some(-1),
        ..Default::default()
    };
    assert!(
        theirs.status.as_ref().is_none_or(|s| *s == untouched),
        "another shard's resource was touched: {:?}",
        theirs.status
    );
    assert!(theirs.metadata.finalizers.unwrap_or_default().is_empty());
    let apps: Vec<String> = stack
        .emulator
        .inventory()
        .apps
        .iter()
        .map(|a| a.name.clone())
        .collect();
    assert_eq!(apps, [app_of(&mine)], "only this shard's app exists on Fly");
    Ok(())
}

#[tokio::test]
async fn our_own_writes_are_not_reconciled_again_but_a_deleted_connection_secret_is_news()
-> anyhow::Result<()> {
    let stack = Stack::start("ctl-echo", StackOptions::default()).await?;
    stack.apply(&manifest("echoed", "")).await?;
    stack.wait_ready("echoed", READY).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.emulator.reset_counters();

    // A forced reconcile looks once and writes status once (lastHandledReconcileAt); that write comes back
    // through the watch, and reconciling it would look a second time.
    let forced = manifest("echoed", "").replace(
        "metadata: {name: echoed}",
        "metadata: {name: echoed, annotations: {mcpfly.dev/reconcile-requested-at: \"first\"}}",
    );
    stack.apply(&forced).await?;
    stack
        .wait_for("echoed", READY, "the request handled", |d| {
            d.status
                .as_ref()
                .unwrap()
                .last_handled_reconcile_at
                .as_deref()
                == Some("first")
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let looks = stack
        .emulator
        .event_log()
        .iter()
        .filter(|e| e.label == "machines.list")
        .count();
    assert_eq!(
        looks, 1,
        "one look for the forced reconcile, none for its echo"
    );

    // The controller ignores the echo of its own connection-Secret write, but not someone deleting it.
    let secrets: Api<Secret> = Api::namespaced(stack.cp.client().await?, &stack.namespace);
    secrets
        .delete("echoed-mcp-connection", &Default::default())
        .await?;
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        if let Some(secret) = secrets.get_opt("echoed-mcp-connection").await? {
            let data = secret.data.unwrap_or_default();
            assert!(data.contains_key("url") && data.contains_key("token"));
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the connection Secret was not recreated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.wait_ready("echoed", READY).await?;
    Ok(())
}

/// `access.auth: oauth`: no endpoint token is made; the machines get the OAuth settings as env (nothing secret)
/// and the connection Secret holds what a client needs, the URL and the issuer.
#[tokio::test]
async fn oauth_deployment_carries_its_settings_and_its_issuer_but_no_token() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-oauth", StackOptions::default()).await?;
    let issuer = "https://login.example.com/realms/mcp";
    stack
        .apply(&manifest(
            "chat",
            &format!(
                "  access:\n    auth: oauth\n    oauth: {{issuer: \"{issuer}\", requiredScopes: [mcp], toolScopes: {{delete: admin}}}}\n"
            ),
        ))
        .await?;
    let ready = stack.wait_ready("chat", READY).await?;
    let status = ready.status.clone().unwrap();
    let url = status.url.clone().unwrap();
    assert!(
        status
            .credentials
            .iter()
            .all(|c| c.name != "MCP_AUTH_TOKEN"),
        "{:?}",
        status.credentials
    );
    let inventory = stack.emulator.inventory();
    let fly_app = inventory.app(&app_of(&ready)).expect("app on the emulator");
    assert!(
        fly_app.secret_names.is_empty(),
        "{:?}",
        fly_app.secret_names
    );
    for machine in &fly_app.machines {
        let env = &machine.config["env"];
        assert_eq!(env["MCPFLY_OAUTH_ISSUERS"], issuer);
        assert_eq!(env["MCPFLY_OAUTH_RESOURCE"], url.as_str());
        assert_eq!(env["MCPFLY_OAUTH_SCOPES"], "mcp");
        assert_eq!(env["MCPFLY_OAUTH_TOOL_SCOPES"], "delete=admin");
        let cmd = machine.config["init"]["cmd"].to_string();
        assert!(!cmd.contains("--no-auth"), "{cmd}");
    }
    let secret = Api::<Secret>::namespaced(stack.cp.client().await?, &stack.namespace)
        .get("chat-mcp-connection")
        .await?;
    let data = secret.data.clone().unwrap();
    assert_eq!(String::from_utf8(data["url"].0.clone())?, url);
    assert_eq!(String::from_utf8(data["issuer"].0.clone())?, issuer);
    assert!(!data.contains_key("token"));
    Ok(())
}
