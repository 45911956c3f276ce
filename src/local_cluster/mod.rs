//! A real Kubernetes control plane for tests and for the local demo: `etcd` and `kube-apiserver` on free loopback
//! ports with a fresh data directory, plus `kubectl` and `helm` pointed at it.
//!
//! Nothing here is a fake: CRD validation, CEL, the status subresource, finalizers, server-side apply and RBAC
//! are the apiserver's own. Processes die with the test process (see [`process`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cp = mcpfly::local_cluster::ControlPlane::shared().await?;
//! cp.install_crds().await?;
//! let client = cp.client().await?;
//! # Ok(()) }
//! ```

mod bins;
mod certs;
pub mod process;
pub mod stack;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

pub use bins::Binaries;
use certs::Pki;
use process::{Stop, Supervised};

const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The deployment large tests apply by the thousand: an image source (no registry needed), one machine in one
/// region, bearer auth (so the controller also writes the connection Secret and sets one Fly secret).
pub fn image_deployment(namespace: &str, name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1",
        "kind": "MCPDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"image": {"ref": "ghcr.io/mcpfly/runtime:0.1.0", "port": 8080, "path": "/mcp"}},
            "fly": {"regions": ["iad"]},
            "access": {"auth": "bearer"},
        },
    })
}

/// Options for [`ControlPlane::start`].
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// `--authorization-mode=RBAC` (the admin user is in `system:masters` and bypasses it). When false,
    /// `AlwaysAllow`.
    pub rbac: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self { rbac: true }
    }
}

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    bins: Binaries,
    dir: PathBuf,
    etcd_port: u16,
    etcd_peer_port: u16,
    apiserver_port: u16,
    options: ControlPlaneOptions,
    pki: Pki,
    kubeconfig_path: PathBuf,
    etcd: Mutex<Option<Supervised>>,
    apiserver: Mutex<Option<Supervised>>,
    crds_installed: OnceCell<()>,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

