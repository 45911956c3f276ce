//! Shared by the survival tests (issue 11): a supervisor that SIGKILLs and restarts `mcpfly controller` on a
//! schedule, the emulator's fault mix, the fleet audit (emulator inventory against the resources) and sizes
//! chosen by environment variables so CI runs a stated smaller size and a person can run the full one.
//!
//! Include with `mod ops_support; mod survival_support;` (it builds on `ops_support::ControllerProcess`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fly_emulator::{EmulatorHandle, Fault, FaultConfig, Inventory};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use rand::Rng;

use crate::ops_support::ControllerProcess;

/// A size from the environment (e.g. `MCPFLY_SURVIVAL_DEPLOYMENTS=200`), else the CI default.
pub fn env_size(var: &str, ci_default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

/// The fault mix of the issue: 429, 5xx, 408 after the work committed, connection resets (before and after
/// the work), each request failing with `probability`.
pub fn fault_mix(probability: f64) -> FaultConfig {
    FaultConfig {
        probability,
        faults: vec![
            Fault::Status(429),
            Fault::Status(500),
            Fault::Status(502),
            Fault::Status(503),
            Fault::CommitThenStatus(408),
            Fault::CommitThenStatus(500),
            Fault::Reset,
            Fault::CommitThenReset,
        ],
        labels: vec![],
    }
}

/// Environment for a controller process in these tests: fast convergence, the org-wide listing every second
/// as in production, no MCP handshake (emulated machines run nothing), JSON logs with audit lines.
pub fn controller_env<'a>(
    namespace: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("MCPFLY_NAMESPACES", namespace),
        ("MCPFLY_CONVERGE_INTERVAL_MS", "200"),
        ("MCPFLY_FLEET_POLL_SECONDS", "1"),
        ("MCPFLY_VERIFY", "false"),
        ("MCPFLY_LEADER_ELECTION", "false"),
        ("MCPFLY_CLUSTER_NAME", "survival"),
    ];
    env.extend_from_slice(extra);
    env
}

/// One incarnation of the controller: its name (POD_NAME), when it started and when it was killed.
#[derive(Clone, Debug)]
pub struct Incarnation {
    pub name: String,
    pub pid: u32,
    pub started: Instant,
    pub killed: Option<Instant>,
    pub log: PathBuf,
}

/// Starts one controller process with the given name.
type SpawnFn = dyn Fn(&str) -> anyhow::Result<ControllerProcess> + Send + Sync;

/// Runs `mcpfly controller` and SIGKILLs it every `min..max`, starting a new one at once, until stopped.
pub struct Supervisor {
    current: Arc<Mutex<Option<ControllerProcess>>>,
    pub incarnations: Arc<Mutex<Vec<Incarnation>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    spawn: Arc<SpawnFn>,
    prefix: String,
}

impl Supervisor {
    /// `spawn(name)` starts one controller process named `name`.
    pub fn new(
        prefix: &str,
        spawn: impl Fn(&str) -> anyhow::Result<ControllerProcess> + Send + Sync + 'static,
    ) -> Self {
        Self {
            current: Arc::new(Mutex::new(None)),
            incarnations: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            task: None,
            spawn: Arc::new(spawn),
            prefix: prefix.into(),
        }
    }

    /// Starts one controller that is left running (until `stop`, `start_chaos` or drop).
    pub fn start_stable(&self) -> anyhow::Result<()> {
        let n = self.incarnations.lock().unwrap().len();
        let name = format!("{}-{n}", self.prefix);
        let process = (self.spawn)(&name)?;
        self.incarnations.lock().unwrap().push(Incarnation {
            name: name.clone(),
            pid: process.pid(),
            started: Instant::now(),
            killed: None,
            log: process.log_path().to_path_buf(),
        });
        *self.current.lock().unwrap() = Some(process);
        Ok(())
    }

