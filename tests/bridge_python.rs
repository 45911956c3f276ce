//! The bridge driven by the official MCP Python SDK (from PyPI, in a venv prepared by hack/python-mcp-env.sh):
//! its default mode must land on 2026-07-28 (not silently fall back), and `legacy` on the handshake. The
//! 2026-07-28 feature tests run one Python server (tests/support/py_feature_server.py) behind the bridge and
//! under the SDK's own HTTP server, and drive both with the official Python and TypeScript clients.

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

/// Like `wait_ready`, with room for a Python server's import time on a loaded machine.
async fn wait_python_ready(bridge: &mcpfly::bridge::Bridge) {
    let client = reqwest::Client::new();
    let url = format!("http://{}/readyz", bridge.addr());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = client.get(&url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the bridge's Python server never became ready");
}

fn feature_server() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support/py_feature_server.py")
        .to_string_lossy()
        .into_owned()
}

async fn run_feature_client(url: &str, token: &str, mode: &str) -> Value {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py_feature_client.py");
    let output = tokio::process::Command::new(python())
        .arg(script)
        .args([url, token, mode])
        .output()
        .await
        .expect("running the Python feature client");
    assert!(
        output.status.success(),
        "Python feature client ({mode}, {url}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim().lines().last().unwrap())
        .expect("JSON from the Python feature client")
}

/// The same server served by the SDK's own Streamable HTTP server: the reference behaviour.
async fn reference_server() -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(python())
        .args([feature_server(), "http".into(), port.to_string()])
        .kill_on_drop(true)
        .spawn()
        .expect("starting the reference server");
    // Generous: importing the SDK takes seconds on a loaded CI machine.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (child, format!("http://127.0.0.1:{port}/mcp"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the reference server never listened");
}

/// Sampling, elicitation, roots, progress, logging (opted in at `info`), `list_changed` on `subscriptions/listen`,
/// `Mcp-Param-*` and cancellation: the official Python client at 2026-07-28 (pinned, and its default mode) gets
/// through the bridge exactly what it gets from the SDK's own server for the same stdio server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_2026_07_28_gets_every_feature_the_sdk_server_gives() {
    let (_reference, reference_url) = reference_server().await;
    let python = python().to_string_lossy().into_owned();
    let bridge = start_bridge_cmd(
        &[],
        Auth::bearer(TOKEN.into()),
        &[&python, &feature_server(), "stdio"],
    )
    .await;
    wait_python_ready(&bridge).await;
    let reference = run_feature_client(&reference_url, "-", "2026-07-28").await;
    eprintln!("reference: {reference}");
    assert_reference_works(&reference, "2026-07-28");
    assert_eq!(reference["routed"], "routed to ams");
    for mode in ["2026-07-28", "auto"] {
        // The previous run ended by cancelling a call, which keeps the server's questions unattributable for a
        // few seconds: wait until one is attributed again.
        questions_attributed(&url(&bridge)).await;
        let through_bridge = run_feature_client(&url(&bridge), TOKEN, mode).await;
        eprintln!("bridge ({mode}): {through_bridge}");
        assert_eq!(through_bridge, reference, "mode {mode}");
    }
    assert_eq!(bridge.held_for_input(), 0);
    bridge.shutdown().await.unwrap();
}

/// The reference itself shows each feature working, so an equality with it is not two equal failures. Handshake-era
/// logs: the feature server declares no `logging`, so no client sends `logging/setLevel` and every level arrives.
fn assert_reference_works(reference: &Value, protocol_version: &str) {
    assert_eq!(
        reference["protocol_version"], protocol_version,
        "{reference}"
    );
    assert_eq!(reference["sample"], "llm said: forty-two");
    assert_eq!(reference["greet"], "hello Ada");
    assert_eq!(reference["roots"], "file:///work/project");
    // Python reports progress as floats, JavaScript as integers.
    let progress: Vec<f64> = reference["progress"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(progress, [1.0, 2.0, 3.0], "{reference}");
    let logs = if protocol_version == "2026-07-28" {
        serde_json::json!(["warning:warning line"])
    } else {
        serde_json::json!(["debug:debug line", "warning:warning line"])
    };
    assert_eq!(reference["logs"], logs, "{reference}");
    assert_eq!(reference["cancelled"], true);
    assert_eq!(reference["after_cancel"], "done after 1 steps");
    assert_eq!(reference["list_changed"], "ToolsListChanged");
    assert_eq!(reference["tools_after"], true);
}

/// The same comparison in the Python SDK's handshake mode (`legacy`, 2025-11-25): the server's sampling,
/// elicitation and roots requests, its logs and `list_changed` reach the client over the session's streams. The
/// run ends by cancelling a call and closing the client, which must not be answered after the client closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_legacy_mode_gets_every_feature_the_sdk_server_gives() {
    let (_reference, reference_url) = reference_server().await;
    let python = python().to_string_lossy().into_owned();
    let bridge = start_bridge_cmd(
        &[],
        Auth::bearer(TOKEN.into()),
        &[&python, &feature_server(), "stdio"],
    )
    .await;
    wait_python_ready(&bridge).await;
    let reference = run_feature_client(&reference_url, "-", "legacy").await;
    eprintln!("reference: {reference}");
    assert_reference_works(&reference, "2025-11-25");
    let through_bridge = run_feature_client(&url(&bridge), TOKEN, "legacy").await;
    eprintln!("bridge: {through_bridge}");
    assert_eq!(through_bridge, reference);
    bridge.shutdown().await.unwrap();
}

