//! The fleet benchmark (BENCHMARKS.md): a real control plane, the Fly emulator with realistic settings (machine
//! start, Fly's per-action limits, an org-wide mutation cap) in this process, and `mcpfly controller` as a
//! separate process. Shared with the CI smoke test (`tests/bench_smoke.rs`), which runs it with a small N.
//!
//! Phases: single deployments one at a time (apply → Ready, Fly calls per create), a fleet of N applied at once
//! (→ all Ready), an idle window (Fly calls, Kubernetes writes), the controller's RSS and CPU; then the same
//! fleet and idle window under a naive baseline configuration (per-resource polling every minute).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fly_emulator::{
    DEFAULT_ORG, DEFAULT_TOKEN, Emulator, EmulatorConfig, EmulatorHandle, Latencies, Realism,
};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use mcpfly::api::{ConditionType, MCPDeployment};
use mcpfly::local_cluster::{ControlPlane, ControlPlaneOptions};
use serde::Serialize;

/// The Fly mutations creating one deployment needs: apps.create, ips.assign (v6), ips.assign (shared v4),
/// secrets.set (the endpoint token), machines.create (one region, one machine).
pub const MUTATIONS_PER_DEPLOYMENT: u64 = 5;
/// The readiness check the controller puts on every machine has a 5 s grace period: Fly (and the emulator)
/// report it passing no earlier than that after the start.
pub const CHECK_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Options {
    /// Deployments applied at once.
    pub n: usize,
    /// Deployments applied one at a time for the apply → Ready latency.
    pub singles: usize,
    /// The `mcpfly` binary run as the controller.
    pub controller_bin: PathBuf,
    pub start_latency: Duration,
    /// Fly's eventual consistency as the emulator plays it (app visibility lag, image pull, check and listing
    /// delays): [`Realism::fly_timing`] by default.
    pub realism: Realism,
    /// An org-wide mutation cap (per second, burst), imposed by the emulator and announced to the controller.
    /// Fly documents none: `None` (the default) leaves only Fly's documented per-action limits.
    pub org_mutations: Option<(f64, f64)>,
    pub fleet_poll_seconds: u64,
    pub idle_window: Duration,
    /// Run the naive baseline too.
    pub baseline: bool,
    pub baseline_resync_seconds: u64,
    pub baseline_idle_window: Duration,
    pub concurrency: u16,
    pub converge_interval_ms: u64,
    pub timeout: Duration,
    /// Quiet time after convergence before the idle window (trailing reconciles of our own status writes).
    pub settle: Duration,
    /// Controller logs and the report go here.
    pub out_dir: PathBuf,
}

impl Options {
    /// DESIGN §8 settings for N deployments.
    pub fn full(n: usize, controller_bin: PathBuf, out_dir: PathBuf) -> Self {
        Options {
            n,
            singles: 20,
            controller_bin,
            start_latency: Duration::from_secs(2),
            realism: Realism::fly_timing(),
            org_mutations: None,
            fleet_poll_seconds: 60,
            idle_window: Duration::from_secs(300),
            baseline: true,
            baseline_resync_seconds: 60,
            baseline_idle_window: Duration::from_secs(180),
            concurrency: 32,
            converge_interval_ms: 1000,
            timeout: Duration::from_secs(3600),
            settle: Duration::from_secs(15),
            out_dir,
        }
    }

    /// What one deployment cannot beat however fast the controller is: the new app's visibility lag, the
    /// image pull, the machine start and the readiness check's grace period, one after the other.
    pub fn floor(&self) -> Duration {
        self.realism.app_visibility_lag + self.realism.image_pull + self.start_latency + CHECK_GRACE
    }

