//! The emulated Fly state: apps, machines, leases, secrets, IPs, and the timers that move machines
//! through their states.
//!
//! Transitions are scheduled on the emulator clock and applied when any request (or the inventory)
//! looks, in due order, so the state is deterministic under a manual clock and no background task is
//! needed. Everything is indexed (apps by name, machines by app, an org-wide index ordered by
//! `updated_at`) so 10,000 apps and 20,000 machines cost no per-request scans.

use super::{DriverAction, EmulatorConfig, MachineChange};
use chrono::SecondsFormat;
use fly_adapter::client::types::parse_go_duration;
use rand::Rng;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

mod machine_faults;
pub use machine_faults::{CRASH_LOOP_PERIOD, LaunchFault, LaunchFaultRule, host_status_str};

/// An error answer: HTTP status, Fly's `error` text and machine-readable `status`.
#[derive(Debug, Clone)]
pub struct ApiErr {
    pub status: u16,
    pub error: String,
    pub code: Option<&'static str>,
    /// Fly's 409 shape `{"status":"error","message":...}` instead of `{"error":...,"status":code}`.
    pub message_body: bool,
}

impl ApiErr {
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        ApiErr {
            status,
            error: error.into(),
            code: None,
            message_body: false,
        }
    }
    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    pub fn body(&self) -> Value {
        if self.message_body {
            return json!({"status": "error", "message": self.error});
        }
        let mut m = Map::new();
        m.insert("error".into(), Value::String(self.error.clone()));
        if let Some(c) = self.code {
            m.insert("status".into(), Value::String(c.into()));
        }
        Value::Object(m)
    }
    pub fn not_found(what: &str) -> Self {
        ApiErr::new(404, format!("not_found: {what} not found")).code("not_found")
    }
    pub fn precondition(msg: impl std::fmt::Display) -> Self {
        ApiErr::new(412, format!("failed_precondition: {msg}")).code("failed_precondition")
    }
    /// §6: a held lease, a stale `current_version` or a host without capacity. With `fly_conflicts` this is
    /// Fly's 409 with a `message` body; without it, the older idealised shape (`code`, and `idealised_status`).
    pub fn conflict(
        fly_conflicts: bool,
        idealised_status: u16,
        code: &'static str,
        msg: impl Into<String>,
    ) -> Self {
        if fly_conflicts {
            ApiErr {
                message_body: true,
                ..ApiErr::new(409, msg)
            }
        } else {
            ApiErr::new(idealised_status, msg).code(code)
        }
    }
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        ApiErr::new(400, format!("invalid_argument: {msg}")).code("invalid_argument")
    }
}

pub type Res = Result<(u16, Value), ApiErr>;

/// Who is asking, when, with which lease nonce.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub org: String,
    pub now: Duration,
    pub nonce: Option<String>,
}

#[derive(Debug, Clone)]
struct Pending {
    at: Duration,
    to: &'static str,
    seq: u64,
}

#[derive(Debug, Clone)]
struct LeaseRec {
    nonce: String,
    owner: String,
    description: String,
    expires: Duration,
}

#[derive(Debug)]
pub(crate) struct MachineRec {
    id: String,
    name: String,
    region: String,
    pub(crate) state: &'static str,
    instance_id: String,
    old_versions: Vec<String>,
    private_ip: String,
    config: Value,
    created: Duration,
    created_ms: i64,
    updated_ms: i64,
    events: Vec<Value>,
    lease: Option<LeaseRec>,
    cordoned: bool,
    pending: Option<Pending>,
    started_at: Option<Duration>,
    booted_secrets_version: Option<u64>,
    check_overrides: HashMap<String, String>,
    /// `ok`, `unknown` or `unreachable` (set by a test hook).
    host_status: &'static str,
    crash: Option<machine_faults::CrashLoop>,
    /// Restarts by the restart policy since the last update.
    restart_count: u64,
    /// Destroyed and past the visibility window: 404 on GET, listed only with include_deleted.
    gone: bool,
    pub(crate) notify: Arc<Notify>,
}

#[derive(Debug, Clone)]
struct SecretRec {
    value: String,
    digest: String,
    created_ms: i64,
    updated_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
struct IpRec {
    ip: String,
    region: String,
    service_name: String,
    shared: bool,
    created_at: String,
    /// When it was assigned, on the emulator clock (for the public hostname's DNS delay).
    #[serde(skip)]
    assigned: Duration,
}

impl IpRec {
    /// §8: an address the public hostname resolves to: any v4, or a v6 outside fc00::/7 (Flycast and the
    /// private network are `fdaa:`). The emulator assigns no egress addresses.
    fn is_public(&self) -> bool {
        let first = self
            .ip
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        !self.ip.contains(':')
            || !(first.len() == 4 && (first.starts_with("fc") || first.starts_with("fd")))
    }
}

/// §7 (docs `reference/suspend-resume`): Fly suspends a machine with at most 2 GB of memory, no swap and no
/// schedule.
fn suspendable(config: &Value) -> bool {
    let memory_mb = config
        .pointer("/guest/memory_mb")
        .and_then(Value::as_u64)
        .unwrap_or(256);
    let swap_mb = config
        .pointer("/init/swap_size_mb")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let schedule = config
        .get("schedule")
        .and_then(Value::as_str)
        .unwrap_or_default();
    memory_mb <= 2048 && swap_mb == 0 && schedule.is_empty()
}

/// §8: a service Fly's proxy serves the public hostname with: it exposes a port with the `http` handler.
fn exposes_http_port(config: &Value) -> bool {
    let services = config.get("services").and_then(Value::as_array);
    services.into_iter().flatten().any(|service| {
        let ports = service.get("ports").and_then(Value::as_array);
        ports.into_iter().flatten().any(|port| {
            let handlers = port.get("handlers").and_then(Value::as_array);
            handlers
                .into_iter()
                .flatten()
                .any(|h| h.as_str() == Some("http"))
        })
    })
}

#[derive(Debug)]
struct AppRec {
    id: String,
    /// When `POST /apps` made it, on the emulator clock (for the visibility lag).
    created: Duration,
    name: String,
    org: String,
    network: String,
    created_ms: i64,
    machines: HashMap<String, MachineRec>,
    secrets: BTreeMap<String, SecretRec>,
    secrets_version: u64,
    ips: Vec<IpRec>,
    ip_seq: u32,
    deleting: bool,
}

#[derive(Debug)]
enum Timer {
    Machine { app: String, id: String, seq: u64 },
    Gone { app: String, id: String },
    Crash { app: String, id: String, seq: u64 },
    RemoveApp { app: String },
}

/// What [`State::wait_check`] found.
pub enum WaitCheck {
    Done(Value),
    /// Not there yet: next scheduled transition (if any) and the machine's change signal.
    Pending(Option<Duration>, Arc<Notify>),
}

pub struct State {
    cfg: Arc<EmulatorConfig>,
    apps: HashMap<String, AppRec>,
    org_apps: HashMap<String, BTreeSet<String>>,
    /// Per org: (updated_at ms, machine id) → app, for `GET /orgs/{org}/machines?updated_after=`.
    org_index: HashMap<String, BTreeMap<(i64, String), String>>,
    timers: BTreeMap<(Duration, u64), Timer>,
    seq: u64,
    last_updated_ms: i64,
    wall_origin_ms: i64,
    /// Driver notifications collected under the lock, delivered after it is released.
    pub(crate) driver_queue: Vec<MachineChange>,
    launch_faults: Vec<LaunchFaultRule>,
    /// Org-wide listings answered, for `Realism::org_listing_error_every`.
    org_listings: u64,
    /// Reference §10.3's optional 404 window after a machine create (zero: off).
    create_lag: Duration,
}

/// Fly's answer for an app the caller's org cannot see (or cannot see yet).
fn unauthorized() -> ApiErr {
    ApiErr::new(401, "unauthorized").code("unauthorized")
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn rfc3339_seconds(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).expect("hex digit"))
        .collect()
}

