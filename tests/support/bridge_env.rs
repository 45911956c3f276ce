//! Shared setup for the bridge tests: the stdio test server (workspace member `testing/mcp-test-server`), an
//! in-process bridge in front of it, log capture for audit assertions, and the Python SDK venv.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use mcpfly::bridge::{Bridge, BridgeArgs, auth::Auth};

pub const TOKEN: &str = "test-token-0123456789abcdef0123456789abcdef";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the test server once per test binary (a no-op when `cargo test --workspace` built it already).
pub fn test_server() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "--quiet", "-p", "mcp-test-server"])
            .status()
            .expect("running cargo to build the test MCP server");
        assert!(status.success(), "building testing/mcp-test-server failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"));
        let path = target.join("debug").join("mcp-test-server");
        assert!(path.exists(), "{} missing after build", path.display());
        path
    })
    .clone()
}

/// Captured log output of this test binary (JSON lines), for audit assertions.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "mcpfly::audit")
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a JSON log subscriber capturing everything (once per test binary).
pub fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        // reqwest (test clients, rmcp's client) is built without a default crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_target(true)
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

/// A bridge on 127.0.0.1 (ephemeral port) in front of the test server, with `extra` arguments.
pub async fn start_bridge(extra: &[&str], auth: Auth) -> Bridge {
    start_bridge_cmd(extra, auth, &[test_server().to_string_lossy().as_ref()]).await
}

pub async fn start_bridge_cmd(extra: &[&str], auth: Auth, command: &[&str]) -> Bridge {
    logs();
    let mut args: Vec<String> = vec!["--path".into(), "/mcp".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    let args = BridgeArgs::parse_from(args).expect("bridge args");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mcpfly::bridge::start(args, auth, listener).await.unwrap()
}

pub fn url(bridge: &Bridge) -> String {
    format!("http://{}/mcp", bridge.addr())
}

/// Waits until `/readyz` answers 200.
pub async fn wait_ready(bridge: &Bridge) {
    let client = reqwest::Client::new();
    let url = format!("http://{}/readyz", bridge.addr());
    for _ in 0..200 {
        if let Ok(r) = client.get(&url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("bridge never became ready");
}

/// The venv's python with the official MCP SDK; fails loudly when Python is missing.
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(workspace().join("hack/python-mcp-env.sh"))
            .output()
            .expect("running hack/python-mcp-env.sh");
        assert!(
            out.status.success(),
            "hack/python-mcp-env.sh failed (Python 3.10+ with venv and pip, and PyPI access, are required for the \
             bridge's Python SDK tests):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The directory whose `node_modules` holds both official TypeScript MCP clients (`@modelcontextprotocol/sdk`
/// 1.x and `@modelcontextprotocol/client` 2.x); fails loudly when node or npm is missing. Run a client script
/// from this directory (or with `NODE_PATH=<dir>/node_modules`) so its imports resolve.
pub fn ts_clients() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(workspace().join("hack/ts-mcp-env.sh"))
            .output()
            .expect("running hack/ts-mcp-env.sh");
        assert!(
            out.status.success(),
            "hack/ts-mcp-env.sh failed (node 20+ with npm, and npm registry access, are required for the \
             bridge's TypeScript client tests):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// Runs an official-client script and returns the JSON on the last line of its stdout (what each script prints
/// when done); fails with the script's stderr when it exits unsuccessfully.
pub async fn client_json(mut command: tokio::process::Command, label: &str) -> serde_json::Value {
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {label}: {e}"));
    assert!(
        output.status.success(),
        "{label} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{label} printed no JSON last ({e}):\n{stdout}"))
}
