//! A Fly Machines API emulator for tests, benchmarks and local demos (`mcpfly emulator --port N`).
//!
//! It reproduces the behaviour listed in `reference/fly-machines-api.md` §10: the machine state
//! machine on an injectable [`Clock`], error codes and bodies, leases, long-poll wait, rate limits,
//! fault injection, secrets versions, config echo, health checks and IP assignments, and it counts
//! every call so tests can assert how many calls the controller made.

pub mod clock;
pub mod faults;
pub mod local;
mod routes;
pub mod state;

pub use clock::Clock;
pub use faults::{Fault, FaultConfig, ScriptedFault};
pub use state::{
    CRASH_LOOP_PERIOD, Inventory, InventoryApp, InventoryMachine, LaunchFault, LaunchFaultRule,
};

use axum::serve::ListenerExt;
use fly_adapter::token_bucket::{RateLimits, TokenBucket};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The token the default configuration accepts, and its org.
pub const DEFAULT_TOKEN: &str = "emulator-token";
pub const DEFAULT_ORG: &str = "personal";

/// How long each transition takes on the emulator clock.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// `starting` → `started` (also the image-pull window in which start of a `created` machine is 412).
    pub start: Duration,
    pub stop: Duration,
    pub suspend: Duration,
    /// Added before the restart after an update.
    pub update: Duration,
    pub destroy: Duration,
    /// How long a destroyed machine still answers GET with `destroyed` before 404.
    pub destroyed_visible: Duration,
    /// How long after `DELETE /apps/{app}` the app is gone.
    pub app_delete: Duration,
}

impl Latencies {
    /// Short but non-zero, so tests see the transient states and still run fast.
    pub fn fast() -> Self {
        let ms = Duration::from_millis;
        Latencies {
            start: ms(50),
            stop: ms(30),
            suspend: ms(30),
            update: ms(20),
            destroy: ms(30),
            destroyed_visible: ms(500),
            app_delete: ms(50),
        }
    }

    /// Closer to Fly: a machine starts in about 2 s.
    pub fn realistic() -> Self {
        let s = Duration::from_secs;
        Latencies {
            start: s(2),
            stop: s(1),
            suspend: s(1),
            update: Duration::from_millis(500),
            destroy: s(1),
            destroyed_visible: s(60),
            app_delete: s(2),
        }
    }
}

/// Where Fly is less kind than an idealised API (`REALISM.md` in this crate names each fact and its source). Each
/// switch is independent; [`Realism::fly`] turns on every behaviour with durations scaled for tests, so a
/// client that ignores one fails a test instead of failing on real Fly.
#[derive(Debug, Clone, Copy)]
pub struct Realism {
    /// §1: after `POST /apps` the app answers 404 for the first half of this window and 401 for the second half,
    /// to every call naming it (and it is missing from `GET /apps`). Zero: visible at once.
    pub app_visibility_lag: Duration,
    /// §2: a new machine (not `skip_launch`) stays `created` this long (the image pull) before `starting`; a start
    /// meanwhile is refused with 412. Zero: `starting` at once.
    pub image_pull: Duration,
    /// §2: a check has no entry in `checks` until its first run (`grace_period` after the machine started).
    /// Off: an entry from the start (`critical` while not started, `warning` within the grace period).
    pub checks_after_first_run: bool,
    /// §2: a passing fake `bg_deployments_compat` check is added to every started machine's `checks`.
    pub compat_check: bool,
    /// §5: the app's machine list leaves out a machine for this long after its create (GET by id finds it).
    pub list_lag: Duration,
    /// §5: the org-wide listing shows a change only this long after it happened (with its original `updated_at`).
    pub org_listing_delay: Duration,
    /// §5: the org-wide listing has whole-second `updated_at`, unsorted pages, and pages shorter than `limit`
    /// while more remain.
    pub org_listing_rough: bool,
    /// §5: every Nth org-wide listing is partial: one region's machines are left out and named in
    /// `error_regions`. Zero: never.
    pub org_listing_error_every: u32,
    /// §6: a held lease (wrong or missing nonce), a stale `current_version` and a host without capacity answer
    /// 409 with Fly's body `{"status":"error","message":...}`. Off: the older idealised answers (412 for a stale
    /// version, `{"error":...,"status":"lease_conflict"}` bodies).
    pub fly_conflicts: bool,
    /// §6: leases are answered as the OpenAPI documents them (a bare `Lease`, 201 on acquire) instead of the
    /// envelope `{status, data}` fly-go reads. Off by default: fly-go and flyctl read the envelope from Fly
    /// every day, so that is what Fly answers; the switch keeps a client honest about the documented shape.
    pub lease_answer_bare: bool,
    /// §6: `POST /apps/{app}/ip_assignments` without the app's `org_slug` is refused (400). flyctl always sends
    /// it and fly-go's request carries it; what Fly does without it is not documented, so the emulator keeps a
    /// client on the path Fly's own tools take.
    pub ip_assign_needs_org_slug: bool,
    /// §7: a new machine whose first launch fails goes `launch_failed` → `destroyed` (then 404), as Fly's
    /// machine-states doc says. Off, or for a machine that ran before: `launch_failed` → `failed`.
    pub launch_failed_destroys: bool,
    /// §7: the proxy's autostop judges each region on its own: a region needs as many machines as its load over
    /// the service's `soft_limit` (default 20) asks for, at least one while it has had traffic within the idle
    /// timeout; `min_machines_running` holds in the primary region only (the machines' `PRIMARY_REGION`; none
    /// set: no region keeps a minimum); at most one machine per region is stopped per pass. Off: the whole app
    /// is judged at once, every idle machine above `min_machines_running` stopped in one go.
    pub autostop_per_region: bool,
    /// §7: autostop suspends only a machine Fly can suspend (at most 2048 MB of memory, no swap, no schedule);
    /// any other is stopped instead. Off: suspended whatever its size.
    pub suspend_needs_small_guest: bool,
    /// §8: the app's public URL answers 404 until the app has a public address (a shared v4, a dedicated v4 or
    /// a v6 that is neither Flycast nor egress) and a machine with a service exposing a port with handlers.
    /// Off: the URL answers as soon as a machine can take the request.
    pub public_url_needs_ip_and_service: bool,
    /// §8: `APP.fly.dev` resolves only "after a small delay" once the first public address is assigned; the
    /// public URL answers 404 for this long after it. Fly gives no figure: a fraction of a second in tests, seconds
    /// in [`Realism::fly_timing`]. Zero: at once.
    pub public_dns_delay: Duration,
}

