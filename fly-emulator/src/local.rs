//! The local machine driver: machines whose image is the mcpfly runtime image run as local processes, and the
//! emulator serves each app's public URL by proxying to them (`http://127.0.0.1:{port}/apps/{app}/...`).
//!
//! A machine's `init.cmd` (`mcpfly bridge --port 8080 --path /mcp -- CMD...`) is executed with `mcpfly` resolved
//! to a local executable and `--port 8080` rewritten to a free loopback port. Its environment is the machine's
//! `env` plus the app's secrets (so `MCP_AUTH_TOKEN` reaches the bridge) and a few host variables a process
//! needs to run at all (`PATH`, `HOME`, ...): never the environment of the process running the emulator, which
//! may hold a Fly token. A runtime-image machine without `init.cmd` runs the image's default command (the
//! repo-built example server behind the bridge, as `runtime/Dockerfile` says). Other images cannot run here:
//! their checks stay critical.
//!
//! Lifecycle follows the emulator's state machine: start spawns (or resumes), stop and destroy terminate,
//! suspend freezes the process (SIGSTOP: memory kept, so resume is instant), update restarts it with the new
//! config. Checks are driven by the real process: `passing` only while its `/readyz` answers 200. Like Fly's
//! proxy, each request goes to one of the app's ready machines (load-balanced), `fly-replay` response headers and
//! the client's `fly-force-instance-id` steer it (REALISM.md §4), and a request for an app with no running
//! machine starts one (autostart) and waits for it to be ready. The public URL answers 404 until the app has a
//! public address and an exposed service (§8). Autostop stops or suspends machines per the service's `autostop`:
//! region by region, one per pass, keeping `min_machines_running` in the primary region only (§7,
//! `local/autostop.rs`), or, with that realism off, every machine above `min_machines_running` once the app has
//! had no traffic for `idle_timeout`.
//!
//! Processes are spawned through a [`ProcessSpawner`], so the caller decides how they are supervised (mcpfly
//! uses its test harness's spawner, which makes the kernel kill them when the emulator's process dies).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{DriverAction, EmulatorControl, MachineChange, MachineDriver};

mod autostop;
mod replay;
pub mod runc;

/// Starts processes; the returned handle stops its process when dropped.
pub trait ProcessSpawner: Send + Sync + 'static {
    fn spawn(
        &self,
        name: &str,
        command: std::process::Command,
        log: &Path,
    ) -> io::Result<Box<dyn LocalProcess>>;
}

/// A running local process.
pub trait LocalProcess: Send + Sync {
    fn pid(&self) -> u32;
    fn is_running(&self) -> bool;
    /// Freeze (suspend) and thaw (resume).
    fn pause(&self);
    fn resume(&self);
    /// Stop gracefully and wait until it is gone (may block for a few seconds).
    fn terminate(self: Box<Self>);
    /// The end of its output, for diagnostics.
    fn log_tail(&self, max_bytes: usize) -> String;
}

/// Settings of the local driver.
#[derive(Clone, Debug)]
pub struct LocalDriverConfig {
    /// Machines with exactly this image run locally.
    pub runtime_image: String,
    /// What `mcpfly` in a machine's command resolves to (normally `std::env::current_exe()`).
    pub mcpfly_exe: PathBuf,
    /// What the runtime image runs when the machine has no `init.cmd` (its image CMD).
    pub default_command: Vec<String>,
    /// Per-machine working directories and logs live below this folder.
    pub work_dir: PathBuf,
    /// Host variables passed to machine processes (values from this process's environment, when set).
    pub pass_env: Vec<String>,
    /// No traffic for this long: machines above `min_machines_running` are stopped or suspended.
    pub idle_timeout: Duration,
    /// How long a request waits for an autostarted machine to become ready.
    pub autostart_timeout: Duration,
    /// With `Realism::autostop_per_region`: how often the proxy judges each region (Fly: every few minutes),
    /// stopping at most one machine per region per pass.
    pub autostop_interval: Duration,
    /// Run runtime-image machines as containers of this image under runc instead of as host processes.
    pub runc: Option<Arc<runc::RuncImage>>,
}

