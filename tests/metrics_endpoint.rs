//! The controller process's HTTP server: `/healthz`, `/readyz` (which waits for the key ring) and `/metrics`
//! with the DESIGN §6 series, checked against what the emulator counted.

mod ops_support;

use std::time::Duration;

use fly_emulator::{Emulator, EmulatorConfig};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use mcpfly::sealing::{KeyRing, Scope, Target, generate_key, seal};
use ops_support::{ControllerProcess, apply_deployment, deployment, eventually, is_ready};

const NS: &str = "metrics-test";

#[tokio::test]
async fn metrics_health_and_readiness_of_a_running_controller() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let client = cp.client().await?;
    let emulator = Emulator::start(EmulatorConfig::default()).await?;

    let mut controller = ControllerProcess::spawn(
        cp,
        "metrics",
        cp.kubeconfig_path(),
        &emulator.base_url(),
        &[
            ("MCPFLY_NAMESPACES", NS),
            ("MCPFLY_KEYRING_SECRET", &format!("{NS}/keys")),
            ("MCPFLY_LEADER_ELECTION", "false"),
        ],
    )?;

    // Live at once; not ready while the key-ring Secret is missing, and /readyz says which.
    assert!(
        eventually(Duration::from_secs(30), || async {
            controller.get("/healthz").await == Some((200, "ok\n".into()))
        })
        .await,
        "{}",
        controller.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(controller.get("/readyz").await, Some((503, body)) if body.contains("keyring: key-ring Secret metrics-test/keys"))
        })
        .await,
        "{:?}",
        controller.get("/readyz").await
    );

    let key = generate_key();
    let ring = KeyRing::parse(&key, "test")?;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "keys", "namespace": NS},
        "stringData": {"keys": *key},
    }))?;
    Api::<Secret>::namespaced(client.clone(), NS)
        .patch(
            "keys",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    controller.wait_ready(Duration::from_secs(15)).await?;

    // One deployment with a sealed credential, taken to Ready.
    let mut manifest = deployment(NS, "metered", serde_json::json!({}));
    let sealed = seal(
        &ring,
        Target::new(NS, "metered", "API_KEY").binding(Scope::Strict),
        "not-a-real-key".into(),
    )?;
    manifest["spec"]["credentials"] = serde_json::json!([{"name": "API_KEY", "sealed": sealed}]);
    apply_deployment(&client, &manifest).await?;
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
    assert!(
        eventually(Duration::from_secs(30), || async {
            api.get_opt("metered")
                .await
                .ok()
                .flatten()
                .is_some_and(|d| is_ready(&d))
        })
        .await,
        "not Ready: {:?}\n{}",
        api.get_opt("metered").await?.and_then(|d| d.status),
        controller.log()
    );

    // The watch cache may lag the status write by a moment.
    let ready_seen = eventually(Duration::from_secs(5), || async {
        controller
            .metrics()
            .await
            .value("mcpfly_deployments{phase=\"Ready\"}")
            == Some(1.0)
    })
    .await;
    let m = controller.metrics().await;
    eprintln!("{}", m.0);
    assert!(ready_seen, "mcpfly_deployments{{phase=\"Ready\"}} != 1");
    assert_eq!(m.value("mcpfly_deployments{phase=\"Pending\"}"), Some(0.0));
    assert_eq!(m.value("mcpfly_leader"), Some(1.0));
    let primary = ring.primary_id().as_str().to_string();
    assert_eq!(
        m.value(&format!("mcpfly_credentials{{key=\"{primary}\"}}")),
        Some(1.0)
    );
    assert_eq!(m.value("mcpfly_credentials_non_primary"), Some(0.0));

    let ok = m
        .value("mcpfly_reconciles_total{outcome=\"ok\"}")
        .unwrap_or(0.0);
    let count = m
        .value("mcpfly_reconcile_duration_seconds_count")
        .unwrap_or(0.0);
    let sum = m
        .value("mcpfly_reconcile_duration_seconds_sum")
        .unwrap_or(0.0);
    assert!(ok >= 2.0, "reconciles ok = {ok}");
    assert!(count >= ok, "duration count {count} < reconciles {ok}");
    assert!(
        sum > 0.0 && sum / count < 5.0,
        "mean reconcile {sum}/{count} s"
    );

    // Every Fly exchange the emulator answered is in the metrics, by endpoint and status. The controller keeps
    // looking, so a call may be answered but not yet counted at one scrape: compare until a scrape agrees
    // (bounded); a call missing from the metrics never does.
    let mut disagreement = Vec::new();
    for _ in 0..50 {
        let answered = emulator.call_counts();
        let scraped = controller.metrics().await;
        disagreement = answered
            .iter()
            .filter_map(|((label, status), n)| {
                let series = format!(
                    "mcpfly_fly_api_calls_total{{endpoint=\"{label}\",status=\"{status}\"}}"
                );
                let value = scraped.value(&series);
                (value != Some(*n as f64)).then(|| format!("{series}: {value:?}, answered {n}"))
            })
            .collect();
        if disagreement.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(disagreement.is_empty(), "{disagreement:#?}");
    assert_eq!(m.fly_calls("apps.create"), 1.0, "exactly one app created");
    assert_eq!(
        m.fly_calls("machines.create"),
        1.0,
        "exactly one machine created"
    );
    assert!(
        m.value("mcpfly_fly_api_call_duration_seconds_count{endpoint=\"apps.create\"}")
            == Some(1.0)
    );
    eprintln!(
        "reconciles ok={ok} mean={:.1} ms; fly calls={}",
        sum / count * 1000.0,
        emulator.total_calls()
    );

    api.delete("metered", &DeleteParams::default()).await?;
    assert!(
        eventually(Duration::from_secs(30), || async {
            api.get_opt("metered").await.ok().flatten().is_none()
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            controller
                .metrics()
                .await
                .value("mcpfly_deployments{phase=\"Ready\"}")
                == Some(0.0)
        })
        .await
    );
    assert!(controller.metrics().await.fly_calls("apps.delete") >= 1.0);
    // Graceful shutdown on SIGTERM.
    assert_eq!(controller.terminate(Duration::from_secs(20)), Some(0));
    Ok(())
}