async fn run_ts_feature_client(url: &str, token: &str, mode: &str) -> Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support/ts_feature_client.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(ts_clients())
        .args([url, token, mode])
        .output()
        .await
        .expect("running the TypeScript feature client");
    assert!(
        output.status.success(),
        "TypeScript feature client ({mode}, {url}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim().lines().last().unwrap())
        .expect("JSON from the TypeScript feature client")
}

/// The same comparison with the official TypeScript client `@modelcontextprotocol/client` 2.4 pinned to
/// 2026-07-28 (its `input_required` auto-fulfilment, `listen()`, `_meta` log opt-in and abort signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_2026_07_28_gets_every_feature_the_sdk_server_gives() {
    let (_reference, reference_url) = reference_server().await;
    let python = python().to_string_lossy().into_owned();
    let bridge = start_bridge_cmd(
        &[],
        Auth::bearer(TOKEN.into()),
        &[&python, &feature_server(), "stdio"],
    )
    .await;
    wait_python_ready(&bridge).await;
    let reference = run_ts_feature_client(&reference_url, "-", "2026-07-28").await;
    eprintln!("reference: {reference}");
    assert_reference_works(&reference, "2026-07-28");
    let through_bridge = run_ts_feature_client(&url(&bridge), TOKEN, "2026-07-28").await;
    eprintln!("bridge: {through_bridge}");
    assert_eq!(through_bridge, reference);
    bridge.shutdown().await.unwrap();
}

/// The same comparison in both official TypeScript clients' handshake modes: `@modelcontextprotocol/sdk` 1.x and
/// `@modelcontextprotocol/client` 2.x in `legacy` mode (2.x pins only modern revisions, so that is its one
/// handshake mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_clients_handshake_era_get_every_feature_the_sdk_server_gives() {
    let (_reference, reference_url) = reference_server().await;
    let python = python().to_string_lossy().into_owned();
    let bridge = start_bridge_cmd(
        &[],
        Auth::bearer(TOKEN.into()),
        &[&python, &feature_server(), "stdio"],
    )
    .await;
    wait_python_ready(&bridge).await;
    for mode in ["sdk1", "legacy"] {
        let reference = run_ts_feature_client(&reference_url, "-", mode).await;
        eprintln!("reference ({mode}): {reference}");
        assert_reference_works(&reference, "2025-11-25");
        let through_bridge = run_ts_feature_client(&url(&bridge), TOKEN, mode).await;
        eprintln!("bridge ({mode}): {through_bridge}");
        assert_eq!(through_bridge, reference, "mode {mode}");
    }
    bridge.shutdown().await.unwrap();
}