/// A 26-character ULID-like id (Crockford base32: 10 chars of time, 16 random).
fn ulid(ms: i64) -> String {
    const A: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut s = String::with_capacity(26);
    let t = ms.max(0) as u64;
    for i in (0..10).rev() {
        s.push(A[((t >> (i * 5)) & 31) as usize] as char);
    }
    let mut rng = rand::rng();
    for _ in 0..16 {
        s.push(A[rng.random_range(0..32)] as char);
    }
    s
}

fn hash16(s: &str) -> u16 {
    let d = Sha256::digest(s.as_bytes());
    u16::from_be_bytes([d[0], d[1]])
}

fn digest(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..8])
}

fn is_transient(state: &str) -> bool {
    !fly_adapter::client::types::is_settled_state(state)
}

/// Fly's config echo: defaults filled in, `autostop` off/stop as booleans, `autostart` strings
/// rejected, guest sizes validated.
pub fn echo_config(cfg: Option<&Value>) -> Result<Value, ApiErr> {
    let mut c = match cfg {
        Some(Value::Object(m)) => m.clone(),
        _ => return Err(ApiErr::invalid("config is required")),
    };
    if c.get("image")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(ApiErr::invalid("config.image is required"));
    }
    for k in ["init", "dns"] {
        if c.get(k).is_none_or(Value::is_null) {
            c.insert(k.into(), json!({}));
        }
    }
    for k in ["env", "metadata"] {
        if c.get(k).is_some_and(Value::is_null) {
            c.remove(k);
        }
    }
    match c.get_mut("restart") {
        Some(Value::Object(r)) => {
            if r.get("policy")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                r.insert("policy".into(), json!("on-failure"));
            }
        }
        _ => {
            c.insert("restart".into(), json!({"policy": "on-failure"}));
        }
    }
    match c.get("guest") {
        None | Some(Value::Null) => {
            c.insert(
                "guest".into(),
                json!({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}),
            );
        }
        Some(g) => {
            let kind = g
                .get("cpu_kind")
                .and_then(Value::as_str)
                .unwrap_or("shared");
            let cpus = g.get("cpus").and_then(Value::as_u64).unwrap_or(1);
            let mem = g.get("memory_mb").and_then(Value::as_u64).unwrap_or(256);
            let ok = match kind {
                "shared" => {
                    [1, 2, 4, 6, 8].contains(&cpus)
                        && mem % 256 == 0
                        && (256..=2048 * cpus).contains(&mem)
                }
                "performance" => {
                    (1..=16).contains(&cpus)
                        && mem % 1024 == 0
                        && (2048 * cpus..=8192 * cpus).contains(&mem)
                }
                _ => false,
            };
            if !ok {
                return Err(ApiErr::invalid(format!(
                    "invalid guest: {kind} cpus={cpus} memory_mb={mem}"
                )));
            }
        }
    }
    if let Some(Value::Array(services)) = c.get_mut("services") {
        for s in services.iter_mut().filter_map(Value::as_object_mut) {
            match s.get("autostart") {
                None | Some(Value::Bool(_)) | Some(Value::Null) => {}
                Some(_) => {
                    return Err(ApiErr::invalid(
                        "json: cannot unmarshal string into Go struct field MachineService.config.services.autostart of type bool",
                    ));
                }
            }
            let echoed = match s.get("autostop") {
                Some(Value::String(m)) => match m.as_str() {
                    "off" => Some(json!(false)),
                    "stop" => Some(json!(true)),
                    "suspend" => None,
                    other => {
                        return Err(ApiErr::invalid(format!("invalid autostop value {other:?}")));
                    }
                },
                _ => None,
            };
            if let Some(e) = echoed {
                s.insert("autostop".into(), e);
            }
        }
    }
    Ok(Value::Object(c))
}

/// Configured checks of a config: (name, grace period); service checks are named as Fly names them.
pub(crate) fn configured_checks(config: &Value) -> Vec<(String, Duration)> {
    let grace = |c: &Value| {
        let ns = match c.get("grace_period") {
            Some(Value::String(s)) => parse_go_duration(s).unwrap_or(0),
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
            _ => 0,
        };
        Duration::from_nanos(ns.max(0) as u64)
    };
    let mut out = Vec::new();
    if let Some(Value::Object(m)) = config.get("checks") {
        for (k, c) in m {
            out.push((k.clone(), grace(c)));
        }
    }
    if let Some(Value::Array(services)) = config.get("services") {
        for (i, s) in services.iter().enumerate() {
            let port = s.get("internal_port").and_then(Value::as_u64).unwrap_or(0);
            if let Some(Value::Array(checks)) = s.get("checks") {
                for c in checks {
                    let kind = c.get("type").and_then(Value::as_str).unwrap_or("tcp");
                    out.push((format!("servicecheck-{i:02}-{kind}-{port}"), grace(c)));
                }
            }
        }
    }
    out
}

impl State {
    pub fn new(cfg: Arc<EmulatorConfig>, wall_origin_ms: i64) -> Self {
        State {
            cfg,
            apps: HashMap::new(),
            org_apps: HashMap::new(),
            org_index: HashMap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            last_updated_ms: 0,
            wall_origin_ms,
            driver_queue: Vec::new(),
            launch_faults: Vec::new(),
            org_listings: 0,
            create_lag: Duration::ZERO,
        }
    }