    /// The lower bound on "N applied at once → all Ready" the limits allow. Fly's documented limits are per
    /// action and per app or machine (app creation too: "app ID for app-level calls such as list and create"),
    /// and each deployment is its own app whose buckets start full, so across apps they bound nothing: without
    /// an org-wide cap the bound is one deployment's [`Self::floor`]. With the optional cap, every deployment's
    /// [`MUTATIONS_PER_DEPLOYMENT`] mutations share it: the last is sent no earlier than (N·k − burst)/rate.
    pub fn lower_bound(&self, n: usize) -> Duration {
        let paced = self.org_mutations.map_or(0.0, |(rate, burst)| {
            (n as f64 * MUTATIONS_PER_DEPLOYMENT as f64 - burst).max(0.0) / rate
        });
        Duration::from_secs_f64(paced) + self.floor()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub cpu: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcStats {
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Singles {
    pub count: usize,
    /// apply → Ready minus (start latency + check grace), milliseconds.
    pub above_floor_ms: Vec<f64>,
    pub median_above_floor_ms: f64,
    pub p95_above_floor_ms: f64,
    pub floor_ms: f64,
    /// Fly calls from apply until Ready + settle, per deployment (mean over the singles), by endpoint.
    pub calls_per_create: BTreeMap<String, f64>,
    pub calls_per_create_total: f64,
    /// Of those, calls after the deployment was already Ready.
    pub calls_after_ready: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Fleet {
    pub config: String,
    pub n: usize,
    pub apply_seconds: f64,
    pub all_ready_seconds: f64,
    pub lower_bound_seconds: f64,
    pub ratio_to_lower_bound: f64,
    /// (seconds since the first apply, Ready count).
    pub progress: Vec<(f64, usize)>,
    pub fly_calls: BTreeMap<String, u64>,
    pub fly_429: u64,
    pub controller_after_converge: ProcStats,
    pub idle_window_seconds: f64,
    pub idle_fly_calls: BTreeMap<String, u64>,
    pub idle_fly_calls_per_hour: f64,
    /// Writes on the resources the controller touches (mcpdeployments, secrets, events) during the idle window.
    pub idle_k8s_writes: BTreeMap<String, f64>,
    pub idle_k8s_writes_per_hour: f64,
    /// Writes by anything else in the window (the apiserver's own leases), for completeness.
    pub idle_other_k8s_writes: BTreeMap<String, f64>,
    pub idle_cpu_seconds: f64,
    pub controller_after_idle: ProcStats,
    pub ready_after_idle: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub settings: BTreeMap<String, String>,
    pub singles: Singles,
    pub fleet: Fleet,
    pub baseline: Option<Fleet>,
    pub apiserver: String,
}

/// Runs every phase and returns the figures.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out_dir)?;
    let mut report = Report {
        started_at: chrono::Utc::now().to_rfc3339(),
        machine: machine(),
        ..Default::default()
    };
    let s = &mut report.settings;
    s.insert("start_latency".into(), format!("{:?}", opts.start_latency));
    s.insert("check_grace".into(), format!("{CHECK_GRACE:?}"));
    s.insert(
        "fly_limits".into(),
        "Fly's documented: most actions 1/s burst 3 per app or machine; machines.get 5/s burst 10; apps.delete 100/min"
            .into(),
    );
    s.insert(
        "org_mutation_limit".into(),
        match opts.org_mutations {
            Some((rate, burst)) => format!("{rate}/s burst {burst} (not Fly's; an option)"),
            None => "none (Fly documents none)".into(),
        },
    );
    s.insert("realism".into(), format!("{:?}", opts.realism));
    s.insert("concurrency".into(), opts.concurrency.to_string());
    s.insert(
        "idle_window_starts_after_ready".into(),
        format!("{:?}", opts.settle),
    );
    s.insert(
        "converge_interval_ms".into(),
        opts.converge_interval_ms.to_string(),
    );
    s.insert(
        "fleet_poll_seconds".into(),
        opts.fleet_poll_seconds.to_string(),
    );

    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    cp.install_crds().await?;
    report.apiserver = cp.apiserver_version().await?;
    for ns in ["bench-single", "bench-fleet", "bench-baseline"] {
        cp.create_namespace(ns).await?;
    }
    let client = cp.client().await?;

    let mut emu_cfg = EmulatorConfig {
        latencies: Latencies {
            start: opts.start_latency,
            ..Latencies::realistic()
        },
        realism: opts.realism,
        ..EmulatorConfig::default()
    };
    if let Some((rate, burst)) = opts.org_mutations {
        emu_cfg = emu_cfg.with_org_mutation_limit(rate, burst);
    }
    emu_cfg.event_log_capacity = 1000;
    let emu = Emulator::start(emu_cfg).await?;

    let tracker = Tracker::start(client.clone());

    // The production configuration (fleet-wide change detection), watching the singles and the fleet.
    let mut controller = ControllerProcess::spawn(
        opts,
        &cp,
        &emu,
        "fleet",
        &[
            ("MCPFLY_NAMESPACES", "bench-single,bench-fleet"),
            (
                "MCPFLY_FLEET_POLL_SECONDS",
                &opts.fleet_poll_seconds.to_string(),
            ),
        ],
    )?;
    controller.wait_ready(Duration::from_secs(120)).await?;

    report.singles = singles(opts, &client, &emu, &tracker).await?;
    tracing::info!(?report.singles.median_above_floor_ms, "singles done");

    report.fleet = fleet(
        opts,
        "fleet-wide change detection (production defaults)",
        "bench-fleet",
        &client,
        &emu,
        &tracker,
        &controller,
        opts.idle_window,
        // By default idle starts right after convergence: the first org-wide listing that follows reports the
        // machines that started meanwhile, and the window shows whether the controller looks at them again (it
        // should not: those changes are its own and already seen). `--idle-after-seconds` moves it later.
        opts.settle,
    )
    .await?;
    controller.terminate();

    if opts.baseline {
        let mut baseline = ControllerProcess::spawn(
            opts,
            &cp,
            &emu,
            "baseline",
            &[
                ("MCPFLY_NAMESPACES", "bench-baseline"),
                ("MCPFLY_FLEET_POLL_SECONDS", "0"),
                (
                    "MCPFLY_FALLBACK_RESYNC_SECONDS",
                    &opts.baseline_resync_seconds.to_string(),
                ),
            ],
        )?;
        baseline.wait_ready(Duration::from_secs(120)).await?;
        report.baseline = Some(
            fleet(
                opts,
                &format!(
                    "naive baseline: per-resource polling every {} s (--fleet-poll-seconds 0 --fallback-resync-seconds {})",
                    opts.baseline_resync_seconds, opts.baseline_resync_seconds
                ),
                "bench-baseline",
                &client,
                &emu,
                &tracker,
                &baseline,
                opts.baseline_idle_window,
                opts.settle,
            )
            .await?,
        );
        baseline.terminate();
    }
    report.machine.loadavg_end = loadavg();
    Ok(report)
}

/// One deployment at a time: apply → Ready, and the Fly calls it took.
async fn singles(
    opts: &Options,
    client: &kube::Client,
    emu: &EmulatorHandle,
    tracker: &Tracker,
) -> anyhow::Result<Singles> {
    let floor = opts.floor();
    let mut out = Singles {
        count: opts.singles,
        floor_ms: floor.as_secs_f64() * 1e3,
        ..Default::default()
    };
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    let mut after_ready = 0u64;
    for i in 0..opts.singles {
        let name = format!("single-{i:03}");
        emu.reset_counters();
        let t0 = Instant::now();
        apply(client, "bench-single", &name).await?;
        let ready = tracker
            .wait_ready("bench-single", &name, opts.timeout)
            .await?;
        out.above_floor_ms
            .push((ready - t0).as_secs_f64() * 1e3 - out.floor_ms);
        let at_ready = fly_calls(emu);
        // Whatever the controller does because of its own last status write shows up within this.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let settled = fly_calls(emu);
        for (label, count) in &settled {
            // The org-wide listing serves the whole fleet, not this deployment.
            if label != "orgs.machines" {
                *calls.entry(label.clone()).or_default() += count;
                after_ready += count - at_ready.get(label).copied().unwrap_or(0);
            }
        }
    }
    let n = opts.singles.max(1) as f64;
    out.calls_per_create = calls
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / n))
        .collect();
    out.calls_per_create_total = calls.values().sum::<u64>() as f64 / n;
    out.calls_after_ready = after_ready as f64 / n;
    let mut sorted = out.above_floor_ms.clone();
    sorted.sort_by(f64::total_cmp);
    out.median_above_floor_ms = percentile(&sorted, 0.5);
    out.p95_above_floor_ms = percentile(&sorted, 0.95);
    // Done with them: the fleet's idle figures are for exactly N.
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), "bench-single");
    for i in 0..opts.singles {
        api.delete(&format!("single-{i:03}"), &DeleteParams::default())
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !api.list(&Default::default()).await?.items.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "singles not deleted in 120 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn fleet(
    opts: &Options,
    config: &str,
    namespace: &str,
    client: &kube::Client,
    emu: &EmulatorHandle,
    tracker: &Tracker,
    controller: &ControllerProcess,
    idle_window: Duration,
    settle: Duration,
) -> anyhow::Result<Fleet> {
    let n = opts.n;
    let lower_bound = opts.lower_bound(n);
    let mut out = Fleet {
        config: config.into(),
        n,
        lower_bound_seconds: lower_bound.as_secs_f64(),
        ..Default::default()
    };
    emu.reset_counters();
    let t0 = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("d-{i:05}")).collect();
    futures::stream::iter(names.iter())
        .map(|name| apply(client, namespace, name))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    out.apply_seconds = t0.elapsed().as_secs_f64();
    let deadline = t0 + opts.timeout;
    let mut last_report = Instant::now();
    loop {
        let ready = tracker.ready_count(namespace);
        if last_report.elapsed() >= Duration::from_secs(10) || ready == n {
            out.progress.push((t0.elapsed().as_secs_f64(), ready));
            tracing::info!(namespace, ready, n, elapsed = ?t0.elapsed(), "fleet converging");
            last_report = Instant::now();
        }
        if ready == n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{ready} of {n} Ready after {:?}",
            opts.timeout
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.all_ready_seconds = tracker
        .last_ready(namespace)
        .map_or(t0.elapsed(), |t| t - t0)
        .as_secs_f64();
    out.ratio_to_lower_bound = out.all_ready_seconds / out.lower_bound_seconds;
    // Trailing reconciles (our own last status writes) finish, then the fleet is idle.
    tokio::time::sleep(settle).await;
    out.fly_calls = fly_calls(emu);
    out.fly_429 = emu.count_status(429);
    out.controller_after_converge = controller.stats();

    emu.reset_counters();
    let writes_before = apiserver_writes(client).await?;
    let cpu_before = controller.stats().cpu_seconds;
    let started = Instant::now();
    tokio::time::sleep(idle_window).await;
    let window = started.elapsed();
    out.idle_window_seconds = window.as_secs_f64();
    out.idle_fly_calls = fly_calls(emu);
    out.fly_429 += emu.count_status(429);
    let per_hour = 3600.0 / window.as_secs_f64();
    out.idle_fly_calls_per_hour = out.idle_fly_calls.values().sum::<u64>() as f64 * per_hour;
    let writes_after = apiserver_writes(client).await?;
    for (key, after) in &writes_after {
        let delta = after - writes_before.get(key).copied().unwrap_or(0.0);
        if delta <= 0.0 {
            continue;
        }
        let ours = ["mcpdeployments", "secrets", "events"]
            .iter()
            .any(|r| key.starts_with(&format!("{r} ")) || key.starts_with(&format!("{r}/")));
        if ours {
            out.idle_k8s_writes.insert(key.clone(), delta);
        } else {
            out.idle_other_k8s_writes.insert(key.clone(), delta);
        }
    }
    out.idle_k8s_writes_per_hour = out.idle_k8s_writes.values().sum::<f64>() * per_hour + 0.0;
    out.controller_after_idle = controller.stats();
    out.idle_cpu_seconds = out.controller_after_idle.cpu_seconds - cpu_before;
    out.ready_after_idle = tracker.ready_count(namespace);
    Ok(out)
}

