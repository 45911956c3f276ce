//! Crash consistency (issue 11): deployments are created while `mcpfly controller` is SIGKILLed every 1–3 s and
//! the emulator fails 5% of calls (429, 5xx, 408 and resets after the work committed, resets before it). After
//! the faults stop every deployment is Ready within a stated bound, with exactly one app each and exactly the
//! desired machines, no orphan app or machine on Fly, and no lease conflict.
//!
//! Size: `MCPFLY_SURVIVAL_DEPLOYMENTS` (CI default 40; the full size is 200) and
//! `MCPFLY_SURVIVAL_CHAOS_SECONDS` (CI default 20; full 60). Figures in RELIABILITY.md.

mod ops_support;
mod survival_support;

use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig, FaultConfig};
use kube::api::{Api, ListParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use ops_support::ControllerProcess;
use survival_support::*;

const NS: &str = "survival-crash";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_every_few_seconds_under_fly_faults_leaks_and_duplicates_nothing()
-> anyhow::Result<()> {
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
    let mut supervisor = Supervisor::new("crash", move |name| {
        ControllerProcess::spawn(
            cp,
            name,
            cp.kubeconfig_path(),
            &url,
            &controller_env(NS, &[]),
        )
    });

    let started = Instant::now();
    supervisor.start_chaos(chaos, Duration::from_secs(1), Duration::from_secs(3))?;
    let names: Vec<String> = (0..n).map(|i| format!("crash-{i:03}")).collect();
    create_all(&client, NS, &names).await?;
    let created = started.elapsed();
    supervisor.finish_chaos().await?;
    let kills = supervisor.kills();
    emulator.set_faults(FaultConfig::default());
    let failures = failures_by_status(&emulator);

    // Bound: the client keeps to Fly's app-creation limit (1/s per org), so n apps take at least n seconds;
    // allow that again plus a minute for the fleet listing and requeues.
    let bound = Duration::from_secs(2 * n + 60);
    let ready_after = wait_all_ready(&api, n as usize, bound)
        .await
        .map_err(|left| {
            anyhow::anyhow!(
                "{} not Ready {bound:?} after the faults stopped: {left:#?}\n{}",
                left.len(),
                tail(&supervisor.current_log())
            )
        })?;
    let total = started.elapsed();

    let resources = api.list(&ListParams::default()).await?.items;
    assert_eq!(resources.len(), n as usize);
    let inventory = emulator.inventory();
    let audit = audit_fleet(&inventory, &resources, &["iad-0"]);
    let conflicts = lease_conflicts(&emulator);
    eprintln!(
        "crash consistency: {n} deployments, {kills} SIGKILLs over {chaos:?} (applies done after {created:?}), \
         faults {failures:?}; all Ready {ready_after:.1?} after the faults stopped ({total:.1?} in all); \
         {} apps, {} machines on Fly; {} violations; {conflicts} lease conflicts; {} Fly calls",
        audit.apps_on_fly,
        audit.machines_on_fly,
        audit.violations.len(),
        emulator.total_calls()
    );
    assert!(
        kills >= (chaos.as_secs() / 3) as usize,
        "only {kills} kills"
    );
    assert!(
        failures.values().sum::<u64>() > 0,
        "no fault was injected: {failures:?}"
    );
    assert!(audit.violations.is_empty(), "{:#?}", audit.violations);
    assert_eq!(audit.apps_on_fly, n as usize);
    assert_eq!(audit.machines_on_fly, n as usize);
    assert_eq!(conflicts, 0);
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
