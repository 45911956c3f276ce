//! `mcpfly seal --via-cluster`: sealing without holding the key, through the real kube-apiserver's service
//! proxy to the controller's seal endpoint, with Kubernetes RBAC deciding who may seal.
//!
//! The apiserver refuses loopback addresses as Service endpoints, so the seal endpoint runs on a test host in
//! a network namespace this test creates (a veth pair on a private /30, torn down afterwards).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use mcpfly::sealing::{KeyRing, Target, unseal};
use mcpfly::testenv::ControlPlane;
use mcpfly::testenv::process::{Stop, Supervised};

const CHILD_ADDR_ENV: &str = "MCPFLY_TEST_SEAL_ENDPOINT_ADDR";
const CHILD_KEY_ENV: &str = "MCPFLY_TEST_SEAL_ENDPOINT_KEY";
const PORT: u16 = 18080;
const CANARY: &str = "canary-via-cluster-51e2";

/// Runs only inside the network namespace: serves the seal endpoint until killed.
#[tokio::test]
async fn seal_endpoint_child() -> anyhow::Result<()> {
    let (Ok(addr), Ok(key)) = (std::env::var(CHILD_ADDR_ENV), std::env::var(CHILD_KEY_ENV)) else {
        return Ok(());
    };
    let ring = Arc::new(KeyRing::parse(&key, "test")?);
    let listener = tokio::net::TcpListener::bind(addr.parse::<SocketAddr>()?).await?;
    axum::serve(listener, mcpfly::sealing::endpoint::router(ring)).await?;
    Ok(())
}

/// A veth pair into a fresh network namespace; removed on drop.
struct TestHost {
    netns: String,
    host_link: String,
    peer_ip: String,
}

impl TestHost {
    fn create() -> anyhow::Result<Self> {
        let tag = std::process::id() % 250;
        let netns = format!("mcpfly-seal-{}", std::process::id());
        let host_link = format!("mcps{tag}a");
        let (host_ip, peer_ip) = (format!("10.213.{tag}.1"), format!("10.213.{tag}.2"));
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("ip").args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "`ip {}` failed: {} (this test needs root to create a network namespace)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        let host = Self {
            netns: netns.clone(),
            host_link: host_link.clone(),
            peer_ip: peer_ip.clone(),
        };
        let peer_link = format!("mcps{tag}b");
        run(&["netns", "add", &netns])?;
        run(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &peer_link,
        ])?;
        run(&["link", "set", &peer_link, "netns", &netns])?;
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_link])?;
        run(&["link", "set", &host_link, "up"])?;
        run(&[
            "netns",
            "exec",
            &netns,
            "ip",
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_link,
        ])?;
        run(&[
            "netns", "exec", &netns, "ip", "link", "set", &peer_link, "up",
        ])?;
        run(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])?;
        Ok(host)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