async fn apply(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), namespace);
    api.patch(
        name,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&mcpfly::local_cluster::image_deployment(namespace, name)),
    )
    .await?;
    Ok(())
}

fn fly_calls(emu: &EmulatorHandle) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ((label, _status), count) in emu.call_counts() {
        *out.entry(label).or_default() += count;
    }
    out
}

/// The apiserver's own count of writes (`apiserver_request_total`), by "resource[/subresource] VERB".
pub async fn apiserver_writes(client: &kube::Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        ) {
            continue;
        }
        let (resource, sub) = (label("resource"), label("subresource"));
        let key = if sub.is_empty() {
            format!("{resource} {verb}")
        } else {
            format!("{resource}/{sub} {verb}")
        };
        *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total_mib: mem_kib / 1024,
        cpu,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

/// First time each deployment was seen Ready (for its current generation), from a watch.
#[derive(Clone, Default)]
pub struct Tracker {
    ready: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

impl Tracker {
    pub fn start(client: kube::Client) -> Self {
        let tracker = Tracker::default();
        let ready = tracker.ready.clone();
        tokio::spawn(async move {
            let api: Api<MCPDeployment> = Api::all(client);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = stream.next().await {
                let Ok(d) = event else { continue };
                let key = (
                    d.metadata.namespace.clone().unwrap_or_default(),
                    d.metadata.name.clone().unwrap_or_default(),
                );
                if is_ready(&d) {
                    ready
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_insert_with(Instant::now);
                }
            }
        });
        tracker
    }