impl Realism {
    /// Every behaviour on, with windows short enough for tests.
    pub fn fly() -> Self {
        Realism {
            app_visibility_lag: Duration::from_millis(600),
            image_pull: Duration::from_millis(150),
            checks_after_first_run: true,
            compat_check: true,
            list_lag: Duration::from_secs(1),
            org_listing_delay: Duration::from_secs(2),
            org_listing_rough: true,
            org_listing_error_every: 7,
            fly_conflicts: true,
            lease_answer_bare: false,
            ip_assign_needs_org_slug: true,
            launch_failed_destroys: true,
            autostop_per_region: true,
            suspend_needs_small_guest: true,
            public_url_needs_ip_and_service: true,
            public_dns_delay: Duration::from_millis(300),
        }
    }

    /// The same behaviours with durations closer to Fly's (seconds), for benchmarks.
    pub fn fly_timing() -> Self {
        Realism {
            app_visibility_lag: Duration::from_secs(3),
            image_pull: Duration::from_secs(3),
            public_dns_delay: Duration::from_secs(3),
            ..Self::fly()
        }
    }

    /// The idealised API: everything visible and ready at once.
    pub fn off() -> Self {
        Realism {
            app_visibility_lag: Duration::ZERO,
            image_pull: Duration::ZERO,
            checks_after_first_run: false,
            compat_check: false,
            list_lag: Duration::ZERO,
            org_listing_delay: Duration::ZERO,
            org_listing_rough: false,
            org_listing_error_every: 0,
            fly_conflicts: false,
            lease_answer_bare: false,
            ip_assign_needs_org_slug: false,
            launch_failed_destroys: false,
            autostop_per_region: false,
            suspend_needs_small_guest: false,
            public_url_needs_ip_and_service: false,
            public_dns_delay: Duration::ZERO,
        }
    }
}

/// What a [`MachineDriver`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DriverAction {
    Start,
    Stop,
    Suspend,
    Destroy,
    Update,
}

/// A machine lifecycle change, with the environment the machine would see (config env overlaid
/// with the app's secrets: secrets win).
#[derive(Clone)]
pub struct MachineChange {
    pub action: DriverAction,
    pub app: String,
    pub machine_id: String,
    pub config: Value,
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for MachineChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `env` holds secret values: names only.
        f.debug_struct("MachineChange")
            .field("action", &self.action)
            .field("app", &self.app)
            .field("machine_id", &self.machine_id)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A hook for running something real per machine ([`local::LocalDriver`] runs a local process). Called
/// outside the emulator's lock, in request order.
pub trait MachineDriver: Send + Sync + 'static {
    fn on_change(&self, _change: &MachineChange) {}
    /// Called once when the emulator starts, with a handle the driver may keep (it holds the emulator weakly).
    fn attach(&self, _emulator: EmulatorControl) {}
    /// Extra routes served on the emulator's port next to `/v1` and `/__emulator/` (e.g. apps' public URLs).
    fn public_router(&self) -> Option<axum::Router> {
        None
    }
}

