//! The contract between the emulator and real Fly: the calls the controller makes, in the order a create, an
//! update, a rollout and a deletion make them, sent to a throwaway app on real Fly and to the emulator; the status
//! code and the response shape (top-level field names) of each step are recorded and compared, so a maintainer
//! with a Fly account sees in one command where the two disagree.
//!
//! Opt-in (it needs a Fly org and creates, then deletes, one app with one shared-cpu-1x machine for about a
//! minute): `FLY_API_TOKEN=... FLY_ORG=... cargo test -p fly-emulator --test contract -- --ignored --nocapture`.
//! README.md ("Before a release") says when to run it and what it costs.

use std::time::Duration;

use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN, Emulator, EmulatorConfig};
use serde_json::{Value, json};

/// One step's answer as compared: the status and the sorted top-level field names (of the first element for an
/// array).
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    shape: Vec<String>,
}

fn shape(v: &Value) -> Vec<String> {
    let object = match v {
        Value::Array(items) => items.first(),
        other => Some(other),
    };
    let mut keys: Vec<String> = object
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

struct Target {
    http: reqwest::Client,
    base: String,
    auth: String,
    org: String,
}

impl Target {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        nonce: Option<&str>,
    ) -> (Answer, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path))
            .header("Authorization", &self.auth)
            .timeout(Duration::from_secs(90));
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(n) = nonce {
            r = r.header("fly-machine-lease-nonce", n);
        }
        let resp = r.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let v: Value =
            serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(Value::Null);
        (
            Answer {
                status,
                shape: shape(&v),
            },
            v,
        )
    }

    /// `GET` until `done` says so (Fly's lags: the app after create, the machine after create), at most 90 s.
    async fn poll(&self, path: &str, done: impl Fn(&Answer, &Value) -> bool) -> (Answer, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let (a, v) = self.call("GET", path, None, None).await;
            if done(&a, &v) || tokio::time::Instant::now() > deadline {
                return (a, v);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The controller's calls for one deployment's life, in order (the client method each mirrors in brackets).
async fn life(t: &Target, app: &str) -> Vec<(&'static str, Answer)> {
    let mut out = Vec::new();
    let org = t.org.clone();
    let config = |env: &str| {
        json!({"image": "registry.fly.io/flyctl-hello:latest", "env": {"STEP": env},
               "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
               "restart": {"policy": "always"}, "metadata": {"mcpfly_contract": "1"},
               "services": [{"protocol": "tcp", "internal_port": 8080, "autostop": "off", "autostart": true,
                             "ports": [{"port": 443, "handlers": ["tls", "http"]}],
                             "checks": [{"type": "tcp", "port": 8080, "interval": "10s", "timeout": "2s",
                                         "grace_period": "5s"}]}]})
    };
    // Create [get_app (free), send_app_create, get_app once a second until visible, assign_ip ×2, set_secrets,
    // create_machine].
    out.push((
        "apps.get (free name)",
        t.call("GET", &format!("/apps/{app}"), None, None).await.0,
    ));
    let body = json!({"name": app, "org_slug": org, "network": app});
    out.push((
        "apps.create",
        t.call("POST", "/apps?wait=true", Some(body), None).await.0,
    ));
    out.push((
        "apps.get (first answer after create)",
        t.call("GET", &format!("/apps/{app}"), None, None).await.0,
    ));
    out.push((
        "apps.get (visible)",
        t.poll(&format!("/apps/{app}"), |a, _| a.status == 200)
            .await
            .0,
    ));
    for kind in ["v6", "shared_v4"] {
        let body = json!({"type": kind, "org_slug": org});
        out.push((
            "ips.assign",
            t.call(
                "POST",
                &format!("/apps/{app}/ip_assignments"),
                Some(body),
                None,
            )
            .await
            .0,
        ));
    }
    out.push((
        "ips.list",
        t.call("GET", &format!("/apps/{app}/ip_assignments"), None, None)
            .await
            .0,
    ));
    let body = json!({"values": {"MCP_AUTH_TOKEN": "contract-test-value"}});
    let (a, secrets) = t
        .call("POST", &format!("/apps/{app}/secrets"), Some(body), None)
        .await;
    out.push(("secrets.set", a));
    let version = secrets.get("version").cloned().unwrap_or(json!(0));
    let body = json!({"name": "iad-0", "region": "iad", "config": config("1"), "min_secrets_version": version});
    let (a, machine) = t
        .call("POST", &format!("/apps/{app}/machines"), Some(body), None)
        .await;
    out.push(("machines.create", a.clone()));
    out.push((
        "machines.create state",
        Answer {
            status: a.status,
            shape: vec![machine["state"].to_string()],
        },
    ));
    let id = machine["id"].as_str().unwrap_or_default().to_string();
    let m = format!("/apps/{app}/machines/{id}");
    out.push((
        "machines.list (just after create)",
        t.call("GET", &format!("/apps/{app}/machines"), None, None)
            .await
            .0,
    ));
    out.push(("machines.get", t.call("GET", &m, None, None).await.0));
    let (a, started) = t
        .poll(&m, |_, v| {
            v["state"] == "started" && v["checks"].as_array().is_some_and(|c| !c.is_empty())
        })
        .await;
    out.push(("machines.get (started, first check results)", a));
    let names: Vec<String> = started["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].to_string())
        .collect();
    out.push((
        "checks names",
        Answer {
            status: 200,
            shape: names,
        },
    ));
    out.push((
        "orgs.machines",
        t.call(
            "GET",
            &format!("/orgs/{org}/machines?include_deleted=true&summary=true&limit=5"),
            None,
            None,
        )
        .await
        .0,
    ));
    // Update and rollout [lease_guard, update_machine with nonce, wait for started, release_lease].
    let (a, lease) = t
        .call(
            "POST",
            &format!("{m}/lease?ttl=30"),
            Some(json!({"ttl": 30})),
            None,
        )
        .await;
    out.push(("leases.acquire", a));
    let nonce = lease["data"]["nonce"]
        .as_str()
        .or(lease["nonce"].as_str())
        .unwrap_or_default()
        .to_string();
    let (a, _) = t
        .call(
            "POST",
            &format!("{m}/lease?ttl=30"),
            Some(json!({"ttl": 30})),
            None,
        )
        .await;
    out.push(("leases.acquire (held by another)", a));
    let body = json!({"config": config("2"), "current_version": started["instance_id"]});
    out.push((
        "machines.update (no nonce)",
        t.call("POST", &m, Some(body.clone()), None).await.0,
    ));
    out.push((
        "machines.update",
        t.call("POST", &m, Some(body), Some(&nonce)).await.0,
    ));
    out.push((
        "machines.wait",
        t.call(
            "GET",
            &format!("{m}/wait?state=started&timeout=60"),
            None,
            None,
        )
        .await
        .0,
    ));
    out.push((
        "leases.release",
        t.call("DELETE", &format!("{m}/lease"), None, Some(&nonce))
            .await
            .0,
    ));
    out.push((
        "leases.release (again)",
        t.call("DELETE", &format!("{m}/lease"), None, Some(&nonce))
            .await
            .0,
    ));
    // Deletion [delete_machine force, delete_app].
    out.push((
        "machines.delete",
        t.call("DELETE", &format!("{m}?force=true"), None, None)
            .await
            .0,
    ));
    out.push((
        "apps.delete",
        t.call("DELETE", &format!("/apps/{app}"), None, None)
            .await
            .0,
    ));
    out
}

#[tokio::test]
#[ignore = "needs a Fly org: FLY_API_TOKEN and FLY_ORG (creates and deletes one throwaway app)"]
async fn emulator_answers_like_fly() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let token = std::env::var("FLY_API_TOKEN").expect("FLY_API_TOKEN");
    let org = std::env::var("FLY_ORG").expect("FLY_ORG");
    let base =
        std::env::var("FLY_FLAPS_BASE_URL").unwrap_or_else(|_| "https://api.machines.dev".into());
    let app = format!("mcpfly-contract-{:08x}", rand_suffix());
    let scheme = if token.starts_with("fm") {
        "FlyV1"
    } else {
        "Bearer"
    };
    let fly = Target {
        http: reqwest::Client::new(),
        base: format!("{base}/v1"),
        auth: format!("{scheme} {token}"),
        org,
    };
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let emu = Target {
        http: reqwest::Client::new(),
        base: emulator.base_url(),
        auth: format!("Bearer {DEFAULT_TOKEN}"),
        org: DEFAULT_ORG.into(),
    };
    let on_fly = life(&fly, &app).await;
    let on_emulator = life(&emu, &app).await;
    let mut differences = 0;
    for ((step, f), (_, e)) in on_fly.iter().zip(&on_emulator) {
        let same = f == e;
        differences += usize::from(!same);
        println!(
            "{} {step}: fly {} {:?} | emulator {} {:?}",
            if same { "  " } else { "!!" },
            f.status,
            f.shape,
            e.status,
            e.shape
        );
    }
    assert_eq!(
        differences, 0,
        "the emulator and Fly disagree on the steps marked !!"
    );
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
