//! REALISM.md §4, §7 and §8 as assertions: the local driver's public proxy spreads requests over an app's
//! machines, honours `fly-replay` (`instance`, `prefer_instance`, `elsewhere`, `region`, `state` →
//! `fly-replay-src`) and the client's `fly-force-instance-id`, and each machine sees `FLY_MACHINE_ID`,
//! `FLY_REGION`, `FLY_APP_NAME`; its autostop works region by region; the public URL needs an address and a
//! service.
//!
//! The machines are in-process HTTP servers started by a test spawner (no binaries needed): each answers with
//! the environment it was started with and the `fly-replay-src` it received, and asks for the replay that the
//! request's `x-ask-replay` header names (only on a request that was not replayed yet, unless `x-replay-loop`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use fly_adapter::token_bucket::RateLimits;
use fly_emulator::local::{LocalDriver, LocalDriverConfig, LocalProcess, ProcessSpawner};
use fly_emulator::{DEFAULT_TOKEN, EmulatorConfig, EmulatorHandle, Realism};
use serde_json::{Value, json};

const IMAGE: &str = "registry.example/runtime:1";

struct InProcess;

struct Machine {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalProcess for Machine {
    fn pid(&self) -> u32 {
        0
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
    fn pause(&self) {}
    fn resume(&self) {}
    fn terminate(self: Box<Self>) {
        self.running.store(false, Ordering::Relaxed);
        self.task.abort();
    }
    fn log_tail(&self, _: usize) -> String {
        String::new()
    }
}

impl ProcessSpawner for InProcess {
    fn spawn(
        &self,
        _name: &str,
        command: std::process::Command,
        _log: &Path,
    ) -> io::Result<Box<dyn LocalProcess>> {
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let port: u16 = args
            .windows(2)
            .find(|w| w[0] == "--port")
            .and_then(|w| w[1].parse().ok())
            .ok_or_else(|| io::Error::other("no --port"))?;
        let env: BTreeMap<String, String> = command
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        // `READY_AFTER_MS` in the machine's env: its readiness check fails for that long after the start, like a
        // server that installs its package first.
        let ready_at = std::time::Instant::now()
            + Duration::from_millis(
                env.get("READY_AFTER_MS")
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(0),
            );
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = axum::Router::new()
            .route(
                "/readyz",
                axum::routing::get(move || async move {
                    if std::time::Instant::now() < ready_at {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::OK
                    }
                }),
            )
            .fallback(echo)
            .with_state(Arc::new(env));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Box::new(Machine {
            running: Arc::new(AtomicBool::new(true)),
            task,
        }))
    }
}

async fn echo(
    State(env): State<Arc<BTreeMap<String, String>>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let body = json!({
        "machine": env.get("FLY_MACHINE_ID"),
        "region": env.get("FLY_REGION"),
        "app": env.get("FLY_APP_NAME"),
        "src": header("fly-replay-src"),
    });
    let mut response = axum::Json(body).into_response();
    if let Some(ask) = header("x-ask-replay")
        && (header("fly-replay-src").is_none() || header("x-replay-loop").is_some())
    {
        response
            .headers_mut()
            .insert("fly-replay", ask.parse().unwrap());
    }
    response
}

struct World {
    emu: EmulatorHandle,
    _driver: LocalDriver,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    app: String,
}

impl World {
    /// An app with one running machine per region, all ready; returns `(world, machine ids by region)`.
    async fn start(regions: &[&str]) -> (Self, Vec<String>) {
        let world = World::empty(Realism::off(), |_| {}).await;
        let mut ids = Vec::new();
        for region in regions {
            ids.push(world.add_machine(region).await);
        }
        world.wait_ready(&ids).await;
        (world, ids)
    }

    /// The app without machines, on an emulator with `realism` and a local driver `tune` adjusts.
    async fn empty(realism: Realism, tune: impl FnOnce(&mut LocalDriverConfig)) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut driver_config =
            LocalDriverConfig::new(IMAGE, "/nonexistent/mcpfly".into(), dir.path().into());
        tune(&mut driver_config);
        let driver = LocalDriver::new(driver_config, Arc::new(InProcess));
        let emu = common::emulator(EmulatorConfig {
            driver: Arc::new(driver.clone()),
            rate_limits: RateLimits::disabled(),
            realism,
            ..Default::default()
        })
        .await;
        let world = World {
            emu,
            _driver: driver,
            _dir: dir,
            http: reqwest::Client::new(),
            app: "replay-app".into(),
        };
        world
            .api(
                "POST",
                "/apps",
                json!({"app_name": world.app, "org_slug": "personal"}),
            )
            .await;
        world
    }

