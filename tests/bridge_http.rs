//! The bridge's HTTP contract on the wire: auth before any child work, Origin, rate limits, readiness, audit
//! lines without argument values, and the status codes each era prescribes.

#[path = "support/bridge_env.rs"]
mod support;

use std::time::Duration;

use mcpfly::bridge::auth::Auth;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

const ACCEPT: &str = "application/json, text/event-stream";

fn http() -> reqwest::Client {
    logs(); // installs the crypto provider too
    reqwest::Client::new()
}

fn initialize_body() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
}

fn modern(method: &str, id: u64, params: Value) -> (Value, Vec<(&'static str, String)>) {
    let mut params = params;
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let mut headers = vec![
        ("mcp-protocol-version", "2026-07-28".to_string()),
        ("mcp-method", method.to_string()),
    ];
    if let Some(name) = params.get("name").and_then(Value::as_str) {
        headers.push(("mcp-name", name.to_string()));
    }
    (
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        headers,
    )
}

async fn post_modern(url: &str, method: &str, params: Value) -> reqwest::Response {
    let (body, headers) = modern(method, 1, params);
    let mut request = http()
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    request.send().await.unwrap()
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_token_is_401_and_starts_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("spawns");
    let script = format!(
        "echo spawn >> '{}'; exec '{}'",
        marker.display(),
        test_server().display()
    );
    let bridge =
        start_bridge_cmd(&[], Auth::bearer(TOKEN.into()), &["/bin/sh", "-c", &script]).await;
    wait_ready(&bridge).await;
    assert_eq!(count_lines(&marker), 1, "only the shared child at start");
    let client = http();
    let missing = client
        .post(url(&bridge))
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.headers()["www-authenticate"],
        r#"Bearer realm="mcpfly""#
    );
    let wrong = client
        .post(url(&bridge))
        .bearer_auth("not-the-token")
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(
        wrong.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let (body, headers) = modern(
        "tools/call",
        1,
        json!({"name": "echo", "arguments": {"text": "x"}}),
    );
    let mut request = client
        .post(url(&bridge))
        .header("accept", ACCEPT)
        .json(&body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    assert_eq!(
        request.send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count_lines(&marker),
        1,
        "a rejected request started a server"
    );

    let ok = client
        .post(url(&bridge))
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok.headers().contains_key("mcp-session-id"));
    assert_eq!(
        count_lines(&marker),
        2,
        "an authorized initialize starts the session's server"
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_validated_and_cors_allowlisted() {
    let bridge = start_bridge(
        &["--allowed-origin", "https://app.example"],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let client = http();
    let evil = client
        .post(url(&bridge))
        .bearer_auth(TOKEN)
        .header("origin", "https://evil.example")
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), StatusCode::FORBIDDEN);
    let good = client
        .post(url(&bridge))
        .bearer_auth(TOKEN)
        .header("origin", "https://app.example")
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::OK);
    assert_eq!(
        good.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let preflight = client
        .request(reqwest::Method::OPTIONS, url(&bridge))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, mcp-session-id",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_gives_429_with_retry_after() {
    let bridge = start_bridge(
        &[
            "--rate-per-client",
            "60",
            "--rate-per-token",
            "0",
            "--rate-burst",
            "3",
        ],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = post_modern(&url(&bridge), "tools/list", json!({})).await;
        statuses.push((r.status(), r.headers().get("retry-after").cloned()));
    }
    assert!(
        statuses[..3].iter().all(|(s, _)| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(statuses[3].0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(statuses[3].1.as_ref().unwrap(), "1");
    bridge.shutdown().await.unwrap();

    // Per token: a different client address does not escape it.
    let bridge = start_bridge(
        &[
            "--rate-per-client",
            "0",
            "--rate-per-token",
            "60",
            "--rate-burst",
            "2",
        ],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let mut last = StatusCode::OK;
    for i in 0..3 {
        let (body, headers) = modern("tools/list", 1, json!({}));
        let mut request = http()
            .post(url(&bridge))
            .bearer_auth(TOKEN)
            .header("fly-client-ip", format!("2001:db8::{i}"))
            .json(&body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        last = request.send().await.unwrap().status();
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_shared_server() {
    let server = test_server();
    // Not ready while the server starts.
    let script = format!("sleep 1; exec '{}'", server.display());
    let bridge =
        start_bridge_cmd(&[], Auth::bearer(TOKEN.into()), &["/bin/sh", "-c", &script]).await;
    let base = format!("http://{}", bridge.addr());
    let client = http();
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    wait_ready(&bridge).await;

    // A crash makes it unready; it is restarted with backoff and ready again.
    let r = post_modern(
        &url(&bridge),
        "tools/call",
        json!({"name": "crash", "arguments": {}}),
    )
    .await;
    let body: Value = r.json().await.unwrap();
    assert!(body.get("error").is_some(), "{body}");
    let ready = async || {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::OK
    };
    assert!(!ready().await, "ready right after the crash");
    eventually("ready again after the restart", ready).await;
    let r = post_modern(
        &url(&bridge),
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "back"}}),
    )
    .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["result"]["content"][0]["text"],
        "back"
    );
    bridge.shutdown().await.unwrap();

    // A server that never starts: alive, never ready.
    let bridge = start_bridge_cmd(&[], Auth::bearer(TOKEN.into()), &["/bin/false"]).await;
    let base = format!("http://{}", bridge.addr());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_name_tools_but_never_carry_arguments_or_results() {
    let logs = logs();
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let canary = "CANARY-7f3a9c-do-not-log";
    let r = post_modern(
        &url(&bridge),
        "tools/call",
        json!({"name": "echo", "arguments": {"text": canary}}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["result"]["content"][0]["text"],
        canary
    );
    // Handshake era too, with a result on SSE.
    let client = http();
    let init = client
        .post(url(&bridge))
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let call = client
        .post(url(&bridge))
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": canary}}}))
        .send()
        .await
        .unwrap();
    assert!(call.text().await.unwrap().contains(canary));
    bridge.shutdown().await.unwrap();

    let text = logs.text();
    assert!(
        !text.contains(canary),
        "an argument or result value reached the logs"
    );
    assert!(!text.contains(TOKEN), "the token reached the logs");
    let audit = logs.audit_lines();
    let calls: Vec<&Value> = audit
        .iter()
        .filter(|l| l["method"] == "tools/call" && l["tool"] == "echo")
        .collect();
    assert!(calls.iter().any(|l| l["era"] == "2026-07-28"), "{audit:?}");
    let handshake = calls
        .iter()
        .find(|l| l["session"] == session.as_str())
        .expect("session in audit");
    for field in [
        "time_unix_ms",
        "client",
        "status",
        "latency_ms",
        "protocol_version",
    ] {
        assert!(
            handshake.get(field).is_some(),
            "{field} missing: {handshake}"
        );
    }
    assert_eq!(handshake["status"], 200);
    assert_eq!(handshake["client"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_of_both_eras() {
    let bridge = start_bridge(&["--max-body-bytes", "1024"], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let u = url(&bridge);
    let c = http();
    // Handshake era.
    let no_accept = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", "application/json")
        .json(&initialize_body());
    assert_eq!(
        no_accept.send().await.unwrap().status(),
        StatusCode::NOT_ACCEPTABLE
    );
    let text = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("content-type", "text/plain")
        .body("{}");
    assert_eq!(text.send().await.unwrap().status(), StatusCode::BAD_REQUEST);
    let big = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"x": "y".repeat(2000)}}));
    assert_eq!(
        big.send().await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let no_session = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&list);
    assert_eq!(
        no_session.send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let unknown = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", "nope")
        .json(&list);
    assert_eq!(
        unknown.send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let get_no_session = c
        .get(&u)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream");
    assert_eq!(
        get_no_session.send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let put = c.put(&u).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(put.headers()["allow"], "GET, POST, DELETE");

    let init = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let bad_version = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "1999-01-01")
        .json(&list);
    assert_eq!(
        bad_version.send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let initialized = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    assert_eq!(
        initialized.send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let listed = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&list)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    assert_eq!(listed.headers()["content-type"], "application/json");
    let get1 = c
        .get(&u)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session);
    let stream = get1.send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let get2 = c
        .get(&u)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session);
    assert_eq!(get2.send().await.unwrap().status(), StatusCode::CONFLICT);
    drop(stream);
    let delete = c
        .delete(&u)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), StatusCode::OK);
    let after = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .json(&list);
    assert_eq!(after.send().await.unwrap().status(), StatusCode::NOT_FOUND);

    // 2026-07-28.
    let discover = post_modern(&u, "server/discover", json!({})).await;
    assert_eq!(discover.status(), StatusCode::OK);
    let d: Value = discover.json().await.unwrap();
    assert_eq!(d["result"]["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(d["result"]["resultType"], "complete");
    assert_eq!(
        d["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "rmcp"
    );
    let listed: Value = post_modern(&u, "tools/list", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["result"]["resultType"], "complete");
    assert_eq!(listed["result"]["cacheScope"], "private");
    assert_eq!(listed["result"]["ttlMs"], 0);
    let ping = post_modern(&u, "ping", json!({})).await;
    assert_eq!(ping.status(), StatusCode::NOT_FOUND);
    assert_eq!(ping.json::<Value>().await.unwrap()["error"]["code"], -32601);
    let (body, _) = modern("tools/list", 1, json!({}));
    let no_method = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("mcp-protocol-version", "2026-07-28")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(no_method.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        no_method.json::<Value>().await.unwrap()["error"]["code"],
        -32020
    );
    let get = c
        .get(&u)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .header("mcp-protocol-version", "2026-07-28");
    let get = get.send().await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers()["allow"], "POST");
    let bad_tool = post_modern(
        &u,
        "tools/call",
        json!({"name": "add", "arguments": {"a": "not a number"}}),
    )
    .await;
    let status = bad_tool.status();
    let bad: Value = bad_tool.json().await.unwrap();
    if let Some(code) = bad.pointer("/error/code").and_then(Value::as_i64) {
        assert_eq!(
            status.as_u16(),
            if code == -32602 { 400 } else { 200 },
            "{bad}"
        );
    }
    bridge.shutdown().await.unwrap();
}
