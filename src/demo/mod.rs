//! `mcpfly demo`: the whole system on one machine, for a newcomer with no cluster and no Fly account.
//!
//! A real control plane (the test harness's etcd + kube-apiserver), the Fly emulator with the
//! [local driver](fly_emulator::local) (machines run as local processes; apps' public URLs are served
//! by the emulator; with `--runc`, as containers of the built runtime image under runc), and the controller
//! in-process. It installs the CRD, loads the demo-only key ring, applies
//! `examples/`, prints progress while the deployments converge, and ends with a table of each deployment, its
//! phase, URL and tools. With `FLY_API_TOKEN` and `FLY_ORG` set it targets real Fly instead of the emulator.
//!
//! - [`example_server`]: `mcpfly example-server`, the stdio MCP server the offline example runs.

pub use crate::example_server;
pub mod processes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser};
use fly_emulator::local::{LocalDriver, LocalDriverConfig};
use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN, Emulator, EmulatorHandle};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::api::{ConditionType, MCPDeployment, Phase};
use crate::controller::ControllerConfig;
use crate::local_cluster::ControlPlane;

/// The namespace holding the demo's key-ring Secret (as the Helm chart's controller namespace would).
pub const SYSTEM_NAMESPACE: &str = "mcpfly-system";
pub const KEYRING_SECRET: &str = "mcpfly-keyring";
/// The runtime image the demo's controller deploys and the local driver runs (the controller's default).
pub const RUNTIME_IMAGE: &str = "registry.fly.io/mcpfly-runtime:0.1.0";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Exit once the deployments have converged (or --timeout-secs passed) instead of running until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Manifests to apply: folders (with a kustomization.yaml: applied with `-k`, otherwise recursively) or files.
    #[arg(long, default_value = "examples")]
    pub apply: Vec<PathBuf>,
    /// Key-ring file (one Fernet key per line, primary first) loaded into the controller. The default is the
    /// demo-only key the sealed example was sealed with: never use it for anything real.
    #[arg(long, default_value = "examples/demo-only.key")]
    pub keyring: PathBuf,
    /// Port on 127.0.0.1 of the Fly emulator, which also serves the apps' public URLs (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Seconds without traffic after which local machines are stopped or suspended (their autostop).
    #[arg(long, default_value_t = 30)]
    pub idle_timeout_secs: u64,
    /// Longest wait for the deployments to converge, in seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_secs: u64,
    /// Where the logs of the controller, the emulator and the MCP clients go (the terminal shows progress and
    /// the final table only). Default: mcpfly-demo-PID.log in the temporary directory.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Run the machines as containers of the built runtime image under runc, each in its own network namespace
    /// like a Fly machine (needs root, runc and umoci; build the image with hack/build-images.sh). The value is
    /// the image's OCI layout.
    #[arg(long, value_name = "OCI_LAYOUT", num_args = 0..=1,
          default_missing_value = "target/images/runtime", env = fly_emulator::local::runc::RUNC_IMAGE_ENV)]
    pub runc: Option<String>,
}

impl DemoArgs {
    pub fn log_path(&self) -> PathBuf {
        self.log_file.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("mcpfly-demo-{}.log", std::process::id()))
        })
    }
}

/// What the test command runs to get `uv`/`uvx` (a venv under target/, from PyPI), relative to a checkout.
const PYTHON_ENV_SCRIPT: &str = "hack/python-mcp-env.sh";

/// Puts `uvx` on PATH the way the test command gets it, when it is not there already: PyPI examples run it on
/// their local machines, which inherit PATH. Prints what it did.
///
/// # Safety
/// Changes this process's environment: call it before any other thread exists (before the tokio runtime).
pub unsafe fn put_uvx_on_path() {
    if on_path("uvx") {
        return;
    }
    if !Path::new(PYTHON_ENV_SCRIPT).is_file() {
        println!(
            "uv:            `uvx` is not on PATH and {PYTHON_ENV_SCRIPT} is not here (run the demo from a checkout, \
             or install uv): PyPI examples will not start"
        );
        return;
    }
    println!(
        "uv:            `uvx` is not on PATH: preparing it with {PYTHON_ENV_SCRIPT} (once, cached under target/)"
    );
    let output = std::process::Command::new("bash")
        .arg(PYTHON_ENV_SCRIPT)
        .stderr(std::process::Stdio::null())
        .output();
    let python = match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        other => {
            let why = match other {
                Ok(out) => format!("exit {}", out.status),
                Err(e) => e.to_string(),
            };
            println!(
                "uv:            {PYTHON_ENV_SCRIPT} failed ({why}): PyPI examples will not start"
            );
            return;
        }
    };
    let Some(bin) = Path::new(&python)
        .parent()
        .filter(|b| b.join("uvx").is_file())
    else {
        println!(
            "uv:            {PYTHON_ENV_SCRIPT} left no `uvx` beside {python}: PyPI examples will not start"
        );
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        // SAFETY: the caller guarantees no other thread reads or writes the environment now.
        unsafe { std::env::set_var("PATH", joined) };
        println!("uv:            {}", bin.join("uvx").display());
    }
}