    /// Starts a controller and then kills and replaces it every `min..max` for `duration`.
    pub fn start_chaos(
        &mut self,
        duration: Duration,
        min: Duration,
        max: Duration,
    ) -> anyhow::Result<()> {
        self.stop.store(false, std::sync::atomic::Ordering::SeqCst);
        self.start_stable()?;
        let current = self.current.clone();
        let incarnations = self.incarnations.clone();
        let stop = self.stop.clone();
        let spawn = self.spawn.clone();
        let prefix = self.prefix.clone();
        let end = Instant::now() + duration;
        self.task = Some(tokio::spawn(async move {
            while Instant::now() < end && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let wait = rand::rng().random_range(min.as_millis()..=max.as_millis()) as u64;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if let Some(mut old) = current.lock().unwrap().take() {
                    old.kill();
                }
                if let Some(last) = incarnations.lock().unwrap().last_mut() {
                    last.killed = Some(Instant::now());
                }
                if Instant::now() >= end || stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let n = incarnations.lock().unwrap().len();
                let name = format!("{prefix}-{n}");
                match spawn(&name) {
                    Ok(process) => {
                        incarnations.lock().unwrap().push(Incarnation {
                            name,
                            pid: process.pid(),
                            started: Instant::now(),
                            killed: None,
                            log: process.log_path().to_path_buf(),
                        });
                        *current.lock().unwrap() = Some(process);
                    }
                    Err(e) => eprintln!("supervisor: cannot start {name}: {e:#}"),
                }
            }
        }));
        Ok(())
    }

    /// Waits for the kill schedule to end (it ends with the last process killed), then starts one controller
    /// that is left running.
    pub async fn finish_chaos(&mut self) -> anyhow::Result<()> {
        if let Some(task) = self.task.take() {
            task.await?;
        }
        if let Some(mut old) = self.current.lock().unwrap().take() {
            old.kill();
            if let Some(last) = self.incarnations.lock().unwrap().last_mut() {
                last.killed = Some(Instant::now());
            }
        }
        self.start_stable()
    }

    /// How many processes were SIGKILLed.
    pub fn kills(&self) -> usize {
        self.incarnations
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.killed.is_some())
            .count()
    }

    /// Every incarnation's log, concatenated.
    pub fn logs(&self) -> String {
        self.incarnations
            .lock()
            .unwrap()
            .iter()
            .map(|i| std::fs::read_to_string(&i.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The log of the process running now.
    pub fn current_log(&self) -> String {
        self.current
            .lock()
            .unwrap()
            .as_ref()
            .map(ControllerProcess::log)
            .unwrap_or_default()
    }

    /// Stops the kill schedule and kills the running controller.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(mut p) = self.current.lock().unwrap().take() {
            p.kill();
            if let Some(last) = self.incarnations.lock().unwrap().last_mut() {
                last.killed.get_or_insert_with(Instant::now);
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `names` with server-side apply, retrying transient apiserver errors.
pub async fn create_all(
    client: &kube::Client,
    namespace: &str,
    names: &[String],
) -> anyhow::Result<()> {
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::PatchParams::apply("survival").force();
    futures::future::try_join_all(names.chunks(names.len().div_ceil(8).max(1)).map(|chunk| {
        let api = api.clone();
        let params = params.clone();
        async move {
            for name in chunk {
                let value = mcpfly::local_cluster::image_deployment(namespace, name);
                let mut tries = 0;
                loop {
                    match api
                        .patch(name, &params, &kube::api::Patch::Apply(&value))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if tries < 20 => {
                            tries += 1;
                            eprintln!("apply {name}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(())
}

pub fn is_ready(d: &MCPDeployment) -> bool {
    crate::ops_support::is_ready(d)
}

/// Polls the namespace until every listed resource is Ready; returns how long it took, or the resources that
/// were not Ready at the deadline.
pub async fn wait_all_ready(
    api: &Api<MCPDeployment>,
    expected: usize,
    timeout: Duration,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let (ready, not_ready) = match api.list(&ListParams::default()).await {
            Ok(list) => {
                let (r, n): (Vec<_>, Vec<_>) = list.items.into_iter().partition(is_ready);
                (r.len(), n)
            }
            Err(_) => (0, vec![]),
        };
        if ready == expected && not_ready.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(not_ready
                .iter()
                .map(|d| {
                    format!(
                        "{}: {}",
                        d.name_any(),
                        serde_json::to_string(&d.status).unwrap_or_default()
                    )
                })
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the emulator holds against what the resources say. Every violation is one line.
#[derive(Debug, Default)]
pub struct FleetAudit {
    pub apps_on_fly: usize,
    pub machines_on_fly: usize,
    pub violations: Vec<String>,
}

/// Every live app on the emulator belongs to exactly one resource's `status.app` and vice versa; each app holds
/// exactly the desired machine names, none twice. `desired_machines` is the same for every resource here.
pub fn audit_fleet(
    inventory: &Inventory,
    resources: &[MCPDeployment],
    desired_machines: &[&str],
) -> FleetAudit {
    let mut audit = FleetAudit::default();
    let live: Vec<_> = inventory.apps.iter().filter(|a| !a.deleting).collect();
    audit.apps_on_fly = live.len();
    let mut owner_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in resources {
        match d.status.as_ref().and_then(|s| s.app.clone()) {
            Some(app) => owner_of.entry(app).or_default().push(d.name_any()),
            None => audit
                .violations
                .push(format!("{} has no status.app", d.name_any())),
        }
    }
    for (app, owners) in &owner_of {
        if owners.len() > 1 {
            audit
                .violations
                .push(format!("app {app} claimed by {owners:?}"));
        }
        if !live.iter().any(|a| &a.name == app) {
            audit
                .violations
                .push(format!("{owners:?}: app {app} missing on Fly"));
        }
    }
    let want: BTreeSet<&str> = desired_machines.iter().copied().collect();
    for app in &live {
        if !owner_of.contains_key(&app.name) {
            audit.violations.push(format!(
                "orphan app {} ({} machines)",
                app.name,
                app.machines.len()
            ));
        }
        let machines: Vec<&str> = app
            .machines
            .iter()
            .filter(|m| !m.gone && m.state != "destroyed")
            .map(|m| m.name.as_str())
            .collect();
        audit.machines_on_fly += machines.len();
        let names: BTreeSet<&str> = machines.iter().copied().collect();
        if names.len() != machines.len() {
            audit.violations.push(format!(
                "app {}: duplicate machine names {machines:?}",
                app.name
            ));
        }
        if owner_of.contains_key(&app.name) && names != want {
            audit.violations.push(format!(
                "app {}: machines {machines:?}, want {want:?}",
                app.name
            ));
        }
    }
    audit
}

/// 409 answers on lease endpoints: two writers contending for one machine.
pub fn lease_conflicts(emulator: &EmulatorHandle) -> u64 {
    emulator
        .call_counts()
        .iter()
        .filter(|((label, status), _)| label.starts_with("leases.") && *status == 409)
        .map(|(_, n)| n)
        .sum()
}

/// Faults the emulator injected or answered, by status (0 = dropped connection), from its counters.
pub fn failures_by_status(emulator: &EmulatorHandle) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for ((_, status), n) in emulator.call_counts() {
        if status == 0 || status >= 400 {
            *out.entry(status).or_default() += n;
        }
    }
    out
}

/// `kubectl get <kinds> -A -o json` as text (for canary searches).
pub fn kubectl_json(cp: &ControlPlane, kinds: &str) -> anyhow::Result<String> {
    let out = cp
        .kubectl()
        .args(["get", kinds, "-A", "-o", "json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl get {kinds}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One audit line of a controller process (`target: mcpfly::audit`, one per Fly mutation).
#[derive(Clone, Debug)]
pub struct AuditLine {
    pub process: String,
    pub action: String,
    pub app: Option<String>,
    pub fly_request_id: Option<String>,
}

/// The audit lines in a JSON log of `process`.
pub fn audit_lines(process: &str, log: &str) -> Vec<AuditLine> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "mcpfly::audit")
        .map(|v| AuditLine {
            process: process.to_string(),
            action: v["action"].as_str().unwrap_or_default().to_string(),
            app: v["app"].as_str().map(str::to_string),
            fly_request_id: v["fly_request_id"].as_str().map(str::to_string),
        })
        .collect()
}

/// Mutating requests in the emulator's log (reads, waits and lease bookkeeping excluded).
pub fn is_mutation(e: &fly_emulator::EventRecord) -> bool {
    e.method != "GET" && !e.label.starts_with("leases.")
}