fn mcpfly_seal(kubeconfig: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args([
            "seal",
            "--via-cluster",
            "--namespace",
            "team-a",
            "--name",
            "github",
        ])
        .arg(format!("--from-literal=TOKEN={CANARY}"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("MCPFLY_KEY_FILE")
        .output()
        .expect("mcpfly runs")
}

/// Seals through the cluster, retrying for a few seconds: the apiserver's service proxy and RBAC both answer
/// from caches that lag a fresh Service, EndpointSlice or RoleBinding.
async fn seal_when_allowed(kubeconfig: &std::path::Path) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = mcpfly_seal(kubeconfig);
        if out.status.success() {
            return Ok(out);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "seal --via-cluster still failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn seal_via_cluster_goes_through_the_service_proxy_and_rbac_decides() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let key = mcpfly::sealing::keyring::generate_key();
    let ring = KeyRing::parse(&key, "test")?;
    let host = TestHost::create()?;

    let mut child = Command::new("ip");
    child
        .args(["netns", "exec", &host.netns])
        .arg(std::env::current_exe()?)
        .args(["--exact", "seal_endpoint_child", "--nocapture"])
        .env(CHILD_ADDR_ENV, format!("{}:{PORT}", host.peer_ip))
        .env(CHILD_KEY_ENV, key.as_str());
    let log = tempfile::NamedTempFile::new()?;
    let endpoint = Supervised::spawn("seal-endpoint", child, log.path())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect((host.peer_ip.as_str(), PORT))
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "seal endpoint did not start: {}",
            endpoint.log_tail(2000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The controller's Service as the chart makes it, with its endpoint on the test host.
    cp.create_namespace("mcpfly-system").await?;
    let client = cp.client().await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mcpfly", "namespace": "mcpfly-system"},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": PORT}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), "mcpfly-system")
        .create(&PostParams::default(), &service)
        .await?;
    // No kubelet or controller-manager runs, so what a running controller Pod would have is written by hand:
    // the service proxy only dials Endpoints addresses whose targetRef is a Pod with that IP.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "mcpfly-system");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mcpfly-0", "namespace": "mcpfly-system"},
        "spec": {"containers": [{"name": "controller", "image": "mcpfly:test"}]},
    }))?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let running =
        serde_json::json!({"status": {"podIP": host.peer_ip, "podIPs": [{"ip": host.peer_ip}]}});
    pods.patch_status("mcpfly-0", &PatchParams::default(), &Patch::Merge(&running))
        .await?;
    let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mcpfly", "namespace": "mcpfly-system"},
        "subsets": [{
            "addresses": [{"ip": host.peer_ip, "targetRef": {
                "kind": "Pod", "namespace": "mcpfly-system", "name": "mcpfly-0", "uid": pod.metadata.uid,
            }}],
            "ports": [{"name": "http", "port": PORT}],
        }],
    }))?;
    Api::<Endpoints>::namespaced(client.clone(), "mcpfly-system")
        .create(&PostParams::default(), &endpoints)
        .await?;

    // An admin may seal: the result unseals for its resource with the controller's key.
    let out = seal_when_allowed(cp.kubeconfig_path()).await?;
    let (stdout, stderr) = (
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    );
    assert!(
        !stdout.contains(CANARY) && !stderr.contains(CANARY),
        "plaintext printed"
    );
    let block: serde_yaml::Value = serde_yaml::from_str(&stdout)?;
    let sealed = block["credentials"][0]["sealed"]
        .as_str()
        .expect("a sealed value")
        .to_string();
    let unsealed = unseal(&ring, &sealed, &Target::new("team-a", "github", "TOKEN"))?;
    assert_eq!(unsealed.value.expose(), CANARY);

    // Someone without services/proxy on the controller's Service may not.
    let bob = cp.write_kubeconfig_as("bob", &["system:authenticated"])?;
    let denied = mcpfly_seal(&bob);
    assert!(!denied.status.success(), "bob sealed without permission");
    let message = String::from_utf8(denied.stderr)?;
    assert!(
        message.contains("403") || message.contains("forbidden"),
        "RBAC refused: {message}"
    );
    assert!(!message.contains(CANARY));

    // Granting exactly that permission lets bob seal.
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sealer", "namespace": "mcpfly-system"},
        "rules": [{"apiGroups": [""], "resources": ["services/proxy"],
                   "resourceNames": ["mcpfly", "mcpfly:http"], "verbs": ["create"]}],
    }))?;
    Api::<Role>::namespaced(client.clone(), "mcpfly-system")
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bob-seals", "namespace": "mcpfly-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sealer"},
        "subjects": [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}],
    }))?;
    Api::<RoleBinding>::namespaced(client, "mcpfly-system")
        .create(&PostParams::default(), &binding)
        .await?;
    let allowed = seal_when_allowed(&bob).await?;
    assert!(String::from_utf8(allowed.stdout)?.contains("sealed:"));
    endpoint.stop(Stop::Kill);
    Ok(())
}