/// One row of the final table.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    phase: String,
    verified: String,
    url: String,
    tools: String,
    note: String,
    /// The connection Secret (URL and token for MCP clients).
    secret: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!("logs:          {}", args.log_path().display());
    let real_fly = ["FLY_API_TOKEN", "FLY_ORG"]
        .iter()
        .all(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    let started = Instant::now();
    // SIGTERM ends the demo like Ctrl-C (and installing the handler first means it never kills us outright).
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    let cp = ControlPlane::start(Default::default()).await?;
    println!(
        "control plane: kube-apiserver {} at {}",
        cp.apiserver_version().await?,
        cp.server_url()
    );
    println!("KUBECONFIG={}", cp.kubeconfig_path().display());
    cp.install_crds().await?;
    cp.create_namespace(SYSTEM_NAMESPACE).await?;
    let client = cp.client().await?;
    load_keyring(&client, &args.keyring).await?;

    let work = tempfile::Builder::new().prefix("mcpfly-demo-").tempdir()?;
    let mut controller_args: Vec<String> = vec![
        "--leader-election=false".into(),
        "--metrics-addr=127.0.0.1:0".into(),
        "--seal-addr=127.0.0.1:0".into(),
        "--cluster-name=demo".into(),
        "--converge-interval-ms=250".into(),
        "--fleet-poll-seconds=2".into(),
        "--resync-seconds=300".into(),
        "--fallback-resync-seconds=30".into(),
        "--verify=true".into(),
        format!("--keyring-secret={SYSTEM_NAMESPACE}/{KEYRING_SECRET}"),
    ];
    let mut local: Option<(EmulatorHandle, LocalDriver)> = None;
    if real_fly {
        println!(
            "fly:           FLY_API_TOKEN and FLY_ORG are set: deploying to real Fly.io (apps cost money; delete \
             the resources with kubectl before Ctrl-C to remove them)"
        );
    } else {
        let mut driver_config = LocalDriverConfig::new(
            RUNTIME_IMAGE,
            std::env::current_exe().context("locating the mcpfly executable")?,
            work.path().join("machines"),
        );
        driver_config.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));
        if let Some(layout) = args.runc.clone() {
            let dir = work.path().join("runc");
            let image = tokio::task::spawn_blocking(move || {
                fly_emulator::local::runc::RuncImage::prepare(&layout, &dir)
                    .with_context(|| format!("preparing the runtime image {layout} for runc"))
            })
            .await??;
            driver_config.runc = Some(Arc::new(image));
        }
        let driver = LocalDriver::new(driver_config, Arc::new(processes::SupervisedSpawner));
        let emulator = Emulator::start_on(
            driver.emulator_config(),
            SocketAddr::from(([127, 0, 0, 1], args.port)),
        )
        .await
        .context("starting the Fly emulator")?;
        let machines = match &args.runc {
            Some(layout) => format!("machines run as runc containers of {layout}"),
            None => "machines run as local processes".to_string(),
        };
        println!(
            "fly emulator:  {} ({machines}; public URLs under http://{}/apps/APP/)",
            emulator.base_url(),
            emulator.addr()
        );
        controller_args.extend([
            format!("--fly-api-token={DEFAULT_TOKEN}"),
            format!("--fly-org={DEFAULT_ORG}"),
            format!("--fly-api-base-url={}", emulator.base_url()),
            format!("--url-template=http://{}/apps/{{app}}/mcp", emulator.addr()),
            format!("--runtime-image={RUNTIME_IMAGE}"),
        ]);
        local = Some((emulator, driver));
    }
    let config = controller_config(&controller_args)?;
    let resolver = crate::packages::RegistryResolver::new(&config.resolver)
        .map_err(|e| anyhow::anyhow!("registry configuration: {e}"))?;
    let controller_client = client.clone();
    let mut controller = tokio::spawn(async move {
        if let Err(e) =
            crate::controller::run_with_client(controller_client, config, Arc::new(resolver)).await
        {
            eprintln!("controller stopped: {e:#}");
        }
    });

    for path in &args.apply {
        apply(&cp, path)?;
    }
    // Host processes need npx/uvx here; containers bring their own.
    let host_machines = !real_fly && args.runc.is_none();
    if host_machines {
        tool_notes();
    }

    let deadline = started + Duration::from_secs(args.timeout_secs);
    let rows = converge(&client, started, deadline, host_machines).await?;
    print_table(&rows);
    print_usage(&cp, &rows);

    if !args.once {
        println!("\nRunning until Ctrl-C.");
        let mut last = rows;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
                _ = tick.tick() => {
                    // Later changes (kubectl edits, autostop, new manifests) are reported as they happen.
                    if let Ok(now) = snapshot(&client, host_machines).await {
                        for row in &now {
                            if !last.iter().any(|r| r.name == row.name && r.phase == row.phase && r.verified == row.verified) {
                                println!("[{:>6.1}s] {}: {} {}", started.elapsed().as_secs_f64(), row.name, row.phase, row.note);
                            }
                        }
                        last = now;
                    }
                }
            }
        }
        println!("\nstopping");
    } else if !controller.is_finished() {
        // The controller stops on SIGINT/SIGTERM (its own handlers): ask it to, so its watches end before the
        // control plane goes away.
        // SAFETY: raise(3) on our own process; a handler is installed above, so this cannot kill us.
        unsafe { libc::raise(libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(15), &mut controller)
        .await
        .is_err()
    {
        controller.abort();
    }
    if let Some((emulator, driver)) = local {
        driver.shutdown();
        drop(emulator);
    }
    drop(cp);
    Ok(())
}

/// The controller's configuration as `mcpfly controller` would parse it (environment included), with `args`.
fn controller_config(args: &[String]) -> anyhow::Result<ControllerConfig> {
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        config: ControllerConfig,
    }
    let argv = std::iter::once("mcpfly-controller".to_string()).chain(args.iter().cloned());
    Ok(Wrapper::try_parse_from(argv)?.config)
}