impl ControlPlane {
    /// One control plane per test binary, started on first use and shared by every test in it. Tests isolate
    /// themselves by namespace. Its processes end when the test binary exits.
    pub async fn shared() -> anyhow::Result<&'static ControlPlane> {
        SHARED
            .get_or_try_init(|| Self::start(ControlPlaneOptions::default()))
            .await
    }

    /// Starts a fresh control plane in a new temporary directory.
    pub async fn start(options: ControlPlaneOptions) -> anyhow::Result<Self> {
        let bins = tokio::task::spawn_blocking(Binaries::locate).await??;
        let dir = fresh_run_dir()?;
        let pki = Pki::generate(&dir.join("pki"))?;
        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports::<3>()?;
        let kubeconfig_path = dir.join("kubeconfig");
        let cp = Self {
            bins,
            dir,
            etcd_port,
            etcd_peer_port,
            apiserver_port,
            options,
            pki,
            kubeconfig_path,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            crds_installed: OnceCell::new(),
        };
        std::fs::write(&cp.kubeconfig_path, cp.kubeconfig_yaml("admin", None))?;
        cp.start_etcd().await?;
        cp.start_apiserver().await?;
        tracing::info!(version = %cp.apiserver_version().await?, url = %cp.server_url(), "control plane ready");
        Ok(cp)
    }

    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The admin kubeconfig (user `admin`, group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The folder holding this control plane's data, logs and PKI.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client for the admin user. Make a new one per test: a client's connections belong to the tokio
    /// runtime that created it, and every `#[tokio::test]` has its own.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_for(None).await
    }

    /// A client acting as `user` in `groups`, through impersonation by the admin, so that RBAC decides what it
    /// may do exactly as it would for that user (e.g. `system:serviceaccount:mcpfly-system:mcpfly`).
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> anyhow::Result<kube::Client> {
        self.client_for(Some((user, groups))).await
    }

    /// The admin's client configuration, for building a client with extra layers (e.g. one that records
    /// traffic).
    pub async fn config(&self) -> anyhow::Result<kube::Config> {
        self.config_for(None).await
    }

    async fn config_for(
        &self,
        impersonate: Option<(&str, &[&str])>,
    ) -> anyhow::Result<kube::Config> {
        let kubeconfig: Kubeconfig =
            serde_yaml::from_str(&self.kubeconfig_yaml("admin", impersonate))?;
        Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
    }

    async fn client_for(
        &self,
        impersonate: Option<(&str, &[&str])>,
    ) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.config_for(impersonate).await?)?)
    }

    /// Writes a kubeconfig that impersonates `user` in `groups` (for running a controller process as a
    /// ServiceAccount under RBAC) and returns its path.
    pub fn write_kubeconfig_as(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let safe: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = self.dir.join(format!("kubeconfig-{safe}"));
        std::fs::write(&path, self.kubeconfig_yaml("admin", Some((user, groups))))?;
        Ok(path)
    }

    /// `kubectl` with this control plane's admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig_path);
        cmd
    }

    /// `helm` with this control plane's admin kubeconfig and caches kept inside the run directory.
    pub fn helm(&self) -> anyhow::Result<Command> {
        let helm = self
            .bins
            .helm
            .as_ref()
            .context("helm not found: run hack/control-plane-bins.sh")?;
        let mut cmd = Command::new(helm);
        cmd.env("KUBECONFIG", &self.kubeconfig_path)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        Ok(cmd)
    }

    /// The apiserver's `gitVersion`, e.g. `v1.35.4`.
    pub async fn apiserver_version(&self) -> anyhow::Result<String> {
        Ok(self.client().await?.apiserver_version().await?.git_version)
    }

    /// Applies the CRD (`crds/`) with `kubectl apply --server-side` and waits until every CRD is Established. Done once
    /// per control plane; later calls return at once.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        self.crds_installed
            .get_or_try_init(|| async {
                // The CRD the code generates (identical to crds/, a unit test checks), so no source path is needed.
                let crds = self.dir.join("crds.yaml");
                std::fs::write(&crds, crate::api::crd_yaml())
                    .with_context(|| format!("writing {}", crds.display()))?;
                run_checked(
                    self.kubectl()
                        .args(["apply", "--server-side", "--force-conflicts", "-f"])
                        .arg(&crds),
                )
                .await?;
                run_checked(self.kubectl().args([
                    "wait",
                    "--for=condition=Established",
                    "crd",
                    "--all",
                    "--timeout=60s",
                ]))
                .await?;
                anyhow::Ok(())
            })
            .await?;
        Ok(())
    }

    /// Creates a namespace (no error if it exists).
    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops and starts kube-apiserver on the same port and data, for recovery tests.
    pub async fn restart_apiserver(&self) -> anyhow::Result<()> {
        if let Some(old) = self.apiserver.lock().unwrap().take() {
            old.stop(Stop::Graceful);
        }
        self.start_apiserver().await
    }

    /// Stops and starts etcd on the same port and data directory, for recovery tests.
    pub async fn restart_etcd(&self) -> anyhow::Result<()> {
        if let Some(old) = self.etcd.lock().unwrap().take() {
            old.stop(Stop::Graceful);
        }
        self.start_etcd().await
    }

    /// Pids of etcd and kube-apiserver (for leak checks).
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver]
            .iter()
            .filter_map(|slot| slot.lock().unwrap().as_ref().map(Supervised::pid))
            .collect()
    }

    async fn start_etcd(&self) -> anyhow::Result<()> {
        let client_url = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            // Tests do not need durability across machine crashes; fsync dominates etcd latency on CI disks.
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        let child = Supervised::spawn("etcd", cmd, &self.dir.join("etcd.log"))?;
        let health = format!("{client_url}/health");
        wait_until("etcd", &child, || async {
            let body = reqwest_lite_get(&health).await.ok()?;
            body.contains("\"health\":\"true\"").then_some(())
        })
        .await?;
        *self.etcd.lock().unwrap() = Some(child);
        Ok(())
    }

    async fn start_apiserver(&self) -> anyhow::Result<()> {
        let port = self.apiserver_port;
        let mut cmd = Command::new(&self.bins.kube_apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        .arg(format!("--cert-dir={}", self.dir.join("pki").display()))
        .arg(format!(
            "--tls-cert-file={}",
            self.pki.serving_cert_path.display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            self.pki.serving_key_path.display()
        ))
        .arg(format!(
            "--client-ca-file={}",
            self.pki.client_ca_path.display()
        ))
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--allow-privileged=true")
        // No kubelet or controller-manager runs: ServiceAccount admission would wait for token controllers.
        .arg("--disable-admission-plugins=ServiceAccount")
        // Nothing serves the `kubernetes` Service from 127.0.0.1; without this it logs errors forever.
        .arg("--endpoint-reconciler-type=none")
        .arg(format!(
            "--authorization-mode={}",
            if self.options.rbac {
                "RBAC"
            } else {
                "AlwaysAllow"
            }
        ))
        .arg(format!(
            "--service-account-issuer=https://127.0.0.1:{port}/"
        ))
        .arg(format!(
            "--service-account-key-file={}",
            self.pki.service_account_pub_path.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            self.pki.service_account_key_path.display()
        ))
        .arg("--v=0");
        let child = Supervised::spawn("kube-apiserver", cmd, &self.dir.join("kube-apiserver.log"))?;
        // A plain HTTPS probe: the kube client logs every refused connection during start-up as an error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let identity = format!("{}{}", self.pki.admin_cert_pem, self.pki.admin_key_pem);
        let probe = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(
                self.pki.serving_ca_pem.as_bytes(),
            )?)
            .identity(reqwest::Identity::from_pem(identity.as_bytes())?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let readyz = format!("{}/readyz", self.server_url());
        wait_until("kube-apiserver", &child, || async {
            let response = probe.get(&readyz).send().await.ok()?;
            let body = response.text().await.ok()?;
            (body.trim() == "ok").then_some(())
        })
        .await?;
        *self.apiserver.lock().unwrap() = Some(child);
        Ok(())
    }

    fn kubeconfig_yaml(&self, user: &str, impersonate: Option<(&str, &[&str])>) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut user_block = format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&self.pki.admin_cert_pem),
            b64(&self.pki.admin_key_pem)
        );
        if let Some((as_user, groups)) = impersonate {
            user_block.push_str(&format!(
                "    as: {}\n",
                serde_json::to_string(as_user).unwrap()
            ));
            if !groups.is_empty() {
                user_block.push_str(&format!(
                    "    as-groups: {}\n",
                    serde_json::to_string(groups).unwrap()
                ));
            }
        }
        self.kubeconfig_with_user(user, &user_block)
    }

    /// A bearer token for ServiceAccount `namespace/name` (created if missing), from a TokenRequest: what a
    /// person or a pod authenticating with a token presents.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<String> {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: kube::Api<ServiceAccount> =
            kube::Api::namespaced(self.client().await?, namespace);
        let account: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        match accounts.create(&Default::default(), &account).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            other => {
                other?;
            }
        }
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }))?;
        let issued: TokenRequest = accounts
            .create_subresource("token", name, &Default::default(), &request)
            .await?;
        Ok(issued.status.context("TokenRequest without status")?.token)
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (e.g. a ServiceAccount's, from a
    /// TokenRequest) and returns its path.
    pub fn write_kubeconfig_with_token(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-token-{name}"));
        let user_block = format!("    token: {}\n", serde_json::to_string(token)?);
        std::fs::write(&path, self.kubeconfig_with_user(name, &user_block))?;
        Ok(path)
    }

    fn kubeconfig_with_user(&self, user: &str, user_block: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local_cluster\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n{user_block}contexts:\n- name: local_cluster\n  \
             context:\n    cluster: local_cluster\n    user: {user}\ncurrent-context: local_cluster\n",
            self.server_url(),
            b64(&self.pki.serving_ca_pem),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // apiserver first, so it does not log etcd connection errors while going down.
        drop(self.apiserver.lock().unwrap().take());
        drop(self.etcd.lock().unwrap().take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` until it yields `Some`, failing early with the process's log when it exits.
async fn wait_until<F, Fut>(name: &str, child: &Supervised, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if check().await.is_some() {
            return Ok(());
        }
        if !child.is_running() {
            bail!(
                "{name} exited during start-up; last output:\n{}",
                child.log_tail(4000)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} not healthy after {START_TIMEOUT:?}; last output:\n{}",
                child.log_tail(4000)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A minimal HTTP/1.0 GET over plain TCP for etcd's `/health`, so the harness needs no HTTP client of its own.
async fn reqwest_lite_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

async fn run_checked(cmd: &mut Command) -> anyhow::Result<String> {
    let description = format!("{cmd:?}");
    let mut cmd = tokio::process::Command::from(std::mem::replace(cmd, Command::new("true")));
    let output = cmd
        .output()
        .await
        .with_context(|| format!("running {description}"))?;
    if !output.status.success() {
        bail!(
            "{description} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold all listeners until every port is chosen so the N ports are distinct.
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    Ok(ports.try_into().expect("N ports"))
}

/// A new directory under `$TMPDIR/mcpfly-local_cluster/`, named after this process. Directories of processes that
/// no longer run are removed first: a shared control plane lives in a `static`, which is never dropped.
fn fresh_run_dir() -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join("mcpfly-local_cluster");
    std::fs::create_dir_all(&root)?;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !process::process_is_running(pid)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&root)?
        .keep();
    Ok(dir)
}
