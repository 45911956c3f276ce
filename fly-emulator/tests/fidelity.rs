//! The reference's facts (codes, bodies, field names, state sequences) as assertions against the
//! emulator, in raw HTTP, so drift between `reference/fly-machines-api.md` and the emulator is caught.

mod common;
use common::emulator;
use fly_adapter::token_bucket::RateLimits;
use fly_emulator::{Clock, DEFAULT_TOKEN, EmulatorConfig, EmulatorHandle, Realism};
use serde_json::{Value, json};
use std::time::Duration;

struct Raw {
    http: reqwest::Client,
    base: String,
}

impl Raw {
    fn new(emu: &EmulatorHandle) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Raw {
            http: reqwest::Client::new(),
            base: emu.base_url(),
        }
    }
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        nonce: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path))
            .header("Authorization", format!("Bearer {DEFAULT_TOKEN}"));
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(n) = nonce {
            r = r.header("fly-machine-lease-nonce", n);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            headers,
        )
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

async fn app_with_machine(raw: &Raw, app: &str, extra: Value) -> Value {
    let (s, _, _) = raw
        .call(
            "POST",
            "/apps",
            Some(json!({"app_name": app, "org_slug": "personal"})),
            None,
        )
        .await;
    assert_eq!(s, 201, "create app accepts app_name");
    let mut body = json!({"config": {"image": "img:1"}, "name": "iad-0", "region": "iad"});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let (s, m, _) = raw
        .call("POST", &format!("/apps/{app}/machines"), Some(body), None)
        .await;
    assert_eq!(s, 200, "{m}");
    m
}