async fn load_keyring(client: &kube::Client, path: &Path) -> anyhow::Result<()> {
    let keys = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key ring {}", path.display()))?;
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": KEYRING_SECRET, "namespace": SYSTEM_NAMESPACE},
        "stringData": {"keys": keys},
    });
    Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .patch(
            KEYRING_SECRET,
            &PatchParams::apply("mcpfly-demo").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    println!(
        "key ring:      {} -> Secret {SYSTEM_NAMESPACE}/{KEYRING_SECRET} (DEMO ONLY: this key is public)",
        path.display()
    );
    Ok(())
}

fn apply(cp: &ControlPlane, path: &Path) -> anyhow::Result<()> {
    let mut kubectl = cp.kubectl();
    kubectl.args(["apply", "--server-side", "--field-manager=mcpfly-demo"]);
    if path.join("kustomization.yaml").is_file() {
        kubectl.arg("-k");
    } else {
        kubectl.args(["-R", "-f"]);
    }
    let out = kubectl.arg(path).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(
        out.status.success(),
        "kubectl apply {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// npm and PyPI servers need `npx` / `uvx` on this machine: say up front when one is missing.
fn tool_notes() {
    for (program, what) in [("npx", "npm"), ("uvx", "PyPI")] {
        if !on_path(program) {
            println!(
                "note:          `{program}` is not on PATH: {what} examples cannot start here and will not become Ready"
            );
        }
    }
}

/// The program a deployment's machines need on this machine that is not on PATH (`npx` for npm, `uvx` for
/// PyPI), when running locally.
fn missing_tool(d: &MCPDeployment) -> Option<&'static str> {
    let program = if d.spec.source.npm.is_some() {
        "npx"
    } else if d.spec.source.pypi.is_some() {
        "uvx"
    } else {
        return None;
    };
    (!on_path(program)).then_some(program)
}

/// A deployment is settled when it is Ready and Verified for its generation, or Stalled, or Failed, or cannot
/// start on this machine at all.
fn settled(d: &MCPDeployment, local: bool) -> bool {
    if local && missing_tool(d).is_some() {
        return true;
    }
    let Some(s) = &d.status else { return false };
    let current = |t: ConditionType| {
        s.condition(t).filter(|c| {
            c.observed_generation == d.metadata.generation || c.observed_generation.is_none()
        })
    };
    let ready = current(ConditionType::Ready).is_some_and(|c| c.is_true());
    let verified = current(ConditionType::Verified).is_some_and(|c| c.is_true());
    let stalled = current(ConditionType::Stalled).is_some_and(|c| c.is_true());
    (ready && verified) || stalled || s.phase == Some(Phase::Failed)
}

fn row(d: &MCPDeployment, local: bool) -> Row {
    let mut r = status_row(d);
    if local
        && let Some(program) = missing_tool(d)
        && r.verified != "True"
    {
        r.note = format!(
            "`{program}` is not on PATH, so this server cannot start on this machine (install it and re-run); {}",
            r.note
        );
    }
    r
}

fn status_row(d: &MCPDeployment) -> Row {
    let name = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
    let Some(s) = &d.status else {
        return Row {
            name,
            phase: "Pending".into(),
            verified: "-".into(),
            url: "-".into(),
            tools: "-".into(),
            note: "(no status yet)".into(),
            secret: d.connection_secret_name(),
        };
    };
    let verified = s
        .condition(ConditionType::Verified)
        .map(|c| format!("{:?}", c.status))
        .unwrap_or_else(|| "-".into());
    let ready = s.condition(ConditionType::Ready);
    let stalled = s.condition(ConditionType::Stalled).filter(|c| c.is_true());
    let note = match (stalled, ready) {
        (Some(c), _) => format!("Stalled {}: {}", c.reason, c.message),
        (None, Some(c)) if !c.is_true() => format!("{}: {}", c.reason, c.message),
        _ => String::new(),
    };
    let tools = s
        .server
        .as_ref()
        .map(|server| server.tools.join(","))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into());
    Row {
        name,
        phase: s
            .phase
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "Pending".into()),
        verified,
        url: s.url.clone().unwrap_or_else(|| "-".into()),
        tools,
        note,
        secret: d.connection_secret_name(),
    }
}