impl LocalDriverConfig {
    pub fn new(runtime_image: &str, mcpfly_exe: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            runtime_image: runtime_image.to_string(),
            mcpfly_exe,
            default_command: RUNTIME_DEFAULT_COMMAND
                .iter()
                .map(|s| s.to_string())
                .collect(),
            work_dir,
            pass_env: [
                "PATH",
                "HOME",
                "USER",
                "LANG",
                "TMPDIR",
                "XDG_CACHE_HOME",
                "NPM_CONFIG_REGISTRY",
                "NPM_CONFIG_CACHE",
                "UV_CACHE_DIR",
                "UV_INDEX_URL",
                "UV_PYTHON_PREFERENCE",
                "SSL_CERT_FILE",
                "HTTPS_PROXY",
                "HTTP_PROXY",
                "NO_PROXY",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            idle_timeout: Duration::from_secs(30),
            autostart_timeout: Duration::from_secs(120),
            autostop_interval: Duration::from_secs(1),
            runc: None,
        }
    }
}

/// The runtime image's CMD (`runtime/Dockerfile`): the example server that ships in the mcpfly binary, behind
/// the bridge. Keep the two in step.
pub const RUNTIME_DEFAULT_COMMAND: &[&str] = &[
    "mcpfly",
    "bridge",
    "--port",
    "8080",
    "--path",
    "/mcp",
    "--",
    "mcpfly",
    "example-server",
];

/// Drives emulated machines with local processes. Cheap to clone; dropping the last clone (with the emulator)
/// stops every process.
#[derive(Clone)]
pub struct LocalDriver {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: LocalDriverConfig,
    spawner: Arc<dyn ProcessSpawner>,
    control: OnceLock<EmulatorControl>,
    changes: mpsc::UnboundedSender<MachineChange>,
    machines: Mutex<HashMap<(String, String), Running>>,
    traffic: Mutex<HashMap<String, Traffic>>,
    /// Per (app, region), for the per-region autostop.
    region_load: Mutex<HashMap<(String, String), autostop::RegionLoad>>,
    last_autostop_pass: Mutex<Instant>,
    http: reqwest::Client,
    generation: AtomicU64,
}

struct Running {
    port: u16,
    process: Option<Box<dyn LocalProcess>>,
    generation: u64,
    suspended: bool,
    ready: bool,
    config: Value,
    env: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Copy)]
struct Traffic {
    active: usize,
    last: Instant,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let all: Vec<Running> = self
            .machines
            .get_mut()
            .map(|m| m.drain().map(|(_, r)| r).collect())
            .unwrap_or_default();
        for mut r in all {
            if let Some(p) = r.process.take() {
                // Thawed first, so a frozen process can act on SIGTERM.
                p.resume();
                p.terminate();
            }
        }
    }
}

impl LocalDriver {
    /// Must be called inside a Tokio runtime: it starts the worker that applies changes in order and the
    /// autostop loop.
    pub fn new(cfg: LocalDriverConfig, spawner: Arc<dyn ProcessSpawner>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<MachineChange>();
        let inner = Arc::new(Inner {
            cfg,
            spawner,
            control: OnceLock::new(),
            changes: tx,
            machines: Mutex::new(HashMap::new()),
            traffic: Mutex::new(HashMap::new()),
            region_load: Mutex::new(HashMap::new()),
            last_autostop_pass: Mutex::new(Instant::now()),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            generation: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                inner.apply(change).await;
            }
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner
                    .control()
                    .and_then(|c| c.realism())
                    .is_some_and(|r| r.autostop_per_region)
                {
                    inner.autostop_by_region();
                } else {
                    inner.autostop();
                }
            }
        });
        Self { inner }
    }

    /// An emulator whose machines this driver runs. A machine's checks read `critical` until its process answers
    /// its readiness probe (the driver reports each answer), as a real machine's do before a passing run.
    pub fn emulator_config(&self) -> super::EmulatorConfig {
        super::EmulatorConfig {
            driver: Arc::new(self.clone()),
            default_check_status: "critical".into(),
            ..Default::default()
        }
    }

    /// Stops every process now (also done when the last clone is dropped).
    pub fn shutdown(&self) {
        let all: Vec<Running> = {
            let mut m = self.inner.machines.lock().expect("poisoned");
            m.drain().map(|(_, r)| r).collect()
        };
        for mut r in all {
            if let Some(p) = r.process.take() {
                p.resume();
                p.terminate();
            }
        }
    }

    /// Pids of the processes running now (for tests that check nothing leaks).
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .machines
            .lock()
            .expect("poisoned")
            .values()
            .filter_map(|r| r.process.as_ref().map(|p| p.pid()))
            .collect()
    }

    /// `(app, machine id, port, suspended, ready)` of each local process.
    pub fn processes(&self) -> Vec<(String, String, u16, bool, bool)> {
        self.inner
            .machines
            .lock()
            .expect("poisoned")
            .iter()
            .map(|((a, m), r)| (a.clone(), m.clone(), r.port, r.suspended, r.ready))
            .collect()
    }
}

