//! `mcpfly seal --via-cluster` against the real kube-apiserver: through its service proxy to the controller's seal
//! listener, which checks the caller's token with a TokenReview and asks the API server with a
//! SubjectAccessReview whether the caller may `create` `mcpdeployments/seal` in the target namespace.
//!
//! The apiserver refuses loopback addresses as Service endpoints, so the seal listener binds the host end of a
//! veth pair into a network namespace this test creates (a private /30, torn down afterwards).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use mcpfly::local_cluster::ControlPlane;
use mcpfly::sealing::listener::{ApiServer, Limits};
use mcpfly::sealing::{KeyRing, Target, unseal};

const PORT: u16 = 18081;
const CANARY: &str = "canary-via-cluster-51e2";

/// A veth pair into a fresh network namespace; removed on drop.
struct TestHost {
    netns: String,
    host_link: String,
    host_ip: String,
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
            host_ip: host_ip.clone(),
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

/// Runs `mcpfly seal --via-cluster` without blocking the runtime that serves the seal listener.
async fn mcpfly_seal(kubeconfig: &std::path::Path, namespace: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args([
            "seal",
            "--via-cluster",
            "--namespace",
            namespace,
            "--name",
            "github",
        ])
        .arg(format!("--from-literal=TOKEN={CANARY}"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("MCPFLY_KEY_FILE")
        .output()
        .await
        .expect("mcpfly runs")
}

/// Seals through the cluster until `done` accepts the outcome, for up to 20 s: the apiserver's service proxy
/// and RBAC both answer from caches that lag a fresh Service, EndpointSlice or RoleBinding.
async fn seal_until(
    kubeconfig: &std::path::Path,
    namespace: &str,
    what: &str,
    done: impl Fn(&std::process::Output) -> bool,
) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = mcpfly_seal(kubeconfig, namespace).await;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains(CANARY) && !String::from_utf8_lossy(&out.stdout).contains(CANARY),
            "plaintext printed"
        );
        if done(&out) {
            return Ok(out);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: still {stderr}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn refused_by_the_listener(out: &std::process::Output) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && stderr.contains("403") && stderr.contains("mcpdeployments/seal")
}

async fn create<K>(api: Api<K>, value: serde_json::Value) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    api.create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?;
    Ok(())
}

#[tokio::test]
async fn seal_via_cluster_is_authenticated_and_authorised_by_the_api_server() -> anyhow::Result<()>
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let key = mcpfly::sealing::keyring::generate_key();
    let ring = Arc::new(KeyRing::parse(&key, "test")?);
    let host = TestHost::create()?;

    // The controller's ServiceAccount with exactly the chart's rights for the listener: token and access
    // reviews.
    let controller = "system:serviceaccount:mcpfly-system:mcpfly";
    create::<ClusterRole>(Api::all(client.clone()), serde_json::json!({
        "metadata": {"name": "seal-test-reviews"},
        "rules": [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
        ],
    })).await?;
    create::<ClusterRoleBinding>(Api::all(client.clone()), serde_json::json!({
        "metadata": {"name": "seal-test-reviews"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "seal-test-reviews"},
        "subjects": [{"kind": "User", "name": controller, "apiGroup": "rbac.authorization.k8s.io"}],
    })).await?;
    let as_controller = cp
        .client_as(controller, &["system:serviceaccounts"])
        .await?;
    let source = ring.clone();
    let app = mcpfly::sealing::listener::router(
        Arc::new(move || Some(source.clone())),
        Arc::new(ApiServer(as_controller)),
        Limits::default(),
    );
    let listen: SocketAddr = format!("{}:{PORT}", host.host_ip).parse()?;
    let (_, listener) =
        mcpfly::sealing::listener::serve(listen, app, std::future::pending()).await?;

