//! Session affinity on Fly: an app served by several machines behind the emulator's proxy, which (like Fly's)
//! spreads requests over them. Each machine is the real `mcpfly bridge` in front of the example server, run by
//! the emulator's local driver. The official Python SDK and the TypeScript `@modelcontextprotocol/sdk` 1.x client,
//! in handshake-era mode, open many sessions through the proxy; every call must succeed, also after one machine
//! is replaced (its sessions are gone: the client is told 404 and re-initializes).

#[path = "support/bridge_env.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use fly_adapter::token_bucket::RateLimits;
use fly_emulator::local::{LocalDriver, LocalDriverConfig};
use fly_emulator::{DEFAULT_TOKEN, Emulator, EmulatorConfig, EmulatorHandle, Realism};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const IMAGE: &str = "registry.example/mcpfly-runtime:test";
const APP: &str = "affinity";
/// Per client and round: enough that the proxy's uniform spread puts some on each of three machines whatever the
/// luck (none on one machine out of 2×20: (2/3)^40, about 1e-7).
const SESSIONS: usize = 20;
const CALLS: usize = 4;

struct Fleet {
    /// The stdio server each machine's bridge runs.
    child: Vec<String>,
    emu: EmulatorHandle,
    driver: LocalDriver,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Fleet {
    async fn start(machines: usize, child: &[&str]) -> (Self, Vec<String>) {
        support::logs();
        let dir = tempfile::tempdir().unwrap();
        let driver = LocalDriver::new(
            LocalDriverConfig::new(
                IMAGE,
                env!("CARGO_BIN_EXE_mcpfly").into(),
                dir.path().join("machines"),
            ),
            Arc::new(mcpfly::demo::processes::SupervisedSpawner),
        );
        let emu = Emulator::start(EmulatorConfig {
            rate_limits: RateLimits::disabled(),
            realism: Realism::off(),
            ..driver.emulator_config()
        })
        .await
        .unwrap();
        let fleet = Fleet {
            child: child.iter().map(|a| a.to_string()).collect(),
            emu,
            driver,
            _dir: dir,
            http: reqwest::Client::new(),
        };
        fleet
            .api(
                "POST",
                "/apps",
                json!({"app_name": APP, "org_slug": "personal"}),
            )
            .await;
        let mut ids = Vec::new();
        for _ in 0..machines {
            ids.push(fleet.add_machine().await);
        }
        fleet.wait_ready(&ids).await;
        (fleet, ids)
    }

    fn url(&self) -> String {
        format!("http://{}/apps/{APP}/mcp", self.emu.addr())
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
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {body}");
        body
    }

    async fn add_machine(&self) -> String {
        // A service check on /readyz, so the proxy routes to a machine only once its bridge is ready. Without
        // auth every request is limited per client address, and here every client is 127.0.0.1 (the emulator's
        // proxy sets no Fly-Client-IP): 80 sessions' calls, some counted twice by a replay, would exceed the
        // per-address burst of 100, which is not what this test is about.
        let mut cmd: Vec<String> = [
            "mcpfly",
            "bridge",
            "--port",
            "8080",
            "--path",
            "/mcp",
            "--no-auth",
            "--rate-per-client",
            "0",
            "--warm-sessions",
            "2",
            "--",
        ]
        .map(String::from)
        .to_vec();
        cmd.extend(self.child.iter().cloned());
        let config = json!({
            "image": IMAGE,
            "init": {"cmd": cmd},
            "services": [{"internal_port": 8080, "autostop": "off", "min_machines_running": 0,
                          "checks": [{"type": "http", "path": "/readyz", "interval": "1s"}]}],
        });
        let m = self
            .api(
                "POST",
                &format!("/apps/{APP}/machines"),
                json!({"config": config, "region": "iad"}),
            )
            .await;
        m["id"].as_str().unwrap().to_string()
    }

    async fn wait_ready(&self, ids: &[String]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let ready: Vec<String> = self
                .driver
                .processes()
                .into_iter()
                .filter(|(app, _, _, _, ready)| app == APP && *ready)
                .map(|(_, id, _, _, _)| id)
                .collect();
            if ids.iter().all(|id| ready.contains(id)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "machines never became ready: want {ids:?}, ready {ready:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Replaces `old` with a new machine, as a rolling deploy does: the new one is ready before the old goes.
    async fn replace(&self, old: &str) -> String {
        let new = self.add_machine().await;
        self.wait_ready(std::slice::from_ref(&new)).await;
        self.api(
            "DELETE",
            &format!("/apps/{APP}/machines/{old}?force=true"),
            json!({}),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.driver.processes().iter().any(|(_, id, ..)| id == old) {
            assert!(tokio::time::Instant::now() < deadline, "{old} still runs");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        new
    }
}

/// A two-round client script (see `tests/support/py_sessions.py`): round 1, then the caller changes the fleet,
/// then round 2. Returns both rounds' JSON.
struct TwoRounds {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl TwoRounds {
    fn start(mut command: tokio::process::Command) -> Self {
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the client script");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    async fn next(&mut self, label: &str) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(180), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{label}: no answer in 180 s"))
            .unwrap()
            .unwrap_or_else(|| {
                panic!("{label}: the client script exited early (its stderr is above)")
            });
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("{label}: not JSON: {line}"))
    }

    async fn continue_(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn finish(mut self, label: &str) -> Value {
        let last = self.next(label).await;
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "{label}: exit {status}");
        last
    }
}

fn python_sessions(url: &str) -> TwoRounds {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py_sessions.py");
    let mut command = tokio::process::Command::new(support::python());
    command
        .arg(script)
        .args([url, &SESSIONS.to_string(), &CALLS.to_string()]);
    TwoRounds::start(command)
}

fn typescript_sessions(url: &str) -> TwoRounds {
    // ES modules resolve imports next to the script, so it runs from the directory holding node_modules.
    let dir = support::ts_clients();
    let script = dir.join("ts_sessions.mjs");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ts_sessions.mjs"),
        &script,
    )
    .unwrap();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(script)
        .args([url, &SESSIONS.to_string(), &CALLS.to_string()]);
    TwoRounds::start(command)
}

fn assert_round(label: &str, round: &Value) {
    assert_eq!(
        round["failures"],
        json!([]),
        "{label}: every call must succeed: {round}"
    );
    assert_eq!(round["versions"], json!(["2025-11-25"]), "{label}: {round}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_keep_handshake_sessions_across_machines_and_a_replacement() {
    let (fleet, ids) = Fleet::start(3, &["mcpfly", "example-server"]).await;
    let url = fleet.url();
    let mut clients = [
        ("python", python_sessions(&url)),
        ("typescript sdk 1.x", typescript_sessions(&url)),
    ];
    for (label, client) in &mut clients {
        let first = client.next(label).await;
        eprintln!("{label} round 1: {first}");
        assert_round(label, &first);
    }
    let replaced = fleet.replace(&ids[0]).await;
    eprintln!("replaced {} with {replaced}", ids[0]);
    for (_, client) in &mut clients {
        client.continue_().await;
    }
    let mut reinitialized = 0;
    for (label, client) in clients {
        let second = client.finish(label).await;
        eprintln!("{label} round 2: {second}");
        assert_round(label, &second);
        reinitialized += second["reinitialized"].as_u64().unwrap();
    }
    // The positive control for the spread: 2×20 sessions over 3 machines, so some lived on the replaced one
    // (their clients had to start over; all on the other two has odds of (2/3)^40) and some on the others.
    assert!(
        reinitialized > 0,
        "no session lived on the replaced machine; the replacement was not exercised"
    );
    assert!(
        reinitialized < 2 * SESSIONS as u64,
        "sessions on the machines that stayed must survive: {reinitialized} re-initialized"
    );
    fleet.driver.shutdown();
}

/// 2026-07-28 requests carry no session, so Fly's proxy sends an `input_required` retry to any machine; the
/// held call lives in one. Its `requestState` names that machine, and another machine replays the retry there.
/// Positive control: each first call really was held (`input_required`), and the spread reached every machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_required_retries_reach_the_machine_holding_the_call() {
    let server = support::test_server();
    let (fleet, ids) = Fleet::start(3, &[server.to_str().unwrap()]).await;
    let url = fleet.url();
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"roots": {}},
    });
    let call = |id: u64, params: Value| {
        fleet
            .http
            .post(&url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "roots")
            .json(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}))
            .send()
    };
    let mut holders = std::collections::BTreeSet::new();
    for round in 0..12u64 {
        let first: Value = call(
            2 * round,
            json!({"name": "roots", "arguments": {}, "_meta": meta}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(
            first["result"]["resultType"], "input_required",
            "round {round}: {first}"
        );
        let state = first["result"]["requestState"]
            .as_str()
            .unwrap()
            .to_string();
        let holder = state.split_once('-').map(|(m, _)| m.to_string()).unwrap();
        assert!(
            ids.contains(&holder),
            "round {round}: the token names {holder}, not one of {ids:?}"
        );
        holders.insert(holder);
        let (key, _) = first["result"]["inputRequests"]
            .as_object()
            .unwrap()
            .iter()
            .next()
            .unwrap();
        let answers = json!({key.clone(): {"roots": [{"uri": "file:///a", "name": "a"}]}});
        let retry = call(
            2 * round + 1,
            json!({"name": "roots", "arguments": {}, "_meta": meta, "inputResponses": answers, "requestState": state}),
        )
        .await
        .unwrap();
        let status = retry.status();
        let done: Value = retry.json().await.unwrap();
        assert_eq!(status, 200, "round {round}: {done}");
        assert_eq!(
            done["result"]["content"][0]["text"], "1 roots",
            "round {round}: {done}"
        );
    }
    // 12 first calls over 3 machines all held by one has odds of 3·(1/3)^12: the spread is real.
    assert!(
        holders.len() > 1,
        "every call was held by {holders:?}; the proxy did not spread"
    );
    fleet.driver.shutdown();
}
