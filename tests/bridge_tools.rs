//! Tool governance in the bridge, as the official clients see it: the Python SDK in both eras and both
//! TypeScript clients (`@modelcontextprotocol/sdk` 1.x: handshake; `@modelcontextprotocol/client` 2.x:
//! 2026-07-28, with `Mcp-Name`) must see the same filtered and renamed tools, a hidden tool must be
//! indistinguishable from an absent one, and under `block` only tools with an approved digest may be called.

#[path = "support/bridge_env.rs"]
mod support;

use mcpfly::bridge::auth::Auth;
use serde_json::{Value, json};
use support::*;

/// The four official clients: (label, runner, mode) and the protocol each must negotiate.
const CLIENTS: [(&str, &str, &str); 4] = [
    ("python legacy", "python", "legacy"),
    ("python 2026-07-28", "python", "2026-07-28"),
    ("ts sdk 1.x", "ts", "sdk"),
    ("ts client 2.x", "ts", "client"),
];

async fn run_client(runner: &str, mode: &str, url: &str, calls: &Value) -> Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    let mut command = match runner {
        "python" => {
            let mut c = tokio::process::Command::new(python());
            c.arg(dir.join("py_tools.py"));
            c
        }
        _ => {
            // ESM imports resolve from the script's location and ignore NODE_PATH: the script is evaluated
            // from the directory that holds node_modules.
            let script = std::fs::read_to_string(dir.join("ts_tools.mjs")).unwrap();
            let mut c = tokio::process::Command::new("node");
            c.args(["--input-type=module", "-e", &script, "--"]);
            c
        }
    };
    command
        .current_dir(ts_clients())
        .args([url, TOKEN, mode, &calls.to_string()]);
    client_json(command, &format!("{runner} {mode}")).await
}

/// Every client's view, with the negotiated protocol checked and then set aside so the views can be compared.
async fn views(bridge: &mcpfly::bridge::Bridge, calls: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (label, runner, mode) in CLIENTS {
        let mut view = run_client(runner, mode, &url(bridge), calls).await;
        let expected = if mode == "legacy" || mode == "sdk" {
            "2025-11-25"
        } else {
            "2026-07-28"
        };
        assert_eq!(view["protocol_version"], expected, "{label}: {view}");
        view.as_object_mut().unwrap().remove("protocol_version");
        eprintln!("{label}: {view}");
        out.push((label.to_string(), view));
    }
    out
}

fn policy(value: Value) -> String {
    value.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_renames_look_the_same_to_every_official_client_in_both_eras() {
    let tools = policy(json!({
        "allow": ["echo", "ad?", "slow", "pid"],
        "deny": ["slow"],
        "overrides": {"add": {"name": "sum", "description": "Sum two integers"},
                      "echo": {"description": "Repeat the text"}},
    }));
    let bridge = start_bridge(&["--tools-policy", &tools], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let calls = json!([
        ["sum", {"a": 20, "b": 22}],
        ["echo", {"text": "hi"}],
        // Renamed away, denied, filtered out by allow, and one the server never had.
        ["add", {"a": 1, "b": 2}],
        ["slow", {"steps": 1, "delay_ms": 1}],
        ["crash", {}],
        ["no_such_tool", {}],
    ]);
    let seen = views(&bridge, &calls).await;
    let (_, first) = &seen[0];
    assert_eq!(
        first["tools"],
        json!([
            {"name": "echo", "description": "Repeat the text"},
            {"name": "pid", "description": "Return this server process's id"},
            {"name": "sum", "description": "Sum two integers"},
        ])
    );
    assert_eq!(first["calls"][0], json!({"text": "42", "is_error": false}));
    assert_eq!(first["calls"][1], json!({"text": "hi", "is_error": false}));
    // The crash tool, had it run, would have ended the server: the later calls prove it did not.
    let absent = |i: usize, name: &str| first["calls"][i].to_string().replace(name, "NAME");
    assert_ne!(first["calls"][5].to_string(), "null");
    for (i, name) in [(2, "add"), (3, "slow"), (4, "crash")] {
        assert_eq!(
            absent(i, name),
            absent(5, "no_such_tool"),
            "hidden tool {name} differs from an absent one: {first}"
        );
    }
    for (label, view) in &seen[1..] {
        assert_eq!(view["tools"], first["tools"], "{label}");
        for i in 0..2 {
            assert_eq!(view["calls"][i], first["calls"][i], "{label}");
        }
        let own = |i: usize, name: &str| view["calls"][i].to_string().replace(name, "NAME");
        for (i, name) in [(2, "add"), (3, "slow"), (4, "crash")] {
            assert_eq!(own(i, name), own(5, "no_such_tool"), "{label}: {view}");
        }
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_serves_only_tools_whose_digest_was_approved() {
    // The digests the controller would record, taken through the same verification client.
    let open = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&open).await;
    let info = mcpfly::bridge::verify(&url(&open), Some(TOKEN))
        .await
        .unwrap();
    open.shutdown().await.unwrap();
    let echo = info
        .tool_set
        .tools
        .iter()
        .find(|t| t.name == "echo")
        .unwrap();
    // `add` was approved with another description: it changed since, so it is refused like a new tool.
    let tools = policy(json!({"approved": {
        "echo": echo.digest,
        "add": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    }}));
    let bridge = start_bridge(&["--tools-policy", &tools], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let calls = json!([["echo", {"text": "approved"}], ["add", {"a": 1, "b": 2}], ["pid", {}]]);
    for (label, view) in views(&bridge, &calls).await {
        // Listed (so the controller sees the whole set to review), but not callable.
        assert!(
            view["tools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "add"),
            "{label}: {view}"
        );
        assert_eq!(
            view["calls"][0],
            json!({"text": "approved", "is_error": false}),
            "{label}"
        );
        for i in [1, 2] {
            assert_eq!(view["calls"][i]["is_error"], true, "{label}: {view}");
            assert!(
                view["calls"][i]["text"]
                    .as_str()
                    .unwrap()
                    .contains("refused"),
                "{label}: {view}"
            );
        }
    }
    bridge.shutdown().await.unwrap();
}