async fn modern_call(
    url: &str,
    id: u64,
    tool: &str,
    params: Value,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut body =
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
    body["params"]["name"] = tool.into();
    let mut request = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Waits until the bridge hands the server's question to a request again (a `roots` call comes back
/// `input_required`), and completes that call so nothing stays held.
async fn questions_attributed(url: &str) {
    let meta = envelope(serde_json::json!({"roots": {}}));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, asked) = modern_call(
            url,
            90,
            "roots",
            serde_json::json!({"arguments": {}, "_meta": meta}),
            &[],
        )
        .await;
        if asked["result"]["resultType"] == "input_required" {
            let key = asked["result"]["inputRequests"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone();
            let retry = serde_json::json!({"arguments": {}, "_meta": meta,
                "requestState": asked["result"]["requestState"],
                "inputResponses": {key: {"roots": []}}});
            let (_, done) = modern_call(url, 91, "roots", retry, &[]).await;
            assert_eq!(done["result"]["resultType"], "complete", "{done}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "questions never attributed: {asked}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn envelope(capabilities: Value) -> Value {
    serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": capabilities,
    })
}

/// The `input_required` flow as the wire sees it: capabilities per request (-32021), a `requestState` that
/// opens only its own request and only once, an abandoned request cleaned up after `--input-timeout-secs`, and
/// `Mcp-Param-*` headers refused with -32020 when they disagree with the arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_required_is_bound_checked_single_use_and_bounded() {
    let python = python().to_string_lossy().into_owned();
    // Long enough for the round trips between an input request and its answer below (through a Python child,
    // on a loaded machine); the abandoned request then costs this long.
    let input_timeout = std::time::Duration::from_secs(10);
    let bridge = start_bridge_cmd(
        &["--input-timeout-secs", &input_timeout.as_secs().to_string()],
        Auth::bearer(TOKEN.into()),
        &[&python, &feature_server(), "stdio"],
    )
    .await;
    wait_python_ready(&bridge).await;
    let url = url(&bridge);
    let sampling = envelope(serde_json::json!({"sampling": {}}));
    let ask = |meta: &Value| serde_json::json!({"arguments": {"question": "q"}, "_meta": meta});

    // No sampling capability declared: refused as 2026-07-28 says, and nothing is held.
    let (status, refused) = modern_call(
        &url,
        1,
        "sample",
        ask(&envelope(serde_json::json!({}))),
        &[],
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].clone()),
        (400, (-32021).into()),
        "{refused}"
    );
    assert_eq!(
        refused["error"]["data"]["requiredCapabilities"],
        serde_json::json!({"sampling": {}})
    );
    assert_eq!(bridge.held_for_input(), 0);

    // Declared: the child's sampling request comes back as an input request.
    let (status, first) = modern_call(&url, 2, "sample", ask(&sampling), &[]).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let (key, request) = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(request["method"], "sampling/createMessage");
    let state = first["result"]["requestState"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(bridge.held_for_input(), 1);
    let answer = serde_json::json!({key.clone(): {"role": "assistant", "model": "m",
        "content": {"type": "text", "text": "bound"}}});
    let retry = |arguments: Value, state: &str| serde_json::json!({"arguments": arguments, "inputResponses": answer, "requestState": state, "_meta": sampling});
    // Tampered state, or the state replayed on a request with other arguments: refused, the held call intact.
    let mut forged = state.clone();
    forged.pop();
    forged.push(if state.ends_with('A') { 'B' } else { 'A' });
    for (arguments, token) in [
        (serde_json::json!({"question": "q"}), forged.as_str()),
        (serde_json::json!({"question": "other"}), state.as_str()),
    ] {
        let (status, bad) = modern_call(&url, 3, "sample", retry(arguments, token), &[]).await;
        assert_eq!(
            (status, bad["error"]["code"].clone()),
            (400, (-32602).into()),
            "{bad}"
        );
    }
    assert_eq!(bridge.held_for_input(), 1);
    let (status, done) = modern_call(
        &url,
        4,
        "sample",
        retry(serde_json::json!({"question": "q"}), &state),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["result"]["resultType"], "complete", "{done}");
    assert_eq!(done["result"]["content"][0]["text"], "llm said: bound");
    assert_eq!(done["id"], 4);
    // Single use.
    let (status, replay) = modern_call(
        &url,
        5,
        "sample",
        retry(serde_json::json!({"question": "q"}), &state),
        &[],
    )
    .await;
    assert_eq!(
        (status, replay["error"]["code"].clone()),
        (400, (-32602).into()),
        "{replay}"
    );

    // A client that never comes back: held until the input timeout, then the child is answered with an error
    // and its call cancelled. While it is held, another request's question cannot be attributed (refused); once
    // it is cleaned up, questions are attributed again.
    let (_, abandoned) = modern_call(&url, 6, "sample", ask(&sampling), &[]).await;
    assert_eq!(
        abandoned["result"]["resultType"], "input_required",
        "{abandoned}"
    );
    let (_, while_held) = modern_call(
        &url,
        7,
        "greet",
        serde_json::json!({"arguments": {},
        "_meta": envelope(serde_json::json!({"elicitation": {}}))}),
        &[],
    )
    .await;
    assert!(
        while_held["result"]["isError"] == true || while_held.get("error").is_some(),
        "{while_held}"
    );
    let deadline = tokio::time::Instant::now() + input_timeout + std::time::Duration::from_secs(18);
    loop {
        let (_, again) = modern_call(&url, 8, "sample", ask(&sampling), &[]).await;
        if again["result"]["resultType"] == "input_required" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never attributed again: {again}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while bridge.held_for_input() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "held requests never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Mcp-Param-Region mirrors the x-mcp-header-annotated `region` argument.
    let routed = |region: &str| serde_json::json!({"arguments": {"region": region}, "_meta": envelope(serde_json::json!({}))});
    let (status, ok) = modern_call(
        &url,
        9,
        "routed",
        routed("ams"),
        &[("mcp-param-region", "ams")],
    )
    .await;
    assert_eq!(
        (status, ok["result"]["content"][0]["text"].clone()),
        (200, "routed to ams".into()),
        "{ok}"
    );
    for headers in [&[("mcp-param-region", "fra")][..], &[][..]] {
        let (status, mismatch) = modern_call(&url, 10, "routed", routed("ams"), headers).await;
        assert_eq!(
            (status, mismatch["error"]["code"].clone()),
            (400, (-32020).into()),
            "{mismatch}"
        );
    }
    bridge.shutdown().await.unwrap();
}