    /// A machine in `region` with `services` and `env`, running the in-process echo server.
    async fn add_machine_with(&self, region: &str, services: Value, extra: Value) -> String {
        let mut config = json!({"image": IMAGE,
                                "init": {"cmd": ["mcpfly", "bridge", "--port", "8080", "--", "server"]},
                                "services": services});
        for (k, v) in extra.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        let m = self
            .api(
                "POST",
                &format!("/apps/{}/machines", self.app),
                json!({"config": config, "region": region}),
            )
            .await;
        m["id"].as_str().unwrap().to_string()
    }

    /// The app's machines, as the API lists them.
    async fn machines(&self) -> Vec<Value> {
        let listed = self
            .api("GET", &format!("/apps/{}/machines", self.app), Value::Null)
            .await;
        listed.as_array().expect("a list").clone()
    }

    /// `id → state` of the app's machines, as the API reads them.
    async fn states(&self) -> BTreeMap<String, String> {
        self.machines()
            .await
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn api(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(
                method.parse().unwrap(),
                format!("{}{path}", self.emu.base_url()),
            )
            .bearer_auth(DEFAULT_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{method} {path}: {}", r.status());
        r.json().await.unwrap_or(Value::Null)
    }

    async fn add_machine(&self, region: &str) -> String {
        self.add_machine_with(
            region,
            json!([{"internal_port": 8080, "autostop": "off"}]),
            json!({"env": {"FLY_MACHINE_ID": "forged-by-config"}}),
        )
        .await
    }

    /// Until a forced request reaches each machine (the proxy routes only to ready ones).
    async fn wait_ready(&self, ids: &[String]) {
        for id in ids {
            for attempt in 0.. {
                let (status, _) = self.send(&[("fly-force-instance-id", id)], None).await;
                if status == 200 {
                    break;
                }
                assert!(attempt < 200, "machine {id} never became ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn send(&self, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> (u16, Value) {
        let mut r = self.http.post(format!(
            "http://{}/apps/{}/anything",
            self.emu.addr(),
            self.app
        ));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.body(body.unwrap_or_default()).send().await.unwrap();
        let status = r.status().as_u16();
        assert!(
            r.headers().get("fly-replay").is_none(),
            "the proxy consumes fly-replay; the client never sees it"
        );
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(json!(text)))
    }
}

fn src_field(src: &Value, field: &str) -> Option<String> {
    src.as_str()?
        .split(';')
        .find_map(|f| f.strip_prefix(&format!("{field}=")).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_spreads_requests_and_machines_see_their_identity() {
    let (world, ids) = World::start(&["iad", "ord", "fra"]).await;
    let regions = ["iad", "ord", "fra"];
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let (status, body) = world.send(&[], None).await;
        assert_eq!(status, 200, "{body}");
        let id = body["machine"].as_str().unwrap().to_string();
        let i = ids
            .iter()
            .position(|m| *m == id)
            .expect("a machine of the app");
        assert_eq!(
            body["region"], regions[i],
            "FLY_REGION is the machine's own"
        );
        assert_eq!(body["app"], world.app, "FLY_APP_NAME");
        assert!(
            body["src"].is_null(),
            "no fly-replay-src on a request that was not replayed"
        );
        seen.insert(id);
    }
    assert_eq!(
        seen.len(),
        3,
        "60 requests over 3 ready machines reach each: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_replay_instance_prefer_instance_elsewhere_region_and_state() {
    let (world, ids) = World::start(&["iad", "ord", "fra"]).await;
    let target = &ids[1];
    for _ in 0..12 {
        let ask = format!("instance={target};state=sess-7");
        let (status, body) = world.send(&[("x-ask-replay", &ask)], None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["machine"], *target,
            "instance= replays to that machine"
        );
        let responder = src_field(&body["src"], "instance").expect("fly-replay-src instance");
        assert!(ids.contains(&responder), "{body}");
        assert!(src_field(&body["src"], "region").is_some_and(|r| !r.is_empty()));
        assert!(src_field(&body["src"], "t").is_some_and(|t| t.parse::<u64>().is_ok()));
        assert_eq!(src_field(&body["src"], "state").as_deref(), Some("sess-7"));

        let ask = format!("prefer_instance={target}");
        let (_, body) = world.send(&[("x-ask-replay", &ask)], None).await;
        assert_eq!(
            body["machine"], *target,
            "prefer_instance= goes there when it can"
        );
        assert!(
            src_field(&body["src"], "state").is_none(),
            "no state asked, none echoed"
        );

        let (status, body) = world
            .send(&[("x-ask-replay", "prefer_instance=gone-machine")], None)
            .await;
        assert_eq!(
            status, 200,
            "prefer_instance falls back to load balancing: {body}"
        );

        let (_, body) = world
            .send(&[("x-ask-replay", "elsewhere=true")], None)
            .await;
        let responder = src_field(&body["src"], "instance").unwrap();
        assert_ne!(
            body["machine"], responder,
            "elsewhere=true leaves the responder out"
        );

        let (_, body) = world
            .send(&[("x-ask-replay", r#"region="fra,any""#)], None)
            .await;
        assert_eq!(body["region"], "fra", "region= prefers the listed region");
    }
    // A machine that is not there: the proxy answers with an error itself.
    let (status, _) = world
        .send(&[("x-ask-replay", "instance=gone-machine")], None)
        .await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_instance_loop_guard_and_replay_size_limit() {
    let (world, ids) = World::start(&["iad", "ord"]).await;
    for id in &ids {
        for _ in 0..5 {
            let (status, body) = world.send(&[("fly-force-instance-id", id)], None).await;
            assert_eq!(status, 200);
            assert_eq!(
                body["machine"], *id,
                "fly-force-instance-id pins the machine"
            );
        }
    }
    let (status, _) = world
        .send(&[("fly-force-instance-id", "not-a-machine")], None)
        .await;
    assert_eq!(
        status, 503,
        "a forced machine that is not running is an error"
    );

    // A machine that keeps asking for a replay does not make the proxy loop forever.
    let ask = format!("instance={}", ids[0]);
    let (status, _) = world
        .send(&[("x-ask-replay", &ask), ("x-replay-loop", "1")], None)
        .await;
    assert_eq!(status, 502);

    // A replay of a body over 1 MB fails; the same body without a replay is served.
    let big = vec![b'x'; 1024 * 1024 + 1];
    let (status, _) = world
        .send(&[("x-ask-replay", "elsewhere=true")], Some(big.clone()))
        .await;
    assert_eq!(status, 502);
    let (status, _) = world.send(&[], Some(big)).await;
    assert_eq!(status, 200);
}

/// REALISM.md §8: the public URL answers 404 until the app has a public address (a private v6 is not one) and a
/// machine with a service exposing a port with the http handler; then it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_url_needs_a_public_address_and_an_exposed_service() {
    let realism = Realism {
        public_url_needs_ip_and_service: true,
        ..Realism::off()
    };
    let world = World::empty(realism, |_| {}).await;
    let unexposed = world
        .add_machine_with(
            "iad",
            json!([{"internal_port": 8080, "autostop": "off"}]),
            json!({}),
        )
        .await;
    let assign = |kind: &str| json!({"type": kind, "org_slug": "personal"});
    let ips = format!("/apps/{}/ip_assignments", world.app);
    let (status, body) = world.send(&[], None).await;
    assert_eq!(status, 404, "no address yet: {body}");
    world.api("POST", &ips, assign("private_v6")).await;
    let (status, body) = world.send(&[], None).await;
    assert_eq!(status, 404, "a private v6 is not public: {body}");
    world.api("POST", &ips, assign("v6")).await;
    let (status, body) = world.send(&[], None).await;
    assert_eq!(
        status, 404,
        "an address but no service exposing a port: {body}"
    );
    assert!(body.to_string().contains("service"), "{body}");

    let exposed = world
        .add_machine_with(
            "iad",
            json!([{"internal_port": 8080, "autostop": "off",
                    "ports": [{"port": 443, "handlers": ["tls", "http"]}]}]),
            json!({}),
        )
        .await;
    world.wait_ready(&[unexposed, exposed]).await;
    let (status, body) = world.send(&[], None).await;
    assert_eq!(status, 200, "address and exposed service: {body}");
}

/// REALISM.md §8 (optional DNS delay): the hostname resolves only a while after the first public address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_url_waits_for_the_dns_delay() {
    let realism = Realism {
        public_url_needs_ip_and_service: true,
        public_dns_delay: Duration::from_secs(2),
        ..Realism::off()
    };
    let world = World::empty(realism, |_| {}).await;
    let id = world
        .add_machine_with(
            "iad",
            json!([{"internal_port": 8080, "autostop": "off",
                    "ports": [{"port": 80, "handlers": ["http"]}]}]),
            json!({}),
        )
        .await;
    let ips = format!("/apps/{}/ip_assignments", world.app);
    world
        .api(
            "POST",
            &ips,
            json!({"type": "shared_v4", "org_slug": "personal"}),
        )
        .await;
    let (status, body) = world.send(&[], None).await;
    assert_eq!(status, 404, "just assigned: {body}");
    assert!(body.to_string().contains("resolve"), "{body}");
    world.wait_ready(&[id]).await;
}

/// Machine ids by region (`FLY_REGION` as the machines see it) and each one's time of its last `stopping` or
/// `suspending` event, from the machines API.
async fn parked_at(world: &World) -> BTreeMap<String, (String, Option<i64>)> {
    world
        .machines()
        .await
        .iter()
        .map(|m| {
            let parked = m["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| matches!(e["status"].as_str(), Some("stopping" | "suspending")))
                .filter_map(|e| e["timestamp"].as_i64())
                .max();
            (
                m["id"].as_str().unwrap().to_string(),
                (m["region"].as_str().unwrap().to_string(), parked),
            )
        })
        .collect()
}

/// REALISM.md §7: idle machines are stopped region by region, at most one per region per pass, and
/// `min_machines_running` holds in the primary region (`PRIMARY_REGION`) only: the other region goes to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostop_works_per_region_and_keeps_the_minimum_in_the_primary_region_only() {
    const PASS: Duration = Duration::from_millis(400);
    let realism = Realism {
        autostop_per_region: true,
        ..Realism::off()
    };
    let world = World::empty(realism, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.autostop_interval = PASS;
    })
    .await;
    let services = json!([{"internal_port": 8080, "autostop": "stop", "min_machines_running": 1}]);
    let env = json!({"env": {"PRIMARY_REGION": "iad"}});
    for region in ["iad", "iad", "ord", "ord"] {
        world
            .add_machine_with(region, services.clone(), env.clone())
            .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let states = loop {
        let states = world.states().await;
        let parked = parked_at(&world).await;
        let running_in = |region: &str| {
            states
                .iter()
                .filter(|(id, s)| *s == "started" && parked[*id].0 == region)
                .count()
        };
        if running_in("ord") == 0 && states.values().all(|s| s == "started" || s == "stopped") {
            // The pass that parked ord's last machine judged iad as well: it keeps its minimum.
            assert_eq!(running_in("iad"), 1, "{states:?}");
            break parked;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never settled: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ord: Vec<i64> = states
        .values()
        .filter(|(region, _)| region == "ord")
        .map(|(_, at)| at.expect("ord machines were stopped"))
        .collect();
    let apart = (ord[0] - ord[1]).unsigned_abs();
    assert!(
        apart >= (PASS.as_millis() as u64) * 3 / 4,
        "one machine per region per pass: ord's two were stopped {apart} ms apart"
    );
}

/// REALISM.md §7: autostop suspends only a machine Fly can suspend (≤ 2 GB, no swap, no schedule); a larger one
/// is stopped instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostop_stops_a_machine_too_large_to_suspend() {
    let realism = Realism {
        autostop_per_region: true,
        suspend_needs_small_guest: true,
        ..Realism::off()
    };
    let world = World::empty(realism, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.autostop_interval = Duration::from_millis(300);
    })
    .await;
    let services = json!([{"internal_port": 8080, "autostop": "suspend"}]);
    let guest = |mb: u64| json!({"guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": mb}});
    let small = world
        .add_machine_with("iad", services.clone(), guest(2048))
        .await;
    let large = world.add_machine_with("ord", services, guest(4096)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let states = world.states().await;
        if states.values().all(|s| s == "suspended" || s == "stopped") {
            assert_eq!(states[&small], "suspended", "{states:?}");
            assert_eq!(states[&large], "stopped", "{states:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never parked: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// REALISM.md §7: a request waiting for the machine it autostarted is load in that machine's region, so the
/// per-region autostop never parks the machine under it, however long its start takes (here five idle timeouts).
/// Positive control in the same run: once the request is answered, the same autostop parks the machine again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostop_never_parks_a_machine_a_waiting_request_autostarted() {
    let realism = Realism {
        autostop_per_region: true,
        ..Realism::off()
    };
    let world = World::empty(realism, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.autostop_interval = Duration::from_millis(100);
        c.autostart_timeout = Duration::from_secs(10);
    })
    .await;
    let services = json!([{"internal_port": 8080, "autostop": "stop",
                           "checks": [{"type": "http", "path": "/readyz", "interval": "1s"}]}]);
    let id = world
        .add_machine_with("iad", services, json!({"env": {"READY_AFTER_MS": "1500"}}))
        .await;
    let stopped = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let states = world.states().await;
            if states[&id] == "stopped" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never stopped: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    stopped().await;

    let started = std::time::Instant::now();
    let (status, body) = world.send(&[], None).await;
    assert_eq!(status, 200, "after {:?}: {body}", started.elapsed());
    assert_eq!(body["machine"], id.as_str());
    stopped().await;
}
