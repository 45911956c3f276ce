//! Two controller processes with leader election: only the leader talks to Fly to change things, the follower
//! stays ready; when the leader is killed (SIGKILL, no release) the follower takes over within the lease
//! duration plus a few seconds; on SIGTERM the leader releases the Lease and exits cleanly.

mod ops_support;

use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use ops_support::{
    ControllerProcess, SYSTEM_NS, apply_deployment, deployment, eventually, is_ready,
    takeover_bound,
};

const NS: &str = "leader-test";
const LEASE: &str = "leader-test-lease";
/// `leaseDurationSeconds` the controller writes (LeaseTiming::default()).
const LEASE_DURATION: Duration = Duration::from_secs(15);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test]
async fn only_the_leader_mutates_and_a_follower_takes_over() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    cp.create_namespace(SYSTEM_NS).await?;
    let client = cp.client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
    let deployments: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let env = [
        ("MCPFLY_NAMESPACES", NS),
        ("MCPFLY_LEASE_NAME", LEASE),
        ("MCPFLY_LEADER_ELECTION", "true"),
    ];
    let spawn = |name: &str| {
        ControllerProcess::spawn(cp, name, cp.kubeconfig_path(), &emulator.base_url(), &env)
    };

    let mut a = spawn("leader-a")?;
    a.wait_ready(Duration::from_secs(30)).await?;
    assert!(
        eventually(Duration::from_secs(10), || async {
            holder(&leases).await.as_deref() == Some("leader-a")
        })
        .await,
        "a never led:\n{}",
        a.log()
    );
    let mut b = spawn("leader-b")?;
    b.wait_ready(Duration::from_secs(30)).await?;

    apply_deployment(&client, &deployment(NS, "elected", serde_json::json!({}))).await?;
    assert!(
        eventually(Duration::from_secs(30), || async {
            deployments
                .get_opt("elected")
                .await
                .ok()
                .flatten()
                .is_some_and(|d| is_ready(&d))
        })
        .await,
        "not Ready:\n{}",
        a.log()
    );
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(ma.value("mcpfly_leader"), Some(1.0));
    assert_eq!(mb.value("mcpfly_leader"), Some(0.0));
    assert!(ma.fly_mutations() >= 3.0, "leader: {}", ma.0);
    assert_eq!(
        mb.fly_mutations(),
        0.0,
        "the follower changed something on Fly: {}",
        mb.0
    );
    // The follower's only Fly call was its start-up check of the token and org; it reconciled nothing.
    assert_eq!(mb.fly_calls("apps.list"), 1.0);
    assert_eq!(mb.value("mcpfly_reconciles_total{outcome=\"ok\"}"), None);
    assert_eq!(holder(&leases).await.as_deref(), Some("leader-a"));

    // Kill the leader without letting it release: the follower waits for the lease to expire.
    a.kill();
    let killed = Instant::now();
    let took_over = eventually(LEASE_DURATION + Duration::from_secs(10), || async {
        holder(&leases).await.as_deref() == Some("leader-b")
            && b.metrics().await.value("mcpfly_leader") == Some(1.0)
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL: {:.1} s", takeover.as_secs_f64());
    assert!(took_over, "b never took over:\n{}", b.log());
    assert!(
        takeover <= takeover_bound(),
        "takeover took {takeover:?}, more than {:?}",
        takeover_bound()
    );

    // The new leader does the work now: deletion goes through it.
    deployments
        .delete("elected", &DeleteParams::default())
        .await?;
    assert!(
        eventually(Duration::from_secs(30), || async {
            deployments
                .get_opt("elected")
                .await
                .ok()
                .flatten()
                .is_none()
        })
        .await,
        "not deleted:\n{}",
        b.log()
    );
    assert!(b.metrics().await.fly_calls("apps.delete") >= 1.0);

    // Graceful shutdown releases the Lease, so a successor need not wait for it to expire.
    assert_eq!(b.terminate(Duration::from_secs(20)), Some(0), "{}", b.log());
    assert_eq!(holder(&leases).await, None);
    let mut c = spawn("leader-c")?;
    let started = Instant::now();
    c.wait_ready(Duration::from_secs(30)).await?;
    assert!(
        eventually(Duration::from_secs(10), || async {
            holder(&leases).await.as_deref() == Some("leader-c")
        })
        .await
    );
    eprintln!(
        "successor after a released lease led within {:.1} s of starting",
        started.elapsed().as_secs_f64()
    );
    assert!(started.elapsed() < LEASE_DURATION);
    Ok(())
}
