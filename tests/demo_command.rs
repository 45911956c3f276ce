//! The README's first command, run as a user would: the real `mcpfly demo` binary (control plane, Fly emulator
//! with local machines, controller). The offline example must become Ready and Verified with its tools and answer
//! `tools/call` through its public URL with a real MCP client (rmcp), before and after autostop; the sealed
//! credential must reach its server; the npm and PyPI examples must become Ready and Verified with their tools too
//! (the test command installs node and uv, and the demo locates `uvx` as the test command does); the terminal shows
//! progress and the table only, the logs going to the file the demo names; and Ctrl-C must leave no machine
//! process behind.
//!
//! `--once` exits as soon as the table is printed, taking the URLs with it, so an outside client cannot call
//! them: this test runs the Ctrl-C form (the same code until the table) and ends it with SIGINT.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use sha2::{Digest, Sha256};

/// Kills the demo if the test fails half-way (its machines and control plane die with it: PR_SET_PDEATHSIG).
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone)]
struct Row {
    phase: String,
    verified: String,
    url: String,
    tools: Vec<String>,
}

/// Parses the table `NAME PHASE VERIFIED URL TOOLS` (columns separated by two or more spaces).
fn parse_table(lines: &[String]) -> BTreeMap<String, Row> {
    let start = lines
        .iter()
        .position(|l| l.starts_with("NAME ") && l.contains("VERIFIED") && l.contains("TOOLS"))
        .expect("the demo printed its table");
    let mut rows = BTreeMap::new();
    for line in &lines[start + 1..] {
        if line.trim().is_empty() {
            break;
        }
        let cols: Vec<&str> = line
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(cols.len(), 5, "row {line:?}");
        rows.insert(
            cols[0].to_string(),
            Row {
                phase: cols[1].to_string(),
                verified: cols[2].to_string(),
                url: cols[3].to_string(),
                tools: cols[4].split(',').map(str::to_string).collect(),
            },
        );
    }
    rows
}

async fn call_tool(url: &str, token: &str, tool: &str, args: serde_json::Value) -> String {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string())
        .auth_header(token.to_string());
    let transport = StreamableHttpClientTransport::from_config(config);
    let lifecycle = ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: Some(ProtocolVersion::V_2025_11_25),
    };
    let client = ClientConfig::default()
        .serve_with_lifecycle(transport, lifecycle)
        .await
        .unwrap_or_else(|e| panic!("MCP client connects to {url}: {e}"));
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Some(obj) = args.as_object() {
        params = params.with_arguments(obj.clone());
    }
    let result = client.call_tool(params).await.expect("tools/call");
    let _ = client.cancel().await;
    let value = serde_json::to_value(&result).unwrap();
    value["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn connection(client: &kube::Client, name: &str) -> (String, String) {
    let secret = Api::<Secret>::namespaced(client.clone(), "mcpfly-demo")
        .get(name)
        .await
        .expect("connection Secret");
    let data = secret.data.expect("data");
    let field = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    (field("url"), field("token"))
}

/// The emulator's view of an app's machine states (its admin API, on the URL's host).
async fn machine_states(url: &str, app: &str) -> Vec<String> {
    let base = url.split("/apps/").next().unwrap();
    let inventory: serde_json::Value = reqwest::get(format!("{base}/__emulator/inventory"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    inventory["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == app)
        .flat_map(|a| a["machines"].as_array().unwrap().iter())
        .map(|m| m["state"].as_str().unwrap().to_string())
        .collect()
}

/// Pids of the demo's direct children running `mcpfly bridge` (the local machines).
fn bridge_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("bridge") {
            out.push(pid);
        }
    }
    out
}

/// PATH without any folder holding `uvx`: the demo must find it the way the test command does
/// (hack/python-mcp-env.sh), as on a fresh machine.
fn path_without_uvx() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).filter(|dir| !dir.join("uvx").is_file());
    std::env::join_paths(dirs).unwrap_or(path)
}