async fn snapshot(client: &kube::Client, local: bool) -> anyhow::Result<Vec<Row>> {
    let list = Api::<MCPDeployment>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut rows: Vec<Row> = list.items.iter().map(|d| row(d, local)).collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// Prints a line whenever a deployment's phase or verification changes, until all settle or the deadline.
async fn converge(
    client: &kube::Client,
    started: Instant,
    deadline: Instant,
    local: bool,
) -> anyhow::Result<Vec<Row>> {
    println!("\nwaiting for the deployments to converge (Ctrl-C to stop) ...");
    let api = Api::<MCPDeployment>::all(client.clone());
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        let list = api.list(&ListParams::default()).await?;
        for d in &list.items {
            let r = row(d, local);
            let key = (r.phase.clone(), r.verified.clone());
            if seen.get(&r.name) != Some(&key) {
                let detail = if r.note.is_empty() {
                    format!("verified={}", r.verified)
                } else {
                    shorten(&r.note, 140)
                };
                println!(
                    "[{:>6.1}s] {:<32} {:<10} {detail}",
                    started.elapsed().as_secs_f64(),
                    r.name,
                    r.phase
                );
                seen.insert(r.name.clone(), key);
            }
        }
        let all_settled = !list.items.is_empty() && list.items.iter().all(|d| settled(d, local));
        if all_settled || Instant::now() >= deadline {
            if !all_settled {
                println!(
                    "[{:>6.1}s] timeout: not every deployment settled; showing where each one is",
                    started.elapsed().as_secs_f64()
                );
            }
            let mut rows: Vec<Row> = list.items.iter().map(|d| row(d, local)).collect();
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

fn print_table(rows: &[Row]) {
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wn, wp, wv, wu) = (
        w(|r| &r.name, "NAME"),
        w(|r| &r.phase, "PHASE"),
        w(|r| &r.verified, "VERIFIED"),
        w(|r| &r.url, "URL"),
    );
    println!();
    println!(
        "{:<wn$}  {:<wp$}  {:<wv$}  {:<wu$}  TOOLS",
        "NAME", "PHASE", "VERIFIED", "URL"
    );
    for r in rows {
        println!(
            "{:<wn$}  {:<wp$}  {:<wv$}  {:<wu$}  {}",
            r.name, r.phase, r.verified, r.url, r.tools
        );
    }
    let notes: Vec<&Row> = rows.iter().filter(|r| !r.note.is_empty()).collect();
    if !notes.is_empty() {
        println!("\nnot ready:");
        for r in notes {
            println!("  {}: {}", r.name, r.note);
        }
    }
}

fn print_usage(cp: &ControlPlane, rows: &[Row]) {
    let verified = |r: &&Row| r.verified == "True";
    let offline = rows
        .iter()
        .filter(verified)
        .find(|r| r.name.ends_with("/offline"));
    let Some(ready) = offline.or_else(|| rows.iter().find(verified)) else {
        return;
    };
    let ns = ready.name.split_once('/').map_or("default", |(ns, _)| ns);
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    println!(
        "\nCall a server with any MCP client (the URL and bearer token are in the connection Secret):\n  \
         export KUBECONFIG={kubeconfig}\n  \
         kubectl get mcpd -A\n  \
         TOKEN=$(kubectl -n {ns} get secret {secret} -o jsonpath='{{.data.token}}' | base64 -d)\n  \
         curl -s {url} -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n    \
         -H 'Accept: application/json, text/event-stream' \\\n    \
         -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{{}},\"clientInfo\":{{\"name\":\"curl\",\"version\":\"0\"}}}}}}'",
        url = ready.url,
        secret = ready.secret
    );
}
