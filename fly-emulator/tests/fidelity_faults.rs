//! The reference's optional machine faults as assertions against the emulator, in raw HTTP on a manual clock:
//! a launch that fails (`starting` → `launch_failed` → `failed`, §3 and §10.1), a crash loop as Fly's CLI reads
//! it (latest `exit` event with `restarting`, `restart_count > 1`, non-zero exit: §8), a host that is not `ok`
//! (no `config`, `incomplete_config` instead: §3, §9.8), and the optional 404 window after create (§10.3).

mod common;
use common::emulator;
use fly_adapter::client::types::Machine;
use fly_adapter::token_bucket::RateLimits;
use fly_emulator::{
    CRASH_LOOP_PERIOD, Clock, DEFAULT_TOKEN, EmulatorConfig, EmulatorHandle, LaunchFault, Realism,
};
use serde_json::{Value, json};
use std::time::Duration;

struct Raw {
    http: reqwest::Client,
    base: String,
    admin: String,
}

impl Raw {
    fn new(emu: &EmulatorHandle) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Raw {
            http: reqwest::Client::new(),
            base: emu.base_url(),
            admin: format!("http://{}/__emulator", emu.addr()),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path))
            .header("Authorization", format!("Bearer {DEFAULT_TOKEN}"));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn admin(&self, path: &str, body: Value) -> u16 {
        self.http
            .post(format!("{}/{path}", self.admin))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn machine(&self, app: &str, id: &str) -> Value {
        let (s, m) = self
            .call("GET", &format!("/apps/{app}/machines/{id}"), None)
            .await;
        assert_eq!(s, 200, "{m}");
        m
    }

    async fn create_app(&self, app: &str) {
        let (s, b) = self
            .call(
                "POST",
                "/apps",
                Some(json!({"name": app, "org_slug": "personal"})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }

    async fn create_machine(&self, app: &str, name: &str, config: Value) -> Value {
        let (s, m) = self
            .call(
                "POST",
                &format!("/apps/{app}/machines"),
                Some(json!({"config": config, "name": name, "region": "iad"})),
            )
            .await;
        assert_eq!(s, 200, "{m}");
        m
    }
}

/// The idealised API on a manual clock: these tests pin facts other than Fly's lags (REALISM.md has those).
fn manual() -> EmulatorConfig {
    EmulatorConfig {
        clock: Clock::manual(),
        rate_limits: RateLimits::disabled(),
        realism: Realism::off(),
        ..Default::default()
    }
}

/// The start latency of `Latencies::fast()` and a bit.
const STARTED: Duration = Duration::from_millis(60);

fn mid(m: &Value) -> String {
    m["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_failed_launch_goes_launch_failed_then_failed() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    raw.create_app("lf").await;
    // Armed by name before the machine exists.
    emu.fail_next_start("lf", "iad-0");
    let m = raw
        .create_machine("lf", "iad-0", json!({"image": "img:1"}))
        .await;
    let id = mid(&m);
    assert_eq!(m["state"], "starting");
    emu.clock().advance(STARTED);
    assert_eq!(raw.machine("lf", &id).await["state"], "launch_failed");
    emu.clock().advance(Duration::from_millis(40));
    let got = raw.machine("lf", &id).await;
    assert_eq!(got["state"], "failed");
    let types: Vec<(&str, &str)> = got["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(types[0], ("launch", "failed"), "{types:?}");
    assert_eq!(types[1], ("launch", "launch_failed"), "{types:?}");
    // `failed` is settled: waiting for started can no longer succeed, waiting for failed answers at once.
    let path = format!("/apps/lf/machines/{id}/wait");
    let (s, _) = raw
        .call("GET", &format!("{path}?state=started&timeout=1"), None)
        .await;
    assert_eq!(s, 412);
    let (s, w) = raw
        .call("GET", &format!("{path}?state=failed&timeout=1"), None)
        .await;
    assert_eq!((s, w["state"].as_str()), (200, Some("failed")));
    // The fault was for one launch: a start from failed succeeds.
    let (s, _) = raw
        .call("POST", &format!("/apps/lf/machines/{id}/start"), None)
        .await;
    assert_eq!(s, 200);
    emu.clock().advance(STARTED);
    assert_eq!(raw.machine("lf", &id).await["state"], "started");

    // Per app, through the admin API, for the next two launches of any machine.
    let rule = json!({"app": "lf", "count": 2, "fault": "fail"});
    assert_eq!(raw.admin("launch_faults", rule).await, 200);
    let a = mid(&raw
        .create_machine("lf", "a", json!({"image": "img:1"}))
        .await);
    let b = mid(&raw
        .create_machine("lf", "b", json!({"image": "img:1"}))
        .await);
    let c = mid(&raw
        .create_machine("lf", "c", json!({"image": "img:1"}))
        .await);
    emu.clock().advance(Duration::from_millis(100));
    let states = [
        raw.machine("lf", &a).await["state"].clone(),
        raw.machine("lf", &b).await["state"].clone(),
        raw.machine("lf", &c).await["state"].clone(),
    ];
    assert_eq!(states, [json!("failed"), json!("failed"), json!("started")]);
    // A failed machine is destroyed without force.
    let (s, _) = raw
        .call("DELETE", &format!("/apps/lf/machines/{a}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        raw.admin("launch_faults", json!({"app": "lf", "fault": "bogus"}))
            .await,
        400
    );
}

/// The check Fly's CLI applies during a deploy (reference §8).
fn looks_crash_looping(m: &Machine) -> bool {
    m.events
        .iter()
        .find(|e| e.kind == "exit")
        .and_then(|e| e.request.as_ref())
        .is_some_and(|r| {
            let exit = &r["exit_event"];
            exit["requested_stop"] == json!(false)
                && exit["restarting"] == json!(true)
                && r["restart_count"].as_u64().unwrap_or(0) > 1
                && exit["exit_code"].as_i64().unwrap_or(0) != 0
        })
}

#[tokio::test]
async fn a_crash_loop_shows_exit_events_with_a_growing_restart_count() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    raw.create_app("cl").await;
    let config = json!({"image": "img:1", "restart": {"policy": "always"},
                        "checks": {"ready": {"type": "http", "port": 8080, "path": "/readyz"}}});
    let m = raw.create_machine("cl", "iad-0", config.clone()).await;
    let id = mid(&m);
    emu.clock().advance(STARTED);
    let healthy: Machine = serde_json::from_value(raw.machine("cl", &id).await).unwrap();
    assert_eq!(healthy.checks[0].status, "passing");
    assert!(!looks_crash_looping(&healthy));

    assert!(emu.set_crash_loop("cl", "iad-0", Some(1)));
    emu.clock().advance(CRASH_LOOP_PERIOD);
    let once: Machine = serde_json::from_value(raw.machine("cl", &id).await).unwrap();
    let exit = once.events.iter().find(|e| e.kind == "exit").unwrap();
    let request = exit.request.as_ref().unwrap();
    assert_eq!(
        (
            &request["exit_event"]["exit_code"],
            &request["exit_event"]["requested_stop"],
            &request["exit_event"]["restarting"],
            &request["restart_count"]
        ),
        (&json!(1), &json!(false), &json!(true), &json!(1))
    );
    assert_eq!(exit.source, "flyd");
    assert!(
        !looks_crash_looping(&once),
        "one restart is not yet a loop for Fly's CLI"
    );
    emu.clock().advance(CRASH_LOOP_PERIOD * 2);
    let looping: Machine = serde_json::from_value(raw.machine("cl", &id).await).unwrap();
    assert!(looks_crash_looping(&looping), "{:?}", looping.events);
    let exit = looping.events.iter().find(|e| e.kind == "exit").unwrap();
    assert_eq!(exit.request.as_ref().unwrap()["restart_count"], 3);
    assert_eq!(looping.state, "started", "restarted each time");
    assert_eq!(looping.checks[0].status, "critical");
    assert_eq!(emu.inventory().machine("cl", &id).unwrap().restart_count, 3);

    // Ended by the hook: no more exits.
    assert!(emu.set_crash_loop("cl", &id, None));
    emu.clock().advance(CRASH_LOOP_PERIOD * 3);
    assert_eq!(emu.inventory().machine("cl", &id).unwrap().restart_count, 3);
    assert_eq!(
        raw.machine("cl", &id).await["checks"][0]["status"],
        "passing"
    );

    // on-failure with max_retries 2: two restarts, then the machine stays stopped.
    let bounded = json!({"image": "img:1", "restart": {"policy": "on-failure", "max_retries": 2}});
    let b = mid(&raw.create_machine("cl", "b", bounded).await);
    emu.clock().advance(STARTED);
    let body = json!({"app": "cl", "machine": "b", "exit_code": 3});
    assert_eq!(raw.admin("crash_loop", body).await, 200);
    emu.clock().advance(CRASH_LOOP_PERIOD * 5);
    let gave_up = raw.machine("cl", &b).await;
    assert_eq!(gave_up["state"], "stopped");
    let exit = gave_up["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "exit")
        .unwrap()
        .clone();
    assert_eq!(exit["request"]["exit_event"]["restarting"], false);
    assert_eq!(exit["request"]["restart_count"], 2);

    // Armed for the next launch: an update boots a version that crash-loops; the update after it does not.
    emu.fault_next_launches(
        "cl",
        Some("iad-0"),
        1,
        LaunchFault::CrashLoop { exit_code: 137 },
    );
    let mut v2 = config.clone();
    v2["env"] = json!({"V": "2"});
    let (s, _) = raw
        .call(
            "POST",
            &format!("/apps/cl/machines/{id}"),
            Some(json!({"config": v2})),
        )
        .await;
    assert_eq!(s, 200);
    emu.clock()
        .advance(Duration::from_millis(80) + CRASH_LOOP_PERIOD * 3);
    let bad: Machine = serde_json::from_value(raw.machine("cl", &id).await).unwrap();
    assert!(looks_crash_looping(&bad), "{:?}", bad.events);
    let mut v3 = config.clone();
    v3["env"] = json!({"V": "3"});
    let (s, _) = raw
        .call(
            "POST",
            &format!("/apps/cl/machines/{id}"),
            Some(json!({"config": v3})),
        )
        .await;
    assert_eq!(s, 200);
    emu.clock()
        .advance(Duration::from_millis(80) + CRASH_LOOP_PERIOD * 3);
    let fixed = emu.inventory().machine("cl", &id).unwrap().clone();
    assert_eq!((fixed.state.as_str(), fixed.restart_count), ("started", 0));
    assert_eq!(fixed.checks[0]["status"], "passing");
}

#[tokio::test]
async fn a_host_that_is_not_ok_hides_config_and_refuses_all_but_destroy() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    raw.create_app("hs").await;
    let id = mid(&raw
        .create_machine("hs", "iad-0", json!({"image": "img:1"}))
        .await);
    emu.clock().advance(STARTED);
    let ok = raw.machine("hs", &id).await;
    assert_eq!(ok["host_status"], "ok");
    assert!(ok["config"].is_object());
    assert!(ok["incomplete_config"].is_null());

    assert!(
        !emu.set_host_status("hs", &id, "sideways"),
        "unknown status"
    );
    assert!(
        !emu.set_host_status("hs", "nope", "unreachable"),
        "unknown machine"
    );
    assert!(emu.set_host_status("hs", "iad-0", "unreachable"));
    let (s, list) = raw.call("GET", "/apps/hs/machines", None).await;
    assert_eq!(s, 200);
    for m in [raw.machine("hs", &id).await, list[0].clone()] {
        assert_eq!(m["host_status"], "unreachable");
        assert!(m.get("config").is_none(), "no config: {m}");
        assert_eq!(m["incomplete_config"]["image"], "img:1");
        let parsed: Machine = serde_json::from_value(m).unwrap();
        assert!(parsed.config.is_none() && parsed.incomplete_config.is_some());
    }
    let (s, e) = raw
        .call("POST", &format!("/apps/hs/machines/{id}/stop"), None)
        .await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["status"], "unavailable");
    let (s, _) = raw
        .call(
            "POST",
            &format!("/apps/hs/machines/{id}"),
            Some(json!({"config": {"image": "img:2"}})),
        )
        .await;
    assert_eq!(s, 503);

    let body = json!({"app": "hs", "machine": id, "status": "unknown"});
    assert_eq!(raw.admin("host_status", body).await, 200);
    assert_eq!(raw.machine("hs", &id).await["host_status"], "unknown");
    let bad = json!({"app": "hs", "machine": id, "status": "fine"});
    assert_eq!(raw.admin("host_status", bad).await, 400);
    assert_eq!(
        emu.inventory().machine("hs", &id).unwrap().host_status,
        "unknown"
    );

    let (s, _) = raw
        .call(
            "DELETE",
            &format!("/apps/hs/machines/{id}?force=true"),
            None,
        )
        .await;
    assert_eq!(s, 200, "a machine on a bad host can be destroyed");
    emu.clock().advance(Duration::from_millis(40));
    let (_, list) = raw.call("GET", "/apps/hs/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn the_optional_404_window_after_create() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    raw.create_app("nf").await;
    // Off by default: visible at once.
    let first = mid(&raw
        .create_machine("nf", "a", json!({"image": "img:1"}))
        .await);
    assert_eq!(raw.machine("nf", &first).await["name"], "a");

    emu.clock().advance(Duration::from_secs(1));
    emu.set_create_visibility_lag(Duration::from_millis(500));
    let m = raw
        .create_machine("nf", "b", json!({"image": "img:1"}))
        .await;
    let id = mid(&m);
    assert_eq!(m["name"], "b", "the create itself answers the machine");
    let p = format!("/apps/nf/machines/{id}");
    let (s, e) = raw.call("GET", &p, None).await;
    assert_eq!(s, 404);
    assert!(e["error"].as_str().unwrap().starts_with("not_found:"));
    let (s, _) = raw
        .call("GET", &format!("{p}/wait?state=started&timeout=1"), None)
        .await;
    assert_eq!(s, 404);
    let (_, list) = raw.call("GET", "/apps/nf/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "the list misses it too");
    emu.clock().advance(Duration::from_millis(500));
    assert_eq!(raw.machine("nf", &id).await["state"], "started");
    let (_, list) = raw.call("GET", "/apps/nf/machines", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);

    assert_eq!(
        raw.admin("create_visibility_lag", json!({"ms": 0})).await,
        200
    );
    let c = mid(&raw
        .create_machine("nf", "c", json!({"image": "img:1"}))
        .await);
    assert_eq!(raw.machine("nf", &c).await["name"], "c");
}

/// REALISM.md §7 (Fly's machine-states doc): `launch_failed` "will transition to destroyed" for a new machine;
/// a machine that ran before and cannot start again settles in `failed` and keeps its id.
#[tokio::test]
async fn a_new_machine_whose_launch_fails_is_destroyed() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            launch_failed_destroys: true,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    raw.create_app("lfd").await;
    emu.fail_next_start("lfd", "iad-0");
    let id = mid(&raw
        .create_machine("lfd", "iad-0", json!({"image": "img:1"}))
        .await);
    emu.clock().advance(STARTED);
    assert_eq!(raw.machine("lfd", &id).await["state"], "launch_failed");
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(raw.machine("lfd", &id).await["state"], "destroyed");
    emu.clock().advance(Duration::from_secs(1));
    let (s, _) = raw
        .call("GET", &format!("/apps/lfd/machines/{id}"), None)
        .await;
    assert_eq!(s, 404, "gone after destroyed_visible");

    // One that ran: stop it, then its next start fails → failed, same id.
    let id = mid(&raw
        .create_machine("lfd", "ams-0", json!({"image": "img:1"}))
        .await);
    emu.clock().advance(STARTED);
    assert_eq!(raw.machine("lfd", &id).await["state"], "started");
    let (s, _) = raw
        .call("POST", &format!("/apps/lfd/machines/{id}/stop"), None)
        .await;
    assert_eq!(s, 200);
    emu.clock().advance(Duration::from_millis(40));
    emu.fail_next_start("lfd", &id);
    let (s, _) = raw
        .call("POST", &format!("/apps/lfd/machines/{id}/start"), None)
        .await;
    assert_eq!(s, 200);
    emu.clock().advance(STARTED + Duration::from_millis(40));
    assert_eq!(raw.machine("lfd", &id).await["state"], "failed");
}