#[tokio::test]
async fn apps_codes_and_bodies() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    let (s, b, h) = raw
        .call(
            "POST",
            "/apps",
            Some(json!({"name": "fid-app", "org_slug": "personal"})),
            None,
        )
        .await;
    assert_eq!(s, 201);
    assert!(b["id"].is_string());
    assert!(h.contains_key("fly-request-id"));
    let (s, b, _) = raw
        .call(
            "POST",
            "/apps",
            Some(json!({"name": "fid-app", "org_slug": "personal"})),
            None,
        )
        .await;
    assert_eq!(
        (s, b),
        (
            422,
            json!({"error": "Validation failed: Name has already been taken", "status": "name_taken"})
        )
    );
    let (s, b, _) = raw.call("GET", "/apps/fid-app", None, None).await;
    assert_eq!(s, 200);
    for k in [
        "id",
        "name",
        "status",
        "organization",
        "network",
        "machine_count",
        "volume_count",
    ] {
        assert!(b.get(k).is_some(), "app field {k}");
    }
    assert_eq!(b["status"], "pending");
    assert_eq!(b["organization"]["slug"], "personal");
    let (s, b, _) = raw.call("GET", "/apps/nope", None, None).await;
    assert_eq!(s, 404);
    assert!(b["error"].as_str().unwrap().starts_with("not_found:"));
    emu.add_foreign_app("theirs", "other");
    // REALISM.md §1: 401 (not 403) for an app of an org this token cannot see.
    assert_eq!(raw.call("GET", "/apps/theirs", None, None).await.0, 401);
    let (s, b, _) = raw.call("GET", "/apps?org_slug=personal", None, None).await;
    assert_eq!((s, b["total_apps"].as_u64()), (200, Some(1)));

    let unauth = raw
        .http
        .get(format!("{}/apps/fid-app", raw.base))
        .header("Authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status().as_u16(), 401);

    // Delete: 202, cascades to machines, then gone.
    let (s, m, _) = raw
        .call(
            "POST",
            "/apps/fid-app/machines",
            Some(json!({"config": {"image": "i"}})),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = raw.call("DELETE", "/apps/fid-app", None, None).await;
    assert_eq!(s, 202);
    let (_, mm, _) = raw
        .call(
            "GET",
            &format!("/apps/fid-app/machines/{}", m["id"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!(mm["state"], "destroyed");
    emu.clock().advance(Duration::from_secs(1));
    assert_eq!(raw.call("GET", "/apps/fid-app", None, None).await.0, 404);
    // The name is free again.
    assert_eq!(
        raw.call(
            "POST",
            "/apps",
            Some(json!({"name": "fid-app", "org_slug": "personal"})),
            None
        )
        .await
        .0,
        201
    );
}

#[tokio::test]
async fn machine_state_sequences() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "seq", json!({})).await;
    let id = m["id"].as_str().unwrap().to_string();
    let get = |raw: &Raw| {
        let p = format!("/apps/seq/machines/{id}");
        let raw = Raw {
            http: raw.http.clone(),
            base: raw.base.clone(),
        };
        async move { raw.call("GET", &p, None, None).await.1 }
    };
    assert_eq!(id.len(), 14);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(m["instance_id"].as_str().unwrap().len(), 26);
    assert!(m["private_ip"].as_str().unwrap().starts_with("fdaa:"));
    for k in [
        "id",
        "name",
        "state",
        "region",
        "instance_id",
        "private_ip",
        "config",
        "image_ref",
        "created_at",
        "updated_at",
        "events",
        "checks",
        "host_status",
    ] {
        assert!(m.get(k).is_some(), "machine field {k}");
    }
    assert_eq!(m["state"], "starting");
    emu.clock().advance(Duration::from_millis(60));
    assert_eq!(get(&raw).await["state"], "started");

    let p = format!("/apps/seq/machines/{id}");
    assert_eq!(
        raw.call("POST", &format!("{p}/stop"), Some(json!({})), None)
            .await
            .0,
        200
    );
    assert_eq!(get(&raw).await["state"], "stopping");
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(get(&raw).await["state"], "stopped");
    assert_eq!(
        raw.call("POST", &format!("{p}/stop"), Some(json!({})), None)
            .await
            .0,
        200,
        "stop of a stopped machine succeeds"
    );

    // Update of a stopped machine: new instance_id, ends stopped.
    let (s, u, _) = raw
        .call(
            "POST",
            &p,
            Some(json!({"config": {"image": "img:2"}})),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_ne!(u["instance_id"], m["instance_id"]);
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(get(&raw).await["state"], "stopped");
    // The old version reads as replaced.
    let (s, w, _) = raw
        .call(
            "GET",
            &format!(
                "{p}/wait?state=replaced&timeout=1&version={}",
                m["instance_id"].as_str().unwrap()
            ),
            None,
            None,
        )
        .await;
    assert_eq!((s, w["state"].as_str()), (200, Some("replaced")));

    assert_eq!(
        raw.call("POST", &format!("{p}/start"), None, None).await.0,
        200
    );
    emu.clock().advance(Duration::from_millis(60));
    assert_eq!(get(&raw).await["state"], "started");
    assert_eq!(
        raw.call("POST", &format!("{p}/suspend"), None, None)
            .await
            .0,
        200
    );
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(get(&raw).await["state"], "suspended");
    assert_eq!(
        raw.call("POST", &format!("{p}/start"), None, None).await.0,
        200
    );
    emu.clock().advance(Duration::from_millis(60));

    // Delete: 412 while started without force; destroying → destroyed (visible) → 404.
    let (s, b, _) = raw.call("DELETE", &p, None, None).await;
    assert_eq!(s, 412);
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .starts_with("failed_precondition:")
    );
    let (s, b, _) = raw
        .call("DELETE", &format!("{p}?kill=true"), None, None)
        .await;
    assert_eq!((s, b), (200, json!({"ok": true})));
    assert_eq!(get(&raw).await["state"], "destroying");
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(get(&raw).await["state"], "destroyed");
    let (_, list, _) = raw.call("GET", "/apps/seq/machines", None, None).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "destroyed hidden from list"
    );
    let (_, list, _) = raw
        .call("GET", "/apps/seq/machines?include_deleted=true", None, None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    emu.clock().advance(Duration::from_secs(1));
    assert_eq!(raw.call("GET", &p, None, None).await.0, 404);
    assert_eq!(
        raw.call("POST", &format!("{p}/start"), None, None).await.0,
        404,
        "actions after destroy"
    );
}

#[tokio::test]
async fn preconditions_and_secrets() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "pre", json!({"skip_launch": true})).await;
    let p = format!("/apps/pre/machines/{}", m["id"].as_str().unwrap());
    assert_eq!(m["state"], "created", "skip_launch stays created");
    assert_eq!(
        raw.call("POST", &format!("{p}/start"), None, None).await.0,
        412,
        "start while created"
    );
    let (s, b, _) = raw
        .call(
            "POST",
            "/apps/pre/machines",
            Some(json!({"config": {"image": "i"}, "min_secrets_version": 1})),
            None,
        )
        .await;
    assert_eq!(s, 412, "{b}");

    let (s, b, _) = raw
        .call(
            "POST",
            "/apps/pre/secrets",
            Some(json!({"values": {"A": "x", "B": "y"}})),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (b["version"].as_u64(), b["Version"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, b, _) = raw
        .call(
            "POST",
            "/apps/pre/secrets",
            Some(json!({"values": {"B": null}})),
            None,
        )
        .await;
    assert_eq!(b["version"], 2, "every change bumps the version");
    let (_, b, _) = raw.call("GET", "/apps/pre/secrets", None, None).await;
    let secrets = b["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 1);
    assert!(secrets[0].get("digest").is_some() && secrets[0].get("value").is_none());
    emu.clock().advance(Duration::from_millis(100));
    assert_eq!(
        raw.call("POST", &format!("{p}/start"), None, None).await.0,
        200
    );
    let inv = emu.inventory();
    assert_eq!(
        inv.machine("pre", m["id"].as_str().unwrap())
            .unwrap()
            .booted_secrets_version,
        Some(2),
        "start records the version"
    );
}

#[tokio::test]
async fn leases_and_wait() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "lz", json!({"lease_ttl": 10})).await;
    let create_nonce = m["nonce"]
        .as_str()
        .expect("create with lease_ttl returns a nonce")
        .to_string();
    let p = format!("/apps/lz/machines/{}", m["id"].as_str().unwrap());
    assert_eq!(
        raw.call("POST", &format!("{p}/lease"), Some(json!({"ttl": 5})), None)
            .await
            .0,
        409
    );
    assert_eq!(
        raw.call("POST", &format!("{p}/stop"), None, None).await.0,
        409,
        "mutation without the nonce"
    );
    let (s, b, _) = raw
        .call("DELETE", &format!("{p}/lease"), None, Some(&create_nonce))
        .await;
    assert_eq!(
        (s, b),
        (200, json!({"status": "success", "data": {"ok": true}}))
    );
    assert_eq!(
        raw.call("DELETE", &format!("{p}/lease"), None, Some(&create_nonce))
            .await
            .0,
        404
    );

    let (s, b, _) = raw
        .call(
            "POST",
            &format!("{p}/lease?ttl=5"),
            Some(json!({"ttl": 5, "description": "d"})),
            None,
        )
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("success")));
    for k in ["nonce", "expires_at", "owner", "description", "version"] {
        assert!(b["data"].get(k).is_some(), "lease field {k}");
    }
    assert_eq!(
        raw.call("GET", &format!("{p}/lease"), None, None).await.0,
        200
    );
    emu.clock().advance(Duration::from_secs(6));
    assert_eq!(
        raw.call("GET", &format!("{p}/lease"), None, None).await.0,
        404,
        "expired on the clock"
    );

    for t in ["0", "61"] {
        let (s, b, _) = raw
            .call(
                "GET",
                &format!("{p}/wait?state=started&timeout={t}"),
                None,
                None,
            )
            .await;
        assert_eq!(s, 400);
        assert_eq!(
            b["error"],
            "invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]"
        );
    }
    let (s, b, _) = raw
        .call(
            "GET",
            &format!("{p}/wait?state=started&timeout=5"),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, b["ok"].as_bool(), b["state"].as_str()),
        (200, Some(true), Some("started"))
    );
    assert!(b.get("version").is_some() && b.get("event_id").is_some());
    // An unreachable target (stopped, while started and nothing pending) → 412.
    assert_eq!(
        raw.call(
            "GET",
            &format!("{p}/wait?state=stopped&timeout=2"),
            None,
            None
        )
        .await
        .0,
        412
    );
    // Expiry of a long-poll on a machine still transitioning → 408.
    let mut slow = manual();
    slow.latencies.start = Duration::from_secs(30);
    let emu_slow = emulator(slow).await;
    let raw2 = Raw::new(&emu_slow);
    let ms = app_with_machine(&raw2, "slow", json!({})).await;
    let p2 = format!("/apps/slow/machines/{}", ms["id"].as_str().unwrap());
    let mut waiter = tokio::spawn(async move {
        raw2.call(
            "GET",
            &format!("{p2}/wait?state=started&timeout=2"),
            None,
            None,
        )
        .await
        .0
    });
    // Nothing says when the long-poll has reached the emulator, so time moves a second at a time until it
    // answers: a wait registered at emulator time t expires at t + 2 s, and 29 steps stay short of the 30 s
    // start, so the only answer it can get is the 408 (a loaded machine only costs more steps).
    let mut status = None;
    for _ in 0..29 {
        emu_slow.clock().advance(Duration::from_secs(1));
        if let Ok(answer) = tokio::time::timeout(Duration::from_millis(500), &mut waiter).await {
            status = Some(answer.unwrap());
            break;
        }
    }
    assert_eq!(
        status,
        Some(408),
        "the long-poll did not expire within 29 s of emulator time"
    );
    assert_eq!(
        raw.call("POST", &format!("{p}/stop"), None, None).await.0,
        200
    );
    let raw3 = Raw {
        http: raw.http.clone(),
        base: raw.base.clone(),
    };
    let p3 = p.clone();
    let waiter = tokio::spawn(async move {
        raw3.call(
            "GET",
            &format!("{p3}/wait?state=settled&timeout=10"),
            None,
            None,
        )
        .await
        .1
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    emu.clock().advance(Duration::from_millis(40));
    assert_eq!(waiter.await.unwrap()["state"], "stopped");
}

#[tokio::test]
async fn config_echo_and_checks() {
    let emu = emulator(manual()).await;
    let raw = Raw::new(&emu);
    let svc = |autostop: Value| json!({"protocol": "tcp", "internal_port": 8080, "autostop": autostop, "autostart": true});
    let cfg = json!({"image": "img:1", "services": [svc(json!("off")), svc(json!("stop")), svc(json!("suspend"))],
        "checks": {"ready": {"type": "http", "port": 8080, "path": "/ready", "grace_period": "5s"},
                   "alive": {"type": "tcp", "port": 8080, "grace_period": "5s"}}});
    let m = app_with_machine(&raw, "echo", json!({"config": cfg})).await;
    let c = &m["config"];
    assert_eq!(c["init"], json!({}));
    assert_eq!(c["dns"], json!({}));
    assert_eq!(c["restart"]["policy"], "on-failure");
    assert_eq!(c["services"][0]["autostop"], false);
    assert_eq!(c["services"][1]["autostop"], true);
    assert_eq!(c["services"][2]["autostop"], "suspend");
    let bad = json!({"config": {"image": "i", "services": [{"protocol": "tcp", "internal_port": 1, "autostart": "true"}]}});
    assert_eq!(
        raw.call("POST", "/apps/echo/machines", Some(bad), None)
            .await
            .0,
        400,
        "autostart string rejected"
    );

    let id = m["id"].as_str().unwrap();
    emu.clock().advance(Duration::from_millis(60));
    assert!(emu.set_check_status("echo", id, "ready", "critical"));
    let checks = |raw: &Raw| {
        let (http, base, p) = (
            raw.http.clone(),
            raw.base.clone(),
            format!("/apps/echo/machines/{id}"),
        );
        async move { Raw { http, base }.call("GET", &p, None, None).await.1["checks"].clone() }
    };
    let before = checks(&raw).await;
    assert!(
        before
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] != "passing" && c["status"] != "critical"),
        "hidden during grace: {before}"
    );
    emu.clock().advance(Duration::from_secs(6));
    let after = checks(&raw).await;
    let status = |n: &str| {
        after
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("ready"), "critical");
    assert_eq!(status("alive"), "passing");
}