/// What a driver may do to the emulator: what Fly's own platform does (its proxy and health checker), never
/// an API call, so nothing is counted or rate limited.
#[derive(Clone)]
pub struct EmulatorControl {
    shared: std::sync::Weak<Shared>,
}

/// A machine as a driver sees it.
#[derive(Debug, Clone)]
pub struct MachineView {
    pub id: String,
    pub name: String,
    pub state: String,
    pub config: Value,
    pub region: String,
}

impl EmulatorControl {
    /// Set a check's result, as Fly's health checker would (see [`EmulatorHandle::set_check_status`]).
    pub fn set_check_status(&self, app: &str, machine: &str, check: &str, status: &str) -> bool {
        self.shared.upgrade().is_some_and(|sh| {
            sh.state
                .lock()
                .expect("poisoned")
                .set_check_status(app, machine, check, status)
        })
    }

    /// The app's machines that are not destroyed, oldest first.
    pub fn machines(&self, app: &str) -> Vec<MachineView> {
        let Some(sh) = self.shared.upgrade() else {
            return Vec::new();
        };
        let now = sh.clock.now();
        let mut st = sh.state.lock().expect("poisoned");
        st.advance(now);
        st.machine_views(app)
    }

    /// The emulator's realism switches (the proxy's behaviour follows them too).
    pub fn realism(&self) -> Option<Realism> {
        self.shared.upgrade().map(|sh| sh.cfg.realism)
    }

    /// Why the app's public URL answers 404 (REALISM.md §8), or `None` when Fly's proxy would serve it.
    pub fn public_url_refusal(&self, app: &str) -> Option<&'static str> {
        let sh = self.shared.upgrade()?;
        let now = sh.clock.now();
        let mut st = sh.state.lock().expect("poisoned");
        st.advance(now);
        st.public_url_refusal(app, now)
    }

    /// `start`, `stop` or `suspend` a machine the way Fly's proxy does for autostart and autostop: through the
    /// same state machine as the API (leases do not hold the platform back), a suspend of a machine Fly cannot
    /// suspend becoming a stop (REALISM.md §7). The driver is told as usual.
    pub fn platform_action(&self, app: &str, machine: &str, action: &str) -> Result<(), String> {
        let sh = self.shared.upgrade().ok_or("emulator stopped")?;
        let now = sh.clock.now();
        let result = {
            let mut st = sh.state.lock().expect("poisoned");
            st.advance(now);
            st.platform_action(now, app, machine, action)
        };
        routes::deliver_driver_changes(&sh);
        result.map(|_| ()).map_err(|e| e.error)
    }
}

/// The default: machines are pure state.
#[derive(Debug, Default)]
pub struct NoopDriver;
impl MachineDriver for NoopDriver {}

#[derive(Clone)]
pub struct EmulatorConfig {
    /// Token → org. Requests with another token get 401.
    pub tokens: HashMap<String, String>,
    pub clock: Clock,
    pub latencies: Latencies,
    /// Fly's documented limits by default; `RateLimits::disabled()` for tests of other behaviour.
    pub rate_limits: RateLimits,
    /// Status of checks nobody set, once the grace period is over.
    pub default_check_status: String,
    pub default_region: String,
    pub faults: FaultConfig,
    pub driver: Arc<dyn MachineDriver>,
    /// Events kept (oldest dropped first).
    pub event_log_capacity: usize,
    /// Fly's eventual consistency and other behaviours a client must cope with; on by default.
    pub realism: Realism,
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("orgs", &self.tokens.values().collect::<Vec<_>>())
            .field("clock", &self.clock)
            .field("latencies", &self.latencies)
            .field("rate_limits", &self.rate_limits)
            .finish_non_exhaustive()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            tokens: HashMap::from([(DEFAULT_TOKEN.to_string(), DEFAULT_ORG.to_string())]),
            clock: Clock::real(),
            latencies: Latencies::fast(),
            rate_limits: RateLimits::fly(),
            default_check_status: "passing".into(),
            default_region: "iad".into(),
            faults: FaultConfig::default(),
            driver: Arc::new(NoopDriver),
            event_log_capacity: 200_000,
            realism: Realism::fly(),
        }
    }
}

