//! Deletion under faults (issue 11): half of the deployments are deleted while the emulator fails 5% of calls
//! and the controller is SIGKILLed every 1–3 s. Afterwards every deleted deployment's app is gone from Fly,
//! every finalizer was removed (the resources no longer exist), nothing of theirs is left on the emulator, and
//! the rest are still Ready with exactly their machines.
//!
//! Size: `MCPFLY_SURVIVAL_DEPLOYMENTS` (CI default 40; full 200, of which half are deleted) and
//! `MCPFLY_SURVIVAL_CHAOS_SECONDS` (CI default 20; full 60).

mod ops_support;
mod survival_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig, FaultConfig};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use ops_support::ControllerProcess;
use survival_support::*;

const NS: &str = "survival-delete";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_under_faults_and_sigkills_leaves_nothing_on_fly() -> anyhow::Result<()> {
    let n = env_size("MCPFLY_SURVIVAL_DEPLOYMENTS", 40);
    let chaos = Duration::from_secs(env_size("MCPFLY_SURVIVAL_CHAOS_SECONDS", 20));
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let client = cp.client().await?;
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
    let emulator = Emulator::start(EmulatorConfig {
        faults: fault_mix(0.05),
        ..EmulatorConfig::default()
    })
    .await?;
    let url = emulator.base_url();
    let mut supervisor = Supervisor::new("delete", move |name| {
        ControllerProcess::spawn(
            cp,
            name,
            cp.kubeconfig_path(),
            &url,
            &controller_env(NS, &[]),
        )
    });

    // All of them Ready first (under the same faults, one controller that is not killed).
    let names: Vec<String> = (0..n).map(|i| format!("del-{i:03}")).collect();
    supervisor.start_stable()?;
    create_all(&client, NS, &names).await?;
    wait_all_ready(&api, n as usize, Duration::from_secs(2 * n + 60))
        .await
        .map_err(|left| anyhow::anyhow!("not Ready before deletion: {left:#?}"))?;
    let apps_before: Vec<(String, String)> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|d| {
            (
                d.name_any(),
                d.status.as_ref().unwrap().app.clone().unwrap(),
            )
        })
        .collect();
    supervisor.stop();

    // Delete every other one while the controller is killed and restarted and Fly keeps failing.
    let doomed: BTreeSet<String> = names.iter().step_by(2).cloned().collect();
    let started = Instant::now();
    supervisor.start_chaos(chaos, Duration::from_secs(1), Duration::from_secs(3))?;
    for name in &doomed {
        api.delete(name, &DeleteParams::default()).await?;
    }
    supervisor.finish_chaos().await?;
    let kills = supervisor.kills();
    emulator.set_faults(FaultConfig::default());
    let failures = failures_by_status(&emulator);

    // Bound: deletions are limited to 100/min per org by Fly (and the client); a minute on top.
    let bound = Duration::from_secs(doomed.len() as u64 * 60 / 100 + 60);
    let stopped = Instant::now();
    let mut remaining;
    loop {
        remaining = api.list(&ListParams::default()).await?.items;
        let left: Vec<_> = remaining
            .iter()
            .filter(|d| doomed.contains(&d.name_any()))
            .collect();
        let gone_on_fly = emulator.inventory().apps.len() == names.len() - doomed.len();
        if left.is_empty() && gone_on_fly {
            break;
        }
        anyhow::ensure!(
            stopped.elapsed() < bound,
            "after {bound:?}: {} resources still exist ({:?}), {} apps on Fly\n{}",
            left.len(),
            left.iter()
                .map(|d| (d.name_any(), d.finalizers().to_vec(), d.status.clone()))
                .collect::<Vec<_>>(),
            emulator.inventory().apps.len(),
            supervisor.current_log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deleted_after = stopped.elapsed();
    let ready_after = wait_all_ready(&api, names.len() - doomed.len(), Duration::from_secs(60))
        .await
        .map_err(|left| anyhow::anyhow!("survivors not Ready: {left:#?}"))?;

    let inventory = emulator.inventory();
    let audit = audit_fleet(&inventory, &remaining, &["iad-0"]);
    let doomed_apps: Vec<&String> = apps_before
        .iter()
        .filter(|(name, _)| doomed.contains(name))
        .map(|(_, app)| app)
        .collect();
    let leftovers: Vec<&&String> = doomed_apps
        .iter()
        .filter(|app| inventory.app(app).is_some())
        .collect();
    let conflicts = lease_conflicts(&emulator);
    eprintln!(
        "deletion under faults: {} of {n} deleted with {kills} SIGKILLs over {chaos:?}, faults {failures:?}; \
         every app gone and finalizer removed {deleted_after:.1?} after the faults stopped ({:.1?} in all); \
         survivors Ready {ready_after:.1?} later; {} apps, {} machines left on Fly; {} violations; \
         {conflicts} lease conflicts; {} apps.delete calls",
        doomed.len(),
        started.elapsed(),
        audit.apps_on_fly,
        audit.machines_on_fly,
        audit.violations.len(),
        emulator.count("apps.delete")
    );
    assert!(
        leftovers.is_empty(),
        "apps of deleted resources left: {leftovers:?}"
    );
    assert!(audit.violations.is_empty(), "{:#?}", audit.violations);
    assert_eq!(audit.apps_on_fly, names.len() - doomed.len());
    assert_eq!(audit.machines_on_fly, names.len() - doomed.len());
    assert_eq!(conflicts, 0);
    Ok(())
}