    // The controller's Service as the chart makes it, with its endpoint on the test host. No kubelet or
    // controller-manager runs, so what a running controller Pod would have is written by hand: the service
    // proxy only dials Endpoints addresses whose targetRef is a Pod with that IP.
    cp.create_namespace("mcpfly-system").await?;
    create::<Service>(
        Api::namespaced(client.clone(), "mcpfly-system"),
        serde_json::json!({
            "metadata": {"name": "mcpfly"},
            "spec": {"ports": [{"name": "seal", "port": 8081, "targetPort": PORT}]},
        }),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "mcpfly-system");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mcpfly-0", "namespace": "mcpfly-system"},
        "spec": {"containers": [{"name": "controller", "image": "mcpfly:test"}]},
    }))?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let running =
        serde_json::json!({"status": {"podIP": host.host_ip, "podIPs": [{"ip": host.host_ip}]}});
    pods.patch_status("mcpfly-0", &PatchParams::default(), &Patch::Merge(&running))
        .await?;
    create::<Endpoints>(Api::namespaced(client.clone(), "mcpfly-system"), serde_json::json!({
        "metadata": {"name": "mcpfly"},
        "subsets": [{
            "addresses": [{"ip": host.host_ip, "targetRef": {
                "kind": "Pod", "namespace": "mcpfly-system", "name": "mcpfly-0", "uid": pod.metadata.uid,
            }}],
            "ports": [{"name": "seal", "port": PORT}],
        }],
    })).await?;
    // As the chart does by default: anyone authenticated may reach the seal port through the proxy (the
    // listener decides who may seal), and nothing else of the Service.
    create::<Role>(
        Api::namespaced(client.clone(), "mcpfly-system"),
        serde_json::json!({
            "metadata": {"name": "seal-proxy"},
            "rules": [{"apiGroups": [""], "resources": ["services/proxy"],
                       "resourceNames": ["mcpfly:seal"], "verbs": ["create"]}],
        }),
    )
    .await?;
    create::<RoleBinding>(Api::namespaced(client.clone(), "mcpfly-system"), serde_json::json!({
        "metadata": {"name": "seal-proxy"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "seal-proxy"},
        "subjects": [{"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"}],
    })).await?;

    // bob, a ServiceAccount with a token and no right to seal: the listener refuses him (403).
    cp.create_namespace("team-a").await?;
    let bob_token = cp.service_account_token("team-a", "bob").await?;
    let bob = cp.write_kubeconfig_with_token("bob", &bob_token)?;
    seal_until(
        &bob,
        "team-a",
        "bob refused by the seal listener",
        refused_by_the_listener,
    )
    .await?;

    // Granted `create` on mcpdeployments/seal in team-a, bob seals there; the result unseals for its resource.
    create::<ClusterRole>(Api::all(client.clone()), serde_json::json!({
        "metadata": {"name": "seal-test-sealer"},
        "rules": [{"apiGroups": ["mcpfly.dev"], "resources": ["mcpdeployments/seal"], "verbs": ["create"]}],
    })).await?;
    create::<RoleBinding>(Api::namespaced(client.clone(), "team-a"), serde_json::json!({
        "metadata": {"name": "bob-seals"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "seal-test-sealer"},
        "subjects": [{"kind": "ServiceAccount", "name": "bob", "namespace": "team-a"}],
    })).await?;
    let allowed = seal_until(&bob, "team-a", "bob sealing with the Role", |out| {
        out.status.success()
    })
    .await?;
    let block: serde_yaml::Value = serde_yaml::from_slice(&allowed.stdout)?;
    let sealed = block["credentials"][0]["sealed"]
        .as_str()
        .expect("a sealed value")
        .to_string();
    let unsealed = unseal(&ring, &sealed, &Target::new("team-a", "github", "TOKEN"))?;
    assert_eq!(unsealed.value.expose(), CANARY);
    // The grant is for team-a only.
    assert!(refused_by_the_listener(&mcpfly_seal(&bob, "team-b").await));

    // The admin's kubeconfig holds a client certificate, which cannot pass the proxy: a clear refusal.
    let admin = mcpfly_seal(cp.kubeconfig_path(), "team-a").await;
    assert!(!admin.status.success());
    assert!(
        String::from_utf8_lossy(&admin.stderr).contains("bearer token"),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );

    // Straight to the listener, bypassing the API server: no token 401, a forged one 401, bob's with an
    // oversize body 413.
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/seal");
    let body =
        format!(r#"{{"namespace":"team-a","name":"github","values":{{"TOKEN":"{CANARY}"}}}}"#);
    let direct = |token: Option<&str>, body: String| {
        let mut request = http.post(&url).header("content-type", "application/json");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.body(body).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(direct(None, body.clone()).await?, 401);
    assert_eq!(direct(Some("forged-token"), body.clone()).await?, 401);
    let huge = format!(
        r#"{{"namespace":"team-a","name":"github","values":{{"TOKEN":"{}"}}}}"#,
        "x".repeat(mcpfly::sealing::endpoint::MAX_BODY)
    );
    assert_eq!(direct(Some(&bob_token), huge).await?, 413);
    assert_eq!(direct(Some(&bob_token), body).await?, 200);
    listener.abort();
    Ok(())
}