#[tokio::test]
async fn rate_limits_ips_counters_and_admin() {
    let emu = emulator(EmulatorConfig {
        realism: Realism::off(),
        ..Default::default()
    })
    .await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "rl", json!({})).await;
    let p = format!("/apps/rl/machines/{}", m["id"].as_str().unwrap());
    let mut first_429 = None;
    for i in 0..12 {
        let (s, b, h) = raw.call("GET", &p, None, None).await;
        if s == 429 {
            first_429 = Some((i, b, h));
            break;
        }
    }
    let (i, b, h) = first_429.expect("GET is limited to bursts of 10");
    assert_eq!(i, 10);
    assert!(b["error"].is_string());
    assert!(h.get("retry-after").is_some());

    let (_, a, _) = raw
        .call(
            "POST",
            "/apps/rl/ip_assignments",
            Some(json!({"type": "shared_v4"})),
            None,
        )
        .await;
    let emu2 = emulator(manual()).await;
    let raw2 = Raw::new(&emu2);
    raw2.call(
        "POST",
        "/apps",
        Some(json!({"name": "rl", "org_slug": "personal"})),
        None,
    )
    .await;
    let (_, a2, _) = raw2
        .call(
            "POST",
            "/apps/rl/ip_assignments",
            Some(json!({"type": "shared_v4"})),
            None,
        )
        .await;
    assert_eq!(a["ip"], a2["ip"], "stable fake addresses");
    assert_eq!(
        raw.call(
            "POST",
            "/apps/rl/ip_assignments",
            Some(json!({"type": "bogus"})),
            None
        )
        .await
        .0,
        400
    );

    assert!(emu.count("machines.get") >= 11);
    assert_eq!(emu.count_status(429), 1);
    let admin = raw
        .http
        .get(format!("http://{}/__emulator/counters", emu.addr()))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(admin["total"].as_u64(), Some(emu.total_calls()));
    let ev = emu.event_log();
    assert!(ev.iter().any(|e| e.label == "machines.get"
        && e.status == 429
        && e.machine.as_deref() == m["id"].as_str()));
    emu.reset_counters();
    assert_eq!(emu.total_calls(), 0);
}

