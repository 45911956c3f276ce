//! Shared by the operations tests (helm, RBAC, leader election, metrics): the controller as a separate
//! process (the binary users run), its HTTP endpoints, and a small deployment to drive it with.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN};
use kube::api::{Api, Patch, PatchParams};
use mcpfly::api::{ConditionType, MCPDeployment};
use mcpfly::local_cluster::ControlPlane;

/// The ServiceAccount namespace the chart is rendered for.
pub const SYSTEM_NS: &str = "mcpfly-system";

/// The longest a follower may take to lead after the leader died without releasing the Lease, by construction
/// of the controller's timing: it sees the leader's last renewal (made at or before the death) within one retry
/// period, and takes over on its first look a lease duration after that, at most one retry period late; 3 s
/// cover the API server round trips of those looks and the test's own poll (15 + 2·2 + 3 = 22 s).
pub fn takeover_bound() -> Duration {
    let timing = mcpfly::controller::leader::LeaseTiming::default();
    timing.lease_duration + 2 * timing.retry_period + Duration::from_secs(3)
}

/// A `mcpfly controller` process; killed (SIGKILL) when dropped.
pub struct ControllerProcess {
    child: Option<Child>,
    pub name: String,
    /// Base URLs of the HTTP server and the seal listener, once read from the log ([`Self::http`],
    /// [`Self::seal`]).
    http: OnceLock<String>,
    seal: OnceLock<String>,
    log: PathBuf,
}

impl ControllerProcess {
    /// Starts the controller binary with `kubeconfig`, against the emulator at `fly_url`; `env` adds or
    /// overrides variables (e.g. MCPFLY_NAMESPACES, MCPFLY_LEASE_NAME).
    pub fn spawn(
        cp: &ControlPlane,
        name: &str,
        kubeconfig: &Path,
        fly_url: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = cp.dir().join(format!("controller-{name}.log"));
        let file = std::fs::File::create(&log)?;
        // A benchmark may compare another build of the controller (BENCHMARKS.md, "Secrets by metadata").
        let binary = std::env::var_os("MCPFLY_TEST_CONTROLLER_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_mcpfly").into());
        let mut cmd = Command::new(binary);
        cmd.arg("controller")
            .env("KUBECONFIG", kubeconfig)
            .env("FLY_API_BASE_URL", fly_url)
            .env("FLY_API_TOKEN", DEFAULT_TOKEN)
            .env("FLY_ORG", DEFAULT_ORG)
            // Port 0: the kernel picks a free port at bind, so nothing else can take it between a pick here
            // and the child's bind (many controllers start at once in some tests); the log says which.
            .env("MCPFLY_METRICS_ADDR", "127.0.0.1:0")
            .env("MCPFLY_SEAL_ADDR", "127.0.0.1:0")
            .env("MCPFLY_LOG_FORMAT", "json")
            .env("MCPFLY_LOG", "info")
            .env("MCPFLY_CLUSTER_NAME", "ops-tests")
            .env("MCPFLY_CONVERGE_INTERVAL_MS", "200")
            // Emulated machines run nothing here, so there is no MCP endpoint to verify.
            .env("MCPFLY_VERIFY", "false")
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", SYSTEM_NS)
            .env_remove("MCPFLY_KEYRING_SECRET")
            .env_remove("MCPFLY_KEYRING_FILE")
            .env_remove("MCPFLY_LABEL_SELECTOR")
            .env_remove("MCPFLY_NAMESPACES")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        Ok(Self {
            child: Some(child),
            name: name.into(),
            http: OnceLock::new(),
            seal: OnceLock::new(),
            log,
        })
    }

    /// The HTTP server's base URL (/metrics, /healthz, /readyz), or `None` until the process has bound it.
    pub fn http(&self) -> Option<String> {
        self.listening(&self.http, "serving /metrics, /healthz and /readyz")
    }

    /// The seal listener's base URL, or `None` until the process has bound it.
    pub fn seal(&self) -> Option<String> {
        self.listening(
            &self.seal,
            "serving /seal (TokenReview + SubjectAccessReview)",
        )
    }

    /// The address in the JSON log line whose message is `message` (the controller logs each listener's bound
    /// address), as a base URL.
    fn listening(&self, known: &OnceLock<String>, message: &str) -> Option<String> {
        if let Some(url) = known.get() {
            return Some(url.clone());
        }
        let addr = self
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == message)?["addr"]
            .as_str()?
            .to_string();
        Some(known.get_or_init(|| format!("http://{addr}")).clone())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The file the process's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(code)` once the process has exited.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .map(|s| s.code())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as the kubelet sends; waits up to `timeout` for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// GET on the controller's HTTP server: `(status, body)`, or `None` while it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.http()?))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Polls until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return Ok(());
            }
            if let Some(code) = self.exited() {
                anyhow::bail!(
                    "controller {} exited ({code:?}):\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "controller {} not ready after {timeout:?}; /readyz: {:?}\n{}",
                    self.name,
                    self.get("/readyz").await,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> Metrics {
        Metrics(
            self.get("/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default(),
        )
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One scrape of `/metrics`.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample whose name and labels are exactly `series` (e.g. `mcpfly_leader` or
    /// `mcpfly_deployments{phase="Ready"}`).
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Sum of `mcpfly_fly_api_calls_total` over statuses for one endpoint.
    pub fn fly_calls(&self, endpoint: &str) -> f64 {
        let prefix = format!("mcpfly_fly_api_calls_total{{endpoint=\"{endpoint}\",");
        self.0
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Fly calls that change something (everything but reads, waits and lease bookkeeping reads).
    pub fn fly_mutations(&self) -> f64 {
        self.0
            .lines()
            .filter(|l| l.starts_with("mcpfly_fly_api_calls_total{"))
            .filter(|l| {
                ![".list\"", ".get\"", ".wait\"", ".events\""]
                    .iter()
                    .any(|read| l.contains(read))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A deployment that needs nothing from a registry: an image source, one machine, bearer auth (so the
/// controller also writes the connection Secret).
pub fn deployment(namespace: &str, name: &str, labels: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1",
        "kind": "MCPDeployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "source": {"image": {"ref": "ghcr.io/mcpfly/runtime:0.1.0", "port": 8080, "path": "/mcp"}},
            "fly": {"regions": ["iad"]},
            "access": {"auth": "bearer"},
        },
    })
}

pub async fn apply_deployment(
    client: &kube::Client,
    value: &serde_json::Value,
) -> anyhow::Result<MCPDeployment> {
    let ns = value["metadata"]["namespace"].as_str().unwrap();
    let name = value["metadata"]["name"].as_str().unwrap();
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(value),
        )
        .await?)
}

pub fn is_ready(d: &MCPDeployment) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.observed_generation == d.metadata.generation
            && s.condition(ConditionType::Ready)
                .is_some_and(|c| c.is_true())
    })
}

/// Polls `get` until `done` holds or `timeout` passes; `Ok(false)` on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `helm template` of the chart with `args` (e.g. `--set fly.org=personal`), as a list of YAML documents.
pub fn helm_template(
    cp: &ControlPlane,
    release: &str,
    args: &[&str],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mcpfly");
    let out = cp
        .helm()?
        .args(["template", release])
        .arg(&chart)
        .args(["--namespace", SYSTEM_NS])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

use serde::Deserialize as _;