    fn wall(&self, t: Duration) -> i64 {
        self.wall_origin_ms + t.as_millis() as i64
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Apply every transition due at or before `now`, in order.
    pub fn advance(&mut self, now: Duration) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((at, _), timer) = entry.remove_entry();
            match timer {
                Timer::Machine { app, id, seq } => self.fire(&app, &id, seq, at),
                Timer::Gone { app, id } => {
                    if let Some(m) = self
                        .apps
                        .get_mut(&app)
                        .and_then(|a| a.machines.get_mut(&id))
                    {
                        m.gone = true;
                        m.notify.notify_waiters();
                    }
                }
                Timer::RemoveApp { app } => self.remove_app(&app),
                Timer::Crash { app, id, seq } => self.fire_crash(&app, &id, seq, at),
            }
        }
    }

    fn fire(&mut self, app: &str, id: &str, seq: u64, at: Duration) {
        let destroyed_visible = self.cfg.latencies.destroyed_visible;
        let Some(m) = self.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) else {
            return;
        };
        if m.pending.as_ref().is_none_or(|p| p.seq != seq) {
            return;
        }
        let to = m.pending.take().map(|p| p.to).unwrap_or("started");
        if to == "starting" {
            // The image pull is over: flyd launches the machine now.
            let start = self.cfg.latencies.start;
            self.transition(app, id, at, "starting", "started", start);
            self.queue_driver(app, id, DriverAction::Start);
            return;
        }
        m.state = to;
        let at_ms = self.wall_origin_ms + at.as_millis() as i64;
        let kind = match to {
            "started" => {
                m.started_at = Some(at);
                "start"
            }
            "launch_failed" | "failed" => "launch",
            "stopped" | "suspended" => "exit",
            "destroyed" => "destroy",
            _ => "update",
        };
        push_event(m, kind, to, "flyd", at_ms);
        m.notify.notify_waiters();
        let crash_loops = to == "started" && m.crash.is_some();
        if crash_loops {
            self.schedule_crash(app, id, at);
        }
        if to == "launch_failed" {
            // Transient: Fly gives up on the launch shortly after. A new machine that never ran goes on to
            // `destroyed` (Fly's machine-states doc: "will transition to destroyed"); one that ran before
            // settles in `failed`, "could not start successfully", and keeps its id.
            let delay = self.cfg.latencies.stop;
            let never_ran = self
                .apps
                .get(app)
                .and_then(|a| a.machines.get(id))
                .is_some_and(|m| m.old_versions.is_empty() && m.started_at.is_none())
                && self.cfg.realism.launch_failed_destroys;
            let end = if never_ran { "destroyed" } else { "failed" };
            self.touch(app, id, at);
            self.transition_from(app, id, at, None, end, delay);
            return;
        }
        if to == "destroyed" {
            let s = self.next_seq();
            self.timers.insert(
                (at + destroyed_visible, s),
                Timer::Gone {
                    app: app.into(),
                    id: id.into(),
                },
            );
        }
        self.touch(app, id, at);
    }

    /// Record a change of a machine: new `updated_at` (strictly increasing, so `updated_after`
    /// listings never miss one) and re-index it.
    fn touch(&mut self, app: &str, id: &str, at: Duration) {
        let at_ms = self.wall(at).max(self.last_updated_ms + 1);
        self.last_updated_ms = at_ms;
        let Some(a) = self.apps.get_mut(app) else {
            return;
        };
        let Some(m) = a.machines.get_mut(id) else {
            return;
        };
        let idx = self.org_index.entry(a.org.clone()).or_default();
        idx.remove(&(m.updated_ms, m.id.clone()));
        m.updated_ms = at_ms;
        idx.insert((at_ms, m.id.clone()), app.to_string());
    }

    /// Put a machine into a transient state that ends in `to` after `delay`.
    /// A launch (`to` = `started`) may meet an armed launch fault.
    fn transition(
        &mut self,
        app: &str,
        id: &str,
        now: Duration,
        transient: &'static str,
        to: &'static str,
        delay: Duration,
    ) {
        let mut to = to;
        if to == "started" {
            match self.take_launch_fault(app, id) {
                Some(LaunchFault::Fail) => to = "launch_failed",
                Some(LaunchFault::CrashLoop { exit_code }) => {
                    self.set_crash_loop(now, app, id, Some(exit_code));
                }
                None => {}
            }
        }
        self.transition_from(app, id, now, Some(transient), to, delay);
    }

    /// `transient`: the state until `to` (`None`: keep the current state, e.g. `launch_failed`).
    fn transition_from(
        &mut self,
        app: &str,
        id: &str,
        now: Duration,
        transient: Option<&'static str>,
        to: &'static str,
        delay: Duration,
    ) {
        let seq = self.next_seq();
        let at_ms = self.wall(now);
        if let Some(m) = self.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) {
            if let Some(transient) = transient {
                m.state = transient;
                push_event(m, transient, transient, "user", at_ms);
            }
            m.pending = Some(Pending {
                at: now + delay,
                to,
                seq,
            });
            m.notify.notify_waiters();
        }
        self.timers.insert(
            (now + delay, seq),
            Timer::Machine {
                app: app.into(),
                id: id.into(),
                seq,
            },
        );
        self.touch(app, id, now);
    }

    fn remove_app(&mut self, name: &str) {
        if let Some(a) = self.apps.remove(name) {
            if let Some(set) = self.org_apps.get_mut(&a.org) {
                set.remove(name);
            }
            if let Some(idx) = self.org_index.get_mut(&a.org) {
                for m in a.machines.values() {
                    idx.remove(&(m.updated_ms, m.id.clone()));
                    m.notify.notify_waiters();
                }
            }
        }
    }

    fn queue_driver(&mut self, app: &str, id: &str, action: DriverAction) {
        let Some(a) = self.apps.get(app) else { return };
        let Some(m) = a.machines.get(id) else { return };
        // A launch that is going to fail runs nothing.
        let action = match action {
            DriverAction::Start | DriverAction::Update
                if m.pending.as_ref().is_some_and(|p| p.to == "launch_failed") =>
            {
                DriverAction::Stop
            }
            other => other,
        };
        let mut env: BTreeMap<String, String> = m
            .config
            .get("env")
            .and_then(Value::as_object)
            .map(|e| {
                e.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        // App secrets win over env vars of the same name.
        for (k, s) in &a.secrets {
            env.insert(k.clone(), s.value.clone());
        }
        // What Fly's init sets in every machine (REALISM.md §4), over anything the config says.
        env.insert("FLY_MACHINE_ID".into(), id.into());
        env.insert("FLY_APP_NAME".into(), app.into());
        env.insert("FLY_REGION".into(), m.region.clone());
        self.driver_queue.push(MachineChange {
            action,
            app: app.into(),
            machine_id: id.into(),
            config: m.config.clone(),
            env,
        });
    }

    // ------------------------------------------------------------ lookups

    fn app_ref(&self, ctx: &Ctx, name: &str) -> Result<&AppRec, ApiErr> {
        let a = self
            .apps
            .get(name)
            .ok_or_else(|| ApiErr::not_found("app"))?;
        // Fly answers 401 for an app this token's org cannot see (fly-go's AppNameAvailable reads it so).
        if a.org != ctx.org {
            return Err(unauthorized());
        }
        // Just after create Fly does not know the app yet, then knows it without the token's access (§1).
        let lag = self.cfg.realism.app_visibility_lag;
        if ctx.now < a.created + lag {
            return Err(if ctx.now < a.created + lag / 2 {
                ApiErr::not_found("app")
            } else {
                unauthorized()
            });
        }
        Ok(a)
    }

    fn app_visible(&self, a: &AppRec, now: Duration) -> bool {
        now >= a.created + self.cfg.realism.app_visibility_lag
    }

    fn app_mut(&mut self, ctx: &Ctx, name: &str) -> Result<&mut AppRec, ApiErr> {
        self.app_ref(ctx, name)?;
        Ok(self.apps.get_mut(name).expect("checked above"))
    }

    fn machine_ref(&self, ctx: &Ctx, app: &str, id: &str) -> Result<&MachineRec, ApiErr> {
        let a = self.app_ref(ctx, app)?;
        match a.machines.get(id) {
            Some(m) if !m.gone && !self.not_yet_visible(m, ctx.now) => Ok(m),
            _ => Err(ApiErr::not_found("machine")),
        }
    }

    fn machine_mut(&mut self, ctx: &Ctx, app: &str, id: &str) -> Result<&mut MachineRec, ApiErr> {
        self.machine_ref(ctx, app, id)?;
        Ok(self
            .apps
            .get_mut(app)
            .and_then(|a| a.machines.get_mut(id))
            .expect("checked above"))
    }

    /// A mutation of a leased machine must carry the lease's nonce.
    fn check_lease(&self, ctx: &Ctx, app: &str, id: &str) -> Result<(), ApiErr> {
        let m = self.machine_ref(ctx, app, id)?;
        if let Some(l) = m.lease.as_ref().filter(|l| l.expires > ctx.now)
            && ctx.nonce.as_deref() != Some(l.nonce.as_str())
        {
            return Err(ApiErr::conflict(
                self.cfg.realism.fly_conflicts,
                409,
                "lease_conflict",
                format!(
                    "lease currently held by {}, and the lease nonce provided does not match",
                    l.owner
                ),
            ));
        }
        Ok(())
    }

    fn render_machine(
        &self,
        app: &AppRec,
        m: &MachineRec,
        now: Duration,
        with_app_name: bool,
    ) -> Value {
        let image = m
            .config
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (repo, tag) = image
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .unwrap_or((image, "latest"));
        let (registry, repository) = repo
            .split_once('/')
            .filter(|(r, _)| r.contains('.'))
            .unwrap_or(("docker.io", repo));
        let mut v = json!({
            "id": m.id,
            "name": m.name,
            "state": m.state,
            "region": m.region,
            "instance_id": m.instance_id,
            "private_ip": m.private_ip,
            "config": m.config,
            "incomplete_config": null,
            "image_ref": {"registry": registry, "repository": repository, "tag": tag,
                          "digest": format!("sha256:{}", hex::encode(Sha256::digest(image.as_bytes()))), "labels": {}},
            "created_at": rfc3339(m.created_ms),
            "updated_at": rfc3339(m.updated_ms),
            "events": m.events.iter().take(10).cloned().collect::<Vec<_>>(),
            "checks": self.render_checks(m, now),
            "host_status": "ok",
            "cordoned": m.cordoned,
        });
        if with_app_name {
            v["app_name"] = json!(app.name);
        }
        machine_faults::hide_config(&mut v, m);
        v
    }

    fn render_checks(&self, m: &MachineRec, now: Duration) -> Vec<Value> {
        let realism = &self.cfg.realism;
        let started = m.started_at.filter(|_| m.state == "started");
        let mut out: Vec<Value> = configured_checks(&m.config)
            .into_iter()
            .filter_map(|(name, grace)| {
                let (status, output) = match started {
                    // Fly reports nothing for a check that has not run yet (§2).
                    None if realism.checks_after_first_run => return None,
                    Some(t) if now < t + grace && realism.checks_after_first_run => return None,
                    None => ("critical", "machine is not started".to_string()),
                    Some(_) if m.crash.is_some() => ("critical", "emulated check critical: the process keeps exiting".to_string()),
                    Some(t) if now < t + grace => ("warning", "waiting for grace period".to_string()),
                    Some(_) => {
                        let s = m.check_overrides.get(&name).cloned().unwrap_or_else(|| self.cfg.default_check_status.clone());
                        let st: &'static str = match s.as_str() {
                            "passing" => "passing",
                            "warning" => "warning",
                            _ => "critical",
                        };
                        (st, format!("emulated check {st}"))
                    }
                };
                Some(json!({"name": name, "status": status, "output": output, "updated_at": rfc3339(self.wall(now))}))
            })
            .collect();
        // Fly's fake compatibility check, which fly-go strips on every read (§2).
        if realism.compat_check && started.is_some() {
            out.push(
                json!({"name": "bg_deployments_compat", "status": "passing", "output": "compat",
                            "updated_at": rfc3339(self.wall(now))}),
            );
        }
        out
    }

    // ------------------------------------------------------------ apps

    pub fn add_foreign_app(&mut self, name: &str, org: &str, now: Duration) {
        let ms = self.wall(now);
        // Long established: no visibility lag.
        self.insert_app(name, org, "", ms, Duration::ZERO);
    }

    fn insert_app(
        &mut self,
        name: &str,
        org: &str,
        network: &str,
        ms: i64,
        created: Duration,
    ) -> String {
        let id = format!("app_{}", random_hex(12));
        self.apps.insert(
            name.into(),
            AppRec {
                id: id.clone(),
                created,
                name: name.into(),
                org: org.into(),
                network: network.into(),
                created_ms: ms,
                machines: HashMap::new(),
                secrets: BTreeMap::new(),
                secrets_version: 0,
                ips: Vec::new(),
                ip_seq: 0,
                deleting: false,
            },
        );
        self.org_apps
            .entry(org.into())
            .or_default()
            .insert(name.into());
        id
    }

    fn render_app(&self, a: &AppRec) -> Value {
        let live = a
            .machines
            .values()
            .filter(|m| m.state != "destroyed")
            .count();
        let status = if a.deleting {
            "suspended"
        } else if a.machines.is_empty() {
            "pending"
        } else {
            "deployed"
        };
        json!({
            "id": a.id, "name": a.name, "status": status,
            "organization": {"name": a.org, "slug": a.org},
            "network": a.network, "machine_count": live, "volume_count": 0,
            "created_at": a.created_ms,
        })
    }

    pub fn apps_list(&self, ctx: &Ctx, org: Option<&str>) -> Res {
        let org = org.unwrap_or(&ctx.org);
        if org != ctx.org {
            return Err(
                ApiErr::new(403, "unauthorized: not a member of this organization")
                    .code("unauthorized"),
            );
        }
        let apps: Vec<Value> = self
            .org_apps
            .get(org)
            .into_iter()
            .flatten()
            .filter_map(|n| self.apps.get(n))
            .filter(|a| self.app_visible(a, ctx.now))
            .map(|a| self.render_app(a))
            .collect();
        Ok((200, json!({"total_apps": apps.len(), "apps": apps})))
    }

    pub fn app_get(&self, ctx: &Ctx, name: &str) -> Res {
        Ok((200, self.render_app(self.app_ref(ctx, name)?)))
    }

    pub fn app_create(&mut self, ctx: &Ctx, body: &Value) -> Res {
        let name = body
            .get("name")
            .or_else(|| body.get("app_name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let org = body
            .get("org_slug")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&ctx.org);
        if org != ctx.org {
            return Err(
                ApiErr::new(403, "unauthorized: not a member of this organization")
                    .code("unauthorized"),
            );
        }
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !valid {
            return Err(ApiErr::new(422, "Validation failed: Name is invalid").code("invalid_name"));
        }
        if self.apps.contains_key(name) {
            return Err(
                ApiErr::new(422, "Validation failed: Name has already been taken")
                    .code("name_taken"),
            );
        }
        let network = body
            .get("network")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ms = self.wall(ctx.now);
        let id = self.insert_app(name, org, &network, ms, ctx.now);
        Ok((201, json!({"id": id, "created_at": ms})))
    }

    /// 202; the app's machines are destroyed at once and the app disappears after a short delay.
    pub fn app_delete(&mut self, ctx: &Ctx, name: &str) -> Res {
        let delay = self.cfg.latencies.app_delete;
        let ids: Vec<String> = {
            let a = self.app_mut(ctx, name)?;
            if a.deleting {
                return Ok((202, Value::Null));
            }
            a.deleting = true;
            a.machines
                .values()
                .filter(|m| m.state != "destroyed")
                .map(|m| m.id.clone())
                .collect()
        };
        let ms = self.wall(ctx.now);
        for id in ids {
            self.queue_driver(name, &id, DriverAction::Destroy);
            if let Some(m) = self
                .apps
                .get_mut(name)
                .and_then(|a| a.machines.get_mut(&id))
            {
                m.state = "destroyed";
                m.pending = None;
                push_event(m, "destroy", "destroyed", "user", ms);
                m.notify.notify_waiters();
            }
            self.touch(name, &id, ctx.now);
        }
        let s = self.next_seq();
        self.timers
            .insert((ctx.now + delay, s), Timer::RemoveApp { app: name.into() });
        Ok((202, Value::Null))
    }

    // ------------------------------------------------------------ machines

    pub fn machines_list(
        &self,
        ctx: &Ctx,
        app: &str,
        include_deleted: bool,
        region: Option<&str>,
        states: &[String],
    ) -> Res {
        let a = self.app_ref(ctx, app)?;
        let mut ms: Vec<&MachineRec> = a
            .machines
            .values()
            .filter(|m| include_deleted || m.state != "destroyed")
            .filter(|m| !self.not_yet_visible(m, ctx.now))
            // Fly's per-app list can lag a create (§5); GET by id already answers.
            .filter(|m| ctx.now >= m.created + self.cfg.realism.list_lag)
            .filter(|m| region.is_none_or(|r| r == m.region))
            .filter(|m| states.is_empty() || states.iter().any(|s| s == m.state))
            .collect();
        ms.sort_by_key(|m| m.created_ms);
        Ok((
            200,
            Value::Array(
                ms.into_iter()
                    .map(|m| self.render_machine(a, m, ctx.now, false))
                    .collect(),
            ),
        ))
    }

    pub fn machine_get(&self, ctx: &Ctx, app: &str, id: &str) -> Res {
        let m = self.machine_ref(ctx, app, id)?;
        Ok((200, self.render_machine(&self.apps[app], m, ctx.now, false)))
    }

    fn check_min_secrets(&self, app: &str, body: &Value) -> Result<Option<u64>, ApiErr> {
        let current = self.apps.get(app).map(|a| a.secrets_version).unwrap_or(0);
        match body.get("min_secrets_version").and_then(Value::as_u64) {
            Some(min) if min > current => Err(ApiErr::precondition(format!(
                "secrets version {min} is not available yet (current version {current})"
            ))),
            _ => Ok(Some(current)),
        }
    }

    pub fn machine_create(&mut self, ctx: &Ctx, app: &str, body: &Value) -> Res {
        self.app_ref(ctx, app)?;
        if self.apps[app].deleting {
            return Err(ApiErr::not_found("app"));
        }
        let config = echo_config(body.get("config"))?;
        let booted = self.check_min_secrets(app, body)?;
        let skip_launch = body
            .get("skip_launch")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let region = body
            .get("region")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.cfg.default_region)
            .to_string();
        let id = random_hex(14);
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("machine-{}", &id[..6]));
        let ms = self.wall(ctx.now);
        let org = self.apps[app].org.clone();
        let lease = body
            .get("lease_ttl")
            .and_then(Value::as_u64)
            .filter(|t| *t > 0)
            .map(|ttl| LeaseRec {
                nonce: random_hex(12),
                owner: org.clone(),
                description: "created with lease_ttl".into(),
                expires: ctx.now + Duration::from_secs(ttl),
            });
        let nonce = lease.as_ref().map(|l| l.nonce.clone());
        let mut m = MachineRec {
            id: id.clone(),
            name,
            region,
            state: "created",
            instance_id: ulid(ms),
            old_versions: Vec::new(),
            private_ip: format!(
                "fdaa:0:{:x}:a7b:{:x}:{}:{}:2",
                hash16(&org),
                hash16(app),
                &id[..4],
                &id[4..8]
            ),
            config,
            created: ctx.now,
            created_ms: ms,
            updated_ms: 0,
            events: Vec::new(),
            lease,
            cordoned: body
                .get("skip_service_registration")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            pending: None,
            started_at: None,
            booted_secrets_version: if skip_launch { None } else { booted },
            check_overrides: HashMap::new(),
            host_status: "ok",
            crash: None,
            restart_count: 0,
            gone: false,
            notify: Arc::new(Notify::new()),
        };
        push_event(&mut m, "launch", "created", "user", ms);
        self.apps
            .get_mut(app)
            .expect("checked")
            .machines
            .insert(id.clone(), m);
        self.touch(app, &id, ctx.now);
        let pull = self.cfg.realism.image_pull;
        if !skip_launch && !pull.is_zero() {
            // Stays `created` while the image is pulled (§2); `fire` launches it afterwards.
            self.transition_from(app, &id, ctx.now, None, "starting", pull);
        } else if !skip_launch {
            let lat = self.cfg.latencies.start;
            self.transition(app, &id, ctx.now, "starting", "started", lat);
            self.queue_driver(app, &id, DriverAction::Start);
        }
        let a = &self.apps[app];
        let mut v = self.render_machine(a, &a.machines[&id], ctx.now, false);
        if let Some(n) = nonce {
            v["nonce"] = json!(n);
        }
        Ok((200, v))
    }

    pub fn machine_update(&mut self, ctx: &Ctx, app: &str, id: &str, body: &Value) -> Res {
        self.check_lease(ctx, app, id)?;
        self.check_host(app, id)?;
        let config = echo_config(body.get("config"))?;
        let booted = self.check_min_secrets(app, body)?;
        let skip_launch = body
            .get("skip_launch")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let lat = self.cfg.latencies;
        let ms = self.wall(ctx.now);
        let fly_conflicts = self.cfg.realism.fly_conflicts;
        let m = self.machine_mut(ctx, app, id)?;
        if matches!(m.state, "destroyed" | "destroying") {
            return Err(ApiErr::precondition(format!("machine is {}", m.state)));
        }
        if let Some(r) = body
            .get("region")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty() && *r != m.region)
        {
            return Err(ApiErr::invalid(format!(
                "region cannot be changed (from {} to {r})",
                m.region
            )));
        }
        if let Some(n) = body
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && *n != m.name)
        {
            return Err(ApiErr::invalid(format!(
                "name cannot be changed (from {} to {n})",
                m.name
            )));
        }
        if let Some(cv) = body
            .get("current_version")
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty() && *v != m.instance_id)
        {
            return Err(ApiErr::conflict(
                fly_conflicts,
                412,
                "failed_precondition",
                format!("machine version {cv} is not the current version"),
            ));
        }
        let was_running = matches!(m.state, "started" | "starting" | "restarting" | "updating");
        // A new version: whatever made the old one crash is gone (an armed launch fault may bring it back).
        m.crash = None;
        m.restart_count = 0;
        let old = std::mem::replace(&mut m.instance_id, ulid(ms));
        m.old_versions.push(old);
        m.config = config;
        let run = was_running && !skip_launch;
        if run {
            m.booted_secrets_version = booted;
        }
        push_event(m, "update", "replacing", "user", ms);
        let (to, delay) = if run {
            ("started", lat.update + lat.start)
        } else {
            ("stopped", lat.update)
        };
        self.transition(app, id, ctx.now, "updating", to, delay);
        self.queue_driver(app, id, DriverAction::Update);
        let a = &self.apps[app];
        Ok((200, self.render_machine(a, &a.machines[id], ctx.now, false)))
    }

    pub fn machine_delete(&mut self, ctx: &Ctx, app: &str, id: &str, force: bool) -> Res {
        self.check_lease(ctx, app, id)?;
        let lat = self.cfg.latencies;
        let m = self.machine_mut(ctx, app, id)?;
        match m.state {
            "destroyed" | "destroying" => return Ok((200, json!({"ok": true}))),
            "started" | "starting" | "restarting" | "updating" | "suspending" if !force => {
                return Err(ApiErr::precondition(format!(
                    "unable to destroy machine, not currently stopped or suspended (state {}); use force=true",
                    m.state
                )));
            }
            _ => {}
        }
        m.lease = None;
        self.transition(app, id, ctx.now, "destroying", "destroyed", lat.destroy);
        self.queue_driver(app, id, DriverAction::Destroy);
        Ok((200, json!({"ok": true})))
    }

    pub fn machine_action(&mut self, ctx: &Ctx, app: &str, id: &str, action: &str) -> Res {
        self.check_lease(ctx, app, id)?;
        if !matches!(action, "cordon" | "uncordon") {
            self.check_host(app, id)?;
        }
        let lat = self.cfg.latencies;
        let m = self.machine_mut(ctx, app, id)?;
        let state = m.state;
        if state == "destroyed" {
            return Err(ApiErr::not_found("machine"));
        }
        let ok = Ok((200, json!({"ok": true})));
        match action {
            "start" => match state {
                "started" | "starting" => ok,
                "created" if m.pending.is_some() || ctx.now < m.created + lat.start => Err(
                    ApiErr::precondition("machine is still being created (image pull in progress)"),
                ),
                "created" | "stopped" | "suspended" | "failed" => {
                    let v = self.apps[app].secrets_version;
                    let m = self.machine_mut(ctx, app, id)?;
                    m.booted_secrets_version = Some(v);
                    self.transition(app, id, ctx.now, "starting", "started", lat.start);
                    self.queue_driver(app, id, DriverAction::Start);
                    ok
                }
                _ => Err(ApiErr::precondition(format!(
                    "unable to start machine from state {state}"
                ))),
            },
            "stop" => match state {
                "stopped" | "created" | "stopping" => ok,
                "started" | "starting" | "restarting" | "suspended" => {
                    self.transition(app, id, ctx.now, "stopping", "stopped", lat.stop);
                    self.queue_driver(app, id, DriverAction::Stop);
                    ok
                }
                _ => Err(ApiErr::precondition(format!(
                    "unable to stop machine from state {state}"
                ))),
            },
            "suspend" => match state {
                "suspended" | "suspending" => ok,
                "started" => {
                    self.transition(app, id, ctx.now, "suspending", "suspended", lat.suspend);
                    self.queue_driver(app, id, DriverAction::Suspend);
                    ok
                }
                _ => Err(ApiErr::precondition(format!(
                    "unable to suspend machine from state {state}"
                ))),
            },
            "restart" => match state {
                "started" => {
                    self.transition(
                        app,
                        id,
                        ctx.now,
                        "restarting",
                        "started",
                        lat.stop + lat.start,
                    );
                    self.queue_driver(app, id, DriverAction::Stop);
                    self.queue_driver(app, id, DriverAction::Start);
                    ok
                }
                _ => Err(ApiErr::precondition(format!(
                    "unable to restart machine from state {state}"
                ))),
            },
            "cordon" | "uncordon" => {
                m.cordoned = action == "cordon";
                self.touch(app, id, ctx.now);
                ok
            }
            _ => Err(ApiErr::not_found("action")),
        }
    }

    /// One look for a waiter: done, pending (with when to look again), or an error.
    pub fn wait_check(
        &self,
        ctx: &Ctx,
        app: &str,
        id: &str,
        states: &[String],
        version: Option<&str>,
    ) -> Result<WaitCheck, ApiErr> {
        let a = self.app_ref(ctx, app)?;
        let m = match a.machines.get(id) {
            Some(m) if self.not_yet_visible(m, ctx.now) => {
                return Err(ApiErr::not_found("machine"));
            }
            Some(m) if !m.gone => m,
            Some(m) if states.iter().any(|s| s == "destroyed") => {
                return Ok(WaitCheck::Done(
                    json!({"ok": true, "state": "destroyed", "version": m.instance_id, "event_id": ""}),
                ));
            }
            _ => return Err(ApiErr::not_found("machine")),
        };
        // Waiting on a replaced version: that version's state is `replaced`.
        let state = match version {
            Some(v) if v != m.instance_id && m.old_versions.iter().any(|o| o == v) => "replaced",
            _ => m.state,
        };
        let matched = states
            .iter()
            .any(|s| s == state || (s == "settled" && !is_transient(state)));
        if matched {
            let event_id = m
                .events
                .first()
                .and_then(|e| e.get("id"))
                .cloned()
                .unwrap_or(json!(""));
            return Ok(WaitCheck::Done(
                json!({"ok": true, "state": state, "version": version.unwrap_or(&m.instance_id), "event_id": event_id}),
            ));
        }
        match &m.pending {
            Some(p) if state != "replaced" => Ok(WaitCheck::Pending(Some(p.at), m.notify.clone())),
            _ if is_transient(state) => Ok(WaitCheck::Pending(None, m.notify.clone())),
            _ => Err(ApiErr::precondition(format!(
                "machine is {state} and will not reach {}",
                states.join(",")
            ))),
        }
    }

    pub fn events(&self, ctx: &Ctx, app: &str, id: &str, limit: usize) -> Res {
        let m = self.machine_ref(ctx, app, id)?;
        Ok((
            200,
            Value::Array(m.events.iter().take(limit.clamp(1, 50)).cloned().collect()),
        ))
    }

    // ------------------------------------------------------------ leases

    /// fly-go's envelope `{status, data}`, or (`bare`) the OpenAPI's bare `Lease`.
    fn lease_json(l: &LeaseRec, version: &str, wall_origin_ms: i64, bare: bool) -> Value {
        let lease = json!({
            "nonce": l.nonce, "expires_at": (wall_origin_ms + l.expires.as_millis() as i64) / 1000,
            "owner": l.owner, "description": l.description, "version": version});
        if bare {
            lease
        } else {
            json!({"status": "success", "data": lease})
        }
    }

    pub fn lease_acquire(
        &mut self,
        ctx: &Ctx,
        app: &str,
        id: &str,
        ttl: u64,
        description: &str,
    ) -> Res {
        let origin = self.wall_origin_ms;
        let owner = ctx.org.clone();
        let (fly_conflicts, bare) = (
            self.cfg.realism.fly_conflicts,
            self.cfg.realism.lease_answer_bare,
        );
        let m = self.machine_mut(ctx, app, id)?;
        let ttl = Duration::from_secs(ttl.max(1));
        let active = m.lease.as_ref().filter(|l| l.expires > ctx.now).cloned();
        match (active, ctx.nonce.as_deref()) {
            (Some(l), Some(n)) if l.nonce == n => {
                let l = m.lease.as_mut().expect("active");
                l.expires = ctx.now + ttl;
                Ok((200, Self::lease_json(l, &m.instance_id, origin, bare)))
            }
            (Some(l), _) => Err(ApiErr::conflict(
                fly_conflicts,
                409,
                "lease_conflict",
                format!(
                    "lease currently held by {}, expires at {}",
                    l.owner,
                    (origin + l.expires.as_millis() as i64) / 1000
                ),
            )),
            (None, Some(_)) => Err(ApiErr::not_found("lease")),
            (None, None) => {
                let l = LeaseRec {
                    nonce: random_hex(12),
                    owner,
                    description: description.into(),
                    expires: ctx.now + ttl,
                };
                let v = Self::lease_json(&l, &m.instance_id, origin, bare);
                m.lease = Some(l);
                // The OpenAPI documents 201 for the bare answer; fly-go accepts either.
                Ok((if bare { 201 } else { 200 }, v))
            }
        }
    }

    pub fn lease_get(&self, ctx: &Ctx, app: &str, id: &str) -> Res {
        let m = self.machine_ref(ctx, app, id)?;
        match m.lease.as_ref().filter(|l| l.expires > ctx.now) {
            Some(l) => Ok((
                200,
                Self::lease_json(
                    l,
                    &m.instance_id,
                    self.wall_origin_ms,
                    self.cfg.realism.lease_answer_bare,
                ),
            )),
            None => Err(ApiErr::not_found("lease")),
        }
    }

    pub fn lease_release(&mut self, ctx: &Ctx, app: &str, id: &str) -> Res {
        let fly_conflicts = self.cfg.realism.fly_conflicts;
        let m = self.machine_mut(ctx, app, id)?;
        match m.lease.as_ref().filter(|l| l.expires > ctx.now) {
            None => Err(ApiErr::not_found("lease")),
            Some(l) if ctx.nonce.as_deref() != Some(l.nonce.as_str()) => Err(ApiErr::conflict(
                fly_conflicts,
                409,
                "lease_conflict",
                "lease nonce does not match",
            )),
            Some(_) => {
                m.lease = None;
                Ok((200, json!({"status": "success", "data": {"ok": true}})))
            }
        }
    }

    // ------------------------------------------------------------ metadata

    pub fn metadata_get(&self, ctx: &Ctx, app: &str, id: &str) -> Res {
        let m = self.machine_ref(ctx, app, id)?;
        Ok((200, m.config.get("metadata").cloned().unwrap_or(json!({}))))
    }

    /// Changes metadata without a new instance_id (no reboot).
    pub fn metadata_set(
        &mut self,
        ctx: &Ctx,
        app: &str,
        id: &str,
        key: &str,
        value: Option<&str>,
    ) -> Res {
        self.check_lease(ctx, app, id)?;
        let m = self.machine_mut(ctx, app, id)?;
        let cfg = m.config.as_object_mut().expect("config is an object");
        let md = cfg.entry("metadata").or_insert_with(|| json!({}));
        if !md.is_object() {
            *md = json!({});
        }
        let md = md.as_object_mut().expect("object");
        match value {
            Some(v) => {
                md.insert(key.into(), json!(v));
            }
            None => {
                md.remove(key);
            }
        }
        self.touch(app, id, ctx.now);
        Ok((204, Value::Null))
    }

    // ------------------------------------------------------------ secrets

    fn secret_json(name: &str, s: &SecretRec) -> Value {
        json!({"name": name, "digest": s.digest, "created_at": rfc3339(s.created_ms), "updated_at": rfc3339(s.updated_ms)})
    }

    pub fn secrets_list(&self, ctx: &Ctx, app: &str) -> Res {
        let a = self.app_ref(ctx, app)?;
        let list: Vec<Value> = a
            .secrets
            .iter()
            .map(|(k, s)| Self::secret_json(k, s))
            .collect();
        Ok((200, json!({"secrets": list})))
    }

    /// Bulk set/unset: one version bump per call.
    pub fn secrets_set(&mut self, ctx: &Ctx, app: &str, body: &Value) -> Res {
        let values = body
            .get("values")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiErr::invalid("values is required"))?;
        for k in values.keys() {
            let valid = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ApiErr::invalid(format!("invalid secret name {k:?}")));
            }
        }
        let ms = self.wall(ctx.now);
        let a = self.app_mut(ctx, app)?;
        for (k, v) in values {
            match v.as_str() {
                Some(v) => {
                    let created = a.secrets.get(k).map(|s| s.created_ms).unwrap_or(ms);
                    a.secrets.insert(
                        k.clone(),
                        SecretRec {
                            value: v.into(),
                            digest: digest(v),
                            created_ms: created,
                            updated_ms: ms,
                        },
                    );
                }
                None => {
                    a.secrets.remove(k);
                }
            }
        }
        a.secrets_version += 1;
        let list: Vec<Value> = a
            .secrets
            .iter()
            .map(|(k, s)| Self::secret_json(k, s))
            .collect();
        Ok((
            200,
            json!({"secrets": list, "version": a.secrets_version, "Version": a.secrets_version}),
        ))
    }

    pub fn secret_set_one(&mut self, ctx: &Ctx, app: &str, name: &str, body: &Value) -> Res {
        let value = body
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiErr::invalid("value is required"))?;
        let mut values = Map::new();
        values.insert(name.into(), json!(value));
        self.secrets_set(ctx, app, &json!({ "values": values }))?;
        let a = &self.apps[app];
        let mut v = Self::secret_json(name, &a.secrets[name]);
        v["version"] = json!(a.secrets_version);
        v["Version"] = json!(a.secrets_version);
        Ok((200, v))
    }

    pub fn secret_delete_one(&mut self, ctx: &Ctx, app: &str, name: &str) -> Res {
        let a = self.app_mut(ctx, app)?;
        if a.secrets.remove(name).is_none() {
            return Err(ApiErr::not_found("secret"));
        }
        a.secrets_version += 1;
        Ok((
            200,
            json!({"version": a.secrets_version, "Version": a.secrets_version}),
        ))
    }

    // ------------------------------------------------------------ ips

    pub fn ips_list(&self, ctx: &Ctx, app: &str) -> Res {
        let a = self.app_ref(ctx, app)?;
        Ok((200, json!({"ips": a.ips})))
    }

    /// Stable fake addresses derived from the app name, so reruns produce the same values.
    pub fn ip_assign(&mut self, ctx: &Ctx, app: &str, body: &Value) -> Res {
        let kind = body
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let region = body
            .get("region")
            .and_then(Value::as_str)
            .unwrap_or("global")
            .to_string();
        let ms = self.wall(ctx.now);
        let needs_org = self.cfg.realism.ip_assign_needs_org_slug;
        let a = self.app_mut(ctx, app)?;
        let org_slug = body.get("org_slug").and_then(Value::as_str);
        if needs_org && org_slug.is_none_or(|o| o != a.org) {
            return Err(ApiErr::invalid(format!(
                "org_slug must name the app's organization, got {org_slug:?}"
            )));
        }
        let h = hash16(app);
        a.ip_seq += 1;
        let n = a.ip_seq;
        let (ip, shared) = match kind.as_str() {
            "v6" => (format!("2a09:8280:1::{h:x}:{n:x}"), false),
            "shared_v4" => (format!("66.241.{}.{}", h >> 8, h & 0xff), true),
            "v4" => (
                format!("137.66.{}.{}", h >> 8, (h as u32 + n) & 0xff),
                false,
            ),
            "private_v6" => (format!("fdaa:0:{h:x}:0::{n:x}"), false),
            other => return Err(ApiErr::invalid(format!("invalid ip type {other:?}"))),
        };
        let rec = IpRec {
            ip,
            region,
            service_name: String::new(),
            shared,
            created_at: rfc3339(ms),
            assigned: ctx.now,
        };
        a.ips.push(rec.clone());
        Ok((200, serde_json::to_value(rec).expect("serialises")))
    }

    pub fn ip_delete(&mut self, ctx: &Ctx, app: &str, ip: &str) -> Res {
        let a = self.app_mut(ctx, app)?;
        let before = a.ips.len();
        a.ips.retain(|r| r.ip != ip);
        if a.ips.len() == before {
            return Err(ApiErr::not_found("ip assignment"));
        }
        Ok((204, Value::Null))
    }

    // ------------------------------------------------------------ org listing

    pub fn org_machines(
        &mut self,
        ctx: &Ctx,
        org: &str,
        updated_after: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
        include_deleted: bool,
    ) -> Res {
        if org != ctx.org {
            return Err(
                ApiErr::new(403, "unauthorized: not a member of this organization")
                    .code("unauthorized"),
            );
        }
        let realism = self.cfg.realism;
        self.org_listings += 1;
        let failed_region = (realism.org_listing_error_every > 0
            && self
                .org_listings
                .is_multiple_of(u64::from(realism.org_listing_error_every)))
        .then(|| self.cfg.default_region.clone());
        let empty = BTreeMap::new();
        let idx = self.org_index.get(org).unwrap_or(&empty);
        let start: (i64, String) = match (cursor, updated_after) {
            (Some(c), _) => {
                let (ms, id) = c
                    .split_once(':')
                    .ok_or_else(|| ApiErr::invalid("bad cursor"))?;
                (
                    ms.parse().map_err(|_| ApiErr::invalid("bad cursor"))?,
                    id.to_string(),
                )
            }
            (None, Some(u)) => {
                let ms = parse_rfc3339_ms(u)
                    .ok_or_else(|| ApiErr::invalid(format!("bad updated_after {u:?}")))?;
                // Strictly after: every key with this millisecond sorts at or below (ms, "\u{10FFFF}").
                (ms, "\u{10FFFF}".to_string())
            }
            (None, None) => (i64::MIN, String::new()),
        };
        let mut limit = limit.clamp(1, 1000);
        if realism.org_listing_rough {
            // `limit` is advisory: pages may be short while more remain (§5).
            limit = rand::rng().random_range(1..=limit);
        }
        // A change shows up only after it propagated (§5), with its original `updated_at`.
        let visible_until = self.wall(ctx.now) - realism.org_listing_delay.as_millis() as i64;
        let mut out = Vec::new();
        let mut last_key: Option<(i64, String)> = None;
        let mut more = false;
        use std::ops::Bound::{Excluded, Unbounded};
        for ((ms, id), app) in idx.range((Excluded(start), Unbounded)) {
            if *ms > visible_until {
                break;
            }
            let Some(a) = self.apps.get(app) else {
                continue;
            };
            let Some(m) = a.machines.get(id) else {
                continue;
            };
            if !include_deleted && m.state == "destroyed" {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            last_key = Some((*ms, id.clone()));
            // A region that did not answer: its machines are missing from this (partial) listing.
            if failed_region.as_deref() == Some(m.region.as_str()) {
                continue;
            }
            let mut v = self.render_machine(a, m, ctx.now, true);
            if realism.org_listing_rough {
                v["updated_at"] = json!(rfc3339_seconds(*ms));
            }
            out.push(v);
        }
        // The cursor points at the last entry this page covered.
        let next_cursor = more
            .then_some(last_key)
            .flatten()
            .map(|(ms, id)| format!("{ms}:{id}"));
        if realism.org_listing_rough {
            use rand::seq::SliceRandom;
            out.shuffle(&mut rand::rng());
        }
        let last_updated_at = idx.keys().next_back().map(|(ms, _)| rfc3339(*ms));
        let error_regions: Vec<String> = failed_region.into_iter().collect();
        Ok((
            200,
            json!({"machines": out, "next_cursor": next_cursor, "last_updated_at": last_updated_at,
                   "error_regions": error_regions}),
        ))
    }

    // ------------------------------------------------------------ platform (for machine drivers)

    /// §8: why the app's public hostname does not answer yet; `None` when Fly's proxy would serve it.
    pub(crate) fn public_url_refusal(&self, app: &str, now: Duration) -> Option<&'static str> {
        let realism = self.cfg.realism;
        if !realism.public_url_needs_ip_and_service {
            return None;
        }
        let Some(a) = self.apps.get(app).filter(|a| !a.deleting) else {
            return Some("no such app");
        };
        let Some(first_public) = a
            .ips
            .iter()
            .filter(|ip| ip.is_public())
            .map(|ip| ip.assigned)
            .min()
        else {
            return Some("the app has no public IP address");
        };
        if now < first_public + realism.public_dns_delay {
            return Some("the app's hostname does not resolve yet");
        }
        let serving = a
            .machines
            .values()
            .any(|m| m.state != "destroyed" && !m.gone && exposes_http_port(&m.config));
        if !serving {
            return Some(
                "no machine of the app has a service exposing a port with the http handler",
            );
        }
        None
    }

    pub(crate) fn machine_views(&self, app: &str) -> Vec<super::MachineView> {
        let Some(a) = self.apps.get(app) else {
            return Vec::new();
        };
        let mut ms: Vec<&MachineRec> = a
            .machines
            .values()
            .filter(|m| m.state != "destroyed" && !m.gone)
            .collect();
        ms.sort_by_key(|m| (m.created_ms, m.id.clone()));
        ms.into_iter()
            .map(|m| super::MachineView {
                id: m.id.clone(),
                name: m.name.clone(),
                state: m.state.to_string(),
                config: m.config.clone(),
                region: m.region.clone(),
            })
            .collect()
    }

    /// A start/stop/suspend by the platform itself (Fly's proxy): acts as the app's org, with the lease's nonce.
    pub(crate) fn platform_action(
        &mut self,
        now: Duration,
        app: &str,
        id: &str,
        action: &str,
    ) -> Res {
        let a = self.apps.get(app).ok_or_else(|| ApiErr::not_found("app"))?;
        let nonce = a
            .machines
            .get(id)
            .and_then(|m| m.lease.as_ref())
            .filter(|l| l.expires > now)
            .map(|l| l.nonce.clone());
        // §7: Fly's autostop falls back to stop for a machine it cannot suspend.
        let action = match a.machines.get(id) {
            Some(m)
                if action == "suspend"
                    && self.cfg.realism.suspend_needs_small_guest
                    && !suspendable(&m.config) =>
            {
                "stop"
            }
            _ => action,
        };
        let ctx = Ctx {
            org: a.org.clone(),
            now,
            nonce,
        };
        self.machine_action(&ctx, app, id, action)
    }

    // ------------------------------------------------------------ test hooks

    pub fn set_check_status(&mut self, app: &str, id: &str, check: &str, status: &str) -> bool {
        match self.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) {
            Some(m) => {
                m.check_overrides.insert(check.into(), status.into());
                true
            }
            None => false,
        }
    }

    pub fn inventory(&self, now: Duration) -> Inventory {
        let mut apps: Vec<InventoryApp> = self
            .apps
            .values()
            .map(|a| {
                let mut machines: Vec<InventoryMachine> = a
                    .machines
                    .values()
                    .map(|m| InventoryMachine {
                        id: m.id.clone(),
                        name: m.name.clone(),
                        region: m.region.clone(),
                        state: m.state.to_string(),
                        instance_id: m.instance_id.clone(),
                        booted_secrets_version: m.booted_secrets_version,
                        config: m.config.clone(),
                        leased: m.lease.as_ref().is_some_and(|l| l.expires > now),
                        cordoned: m.cordoned,
                        gone: m.gone,
                        checks: self.render_checks(m, now),
                        host_status: m.host_status.to_string(),
                        restart_count: m.restart_count,
                    })
                    .collect();
                machines.sort_by(|x, y| x.name.cmp(&y.name).then(x.id.cmp(&y.id)));
                InventoryApp {
                    name: a.name.clone(),
                    org: a.org.clone(),
                    network: a.network.clone(),
                    secrets_version: a.secrets_version,
                    secret_names: a.secrets.keys().cloned().collect(),
                    ips: a.ips.iter().map(|i| i.ip.clone()).collect(),
                    deleting: a.deleting,
                    machines,
                }
            })
            .collect();
        apps.sort_by(|x, y| x.name.cmp(&y.name));
        Inventory { apps }
    }
}