/// REALISM.md §1: after `POST /apps?wait=true` the app answers 404, then 401, to every call naming it, and is
/// missing from the org's app list, until the lag is over.
#[tokio::test]
async fn app_visibility_lag_after_create() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            app_visibility_lag: Duration::from_secs(10),
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    let body = json!({"name": "lagging", "org_slug": "personal", "network": "lagging"});
    assert_eq!(
        raw.call("POST", "/apps?wait=true", Some(body), None)
            .await
            .0,
        201
    );
    let seen = |raw: &Raw| {
        let (http, base) = (raw.http.clone(), raw.base.clone());
        async move {
            let raw = Raw { http, base };
            (
                raw.call("GET", "/apps/lagging", None, None).await.0,
                raw.call("GET", "/apps/lagging/machines", None, None)
                    .await
                    .0,
                raw.call("GET", "/apps/lagging/ip_assignments", None, None)
                    .await
                    .0,
                raw.call("GET", "/apps?org_slug=personal", None, None)
                    .await
                    .1["total_apps"]
                    .as_u64(),
            )
        }
    };
    assert_eq!(seen(&raw).await, (404, 404, 404, Some(0)));
    emu.clock().advance(Duration::from_secs(6));
    assert_eq!(seen(&raw).await, (401, 401, 401, Some(0)));
    emu.clock().advance(Duration::from_secs(5));
    assert_eq!(seen(&raw).await, (200, 200, 200, Some(1)));
}