impl MachineDriver for LocalDriver {
    fn on_change(&self, change: &MachineChange) {
        let _ = self.inner.changes.send(change.clone());
    }

    fn attach(&self, emulator: EmulatorControl) {
        let _ = self.inner.control.set(emulator);
    }

    fn public_router(&self) -> Option<Router> {
        Some(
            Router::new()
                .route("/apps/{app}", axum::routing::any(proxy_root))
                .route("/apps/{app}/{*rest}", axum::routing::any(proxy))
                .with_state(Arc::downgrade(&self.inner)),
        )
    }
}

/// Check names of a machine config: top-level and service checks (the probe drives them all).
fn check_names(config: &Value) -> Vec<String> {
    super::state::configured_checks(config)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Whether Fly's proxy sends a machine traffic: it routes on service checks only (top-level checks do not
/// affect routing), so a running machine without service checks gets traffic whatever its probe says.
fn routable(config: &Value, probe_ok: bool) -> bool {
    let has_service_checks = config
        .get("services")
        .and_then(Value::as_array)
        .is_some_and(|services| {
            services.iter().any(|s| {
                s.get("checks")
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty())
            })
        });
    probe_ok || !has_service_checks
}

fn service(config: &Value) -> Option<&Value> {
    config
        .get("services")
        .and_then(Value::as_array)
        .and_then(|s| s.first())
}

/// The service's autostop as an action: `None` when off.
fn autostop_action(config: &Value) -> Option<&'static str> {
    match service(config).and_then(|s| s.get("autostop")) {
        Some(Value::Bool(true)) => Some("stop"),
        Some(Value::String(s)) if s == "stop" => Some("stop"),
        Some(Value::String(s)) if s == "suspend" => Some("suspend"),
        _ => None,
    }
}

fn min_running(config: &Value) -> usize {
    service(config)
        .and_then(|s| s.get("min_machines_running"))
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize
}

