//! Control-plane restarts (issue 11): kube-apiserver, and separately etcd, are restarted while deployments are
//! being created and deleted. The controller process is never restarted: it recovers on its own (same pid,
//! still running), every deployment created before, during and after a restart becomes Ready, every deletion
//! completes, and the emulator holds exactly what the resources say. A dedicated control plane, since the
//! restarts would disturb other tests.

mod ops_support;
mod survival_support;

use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig};
use kube::api::{Api, DeleteParams, ListParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::{ControlPlane, ControlPlaneOptions};
use ops_support::{ControllerProcess, eventually};
use survival_support::*;

const NS: &str = "survival-cp";

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_and_etcd_restarts_lose_no_work() -> anyhow::Result<()> {
    let batch = env_size("MCPFLY_SURVIVAL_CP_BATCH", 10) as usize;
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let mut controller = ControllerProcess::spawn(
        &cp,
        "cp-restarts",
        cp.kubeconfig_path(),
        &emulator.base_url(),
        &controller_env(NS, &[]),
    )?;
    controller.wait_ready(Duration::from_secs(30)).await?;
    let pid = controller.pid();
    let mut expected = 0;

    let mut figures = Vec::new();
    for (component, restart) in [("kube-apiserver", 0), ("etcd", 1)] {
        // A batch in flight when the component goes down, another once it is back.
        let client = cp.client().await?;
        let before = names(&format!("{}-before", &component[..4]), batch);
        create_all(&client, NS, &before).await?;
        let down = Instant::now();
        if restart == 0 {
            cp.restart_apiserver().await?;
        } else {
            cp.restart_etcd().await?;
        }
        let back = down.elapsed();
        // A fresh client: the old one's connections went down with the apiserver.
        let client = cp.client().await?;
        let api: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
        let after = names(&format!("{}-after", &component[..4]), batch);
        create_all(&client, NS, &after).await?;
        // And a deletion issued right after the restart.
        api.delete(&before[0], &DeleteParams::default()).await?;
        expected += 2 * batch - 1;
        let converged = wait_all_ready(&api, expected, Duration::from_secs(120))
            .await
            .map_err(|left| {
                anyhow::anyhow!(
                    "after the {component} restart: {left:#?}\n{}",
                    controller.log()
                )
            })?;
        assert!(
            eventually(Duration::from_secs(30), || async {
                api.get_opt(&before[0]).await.ok().flatten().is_none()
            })
            .await,
            "deletion after the {component} restart never completed"
        );
        assert_eq!(
            controller.exited(),
            None,
            "the controller exited after the {component} restart:\n{}",
            controller.log()
        );
        figures.push(format!(
            "{component} down and back in {back:.1?}, all {expected} Ready and the deletion done {converged:.1?} later"
        ));
    }

    let api: Api<MCPDeployment> = Api::namespaced(cp.client().await?, NS);
    let resources = api.list(&ListParams::default()).await?.items;
    let audit = audit_fleet(&emulator.inventory(), &resources, &["iad-0"]);
    eprintln!(
        "control-plane restarts: {}; controller pid {pid} throughout; {} apps on Fly; {} violations",
        figures.join("; "),
        audit.apps_on_fly,
        audit.violations.len()
    );
    assert_eq!(controller.pid(), pid);
    assert!(audit.violations.is_empty(), "{:#?}", audit.violations);
    assert_eq!(audit.apps_on_fly, expected);
    Ok(())
}