/// REALISM.md §2: a new machine stays `created` through the image pull (a start is refused meanwhile), and its
/// checks have no entry before their first run; a passing compat check appears once it is started.
#[tokio::test]
async fn created_during_image_pull_and_no_check_results_before_first_run() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            image_pull: Duration::from_secs(3),
            checks_after_first_run: true,
            compat_check: true,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    let cfg = json!({"image": "img:1",
        "services": [{"protocol": "tcp", "internal_port": 8080,
                      "checks": [{"type": "http", "port": 8080, "path": "/readyz", "grace_period": "5s"}]}],
        "checks": {"alive": {"type": "tcp", "port": 8080, "grace_period": "5s"}}});
    let m = app_with_machine(&raw, "pull", json!({"config": cfg})).await;
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["state"], "created");
    let p = format!("/apps/pull/machines/{id}");
    let get = |raw: &Raw| {
        let (http, base, p) = (raw.http.clone(), raw.base.clone(), p.clone());
        async move { Raw { http, base }.call("GET", &p, None, None).await.1 }
    };
    emu.clock().advance(Duration::from_secs(2));
    assert_eq!(get(&raw).await["state"], "created", "still pulling");
    let (s, b, _) = raw.call("POST", &format!("{p}/start"), None, None).await;
    assert_eq!(s, 412, "start refused while created: {b}");
    emu.clock().advance(Duration::from_secs(1));
    assert_eq!(get(&raw).await["state"], "starting");
    emu.clock().advance(Duration::from_millis(100));
    let started = get(&raw).await;
    assert_eq!(started["state"], "started");
    let names = |m: &Value| -> Vec<String> {
        m["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&started),
        ["bg_deployments_compat"],
        "no result before the first run"
    );
    emu.clock().advance(Duration::from_secs(6));
    let after = get(&raw).await;
    let mut seen = names(&after);
    seen.sort();
    assert_eq!(
        seen,
        [
            "alive",
            "bg_deployments_compat",
            "servicecheck-00-http-8080"
        ]
    );
}

