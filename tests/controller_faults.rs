//! The controller against machine faults the emulator reproduces (reference §3, §8, §9.8, §10.1): a host that
//! becomes unreachable and a machine that ends `failed` are replaced under the same name; a machine that
//! crash-loops after an update holds the rolling update, and status names it.

use std::time::{Duration, Instant};

use fly_emulator::{InventoryMachine, LaunchFault};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use mcpfly::api::{ConditionType, Phase};
use mcpfly::local_cluster::stack::{Stack, StackOptions};

mod controller_support;
use controller_support::{READY, app_of, manifest};

/// Machines not yet destroyed, from the emulator's inventory (test polling must not eat the controller's
/// rate budget).
fn live(stack: &Stack, app: &str) -> Vec<InventoryMachine> {
    stack
        .emulator
        .inventory()
        .app(app)
        .map(|a| {
            a.machines
                .iter()
                .filter(|m| !m.gone && m.state != "destroyed")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages of the resource's Kubernetes Events with this reason.
async fn event_messages(stack: &Stack, reason: &str) -> anyhow::Result<Vec<String>> {
    let events = Api::<Event>::namespaced(stack.cp.client().await?, &stack.namespace)
        .list(&ListParams::default())
        .await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.message)
        .collect())
}

/// Waits until `name` is again a single started machine with a new id, and returns it.
async fn replaced(stack: &Stack, app: &str, name: &str, old_id: &str) -> InventoryMachine {
    let mut found = None;
    eventually(
        &format!("{name} ({old_id}) replaced by a started machine"),
        READY,
        || {
            let same_name: Vec<_> = live(stack, app)
                .into_iter()
                .filter(|m| m.name == name)
                .collect();
            found = match same_name.as_slice() {
                [m] if m.id != old_id && m.state == "started" => Some(m.clone()),
                _ => None,
            };
            found.is_some()
        },
    )
    .await;
    found.unwrap()
}

#[tokio::test]
async fn a_machine_whose_host_becomes_unreachable_is_replaced_under_its_name() -> anyhow::Result<()>
{
    // Ready deployments are looked at on resync: short, so the test sees the controller notice.
    let options = StackOptions {
        resync: Duration::from_secs(1),
        ..Default::default()
    };
    let stack = Stack::start("ctl-fault-host", options).await?;
    stack.apply(&manifest("hosted", "")).await?;
    let app = app_of(&stack.wait_ready("hosted", READY).await?);
    let before = live(&stack, &app);
    let victim = before.iter().find(|m| m.name == "iad-0").unwrap().clone();
    let other = before.iter().find(|m| m.name == "ams-0").unwrap().clone();

    assert!(
        stack
            .emulator
            .set_host_status(&app, &victim.id, "unreachable")
    );
    let new = replaced(&stack, &app, "iad-0", &victim.id).await;
    assert_eq!(new.host_status, "ok");
    assert_eq!(new.region, victim.region);
    assert_eq!(
        new.config["env"], victim.config["env"],
        "recreated with the same config"
    );
    let ready = stack.wait_ready("hosted", READY).await?;
    let status = ready.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(status.machines_summary.as_deref(), Some("2/2"));
    assert!(status.machines.iter().any(|m| m.id == new.id));
    assert!(status.machines.iter().all(|m| m.id != victim.id));

    // The machine on a healthy host was left alone.
    let after = live(&stack, &app);
    let kept = after.iter().find(|m| m.name == "ams-0").unwrap();
    assert_eq!(
        (&kept.id, &kept.instance_id),
        (&other.id, &other.instance_id)
    );
    assert_eq!(after.len(), 2, "{after:?}");
    // The reason reads `Broken`, not `HostUnhealthy`: Fly hides `config` when the host is not ok, and the planner
    // checks for a missing config first.
    let destroyed = event_messages(&stack, "MachineDestroyed").await?;
    assert!(
        destroyed.iter().any(|m| m.contains(&victim.id)),
        "{destroyed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_machine_that_ends_failed_is_replaced_under_its_name() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-fault-failed", StackOptions::default()).await?;
    stack.apply(&manifest("failing", "")).await?;
    let app = app_of(&stack.wait_ready("failing", READY).await?);
    let before = live(&stack, &app);

    // The next launch in the app (the rolling update's first machine) fails: starting → launch_failed → failed.
    stack
        .emulator
        .fault_next_launches(&app, None, 1, LaunchFault::Fail);
    stack
        .apply(&manifest("failing", "  env: {LOG_LEVEL: debug}\n"))
        .await?;
    let ready = stack.wait_ready("failing", READY).await?;
    assert_eq!(ready.status.as_ref().unwrap().phase, Some(Phase::Ready));

    let after = live(&stack, &app);
    assert_eq!(after.len(), 2, "{after:?}");
    for m in &after {
        assert_eq!(m.state, "started");
        assert_eq!(m.config["env"]["LOG_LEVEL"], "debug", "{}", m.name);
    }
    // Exactly one machine was replaced (the one whose launch failed), under its own name.
    let replaced: Vec<_> = before
        .iter()
        .filter(|b| !after.iter().any(|a| a.id == b.id))
        .collect();
    assert_eq!(replaced.len(), 1, "before {before:?} after {after:?}");
    assert!(after.iter().any(|a| a.name == replaced[0].name));
    let destroyed = event_messages(&stack, "MachineDestroyed").await?;
    assert!(
        destroyed
            .iter()
            .any(|m| m.contains(&replaced[0].id) && m.contains("Broken")),
        "{destroyed:?}"
    );
    Ok(())
}

/// REALISM.md §7: a new machine whose first launch fails goes `launch_failed` → `destroyed` on Fly, so the
/// create the controller remembers vanishes; it must create the machine again (not wait on the dead id, not stall).
#[tokio::test]
async fn a_new_machine_destroyed_by_a_failed_launch_is_created_again() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-fault-lfd", StackOptions::default()).await?;
    let app = mcpfly::reconcile::naming::app_name("mcpfly", "test", "ctl-fault-lfd", "doomed");
    stack
        .emulator
        .fault_next_launches(&app, Some("iad-0"), 1, LaunchFault::Fail);
    stack.apply(&manifest("doomed", "")).await?;
    let ready = stack.wait_ready("doomed", READY).await?;
    assert_eq!(app_of(&ready), app);
    let inventory = stack.emulator.inventory();
    let iad: Vec<_> = inventory
        .app(&app)
        .unwrap()
        .machines
        .iter()
        .filter(|m| m.name == "iad-0")
        .collect();
    assert_eq!(
        iad.len(),
        2,
        "the destroyed one and its replacement: {iad:?}"
    );
    assert!(
        iad.iter().any(|m| m.state == "destroyed" || m.gone),
        "{iad:?}"
    );
    assert_eq!(live(&stack, &app).len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_crash_loop_after_an_update_holds_the_rolling_update() -> anyhow::Result<()> {
    let stack = Stack::start("ctl-fault-crash", StackOptions::default()).await?;
    stack.apply(&manifest("crashy", "")).await?;
    let app = app_of(&stack.wait_ready("crashy", READY).await?);
    let before = live(&stack, &app);

    // The first machine updated boots a version whose process exits with 1 over and over.
    stack
        .emulator
        .fault_next_launches(&app, None, 1, LaunchFault::CrashLoop { exit_code: 1 });
    stack
        .apply(&manifest("crashy", "  env: {LOG_LEVEL: debug}\n"))
        .await?;
    let updated = |m: &InventoryMachine| m.config["env"]["LOG_LEVEL"] == "debug";
    let mut crashing = None;
    eventually("one machine updated and crash-looping", READY, || {
        crashing = live(&stack, &app)
            .into_iter()
            .find(|m| updated(m) && m.restart_count > 1);
        crashing.is_some()
    })
    .await;
    let crashing = crashing.unwrap();

    // Several seconds of crash loop (checks critical, restarts climbing): the other machine keeps its version.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = live(&stack, &app);
    let waiting = now.iter().find(|m| m.id != crashing.id).unwrap();
    let was = before.iter().find(|m| m.id == waiting.id).unwrap();
    assert_eq!(
        waiting.instance_id, was.instance_id,
        "the rolling update moved on past a crash-looping machine: {now:?}"
    );
    assert!(!updated(waiting));
    assert_eq!(
        now.iter().find(|m| m.id == crashing.id).unwrap().id,
        crashing.id,
        "the crash-looping machine is not replaced: its config is what was asked for"
    );

    let d = stack.deployments().await?.get("crashy").await?;
    let status = d.status.unwrap();
    assert_ne!(status.phase, Some(Phase::Ready), "{status:?}");
    let ready = status.condition(ConditionType::Ready).unwrap();
    assert!(!ready.is_true());
    assert!(
        ready.message.contains(&crashing.name),
        "status names the unhealthy machine: {}",
        ready.message
    );
    let machine = status
        .machines
        .iter()
        .find(|m| m.id == crashing.id)
        .expect("crashing machine in status");
    assert_eq!(
        machine.checks.as_deref(),
        Some("0/1 passing"),
        "{machine:?}"
    );

    // Fixed (the process stays up): the rollout resumes and completes.
    assert!(stack.emulator.set_crash_loop(&app, &crashing.id, None));
    eventually("both machines updated and started", READY, || {
        let all = live(&stack, &app);
        all.len() == 2 && all.iter().all(|m| updated(m) && m.state == "started")
    })
    .await;
    stack.wait_ready("crashy", READY).await?;
    Ok(())
}