fn autostart(config: &Value) -> bool {
    service(config)
        .and_then(|s| s.get("autostart"))
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

impl Inner {
    fn control(&self) -> Option<&EmulatorControl> {
        self.control.get()
    }

    fn set_checks(&self, app: &str, id: &str, config: &Value, status: &str) {
        if let Some(c) = self.control() {
            for name in check_names(config) {
                c.set_check_status(app, id, &name, status);
            }
        }
    }

    /// The argv to run for a machine config, with the bridge on `port`; `None` when it cannot run here.
    fn argv(&self, config: &Value, port: u16) -> Option<Vec<String>> {
        if config.get("image").and_then(Value::as_str) != Some(self.cfg.runtime_image.as_str()) {
            return None;
        }
        let init: Vec<String> = config
            .pointer("/init/cmd")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let cmd = if init.is_empty() {
            self.cfg.default_command.clone()
        } else {
            init
        };
        local_argv(&cmd, &self.cfg.mcpfly_exe.to_string_lossy(), port)
    }

    async fn apply(self: &Arc<Self>, change: MachineChange) {
        let key = (change.app.clone(), change.machine_id.clone());
        match change.action {
            DriverAction::Start => {
                let resumed = {
                    let mut m = self.machines.lock().expect("poisoned");
                    match m.get_mut(&key) {
                        Some(r) if r.suspended => {
                            if let Some(p) = &r.process {
                                p.resume();
                            }
                            r.suspended = false;
                            true
                        }
                        Some(r) if r.process.as_ref().is_some_and(|p| p.is_running()) => true,
                        _ => false,
                    }
                };
                self.touch(&change.app);
                if let Some(region) = change.env.get("FLY_REGION") {
                    self.started_in(&change.app, region);
                }
                if !resumed {
                    self.terminate(&key).await;
                    self.spawn(&change.app, &change.machine_id, change.config, change.env);
                }
            }
            DriverAction::Suspend => {
                let mut m = self.machines.lock().expect("poisoned");
                if let Some(r) = m.get_mut(&key) {
                    if let Some(p) = &r.process {
                        p.pause();
                    }
                    r.suspended = true;
                }
            }
            DriverAction::Stop | DriverAction::Destroy => {
                self.set_checks(&change.app, &change.machine_id, &change.config, "critical");
                self.terminate(&key).await;
            }
            DriverAction::Update => {
                // The emulator restarts a machine on update only if it was running (not suspended).
                let was_running = {
                    let m = self.machines.lock().expect("poisoned");
                    m.get(&key).is_some_and(|r| !r.suspended)
                };
                self.terminate(&key).await;
                if was_running {
                    self.spawn(&change.app, &change.machine_id, change.config, change.env);
                }
            }
        }
    }

    async fn terminate(&self, key: &(String, String)) {
        let removed = self.machines.lock().expect("poisoned").remove(key);
        if let Some(mut r) = removed
            && let Some(p) = r.process.take()
        {
            let _ = tokio::task::spawn_blocking(move || {
                p.resume();
                p.terminate();
            })
            .await;
        }
    }

    fn spawn(
        self: &Arc<Self>,
        app: &str,
        id: &str,
        config: Value,
        env: std::collections::BTreeMap<String, String>,
    ) {
        self.set_checks(app, id, &config, "critical");
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(app, machine = id, error = %e, "no free port for a local machine");
                return;
            }
        };
        let process = match self.launch(app, id, &config, &env, port) {
            None => {
                let image = config.get("image").and_then(Value::as_str).unwrap_or("");
                tracing::warn!(
                    app,
                    machine = id,
                    image,
                    "image cannot run locally (only the runtime image does); its checks stay critical"
                );
                None
            }
            Some(started) => match started {
                Ok(p) => {
                    tracing::info!(
                        app,
                        machine = id,
                        port,
                        pid = p.pid(),
                        "local machine started"
                    );
                    Some(p)
                }
                Err(e) => {
                    tracing::warn!(app, machine = id, error = %e, "local machine failed to start");
                    None
                }
            },
        };
        let runs = process.is_some();
        self.machines.lock().expect("poisoned").insert(
            (app.to_string(), id.to_string()),
            Running {
                port,
                process,
                generation,
                suspended: false,
                ready: false,
                config,
                env,
            },
        );
        if runs {
            let weak = Arc::downgrade(self);
            let (app, id) = (app.to_string(), id.to_string());
            tokio::spawn(async move { probe(weak, app, id, generation, port).await });
        }
    }

    /// Starts a machine's process (a runc container when configured); `None` when its image cannot run here.
    fn launch(
        &self,
        app: &str,
        id: &str,
        config: &Value,
        env: &std::collections::BTreeMap<String, String>,
        port: u16,
    ) -> Option<io::Result<Box<dyn LocalProcess>>> {
        match &self.cfg.runc {
            Some(image)
                if config.get("image").and_then(Value::as_str) == Some(&self.cfg.runtime_image) =>
            {
                let dir = self.cfg.work_dir.join(app).join(id);
                Some(
                    std::fs::create_dir_all(&dir).and_then(|()| {
                        image.start(&*self.spawner, &dir, (app, id), config, env, port)
                    }),
                )
            }
            Some(_) => None,
            None => Some(self.start_process(app, id, &self.argv(config, port)?, env)),
        }
    }

    fn start_process(
        &self,
        app: &str,
        id: &str,
        argv: &[String],
        env: &std::collections::BTreeMap<String, String>,
    ) -> io::Result<Box<dyn LocalProcess>> {
        let dir = self.cfg.work_dir.join(app).join(id);
        std::fs::create_dir_all(&dir)?;
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]).current_dir(&dir).env_clear();
        for name in &self.cfg.pass_env {
            if let Some(v) = std::env::var_os(name) {
                command.env(name, v);
            }
        }
        command.envs(env);
        self.spawner
            .spawn(&format!("{app}-{id}"), command, &dir.join("machine.log"))
    }

    fn touch(&self, app: &str) {
        let mut t = self.traffic.lock().expect("poisoned");
        let e = t.entry(app.to_string()).or_insert(Traffic {
            active: 0,
            last: Instant::now(),
        });
        e.last = Instant::now();
    }

    /// Stops or suspends machines of apps idle for `idle_timeout`, above `min_machines_running`.
    fn autostop(&self) {
        let Some(control) = self.control() else {
            return;
        };
        let idle: Vec<String> = {
            let t = self.traffic.lock().expect("poisoned");
            t.iter()
                .filter(|(_, tr)| tr.active == 0 && tr.last.elapsed() >= self.cfg.idle_timeout)
                .map(|(a, _)| a.clone())
                .collect()
        };
        for app in idle {
            let running: Vec<(String, Value)> = {
                let m = self.machines.lock().expect("poisoned");
                let mut v: Vec<(String, Value)> = m
                    .iter()
                    .filter(|((a, _), r)| *a == app && !r.suspended && r.process.is_some())
                    .map(|((_, id), r)| (id.clone(), r.config.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            let started: Vec<String> = control
                .machines(&app)
                .into_iter()
                .filter(|m| m.state == "started")
                .map(|m| m.id)
                .collect();
            let candidates: Vec<&(String, Value)> = running
                .iter()
                .filter(|(id, _)| started.contains(id))
                .collect();
            let keep = candidates.first().map_or(0, |(_, c)| min_running(c));
            for (id, config) in candidates.iter().skip(keep) {
                if let Some(action) = autostop_action(config) {
                    tracing::info!(app = %app, machine = %id, action, "autostop: idle");
                    if let Err(e) = control.platform_action(&app, id, action) {
                        tracing::debug!(app = %app, machine = %id, error = %e, "autostop refused");
                    }
                }
            }
            // Look again only after new traffic.
            self.traffic.lock().expect("poisoned").remove(&app);
        }
    }

    /// Where the proxy sends a request of `app` now: `(machine id, port, region)` of a ready local process.
    fn pick(&self, app: &str, route: &Route) -> Option<(String, u16, String)> {
        let m = self.machines.lock().expect("poisoned");
        let mut ready: Vec<(String, u16, String)> = m
            .iter()
            .filter(|((a, _), r)| a == app && r.ready && !r.suspended && r.process.is_some())
            .map(|((_, id), r)| {
                let region = r.env.get("FLY_REGION").cloned().unwrap_or_default();
                (id.clone(), r.port, region)
            })
            .collect();
        ready.sort();
        let (only, exclude, regions): (Option<&str>, Option<&str>, &[String]) = match route {
            Route::Only(id) => (Some(id.as_str()), None, &[]),
            Route::Prefer { id, exclude } => {
                if let Some(hit) = ready.iter().find(|(m, _, _)| m == id) {
                    return Some(hit.clone());
                }
                (None, exclude.as_deref(), &[])
            }
            Route::Balance { exclude, regions } => (None, exclude.as_deref(), regions.as_slice()),
        };
        if let Some(id) = only {
            return ready.into_iter().find(|(m, _, _)| m == id);
        }
        ready.retain(|(m, _, _)| Some(m.as_str()) != exclude);
        // `region=` lists regions in order of preference; `any` (or no list) falls back to every region.
        for region in regions {
            if region == "any" {
                break;
            }
            let here: Vec<_> = ready.iter().filter(|(_, _, r)| r == region).collect();
            if !here.is_empty() {
                return Some(here[rand::random_range(0..here.len())].clone());
            }
        }
        if !regions.is_empty() && !regions.iter().any(|r| r == "any") {
            return None;
        }
        // Spread requests over the ready machines, as Fly's proxy load-balances each request.
        let n = ready.len();
        (n > 0).then(|| ready.swap_remove(rand::random_range(0..n)))
    }

    /// Starts a stopped or suspended machine of `app` (Fly proxy autostart), if none is on its way. Returns the
    /// region of the machine the waiting request should expect (the one on its way, or the one started).
    fn autostart(&self, app: &str) -> Option<String> {
        let control = self.control()?;
        let machines = control.machines(app);
        if let Some(m) = machines
            .iter()
            .find(|m| matches!(m.state.as_str(), "started" | "starting"))
        {
            return Some(m.region.clone());
        }
        let m = machines.iter().find(|m| {
            matches!(m.state.as_str(), "stopped" | "suspended") && autostart(&m.config)
        })?;
        tracing::info!(app, machine = %m.id, "autostart: request for an app with no running machine");
        if let Err(e) = control.platform_action(app, &m.id, "start") {
            tracing::debug!(app, machine = %m.id, error = %e, "autostart refused");
        }
        Some(m.region.clone())
    }
}

/// `argv` with `mcpfly` resolved to `exe` and the bridge on 127.0.0.1:`port`; `None` unless it runs the bridge.
pub fn local_argv(cmd: &[String], exe: &str, port: u16) -> Option<Vec<String>> {
    let split = cmd.iter().position(|a| a == "--").unwrap_or(cmd.len());
    let (head, tail) = cmd.split_at(split);
    if head.len() < 2 || head[0] != "mcpfly" || head[1] != "bridge" {
        return None;
    }
    let mut out = vec![exe.to_string(), "bridge".to_string()];
    let mut rest = head[2..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--port" | "--host" | "--shutdown-grace-secs" => {
                rest.next();
            }
            s if s.starts_with("--port=")
                || s.starts_with("--host=")
                || s.starts_with("--shutdown-grace-secs=") => {}
            _ => out.push(a.clone()),
        }
    }
    out.extend(
        [
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--shutdown-grace-secs",
            "2",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut tail: Vec<String> = tail.to_vec();
    if tail.get(1).is_some_and(|a| a == "mcpfly") {
        tail[1] = exe.to_string();
    }
    out.extend(tail);
    Some(out)
}

/// Drives a machine's checks from its process's `/readyz`, and restarts a process that exits (restart policy).
async fn probe(inner: Weak<Inner>, app: String, id: String, generation: u64, port: u16) {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let key = (app.clone(), id.clone());
    let mut last: Option<bool> = None;
    loop {
        let Some(this) = inner.upgrade() else { return };
        let (alive, suspended, config, env) = {
            let m = this.machines.lock().expect("poisoned");
            match m.get(&key) {
                Some(r) if r.generation == generation => (
                    r.process.as_ref().is_some_and(|p| p.is_running()),
                    r.suspended,
                    r.config.clone(),
                    r.env.clone(),
                ),
                _ => return,
            }
        };
        if !alive {
            let tail = {
                let m = this.machines.lock().expect("poisoned");
                m.get(&key)
                    .and_then(|r| r.process.as_ref().map(|p| p.log_tail(600)))
                    .unwrap_or_default()
            };
            tracing::warn!(app = %app, machine = %id, log_tail = %tail, "local machine exited; restarting");
            this.set_checks(&app, &id, &config, "critical");
            drop(this);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let Some(this) = inner.upgrade() else { return };
            let same = this
                .machines
                .lock()
                .expect("poisoned")
                .get(&key)
                .is_some_and(|r| r.generation == generation);
            if same {
                this.terminate(&key).await;
                this.spawn(&app, &id, config, env);
            }
            return;
        }
        if suspended {
            // While frozen the machine's checks may be reset; publish the probe's answer again after resume.
            last = None;
        } else {
            let ok = this
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if last != Some(ok) {
                this.set_checks(&app, &id, &config, if ok { "passing" } else { "critical" });
                if let Some(r) = this.machines.lock().expect("poisoned").get_mut(&key)
                    && r.generation == generation
                {
                    r.ready = routable(&config, ok);
                }
                last = Some(ok);
            }
        }
        let pause = if last == Some(true) { 1000 } else { 150 };
        drop(this);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Counts a request as traffic for autostop while it (or its streamed body) is in flight.
struct InFlight {
    inner: Weak<Inner>,
    app: String,
    /// The region of the machine serving it, once chosen (for the per-region autostop).
    region: Option<String>,
}

impl InFlight {
    fn new(inner: &Arc<Inner>, app: &str) -> Self {
        let mut t = inner.traffic.lock().expect("poisoned");
        let e = t.entry(app.to_string()).or_insert(Traffic {
            active: 0,
            last: Instant::now(),
        });
        e.active += 1;
        e.last = Instant::now();
        Self {
            inner: Arc::downgrade(inner),
            app: app.to_string(),
            region: None,
        }
    }

    /// Counts the request as load in `region` from now on (moving it there if it was counted elsewhere): where
    /// it waits for an autostarted machine, then where the machine that answers it runs.
    fn served_from(&mut self, inner: &Inner, region: &str) {
        if self.region.as_deref() == Some(region) {
            return;
        }
        if let Some(previous) = self.region.take() {
            inner.served(&self.app, &previous);
        }
        inner.serving(&self.app, region);
        self.region = Some(region.to_string());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut t = inner.traffic.lock().expect("poisoned");
            let e = t.entry(self.app.clone()).or_insert(Traffic {
                active: 1,
                last: Instant::now(),
            });
            e.active = e.active.saturating_sub(1);
            e.last = Instant::now();
            drop(t);
            if let Some(region) = &self.region {
                inner.served(&self.app, region);
            }
        }
    }
}

async fn proxy_root(
    State(inner): State<Weak<Inner>>,
    axum::extract::Path(app): axum::extract::Path<String>,
    req: Request,
) -> Response {
    forward(inner, app, String::new(), req).await
}

async fn proxy(
    State(inner): State<Weak<Inner>>,
    axum::extract::Path((app, rest)): axum::extract::Path<(String, String)>,
    req: Request,
) -> Response {
    forward(inner, app, rest, req).await
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    // Set by Fly's edge only; a client must not choose its own rate-limit identity.
    "fly-client-ip",
];

fn copy_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, body.to_string()).into_response()
}

/// Which machines may take a request (Fly's proxy routing, REALISM.md §4).
enum Route {
    /// `fly-force-instance-id`, or `fly-replay: instance=`: this machine or an error.
    Only(String),
    /// `fly-replay: prefer_instance=`: this machine if ready, else load-balanced.
    Prefer { id: String, exclude: Option<String> },
    /// Load-balanced over ready machines (`elsewhere=true` excludes the responder; `region=` prefers regions).
    Balance {
        exclude: Option<String>,
        regions: Vec<String>,
    },
}

/// Fly documents no limit on chained replays; the emulator stops a loop after this many, with a 502.
const MAX_REPLAYS: usize = 8;
/// Docs: "Requests larger than 1MB cannot be replayed".
const MAX_REPLAY_BODY: usize = 1024 * 1024;
const FORCE_INSTANCE: &str = "fly-force-instance-id";
const REPLAY: &str = "fly-replay";
const REPLAY_SRC: &str = "fly-replay-src";

async fn forward(inner: Weak<Inner>, app: String, rest: String, req: Request) -> Response {
    let Some(inner) = inner.upgrade() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "emulator stopping\n");
    };
    // REALISM.md §8: without a public address and an exposed service, Fly's edge has nothing to route.
    if let Some(reason) = inner.control().and_then(|c| c.public_url_refusal(&app)) {
        return text(StatusCode::NOT_FOUND, &format!("{reason}\n"));
    }
    let mut guard = InFlight::new(&inner, &app);
    let forced = req
        .headers()
        .get(FORCE_INSTANCE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string());
    let mut route = match forced {
        Some(id) => Route::Only(id),
        None => Route::Balance {
            exclude: None,
            regions: Vec::new(),
        },
    };
    let mut target = match inner.pick(&app, &route) {
        Some(t) => t,
        None if matches!(route, Route::Only(_)) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "fly-force-instance-id: that machine is not running\n",
            );
        }
        None => {
            if inner.control().is_none_or(|c| c.machines(&app).is_empty()) {
                return text(StatusCode::NOT_FOUND, "no such app or no machines\n");
            }
            // The waiting request is load where its machine starts, so the per-region autostop (REALISM.md §7)
            // does not park that machine before it is ready, however slow its start; and if the machine is
            // parked or stops anyway, the proxy starts one again, as Fly's holds the request for a machine.
            let deadline = Instant::now() + inner.cfg.autostart_timeout;
            loop {
                if let Some(region) = inner.autostart(&app) {
                    guard.served_from(&inner, &region);
                }
                if let Some(t) = inner.pick(&app, &route) {
                    break t;
                }
                if Instant::now() > deadline {
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no machine of this app became ready in time\n",
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 16 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
    };
    let mut url = format!("/{rest}");
    if let Some(q) = parts.uri.query() {
        url.push('?');
        url.push_str(q);
    }
    // The client's own headers go to the first machine as sent; a replay carries the proxy's `fly-replay-src`.
    let mut headers = copy_headers(&parts.headers);
    let mut replays = 0;
    let upstream = loop {
        let (id, port, region) = &target;
        // Load in the machine's region from the moment the proxy hands it the request, as Fly's proxy counts
        // concurrency, not once the answer's head is back.
        guard.served_from(&inner, region);
        let sent = inner
            .http
            .request(
                parts.method.clone(),
                format!("http://127.0.0.1:{port}{url}"),
            )
            .headers(headers.clone())
            .body(body.clone())
            .send()
            .await;
        let upstream = match sent {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("machine did not answer: {e}\n"),
                );
            }
        };
        let Some(asked) = upstream.headers().get(REPLAY) else {
            break upstream;
        };
        let asked = replay::parse(asked.to_str().unwrap_or_default());
        replays += 1;
        if replays > MAX_REPLAYS {
            return text(StatusCode::BAD_GATEWAY, "fly-replay: too many replays\n");
        }
        if body.len() > MAX_REPLAY_BODY {
            return text(
                StatusCode::BAD_GATEWAY,
                "fly-replay: requests larger than 1MB cannot be replayed\n",
            );
        }
        if asked.app.as_ref().is_some_and(|a| *a != app) {
            return text(
                StatusCode::BAD_GATEWAY,
                "fly-replay: replays to another app are not modelled by the emulator\n",
            );
        }
        let exclude = asked.elsewhere.then(|| id.clone());
        route = match (asked.instance, asked.prefer_instance) {
            (Some(only), _) => Route::Only(only),
            (None, Some(preferred)) => Route::Prefer {
                id: preferred,
                exclude,
            },
            (None, None) => Route::Balance {
                exclude,
                regions: asked.regions,
            },
        };
        let source = replay::source(id, region, asked.state.as_deref());
        headers.insert(
            REPLAY_SRC,
            http::HeaderValue::from_str(&source).unwrap_or(http::HeaderValue::from_static("")),
        );
        target = match inner.pick(&app, &route) {
            Some(t) => t,
            None => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fly-replay: no running machine matches the replay\n",
                );
            }
        };
    };
    let status = upstream.status();
    let headers = copy_headers(upstream.headers());
    // Streamed through, chunk by chunk (SSE responses stay open); traffic lasts as long as the body.
    let stream = futures::stream::unfold(Some((upstream, guard)), |state| async move {
        let (mut r, guard) = state?;
        match r.chunk().await {
            Ok(Some(c)) => Some((Ok::<Bytes, io::Error>(c), Some((r, guard)))),
            Ok(None) => None,
            Err(e) => Some((Err(io::Error::other(e)), None)),
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::routable;
    use serde_json::json;

    /// REALISM.md §3: the proxy routes on service checks; a failing top-level check does not keep traffic away.
    #[test]
    fn proxy_routes_on_service_checks_only() {
        let top_level_only = json!({"checks": {"ready": {"type": "http"}},
                                    "services": [{"internal_port": 8080}]});
        assert!(routable(&top_level_only, false));
        let service_check = json!({"services": [{"internal_port": 8080,
                                                 "checks": [{"type": "http", "path": "/readyz"}]}]});
        assert!(!routable(&service_check, false));
        assert!(routable(&service_check, true));
    }
}