    fn ready_count(&self, namespace: &str) -> usize {
        self.ready
            .lock()
            .unwrap()
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .count()
    }

    fn last_ready(&self, namespace: &str) -> Option<Instant> {
        self.ready
            .lock()
            .unwrap()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, t)| *t)
            .max()
    }

    async fn wait_ready(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        let key = (namespace.to_string(), name.to_string());
        loop {
            if let Some(t) = self.ready.lock().unwrap().get(&key) {
                return Ok(*t);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{namespace}/{name} not Ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn is_ready(d: &MCPDeployment) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.observed_generation == d.metadata.generation
            && s.condition(ConditionType::Ready)
                .is_some_and(|c| c.is_true())
    })
}

/// `mcpfly controller` as its own process; SIGKILLed when dropped.
pub struct ControllerProcess {
    child: Option<Child>,
    http: String,
    log: PathBuf,
}

impl ControllerProcess {
    fn spawn(
        opts: &Options,
        cp: &ControlPlane,
        emu: &EmulatorHandle,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = opts.out_dir.join(format!("controller-{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&opts.controller_bin);
        cmd.arg("controller")
            .arg("--verify=false")
            .arg("--leader-election=false")
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("FLY_API_BASE_URL", emu.base_url())
            .env("FLY_API_TOKEN", DEFAULT_TOKEN)
            .env("FLY_ORG", DEFAULT_ORG)
            .env("MCPFLY_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("MCPFLY_SEAL_ADDR", "127.0.0.1:0")
            .env("MCPFLY_LOG", "info")
            .env("MCPFLY_CLUSTER_NAME", format!("bench-{name}"))
            .envs(opts.org_mutations.iter().flat_map(|(rate, burst)| {
                [
                    ("MCPFLY_FLY_ORG_MUTATIONS_PER_SECOND", rate.to_string()),
                    ("MCPFLY_FLY_ORG_MUTATIONS_BURST", burst.to_string()),
                ]
            }))
            .env("MCPFLY_CONCURRENCY", opts.concurrency.to_string())
            .env(
                "MCPFLY_CONVERGE_INTERVAL_MS",
                opts.converge_interval_ms.to_string(),
            )
            .env_remove("MCPFLY_KEYRING_SECRET")
            .env_remove("MCPFLY_KEYRING_FILE")
            .env_remove("MCPFLY_LABEL_SELECTOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", opts.controller_bin.display()))?;
        Ok(Self {
            child: Some(child),
            http: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let http = reqwest::Client::new();
        loop {
            let ok = http
                .get(format!("{}/readyz", self.http))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                anyhow::bail!(
                    "controller exited ({status}); log: {}",
                    tail(&self.log, 4000)
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "controller not ready after {timeout:?}; log: {}",
                tail(&self.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stats(&self) -> ProcStats {
        proc_stats(self.pid())
    }

    /// SIGTERM and wait for the exit (graceful shutdown), SIGKILL after 30 s.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    text.get(start..).unwrap_or_default().to_string()
}

/// RSS, peak RSS (VmHWM) and user+system CPU seconds of a process, from /proc.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ProcStats {
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
        cpu_seconds: (field(11) + field(12)) / ticks,
    }
}

/// The report as Markdown (the tables BENCHMARKS.md quotes).
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# Fleet benchmark, {}\n", r.started_at);
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {} MiB RAM; load average at start {}, at end {}. kube-apiserver {}.\n",
        m.nproc, m.cpu, m.mem_total_mib, m.loadavg_start, m.loadavg_end, r.apiserver
    );
    let _ = writeln!(s, "Settings:");
    for (k, v) in &r.settings {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let g = &r.singles;
    let _ = writeln!(
        s,
        "\n## One deployment, apply → Ready ({} runs)\n\nFloor (app visibility lag + image pull + machine start + check grace): {:.0} ms. Above the floor: median {:.0} ms, p95 {:.0} ms.\n",
        g.count, g.floor_ms, g.median_above_floor_ms, g.p95_above_floor_ms
    );
    let _ = writeln!(
        s,
        "Fly calls per create (mean; {:.2} in total, {:.2} of them after Ready):\n\n| endpoint | calls |\n|---|---|",
        g.calls_per_create_total, g.calls_after_ready
    );
    for (k, v) in &g.calls_per_create {
        let _ = writeln!(s, "| {k} | {v:.2} |");
    }
    let mut fleets = vec![&r.fleet];
    fleets.extend(r.baseline.iter());
    let _ = writeln!(
        s,
        "\n## N = {} applied at once\n\n| | {} |\n|---|{}",
        r.fleet.n,
        fleets
            .iter()
            .map(|f| f.config.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(fleets.len())
    );
    let row = |s: &mut String, name: &str, f: &dyn Fn(&Fleet) -> String| {
        let _ = writeln!(
            s,
            "| {name} | {} |",
            fleets.iter().map(|x| f(x)).collect::<Vec<_>>().join(" | ")
        );
    };
    row(&mut s, "apply (s)", &|f| format!("{:.1}", f.apply_seconds));
    row(&mut s, "all Ready (s)", &|f| {
        format!("{:.1}", f.all_ready_seconds)
    });
    row(&mut s, "lower bound (s)", &|f| {
        format!("{:.1}", f.lower_bound_seconds)
    });
    row(&mut s, "ratio to lower bound", &|f| {
        format!("{:.2}", f.ratio_to_lower_bound)
    });
    row(&mut s, "Fly calls to converge", &|f| {
        f.fly_calls.values().sum::<u64>().to_string()
    });
    row(&mut s, "429 answers", &|f| f.fly_429.to_string());
    row(&mut s, "idle window (s)", &|f| {
        format!("{:.0}", f.idle_window_seconds)
    });
    row(&mut s, "idle Fly calls in window", &|f| {
        format!("{:?}", f.idle_fly_calls)
    });
    row(&mut s, "idle Fly calls per hour (extrapolated)", &|f| {
        format!("{:.0}", f.idle_fly_calls_per_hour)
    });
    row(&mut s, "idle Kubernetes writes (ours) in window", &|f| {
        format!("{:?}", f.idle_k8s_writes)
    });
    row(&mut s, "idle Kubernetes writes per hour", &|f| {
        format!("{:.0}", f.idle_k8s_writes_per_hour)
    });
    row(&mut s, "other writes in window (apiserver's own)", &|f| {
        format!("{:?}", f.idle_other_k8s_writes)
    });
    row(&mut s, "controller RSS after converge / peak (MiB)", &|f| {
        format!(
            "{:.1} / {:.1}",
            f.controller_after_converge.rss_mib, f.controller_after_converge.peak_rss_mib
        )
    });
    row(&mut s, "controller RSS after idle (MiB)", &|f| {
        format!("{:.1}", f.controller_after_idle.rss_mib)
    });
    row(&mut s, "controller CPU s (converge / idle window)", &|f| {
        format!(
            "{:.1} / {:.2}",
            f.controller_after_converge.cpu_seconds, f.idle_cpu_seconds
        )
    });
    row(&mut s, "Ready after idle", &|f| {
        f.ready_after_idle.to_string()
    });
    if let Some(b) = &r.baseline {
        let f = &r.fleet;
        let _ = writeln!(
            s,
            "\nRatios (baseline / fleet-wide): idle Fly calls per hour {:.0}×, all Ready {:.2}×.",
            b.idle_fly_calls_per_hour / f.idle_fly_calls_per_hour.max(1e-9),
            b.all_ready_seconds / f.all_ready_seconds.max(1e-9)
        );
    }
    let _ = writeln!(
        s,
        "\nFleet calls to converge by endpoint: {:?}",
        r.fleet.fly_calls
    );
    if let Some(b) = &r.baseline {
        let _ = writeln!(
            s,
            "\nBaseline calls to converge by endpoint: {:?}",
            b.fly_calls
        );
    }
    s
}
