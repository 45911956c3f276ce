//! Machines from the real runtime image under runc (issue 18 item 3), end to end: the controller deploys to the
//! emulator, whose local driver runs each machine as a container of the built image (its own network namespace,
//! read-only root, tmpfs home), and MCP calls go through the emulator's proxy. Also the cold-start figures of
//! BENCHMARKS.md (issue 18 item 5, `hack/bench-coldstart.sh`).
//!
//! Both need root, runc, umoci and the image hack/build-images.sh builds (named by MCPFLY_EMULATOR_RUNC_IMAGE),
//! and the npm/PyPI registries: hack/image-check.sh runs the test right after the image smoke test.

#[path = "support/bridge_env.rs"]
mod bridge_env;
mod controller_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fly_adapter::client::FlyClient;
use fly_adapter::client::types::{ListMachinesQuery, StopRequest};
use fly_emulator::local::runc::{RUNC_IMAGE_ENV, RuncImage};
use fly_emulator::local::{LocalDriver, LocalDriverConfig};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use mcpfly::local_cluster::stack::{Stack, StackOptions};
use serde_json::{Value, json};

use controller_support::{app_of, fly_client};

const RUNTIME_IMAGE: &str = "registry.example/mcpfly-runtime:test";
const READY: Duration = Duration::from_secs(240);
const NPM_SERVER: (&str, &str) = ("@modelcontextprotocol/server-everything", "2026.8.31");
const PYPI_SERVER: (&str, &str) = ("mcp-server-time", "2026.10.19");

/// `spec.source` for `(package, version)` from `registry` (`npm` or `pypi`).
fn package_source(registry: &str, (package, version): (&str, &str)) -> String {
    format!(r#"{{{registry}: {{package: "{package}", version: "{version}"}}}}"#)
}

struct World {
    stack: Stack,
    driver: LocalDriver,
    fly: FlyClient,
    http: reqwest::Client,
    work: tempfile::TempDir,
}

/// A stack whose emulator runs runtime-image machines under runc; `cache`: keep package caches across stops.
async fn world(namespace: &str, cache: bool) -> anyhow::Result<World> {
    bridge_env::logs();
    let layout = std::env::var(RUNC_IMAGE_ENV).with_context(|| {
        format!("{RUNC_IMAGE_ENV} must name the OCI layout hack/build-images.sh wrote (e.g. target/images/runtime)")
    })?;
    let work = tempfile::Builder::new().prefix("mcpfly-runc-").tempdir()?;
    let dir = work.path().to_path_buf();
    let image = tokio::task::spawn_blocking(move || {
        let image = RuncImage::prepare(&layout, &dir.join("image"))?;
        anyhow::Ok(if cache {
            image.with_package_cache(dir.join("cache"))
        } else {
            image
        })
    })
    .await??;
    let mut driver_config = LocalDriverConfig::new(
        RUNTIME_IMAGE,
        env!("CARGO_BIN_EXE_mcpfly").into(),
        work.path().join("machines"),
    );
    // Stops and suspends come from the test, not from idleness.
    driver_config.idle_timeout = Duration::from_secs(3600);
    driver_config.autostart_timeout = Duration::from_secs(180);
    driver_config.runc = Some(Arc::new(image));
    let driver = LocalDriver::new(
        driver_config,
        Arc::new(mcpfly::demo::processes::SupervisedSpawner),
    );
    let stack = Stack::start(namespace, StackOptions::with_local_machines(&driver)).await?;
    let fly = fly_client(&stack);
    Ok(World {
        stack,
        driver,
        fly,
        http: reqwest::Client::builder().no_proxy().build()?,
        work,
    })
}

fn manifest(name: &str, source: &str, auto_stop: &str) -> String {
    format!(
        r#"
apiVersion: mcpfly.dev/v1alpha1
kind: MCPDeployment
metadata: {{name: {name}}}
spec:
  source: {source}
  fly: {{regions: [iad], machinesPerRegion: 1, autoStop: {auto_stop}, minMachinesRunning: 0}}
  access: {{auth: bearer, connectionSecret: {name}-conn}}
"#
    )
}

/// A deployment once Ready: its app, machine, URL and token.
struct Deployed {
    app: String,
    machine: String,
    url: String,
    token: String,
}

async fn deploy(w: &World, name: &str, source: &str, auto_stop: &str) -> anyhow::Result<Deployed> {
    w.stack.apply(&manifest(name, source, auto_stop)).await?;
    let d = w.stack.wait_ready(name, READY).await?;
    let app = app_of(&d);
    let url = d
        .status
        .as_ref()
        .and_then(|s| s.url.clone())
        .context("status.url")?;
    let secret = Api::<Secret>::namespaced(w.stack.cp.client().await?, &w.stack.namespace)
        .get(&format!("{name}-conn"))
        .await?;
    let token = secret
        .data
        .and_then(|d| d.get("token").cloned())
        .context("connection token")?;
    let machines = w
        .fly
        .list_machines(&app, &ListMachinesQuery::default())
        .await?;
    anyhow::ensure!(machines.len() == 1, "one machine expected: {machines:?}");
    Ok(Deployed {
        app,
        machine: machines[0].id.clone(),
        url,
        token: String::from_utf8(token.0)?,
    })
}

/// One JSON-RPC message to the MCP endpoint; returns the answer (JSON or the first SSE `data:`) and the session.
async fn rpc(
    w: &World,
    d: &Deployed,
    session: Option<&str>,
    body: Value,
) -> anyhow::Result<(Value, Option<String>)> {
    let mut req = w
        .http
        .post(&d.url)
        .bearer_auth(&d.token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .timeout(Duration::from_secs(200))
        .json(&body);
    if let Some(s) = session {
        req = req.header("mcp-session-id", s);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let session = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "{status}: {text}");
    if text.trim().is_empty() {
        return Ok((Value::Null, session));
    }
    // An SSE stream may carry notifications before the answer: take the message with the request's id.
    let messages: Vec<Value> = match text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .collect::<Vec<_>>()
    {
        data if data.is_empty() => vec![serde_json::from_str(text.trim())?],
        data => data
            .iter()
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect(),
    };
    let answer = messages
        .iter()
        .find(|m| m.get("id") == body.get("id") && m.get("method").is_none())
        .or(messages.last())
        .cloned()
        .unwrap_or(Value::Null);
    Ok((answer, session))
}

async fn initialize(w: &World, d: &Deployed) -> anyhow::Result<(Value, Option<String>)> {
    rpc(
        w,
        d,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "runc-machines", "version": "0"}}}),
    )
    .await
}