fn push_event(m: &mut MachineRec, kind: &str, status: &str, source: &str, ms: i64) {
    m.events.insert(
        0,
        json!({"id": ulid(ms), "type": kind, "status": status, "source": source, "timestamp": ms}),
    );
    m.events.truncate(50);
}

/// Everything the emulator holds, for assertions (secret values are never included).
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub apps: Vec<InventoryApp>,
}

impl Inventory {
    pub fn app(&self, name: &str) -> Option<&InventoryApp> {
        self.apps.iter().find(|a| a.name == name)
    }
    pub fn machine(&self, app: &str, id: &str) -> Option<&InventoryMachine> {
        self.app(app)?.machines.iter().find(|m| m.id == id)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InventoryApp {
    pub name: String,
    pub org: String,
    pub network: String,
    pub secrets_version: u64,
    pub secret_names: Vec<String>,
    pub ips: Vec<String>,
    pub deleting: bool,
    pub machines: Vec<InventoryMachine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InventoryMachine {
    pub id: String,
    pub name: String,
    pub region: String,
    pub state: String,
    pub instance_id: String,
    /// The app secrets version the machine last booted with (create, update or start).
    pub booted_secrets_version: Option<u64>,
    pub config: Value,
    pub leased: bool,
    pub cordoned: bool,
    pub gone: bool,
    pub checks: Vec<Value>,
    pub host_status: String,
    /// Restarts by the restart policy (crash loops) since the last update.
    pub restart_count: u64,
}