/// REALISM.md §5: the app's machine list lags a create (GET by id does not); the org-wide listing shows a change
/// only after it propagated, with whole-second `updated_at`, and now and then is partial (`error_regions`).
#[tokio::test]
async fn listings_are_a_point_in_time() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            list_lag: Duration::from_secs(2),
            org_listing_delay: Duration::from_secs(3),
            org_listing_rough: true,
            org_listing_error_every: 2,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "lists", json!({})).await;
    let id = m["id"].as_str().unwrap();
    let count = |v: &Value| v.as_array().map(Vec::len);
    assert_eq!(
        count(&raw.call("GET", "/apps/lists/machines", None, None).await.1),
        Some(0)
    );
    assert_eq!(
        raw.call("GET", &format!("/apps/lists/machines/{id}"), None, None)
            .await
            .0,
        200
    );
    let org = "/orgs/personal/machines?include_deleted=true";
    // Call 1: not propagated yet.
    let (s, b, _) = raw.call("GET", org, None, None).await;
    assert_eq!((s, count(&b["machines"])), (200, Some(0)), "{b}");
    emu.clock().advance(Duration::from_secs(5));
    assert_eq!(
        count(&raw.call("GET", "/apps/lists/machines", None, None).await.1),
        Some(1)
    );
    // Call 2: partial, the default region (iad, where the machine runs) did not answer.
    let (_, b, _) = raw.call("GET", org, None, None).await;
    assert_eq!(b["error_regions"], json!(["iad"]));
    assert_eq!(count(&b["machines"]), Some(0));
    // Call 3: complete, with a whole-second timestamp.
    let (_, b, _) = raw.call("GET", org, None, None).await;
    assert_eq!(b["error_regions"], json!([]));
    let updated = b["machines"][0]["updated_at"].as_str().unwrap().to_string();
    assert!(!updated.contains('.'), "whole seconds: {updated}");
}

