//! The test harness's control plane is the real thing: a real apiserver version, real RBAC decisions, kubectl
//! and helm that talk to it, and no process left behind when a test panics.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use mcpfly::local_cluster::{ControlPlane, ControlPlaneOptions, process::process_is_running};

#[tokio::test]
async fn apiserver_is_real_and_reports_its_version() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let version = cp.apiserver_version().await?;
    // The binary's own idea of its version must match what the running server reports.
    let binary = std::process::Command::new(&cp.binaries().kube_apiserver)
        .arg("--version")
        .output()?;
    let binary = String::from_utf8(binary.stdout)?;
    eprintln!(
        "kube-apiserver reports {version}; binary says {}",
        binary.trim()
    );
    assert!(version.starts_with("v1."), "unexpected version {version}");
    assert_eq!(binary.trim(), format!("Kubernetes {version}"));

    let out = cp.kubectl().args(["version", "-o", "json"]).output()?;
    assert!(
        out.status.success(),
        "kubectl version failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["serverVersion"]["gitVersion"], version.as_str());
    Ok(())
}

#[tokio::test]
async fn rbac_decides_for_impersonated_users() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.create_namespace("rbac-check").await?;
    let alice: Api<Secret> = Api::namespaced(cp.client_as("alice", &[]).await?, "rbac-check");
    let denied = alice
        .list(&ListParams::default())
        .await
        .expect_err("alice has no role yet");
    assert!(
        matches!(&denied, kube::Error::Api(e) if e.code == 403),
        "expected 403, got {denied:?}"
    );

    let admin = cp.client().await?;
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "secret-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]
    }))?;
    Api::<Role>::namespaced(admin.clone(), "rbac-check")
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "alice-reads-secrets"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]
    }))?;
    Api::<RoleBinding>::namespaced(admin, "rbac-check")
        .create(&PostParams::default(), &binding)
        .await?;
    // RBAC decisions follow the informer cache in the apiserver: allow a moment for the binding to count.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match alice.list(&ListParams::default()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("alice still denied after binding: {e}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn helm_reaches_the_control_plane() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let out = cp
        .helm()?
        .args(["list", "--all-namespaces", "-o", "json"])
        .output()?;
    assert!(
        out.status.success(),
        "helm list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?.trim(), "[]");
    Ok(())
}

const LEAK_PROBE_ENV: &str = "MCPFLY_TESTENV_LEAK_PROBE_PIDFILE";

/// Runs only inside the child process of `no_process_survives_a_panicking_test`: starts a control plane,
/// writes its pids, then panics without any cleanup code running for the shared instance.
#[tokio::test]
async fn leak_probe_child() -> anyhow::Result<()> {
    let Some(pidfile) = std::env::var_os(LEAK_PROBE_ENV) else {
        return Ok(());
    };
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let pids = cp
        .pids()
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(pidfile, pids)?;
    // Leak the handle on purpose (as a static would be): only PDEATHSIG can clean up now.
    std::mem::forget(cp);
    panic!("leak probe panics on purpose");
}

#[test]
fn no_process_survives_a_panicking_test() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("pids");
    // Output captured: the child's own "test result: FAILED" line would read like a failure of this suite.
    let probe = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "leak_probe_child"])
        .env(LEAK_PROBE_ENV, &pidfile)
        .output()?;
    assert!(!probe.status.success(), "the probe must fail by panicking");
    let pids: Vec<u32> = std::fs::read_to_string(&pidfile)?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver pids");
    assert!(pids.iter().all(|&pid| pid > 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&pid| process_is_running(pid)) {
        assert!(
            Instant::now() < deadline,
            "control-plane processes {pids:?} outlived the test process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