#[tokio::test]
async fn demo_deploys_the_examples_and_serves_them_to_an_mcp_client() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let logs = tempfile::tempdir().unwrap();
    let stderr = std::fs::File::create(logs.path().join("demo.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mcpfly"))
        .args(["demo", "--idle-timeout-secs", "3", "--timeout-secs", "150"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", path_without_uvx())
        .env_remove("FLY_API_TOKEN")
        .env_remove("FLY_ORG")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("mcpfly demo starts");
    let mut demo = Demo(child);
    let pid = demo.0.id();
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("demo| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Everything up to "Running until Ctrl-C." (the table and the usage lines come before it).
    let started = Instant::now();
    let mut lines = Vec::new();
    loop {
        let left = Duration::from_secs(200).saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with("Running until Ctrl-C");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(_) => panic!(
                "the demo did not finish converging; stdout so far:\n{}\nlog tail:\n{}",
                lines.join("\n"),
                std::fs::read_to_string(logs.path().join("demo.log")).unwrap_or_default()
            ),
        }
    }
    eprintln!("demo converged in {:.1}s", started.elapsed().as_secs_f64());
    let table = parse_table(&lines);

    // The terminal holds progress lines and the table; the logs are in the file the demo names.
    let log_file = lines
        .iter()
        .find_map(|l| l.strip_prefix("logs:"))
        .expect("the demo names its log file")
        .trim()
        .to_string();
    let logged = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        logged.contains(" INFO "),
        "no controller logs in {log_file}"
    );
    let stderr = std::fs::read_to_string(logs.path().join("demo.log")).unwrap();
    assert!(
        !stderr.contains(" INFO ") && !stderr.contains('\x1b'),
        "logs reached the terminal:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains('\x1b') && !l.contains(" INFO ")),
        "log lines on stdout"
    );
    // uvx was not on PATH: the demo prepared it as the test command does, so PyPI can start here.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("uv:") && l.trim_end().ends_with("/uvx")),
        "the demo did not locate uvx"
    );
    let fetch_note = lines
        .iter()
        .find(|l| l.trim_start().starts_with("mcpfly-demo/fetch:"));
    assert!(
        fetch_note.is_none_or(|n| !n.contains("is not on PATH")),
        "{fetch_note:?}"
    );

    let offline = &table["mcpfly-demo/offline"];
    assert_eq!(offline.phase, "Ready", "{offline:?}");
    assert_eq!(offline.verified, "True", "{offline:?}");
    for tool in ["echo", "add", "credential_fingerprint"] {
        assert!(
            offline.tools.iter().any(|t| t == tool),
            "{tool} missing: {offline:?}"
        );
    }
    for name in ["mcpfly-demo/sealed", "mcpfly-demo/global"] {
        assert_eq!(table[name].verified, "True", "{name}: {:?}", table[name]);
    }
    // npm and PyPI: the test command installs node and uv, and the registries are reachable where it runs, so
    // these become Ready too (issue 18: every example Ready on a fresh machine), each with its own tool.
    for (name, tool) in [
        ("mcpfly-demo/everything", "echo"),
        ("mcpfly-demo/fetch", "fetch"),
    ] {
        let row = &table[name];
        let note = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{name}:")))
            .cloned()
            .unwrap_or_default();
        eprintln!(
            "OUTCOME {name}: phase={} verified={} tools={} {}",
            row.phase,
            row.verified,
            row.tools.join(","),
            note.trim()
        );
        assert_eq!(
            (row.phase.as_str(), row.verified.as_str()),
            ("Ready", "True"),
            "{name}: {row:?} {}",
            note.trim()
        );
        assert!(
            row.tools.iter().any(|t| t == tool),
            "{name}: {tool} missing: {row:?}"
        );
    }

    // The token from the connection Secret, as the printed instructions say.
    let kubeconfig = lines
        .iter()
        .find_map(|l| l.strip_prefix("KUBECONFIG="))
        .expect("KUBECONFIG line")
        .to_string();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (url, token) = connection(&client, "offline-mcp-connection").await;
    assert_eq!(url, offline.url);

    let echoed = call_tool(
        &url,
        &token,
        "echo",
        serde_json::json!({"text": "through the public URL"}),
    )
    .await;
    assert_eq!(echoed, "through the public URL");
    assert_eq!(
        call_tool(&url, &token, "add", serde_json::json!({"a": 40, "b": 2})).await,
        "42"
    );

    // The sealed credential reached its server (a fingerprint, never the value).
    let (sealed_url, sealed_token) = connection(&client, "sealed-mcp-connection").await;
    let fingerprint = call_tool(
        &sealed_url,
        &sealed_token,
        "credential_fingerprint",
        serde_json::json!({"name": "DEMO_API_KEY"}),
    )
    .await;
    let expected = &hex::encode(Sha256::digest(b"not-a-real-secret"))[..8];
    assert_eq!(fingerprint, format!("DEMO_API_KEY: set, sha256 {expected}"));

    // Without the token the endpoint refuses.
    let status = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);

    // Idle for the autostop timeout: the machine is suspended; the next request resumes it (autostart).
    let app = url
        .split("/apps/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = machine_states(&url, &app).await;
        if states == ["suspended"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offline never autostopped: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let again = call_tool(
        &url,
        &token,
        "echo",
        serde_json::json!({"text": "after autostop"}),
    )
    .await;
    assert_eq!(again, "after autostop");
    assert_eq!(machine_states(&url, &app).await, ["started"]);

    // Ctrl-C: a clean exit, and no machine process left.
    let machines = bridge_children(pid);
    assert!(
        !machines.is_empty(),
        "no local machine processes found under the demo"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not exit after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "demo exited with {status}");
    let left: Vec<u32> = machines
        .into_iter()
        .filter(|p| mcpfly::local_cluster::process::process_is_running(*p))
        .collect();
    assert!(
        left.is_empty(),
        "machine processes outlived the demo: {left:?}"
    );
}
