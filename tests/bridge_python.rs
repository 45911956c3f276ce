//! The bridge driven by the official MCP Python SDK (from PyPI, in a venv prepared by hack/python-mcp-env.sh):
//! its default mode must land on 2026-07-28 (not silently fall back), and `legacy` on the handshake.

#[path = "support/bridge_env.rs"]
mod support;

use mcpfly::bridge::auth::Auth;
use serde_json::Value;
use support::*;

async fn run_python(url: &str, mode: &str) -> Value {
    let python = python();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py_client.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .args([url, TOKEN, mode])
        .output()
        .await
        .expect("running the Python client");
    assert!(
        output.status.success(),
        "Python client ({mode}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim().lines().last().unwrap())
        .expect("JSON from the Python client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_default_mode_negotiates_2026_07_28_and_legacy_the_handshake() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    for (mode, expected) in [
        ("auto", "2026-07-28"),
        ("2026-07-28", "2026-07-28"),
        ("legacy", "2025-11-25"),
    ] {
        let out = run_python(&url(&bridge), mode).await;
        eprintln!("Python SDK mode={mode}: {out}");
        assert_eq!(
            out["protocol_version"], expected,
            "mode {mode} negotiated the wrong version: {out}"
        );
        if mode != "2026-07-28" {
            // A pinned mode skips server/discover, so it has no serverInfo to report.
            assert_eq!(out["server_name"], "rmcp", "{out}");
        }
        for tool in ["echo", "add", "slow", "announce"] {
            assert!(
                out["tools"].as_array().unwrap().iter().any(|t| t == tool),
                "{out}"
            );
        }
        assert_eq!(out["echo"], "from python");
        assert_eq!(out["add"], "42");
        assert_eq!(out["slow"], "done after 3 steps");
        assert_eq!(
            out["progress"].as_array().unwrap().len(),
            3,
            "progress relayed: {out}"
        );
        assert_eq!(out["announce"], "announced");
        if mode == "legacy" {
            // The server's log notification reached the handshake-era client over SSE.
            assert_eq!(out["logs"], serde_json::json!(["announcement"]), "{out}");
        } else {
            // 2026-07-28: no log opt-in, so none may arrive.
            assert_eq!(out["logs"], serde_json::json!([]), "{out}");
        }
    }
    bridge.shutdown().await.unwrap();
}