/// REALISM.md §6: a held lease, a stale `current_version` and a host without capacity all answer 409 with Fly's
/// body `{"status":"error","message":...}`; releasing an expired lease answers "lease not found"; the lease answer
/// is fly-go's envelope, or with `lease_answer_bare` the OpenAPI's bare `Lease` (201).
#[tokio::test]
async fn conflicts_are_409_with_a_message_body() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            fly_conflicts: true,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    let m = app_with_machine(&raw, "cf", json!({"lease_ttl": 10})).await;
    let nonce = m["nonce"].as_str().unwrap().to_string();
    let p = format!("/apps/cf/machines/{}", m["id"].as_str().unwrap());
    let is_fly_409 = |(s, b): (u16, Value), about: &str| {
        assert_eq!(s, 409, "{b}");
        assert_eq!(b["status"], "error", "{b}");
        let message = b["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(about), "{b}");
        assert!(b.get("error").is_none(), "{b}");
    };
    let call = |method: &'static str, path: String, body: Option<Value>, nonce: Option<String>| {
        let (http, base) = (raw.http.clone(), raw.base.clone());
        async move {
            let raw = Raw { http, base };
            let (s, b, _) = raw.call(method, &path, body, nonce.as_deref()).await;
            (s, b)
        }
    };
    is_fly_409(
        call("POST", format!("{p}/lease"), Some(json!({"ttl": 5})), None).await,
        "lease",
    );
    is_fly_409(call("POST", format!("{p}/stop"), None, None).await, "lease");
    is_fly_409(
        call("POST", format!("{p}/stop"), None, Some("wrong".into())).await,
        "lease",
    );
    let update = json!({"config": {"image": "img:2"}, "current_version": "01STALE"});
    is_fly_409(
        call("POST", p.clone(), Some(update), Some(nonce.clone())).await,
        "version",
    );
    emu.script_faults([fly_emulator::ScriptedFault {
        label: Some("machines.update".into()),
        fault: fly_emulator::Fault::NoCapacity,
    }]);
    let update = json!({"config": {"image": "img:2"}});
    is_fly_409(
        call("POST", p.clone(), Some(update), Some(nonce.clone())).await,
        "insufficient",
    );
    // The lease expires; releasing it then is harmless and says so.
    emu.clock().advance(Duration::from_secs(11));
    let (s, b) = call("DELETE", format!("{p}/lease"), None, Some(nonce)).await;
    assert_eq!(s, 404, "{b}");
    assert!(b.to_string().contains("lease not found"), "{b}");
    let (s, b) = call("POST", format!("{p}/lease"), Some(json!({"ttl": 5})), None).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("success")), "{b}");
    assert!(b["data"]["nonce"].is_string(), "fly-go's envelope: {b}");

    let bare = emulator(EmulatorConfig {
        realism: Realism {
            lease_answer_bare: true,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&bare);
    let m = app_with_machine(&raw, "bare", json!({})).await;
    let p = format!("/apps/bare/machines/{}", m["id"].as_str().unwrap());
    let (s, b, _) = raw
        .call("POST", &format!("{p}/lease"), Some(json!({"ttl": 5})), None)
        .await;
    assert_eq!(s, 201, "{b}");
    assert!(b["nonce"].is_string() && b.get("data").is_none(), "{b}");
}

/// REALISM.md §6: an IP assignment carries the app's `org_slug`, as flyctl and fly-go send it.
#[tokio::test]
async fn ip_assignment_names_the_org() {
    let emu = emulator(EmulatorConfig {
        realism: Realism {
            ip_assign_needs_org_slug: true,
            ..Realism::off()
        },
        ..manual()
    })
    .await;
    let raw = Raw::new(&emu);
    app_with_machine(&raw, "ipo", json!({"skip_launch": true})).await;
    let path = "/apps/ipo/ip_assignments";
    let (s, b, _) = raw
        .call("POST", path, Some(json!({"type": "v6"})), None)
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b, _) = raw
        .call(
            "POST",
            path,
            Some(json!({"type": "v6", "org_slug": "personal"})),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        raw.call("GET", path, None, None).await.1["ips"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}