impl EmulatorConfig {
    /// Knobs for `mcpfly emulator`: machine start time, rate limits on/off, one token → org.
    pub fn from_knobs(
        start_latency: Duration,
        rate_limits: bool,
        token: Option<&str>,
        org: Option<&str>,
    ) -> Self {
        let mut c = EmulatorConfig::default();
        c.latencies.start = start_latency;
        if !rate_limits {
            c.rate_limits = RateLimits::disabled();
        }
        if let Some(t) = token {
            c.tokens = HashMap::from([(t.to_string(), org.unwrap_or(DEFAULT_ORG).to_string())]);
        }
        c
    }

    /// A cap on all mutations of one org (Fly documents none; benchmarks use one to bound a fleet's creation).
    pub fn with_org_mutation_limit(mut self, per_second: f64, burst: f64) -> Self {
        self.rate_limits.org_mutations =
            Some(fly_adapter::token_bucket::Limit::new(per_second, burst));
        self
    }

    pub fn with_token(mut self, token: &str, org: &str) -> Self {
        self.tokens.insert(token.into(), org.into());
        self
    }
}

/// One request as logged: never a body (secrets travel in bodies).
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// Unix milliseconds on the emulator clock.
    pub time_ms: i64,
    pub method: String,
    pub path: String,
    pub label: String,
    /// 0 for a dropped connection.
    pub status: u16,
    pub app: Option<String>,
    pub machine: Option<String>,
    pub request_id: String,
}

pub(crate) struct Limiter {
    buckets: HashMap<(String, String), TokenBucket>,
    org: HashMap<String, TokenBucket>,
}

pub(crate) struct Shared {
    pub cfg: Arc<EmulatorConfig>,
    pub clock: Clock,
    pub state: Mutex<state::State>,
    pub counters: Mutex<HashMap<(String, u16), u64>>,
    pub events: Mutex<VecDeque<EventRecord>>,
    pub faults: Mutex<faults::FaultState>,
    pub limiter: Mutex<Limiter>,
}

impl Shared {
    fn new(cfg: EmulatorConfig) -> Arc<Self> {
        let clock = cfg.clock.clone();
        let faults = faults::FaultState {
            random: cfg.faults.clone(),
            script: VecDeque::new(),
        };
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared {
            state: Mutex::new(state::State::new(
                cfg.clone(),
                clock.wall_ms(Duration::ZERO),
            )),
            cfg,
            clock,
            counters: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            faults: Mutex::new(faults),
            limiter: Mutex::new(Limiter {
                buckets: HashMap::new(),
                org: HashMap::new(),
            }),
        });
        shared.cfg.driver.attach(EmulatorControl {
            shared: Arc::downgrade(&shared),
        });
        shared
    }
}

/// Entry point: `Emulator::start(config).await` → a running emulator on 127.0.0.1 (random port).
pub struct Emulator;

impl Emulator {
    pub async fn start(cfg: EmulatorConfig) -> std::io::Result<EmulatorHandle> {
        Self::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(
        cfg: EmulatorConfig,
        addr: SocketAddr,
    ) -> std::io::Result<EmulatorHandle> {
        let shared = Shared::new(cfg);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = routes::router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener.tap_io(no_delay), app).await {
                tracing::error!(error = %e, "emulator server stopped");
            }
        });
        Ok(EmulatorHandle { shared, addr, task })
    }
}

/// Serve until the future is dropped (for `mcpfly emulator --port N`).
pub async fn serve(cfg: EmulatorConfig, addr: SocketAddr) -> std::io::Result<()> {
    let shared = Shared::new(cfg);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "Fly emulator listening; API under /v1, admin under /__emulator/");
    axum::serve(listener.tap_io(no_delay), routes::router(shared)).await
}

/// Nagle off on accepted connections: the public proxy relays streamed MCP answers, and with Nagle a write after
/// the first waits for the client's delayed ACK (~40 ms), as Fly's own proxy never makes it wait.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::warn!(%error, "cannot set TCP_NODELAY on a connection");
    }
}