/// initialize, initialized, then `tools/call`: the tool's text answer.
async fn call_tool(w: &World, d: &Deployed, tool: &str, args: Value) -> anyhow::Result<String> {
    let (init, session) = initialize(w, d).await?;
    anyhow::ensure!(
        init["result"]["serverInfo"].is_object(),
        "initialize: {init}"
    );
    let session = session.as_deref();
    rpc(
        w,
        d,
        session,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await?;
    let (answer, _) = rpc(
        w,
        d,
        session,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": tool, "arguments": args}}),
    )
    .await?;
    answer["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("tools/call {tool}: {answer}"))
}

/// `runc state` of a machine's container: `(status, pid)`, or `None` when it does not exist.
fn runc_state(d: &Deployed) -> Option<(String, u32)> {
    let out = std::process::Command::new("runc")
        .args(["state", &format!("mcpfly-{}-{}", d.app, d.machine)])
        .output()
        .ok()?;
    let state: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        state["status"].as_str()?.to_string(),
        state["pid"].as_u64()? as u32,
    ))
}

async fn wait_state(w: &World, d: &Deployed, state: &str) -> anyhow::Result<()> {
    w.fly
        .wait_for_state(&d.app, &d.machine, &[state], None, Duration::from_secs(60))
        .await?;
    // The driver applies the change right after the emulator's transition.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = match state {
            "stopped" => runc_state(d).is_none(),
            "suspended" => runc_state(d).is_some_and(|(s, _)| s == "paused"),
            _ => true,
        };
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: container never {state}",
            d.machine
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default()
}

fn netns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, runc and the built image (MCPFLY_EMULATOR_RUNC_IMAGE): run by hack/image-check.sh"]
async fn npm_and_image_deployments_run_as_runc_machines_behind_the_proxy() -> anyhow::Result<()> {
    let w = world("runc-machines", false).await?;
    let npm = deploy(
        &w,
        "everything",
        &package_source("npm", NPM_SERVER),
        "suspend",
    )
    .await?;
    let image = deploy(
        &w,
        "offline",
        &format!("{{image: {{ref: {RUNTIME_IMAGE}, port: 8080, path: /mcp}}}}"),
        "stop",
    )
    .await?;

    // Both answer a tool call through the emulator's proxy: the npm server fetched by npx inside the container,
    // the image's own CMD (the example server) with no init command.
    let echoed = call_tool(&w, &npm, "echo", json!({"message": "through runc"})).await?;
    assert!(echoed.contains("through runc"), "{echoed}");
    assert_eq!(
        call_tool(&w, &image, "echo", json!({"text": "image"})).await?,
        "image"
    );

    // Each is a container of its own: running, as the image's user, in a network namespace that is not ours
    // nor the other's.
    let (npm_status, npm_pid) = runc_state(&npm).context("npm container")?;
    let (image_status, image_pid) = runc_state(&image).context("image container")?;
    assert_eq!(
        (npm_status.as_str(), image_status.as_str()),
        ("running", "running")
    );
    assert_eq!(status_field(npm_pid, "Uid"), "1000");
    let ours = netns("self");
    let (a, b) = (netns(&npm_pid.to_string()), netns(&image_pid.to_string()));
    assert!(
        !a.is_empty() && a != ours && b != ours && a != b,
        "netns: ours {ours}, npm {a}, image {b}"
    );

    // Suspend is `runc pause` (frozen, memory kept); the next request autostarts it: resumed, same process.
    w.fly.suspend_machine(&npm.app, &npm.machine, None).await?;
    wait_state(&w, &npm, "suspended").await?;
    let echoed = call_tool(&w, &npm, "echo", json!({"message": "after resume"})).await?;
    assert!(echoed.contains("after resume"), "{echoed}");
    assert_eq!(runc_state(&npm), Some(("running".into(), npm_pid)));

    // Stop ends the container with its writable state; autostart boots a new one from the image.
    let home_marker = format!("/proc/{npm_pid}/root/home/node/.npm");
    assert!(
        Path::new(&home_marker).exists(),
        "npx's cache in the tmpfs home"
    );
    w.fly
        .stop_machine(&npm.app, &npm.machine, &StopRequest::default(), None)
        .await?;
    wait_state(&w, &npm, "stopped").await?;
    assert!(
        !Path::new(&format!("/proc/{npm_pid}")).exists(),
        "the container's process is gone"
    );
    let echoed = call_tool(&w, &npm, "echo", json!({"message": "after stop"})).await?;
    assert!(echoed.contains("after stop"), "{echoed}");
    let (_, new_pid) = runc_state(&npm).context("restarted container")?;
    assert_ne!(new_pid, npm_pid);

    // Destroying the deployments removes every container and network the driver made.
    w.stack.delete("everything").await?;
    w.stack.delete("offline").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while runc_state(&npm).is_some() || runc_state(&image).is_some() {
        anyhow::ensure!(Instant::now() < deadline, "containers left after delete");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    w.driver.shutdown();
    drop(w.work);
    Ok(())
}

/// One timed autostart: the request through the proxy until the `initialize` answer.
async fn timed_initialize(w: &World, d: &Deployed) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let (init, _) = initialize(w, d).await?;
    anyhow::ensure!(
        init["result"]["serverInfo"].is_object(),
        "initialize: {init}"
    );
    Ok(t.elapsed())
}