/// A running emulator. Dropping it stops the server.
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`: the client's base URL (`FLY_FLAPS_BASE_URL` is this without `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Calls by (endpoint label, status).
    pub fn call_counts(&self) -> BTreeMap<(String, u16), u64> {
        self.shared
            .counters
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Calls of one endpoint label, any status.
    pub fn count(&self, label: &str) -> u64 {
        self.call_counts()
            .iter()
            .filter(|((l, _), _)| l == label)
            .map(|(_, v)| v)
            .sum()
    }

    /// Calls answered with one status, any endpoint.
    pub fn count_status(&self, status: u16) -> u64 {
        self.call_counts()
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, v)| v)
            .sum()
    }

    pub fn total_calls(&self) -> u64 {
        self.call_counts().values().sum()
    }

    pub fn event_log(&self) -> Vec<EventRecord> {
        self.shared
            .events
            .lock()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }

    pub fn reset_counters(&self) {
        self.shared.counters.lock().expect("poisoned").clear();
        self.shared.events.lock().expect("poisoned").clear();
    }

    pub fn inventory(&self) -> Inventory {
        let now = self.shared.clock.now();
        let mut st = self.shared.state.lock().expect("poisoned");
        st.advance(now);
        st.inventory(now)
    }

    /// Set a check's result (visible once the check's grace period since start has passed).
    pub fn set_check_status(&self, app: &str, machine: &str, check: &str, status: &str) -> bool {
        self.shared
            .state
            .lock()
            .expect("poisoned")
            .set_check_status(app, machine, check, status)
    }

    /// Arms `fault` for the next `count` launches (create without `skip_launch`, start, an update that boots) of
    /// `machine` (id or name) in `app`, or of any machine of `app` when `None`. The app need not exist yet.
    pub fn fault_next_launches(
        &self,
        app: &str,
        machine: Option<&str>,
        count: u32,
        fault: LaunchFault,
    ) {
        self.shared
            .state
            .lock()
            .expect("poisoned")
            .add_launch_faults(LaunchFaultRule {
                app: app.into(),
                machine: machine.map(str::to_string),
                count,
                fault,
            });
    }

    /// The next launch of `machine` (id or name) goes `starting` → `launch_failed` → `failed`.
    pub fn fail_next_start(&self, app: &str, machine: &str) {
        self.fault_next_launches(app, Some(machine), 1, LaunchFault::Fail);
    }

    /// `Some(code)`: the machine's process exits with `code` every [`CRASH_LOOP_PERIOD`] while it is `started`
    /// and is restarted per its restart policy (`exit` events with `restarting`, a growing `restart_count`;
    /// checks critical). `None` ends the loop. An update also ends it. False when there is no such machine.
    pub fn set_crash_loop(&self, app: &str, machine: &str, exit_code: Option<i32>) -> bool {
        let now = self.shared.clock.now();
        let mut st = self.shared.state.lock().expect("poisoned");
        st.advance(now);
        st.set_crash_loop(now, app, machine, exit_code)
    }

    /// `ok`, `unknown` or `unreachable` for `machine` (id or name): when not ok, the machine reads without
    /// `config` (with `incomplete_config`) and calls other than delete and cordon answer 503. False when there is
    /// no such machine or status.
    pub fn set_host_status(&self, app: &str, machine: &str, status: &str) -> bool {
        let Some(status) = state::host_status_str(status) else {
            return false;
        };
        let now = self.shared.clock.now();
        let mut st = self.shared.state.lock().expect("poisoned");
        st.advance(now);
        st.set_host_status(now, app, machine, status)
    }

    /// Machine GET, wait and list answer 404 / leave out a machine for `lag` after its create, as Fly's eventual
    /// consistency may (reference §10.3). Zero (the default) turns it off.
    pub fn set_create_visibility_lag(&self, lag: Duration) {
        self.shared
            .state
            .lock()
            .expect("poisoned")
            .set_create_visibility_lag(lag);
    }

    pub fn set_faults(&self, faults: FaultConfig) {
        self.shared.faults.lock().expect("poisoned").random = faults;
    }

    /// Queue faults for the next matching requests, in order.
    pub fn script_faults(&self, script: impl IntoIterator<Item = ScriptedFault>) {
        self.shared
            .faults
            .lock()
            .expect("poisoned")
            .script
            .extend(script);
    }

    /// An app owned by another org: ours get 401 for it (as Fly answers), and its name is taken.
    pub fn add_foreign_app(&self, name: &str, org: &str) {
        let now = self.shared.clock.now();
        self.shared
            .state
            .lock()
            .expect("poisoned")
            .add_foreign_app(name, org, now);
    }
}

/// A request id in the style of Fly's (ULID-like).
pub(crate) fn state_request_id(ms: i64) -> String {
    use rand::Rng;
    const A: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut rng = rand::rng();
    let mut s = format!("{ms:x}-");
    for _ in 0..16 {
        s.push(A[rng.random_range(0..32)] as char);
    }
    s
}