fn summary(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no run answered".into();
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    format!(
        "median {:>7.0} ms  min {:>7.0}  max {:>7.0}  (n={})",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    )
}

/// How long a machine idles before the cold-start figures suspend it: longer than a Python server's start on
/// this host, far shorter than Fly's autostop (minutes).
const SUSPEND_AFTER_IDLE: Duration = Duration::from_secs(10);

/// Cold-start figures (BENCHMARKS.md "Cold start (issue 18)"): autostart-to-first-answer of an npm and a PyPI
/// server from `stopped` (package cache empty, as today, or kept as a volume would keep it) and `suspended`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: hack/bench-coldstart.sh runs it (root, runc, the built image, the registries)"]
async fn cold_start_figures() -> anyhow::Result<()> {
    let reps: usize = std::env::var("MCPFLY_COLDSTART_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let w = world("runc-coldstart", true).await?;
    let mut servers = Vec::new();
    for (kind, server) in [("npm", NPM_SERVER), ("pypi", PYPI_SERVER)] {
        servers.push((
            kind,
            deploy(&w, kind, &package_source(kind, server), "stop").await?,
        ));
    }
    println!(
        "cold start: {reps} runs per case, request through the emulator's proxy until the initialize answer"
    );
    for (kind, d) in &servers {
        let cache = w.work.path().join("cache").join(&d.app).join(&d.machine);
        let mut cases: Vec<(&str, Vec<Duration>)> = vec![
            ("stopped, empty package cache", vec![]),
            ("stopped, warm package cache", vec![]),
            ("suspended", vec![]),
        ];
        for _ in 0..reps {
            for (case, samples) in cases.iter_mut() {
                match *case {
                    "suspended" => {
                        // Autostop suspends only an idle machine (Fly's proxy looks every few minutes); the
                        // previous case's request has just started it, and its bridge refills the session pool
                        // once requests stop. Suspending at once would time that refill, not a resume.
                        tokio::time::sleep(SUSPEND_AFTER_IDLE).await;
                        w.fly.suspend_machine(&d.app, &d.machine, None).await?;
                        wait_state(&w, d, "suspended").await?;
                    }
                    _ => {
                        w.fly
                            .stop_machine(&d.app, &d.machine, &StopRequest::default(), None)
                            .await?;
                        wait_state(&w, d, "stopped").await?;
                        if case.contains("empty") {
                            for sub in ["npm", "cache"] {
                                let dir = cache.join(sub);
                                if dir.exists() {
                                    for entry in std::fs::read_dir(&dir)? {
                                        let p = entry?.path();
                                        if p.is_dir() {
                                            std::fs::remove_dir_all(&p)?;
                                        } else {
                                            std::fs::remove_file(&p)?;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                match timed_initialize(&w, d).await {
                    Ok(t) => samples.push(t),
                    // Reported, not fatal: the figures say how many runs never answered.
                    Err(e) => println!("cold start: {kind} {case}: no answer: {e:#}"),
                }
            }
        }
        for (case, samples) in &cases {
            println!("cold start: {kind:<4} {case:<30} {}", summary(samples));
        }
    }
    w.driver.shutdown();
    Ok(())
}
