//! The bridge's HTTP contract on the wire: auth before any child work, Origin, rate limits, readiness, audit
//! lines without argument values, and the status codes each era prescribes.

#[path = "support/bridge_env.rs"]
mod support;

use std::time::Duration;

use mcpfly::bridge::{Bridge, auth::Auth};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

const ACCEPT: &str = "application/json, text/event-stream";

fn http() -> reqwest::Client {
    logs(); // installs the crypto provider too
    reqwest::Client::new()
}

fn initialize_body() -> Value {
    initialize_at("2025-11-25")
}

fn initialize_at(version: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
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
    // No warm children here: every spawn after the shared child's is then one a request caused.
    let bridge = ready_bridge_running(&script, &["--warm-sessions", "0"]).await;
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
    // Unauthenticated traffic (auth off) is limited per address.
    let bridge = start_bridge(
        &["--rate-per-client", "60", "--rate-burst", "3"],
        Auth::disabled(),
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
    // Another address has its own budget.
    let (body, headers) = modern("tools/list", 1, json!({}));
    let mut other = http()
        .post(url(&bridge))
        .header("fly-client-ip", "2001:db8::9")
        .json(&body);
    for (k, v) in headers {
        other = other.header(k, v);
    }
    assert_eq!(other.send().await.unwrap().status(), StatusCode::OK);
    bridge.shutdown().await.unwrap();

    // With auth: wrong tokens count against the address (guessing is throttled), the right token does not.
    let bridge = start_bridge(
        &["--rate-per-client", "60", "--rate-burst", "2"],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let mut guesses = Vec::new();
    for _ in 0..3 {
        let (body, headers) = modern("tools/list", 1, json!({}));
        let mut request = http().post(url(&bridge)).bearer_auth("a-guess").json(&body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        guesses.push(request.send().await.unwrap().status());
    }
    assert_eq!(
        guesses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    for _ in 0..5 {
        let r = post_modern(&url(&bridge), "tools/list", json!({})).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "the identity's budget is its own"
        );
    }
    bridge.shutdown().await.unwrap();

    // Per identity: a different client address does not escape it.
    let bridge = start_bridge(
        &[
            "--rate-per-client",
            "0",
            "--rate-per-token",
            "60",
            "--rate-token-burst",
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
    // The answer to the crashing call can arrive a moment before the bridge sees the process exit; the restart
    // then waits out its backoff (500 ms), which polling every 50 ms cannot miss.
    eventually("unready after the crash", async || !ready().await).await;
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

/// A handshake-era session opened on `client` (initialize + initialized); returns its id.
async fn open_session(client: &reqwest::Client, url: &str) -> String {
    open_session_at(client, url, "2025-11-25").await
}

async fn open_session_at(client: &reqwest::Client, url: &str, version: &str) -> String {
    let init = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(&initialize_at(version))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), StatusCode::OK);
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    init.bytes().await.unwrap();
    let initialized = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(initialized.status(), StatusCode::ACCEPTED);
    session
}

/// POSTs a handshake-era request on `session`; returns the content type and the body.
async fn session_post(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    body: Value,
) -> (String, String) {
    let response = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    (content_type, response.text().await.unwrap())
}

/// The JSON-RPC response in a body that is either JSON or SSE.
fn rpc_response(body: &str) -> Value {
    if let Ok(value) = serde_json::from_str::<Value>(body) {
        return value;
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m.get("id").is_some() && m.get("method").is_none())
        .unwrap_or_else(|| panic!("no response in {body}"))
}

/// Regression guard for the delayed-ACK stall: an SSE answer goes out in several writes, and with Nagle on, every
/// write after the first waited for the client's delayed ACK (~40 ms) on a kept-alive connection. Not a benchmark:
/// a call takes a few ms here and 40+ ms with the stall. The stall is a floor under every call, so the fastest
/// quarter tells them apart; load only makes some calls slow, never the fastest ten of forty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streamed_calls_on_one_connection_never_wait_for_a_delayed_ack() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let u = url(&bridge);
    // One client, one kept-alive connection, as a real MCP client holds it.
    let client = http();
    let session = open_session(&client, &u).await;
    let mut handshake = Vec::new();
    let mut modern_era = Vec::new();
    for i in 0..40u64 {
        // A progress token and a step that reports progress: the answer is SSE (priming, progress, result).
        let call = json!({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {
            "name": "slow", "arguments": {"steps": 1, "delay_ms": 0}, "_meta": {"progressToken": i}}});
        let started = std::time::Instant::now();
        let (content_type, body) = session_post(&client, &u, &session, call).await;
        handshake.push(started.elapsed());
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        assert_eq!(
            rpc_response(&body)["result"]["content"][0]["text"],
            "done after 1 steps"
        );

        let (mut body, headers) = modern(
            "tools/call",
            i,
            json!({"name": "slow", "arguments": {"steps": 1, "delay_ms": 0}}),
        );
        body["params"]["_meta"]["progressToken"] = json!(i);
        let mut request = client
            .post(&u)
            .bearer_auth(TOKEN)
            .header("accept", ACCEPT)
            .json(&body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let started = std::time::Instant::now();
        let response = request.send().await.unwrap();
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = response.text().await.unwrap();
        modern_era.push(started.elapsed());
        assert_eq!(
            rpc_response(&text)["result"]["content"][0]["text"],
            "done after 1 steps"
        );
    }
    for (era, mut times) in [("handshake", handshake), ("2026-07-28", modern_era)] {
        times.sort();
        // With Nagle on every call waits >= 40 ms, so even the lower quartile does; without it a call takes a few
        // ms, and 30 ms leaves ten times that for the quickest ten calls on a loaded machine.
        let lower_quartile = times[times.len() / 4];
        assert!(
            lower_quartile < Duration::from_millis(30),
            "{era}: sequential calls stall (lower quartile {lower_quartile:?}, all {times:?}): is TCP_NODELAY off?"
        );
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_progress_is_answered_as_json_and_a_streamed_one_as_sse() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let u = url(&bridge);
    let client = http();
    let session = open_session(&client, &u).await;
    let call = |id: u64, name: &str, args: Value, meta: Option<Value>| {
        let mut body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": args}});
        if let Some(meta) = meta {
            body["params"]["_meta"] = meta;
        }
        body
    };
    // Nothing to stream: one JSON body, no SSE framing.
    let (content_type, body) = session_post(
        &client,
        &u,
        &session,
        call(1, "echo", json!({"text": "plain"}), None),
    )
    .await;
    assert_eq!(content_type, "application/json");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["result"]["content"][0]["text"], "plain");
    // A progress token alone does not force a stream when no progress comes.
    let (content_type, _) = session_post(
        &client,
        &u,
        &session,
        call(
            2,
            "echo",
            json!({"text": "x"}),
            Some(json!({"progressToken": "t"})),
        ),
    )
    .await;
    assert_eq!(content_type, "application/json");
    // Progress before the result: SSE, with the progress first and the client's own token.
    let (content_type, body) = session_post(
        &client,
        &u,
        &session,
        call(
            3,
            "slow",
            json!({"steps": 2, "delay_ms": 10}),
            Some(json!({"progressToken": "p3"})),
        ),
    )
    .await;
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let progress = body
        .lines()
        .filter(|l| l.contains("notifications/progress") && l.contains("\"p3\""))
        .count();
    assert_eq!(progress, 2, "{body}");
    assert_eq!(rpc_response(&body)["id"], 3);
    // A server message during the call while no GET stream is open: it rides this call's stream when it reaches
    // the bridge before the answer; when the answer wins that race (plain JSON then), the message waits for the
    // session's next stream. Either way it is delivered, never dropped.
    let (content_type, body) =
        session_post(&client, &u, &session, call(4, "announce", json!({}), None)).await;
    assert_eq!(
        rpc_response(&body)["result"]["content"][0]["text"],
        "announced"
    );
    if content_type.starts_with("text/event-stream") {
        assert!(body.contains("notifications/message"), "{body}");
    } else {
        assert_eq!(content_type, "application/json");
        let mut stream = client
            .get(&u)
            .bearer_auth(TOKEN)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", "2025-11-25")
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        let mut seen = String::new();
        while !seen.contains("notifications/message") {
            let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
                .await
                .expect("the held server message reaches the next GET stream")
                .unwrap()
                .expect("the GET stream ended without the server message");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_behind_one_address_is_not_throttled_by_the_default_limits() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let u = url(&bridge);
    // Eight clients behind one NAT address, 40 requests each, as fast as they go.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let client = http();
            let mut refused = 0;
            for _ in 0..40 {
                let (body, headers) = modern("tools/list", 1, json!({}));
                let mut request = client
                    .post(&u)
                    .bearer_auth(TOKEN)
                    .header("fly-client-ip", "203.0.113.7")
                    .json(&body);
                for (k, v) in headers {
                    request = request.header(k, v);
                }
                if request.send().await.unwrap().status() == StatusCode::TOO_MANY_REQUESTS {
                    refused += 1;
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    assert_eq!(
        refused, 0,
        "authenticated calls from one address were throttled"
    );
    bridge.shutdown().await.unwrap();
}

/// The text of a `tools/call` on `session`.
async fn session_tool(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    name: &str,
    args: Value,
) -> String {
    let (_, body) = session_post(
        client,
        url,
        session,
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": name, "arguments": args}}),
    )
    .await;
    rpc_response(&body)["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A bridge started with `args` (and the test token), each of whose servers runs `script` in `sh -c`, once ready.
async fn ready_bridge_running(script: &str, args: &[&str]) -> Bridge {
    let bridge =
        start_bridge_cmd(args, Auth::bearer(TOKEN.into()), &["/bin/sh", "-c", script]).await;
    wait_ready(&bridge).await;
    bridge
}

/// A server that records its pid (`exec` keeps it) in `marker` when it starts.
fn recording_server(marker: &std::path::Path) -> String {
    format!(
        "echo $$ >> '{}'; exec '{}'",
        marker.display(),
        test_server().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_take_servers_started_ahead_and_the_pool_stays_within_the_session_limit() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pids");
    let script = recording_server(&marker);
    let bridge =
        ready_bridge_running(&script, &["--warm-sessions", "2", "--max-sessions", "3"]).await;
    eventually("the shared server and two warm ones", async || {
        lines(&marker).len() == 3
    })
    .await;
    assert_eq!(bridge.warm_children(), 2);
    let u = url(&bridge);
    let client = http();
    let mut pids = Vec::new();
    for n in 1..=3 {
        let started_before = lines(&marker);
        let session = open_session(&client, &u).await;
        let pid = session_tool(&client, &u, &session, "pid", json!({})).await;
        assert!(
            started_before.contains(&pid),
            "session {n} ran a server started for it ({pid}), not a warm one ({started_before:?})"
        );
        pids.push(pid);
        if n == 1 {
            // Refilled in the background: room for one more beside two sessions' worth.
            eventually("the pool refilled", async || lines(&marker).len() == 4).await;
        }
    }
    pids.dedup();
    assert_eq!(pids.len(), 3, "each session has its own server");
    // Three sessions fill the limit: nothing is kept warm beyond it.
    assert_eq!(bridge.warm_children(), 0);
    assert_eq!(lines(&marker).len(), 4);
    bridge.shutdown().await.unwrap();
}

/// A server whose start installs into a shared cache, as `npx -y` / `uvx` do on a cold cache: a second install
/// while one is running leaves the cache corrupt, and every later start fails (npm's ENOTEMPTY, then missing
/// modules). Each start records its pid in `marker`.
fn installing_server(cache: &std::path::Path, marker: &std::path::Path) -> String {
    format!(
        "c='{cache}'; mkdir \"$c/installing\" 2>/dev/null || touch \"$c/corrupt\"; sleep 0.5; \
         rmdir \"$c/installing\" 2>/dev/null; [ -e \"$c/corrupt\" ] && exit 1; echo $$ >> '{marker}'; exec '{server}'",
        cache = cache.display(),
        marker = marker.display(),
        server = test_server().display()
    )
}

/// The warm server starts only after the first one is up: at boot both would install the package into one
/// empty cache at once, and the machine would never become ready (seen with `npx` in the runtime image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_server_starts_after_the_first_so_package_installs_never_race() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pids");
    let script = installing_server(dir.path(), &marker);
    let bridge = ready_bridge_running(&script, &["--warm-sessions", "1"]).await;
    eventually("the shared server and a warm one", async || {
        lines(&marker).len() == 2
    })
    .await;
    assert_eq!(bridge.warm_children(), 1);
    assert!(
        !dir.path().join("corrupt").exists(),
        "two installs overlapped"
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sessions_grows_the_warm_pool_so_the_next_burst_takes_servers_done_starting() {
    let dir = tempfile::tempdir().unwrap();
    let (spawned, ready) = (dir.path().join("spawned"), dir.path().join("ready"));
    // A server that takes half a second to start, as a Python one does (or longer): its pid goes to `spawned` when started and to
    // `ready` once it reads stdin.
    let script = format!(
        "echo $$ >> '{}'; sleep 0.5; echo $$ >> '{}'; exec '{}'",
        spawned.display(),
        ready.display(),
        test_server().display()
    );
    let bridge = ready_bridge_running(
        &script,
        &["--warm-sessions", "1", "--warm-sessions-max", "4"],
    )
    .await;
    let u = url(&bridge);
    let client = http();
    // Three sessions back to back: faster than one spare can be started again.
    for _ in 0..3 {
        open_session(&client, &u).await;
    }
    eventually(
        "the pool grown to the burst and done starting",
        async || bridge.warm_children() >= 2 && lines(&ready).len() == lines(&spawned).len(),
    )
    .await;
    // The next burst: each session runs a server that was ready before the session was opened, so no
    // initialize waited for a start.
    let ready_before = lines(&ready);
    for n in 1..=2 {
        let session = open_session(&client, &u).await;
        let pid = session_tool(&client, &u, &session, "pid", json!({})).await;
        assert!(
            ready_before.contains(&pid),
            "session {n} of the burst ran a server still starting ({pid}; ready before: {ready_before:?})"
        );
    }
    bridge.shutdown().await.unwrap();
}

/// Of the pids in `marker`, those of server processes still running (not exited, not a zombie).
fn running(marker: &std::path::Path) -> Vec<String> {
    lines(marker)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_2026_07_28_server_starts_on_first_use_unless_kept_warm() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pids");
    let script = recording_server(&marker);
    let bridge = start_bridge_cmd(
        &["--warm-sessions", "1"],
        Auth::bearer(TOKEN.into()),
        &["/bin/sh", "-c", &script],
    )
    .await;
    // Ready: a probe answered initialize. Then only the warm process runs; the probe is stopped.
    wait_ready(&bridge).await;
    eventually("the warm process, and nothing else, running", async || {
        bridge.warm_children() == 1 && lines(&marker).len() == 2 && running(&marker).len() == 1
    })
    .await;
    // server/discover is answered from what the probe said, and starts nothing.
    let response = post_modern(&url(&bridge), "server/discover", json!({})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"].is_string(),
        "{body}"
    );
    assert_eq!(lines(&marker).len(), 2, "discover started a process");
    // The first 2026-07-28 request that needs the server is served, by a process it started.
    let response = post_modern(&url(&bridge), "tools/list", json!({})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(
        body.pointer("/result/tools").is_some_and(Value::is_array),
        "{body}"
    );
    assert_eq!(lines(&marker).len(), 3);
    assert_eq!(running(&marker).len(), 2);
    bridge.shutdown().await.unwrap();

    // Kept warm by choice: started at boot, with no 2026-07-28 request.
    let marker = dir.path().join("pids-warm");
    let script = recording_server(&marker);
    let bridge = ready_bridge_running(&script, &["--warm-sessions", "1", "--modern-warm"]).await;
    eventually(
        "the 2026-07-28 process and the warm one running",
        async || bridge.warm_children() == 1 && running(&marker).len() == 2,
    )
    .await;
    assert_eq!(lines(&marker).len(), 2, "no probe beside a kept process");
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_isolation_serves_every_session_from_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pids");
    let script = recording_server(&marker);
    let bridge = ready_bridge_running(&script, &["--session-isolation", "shared"]).await;
    let u = url(&bridge);
    let client = http();
    let one = open_session(&client, &u).await;
    let two = open_session(&client, &u).await;
    assert_ne!(one, two);
    let shared = lines(&marker);
    assert_eq!(shared.len(), 1, "one server for everything: {shared:?}");
    assert_eq!(
        session_tool(&client, &u, &one, "pid", json!({})).await,
        shared[0]
    );
    assert_eq!(
        session_tool(&client, &u, &two, "pid", json!({})).await,
        shared[0]
    );
    let modern_pid: Value = post_modern(&u, "tools/call", json!({"name": "pid", "arguments": {}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(modern_pid["result"]["content"][0]["text"], shared[0]);
    // The trade-off, as documented: what the server remembers is shared, and it cannot reach a client.
    session_tool(&client, &u, &one, "remember", json!({"value": "from one"})).await;
    assert_eq!(
        session_tool(&client, &u, &two, "recall", json!({})).await,
        "from one"
    );
    let roots = session_tool(&client, &u, &one, "roots", json!({})).await;
    assert!(roots.starts_with("roots failed"), "{roots}");
    // Ending a session leaves the server to the others.
    let ended = client
        .delete(&u)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &one)
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), StatusCode::OK);
    assert_eq!(
        session_tool(&client, &u, &two, "echo", json!({"text": "still here"})).await,
        "still here"
    );
    assert_eq!(lines(&marker).len(), 1);
    bridge.shutdown().await.unwrap();
}

/// 2025-03-26 JSON-RPC batches: in a session of that revision, two calls and a notification in one POST are
/// answered with one JSON array holding both responses (by id), and a batch of only notifications gets 202; in a
/// 2025-11-25 session (batching removed in 2025-06-18) the same batch is refused with 400 and reaches no server;
/// a batch is charged one rate token per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_served_in_2025_03_26_sessions_and_refused_after() {
    let policy = json!({"deny": ["slow"], "overrides": {"add": {"name": "sum"}}}).to_string();
    let bridge = start_bridge(&["--tools-policy", &policy], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let client = http();
    let endpoint = url(&bridge);
    let call = |id: u64, text: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}}})
    };
    let batch = json!([
        call(7, "first"),
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "none", "progress": 1}},
        call(8, "second"),
    ]);
    let post = |session: String, version: &'static str, body: Value| {
        client
            .post(&endpoint)
            .bearer_auth(TOKEN)
            .header("accept", ACCEPT)
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", version)
            .json(&body)
            .send()
    };

    let old = open_session_at(&client, &endpoint, "2025-03-26").await;
    let response = post(old.clone(), "2025-03-26", batch.clone())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answers: Value = response.json().await.unwrap();
    let answers = answers.as_array().expect("one JSON array of responses");
    assert_eq!(answers.len(), 2, "{answers:?}");
    for (id, text) in [(7, "first"), (8, "second")] {
        let answer = answers
            .iter()
            .find(|a| a["id"] == id)
            .expect("each request answered");
        assert_eq!(answer["result"]["content"][0]["text"], text, "{answer}");
    }
    // The tool policy applies to each request: a renamed tool is called by its new name, a denied one is answered
    // exactly as when called alone.
    let tool = |id: u64, name: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}})
    };
    let slow = tool(11, "slow", json!({"steps": 1, "delay_ms": 1}));
    let policed = json!([tool(10, "sum", json!({"a": 20, "b": 22})), slow.clone()]);
    let response = post(old.clone(), "2025-03-26", policed).await.unwrap();
    let answers: Value = response.json().await.unwrap();
    let sum = answers
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 10)
        .unwrap();
    assert_eq!(sum["result"]["content"][0]["text"], "42", "{answers}");
    let denied = answers
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 11)
        .unwrap();
    let (_, alone) = session_post(&client, &endpoint, &old, slow).await;
    assert_eq!(denied, &rpc_response(&alone), "{answers}");
    assert!(
        denied.get("result").is_none() || denied["result"]["isError"] == true,
        "{denied}"
    );
    let only_notifications =
        json!([{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}]);
    let response = post(old.clone(), "2025-03-26", only_notifications)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    let new = open_session(&client, &endpoint).await;
    let response = post(new.clone(), "2025-11-25", batch.clone())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let refusal: Value = response.json().await.unwrap();
    assert_eq!(refusal["error"]["code"], -32600, "{refusal}");
    // 2026-07-28 has no sessions and no batches.
    let modern_batch = client
        .post(&endpoint)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-protocol-version", "2026-07-28")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(modern_batch.status(), StatusCode::BAD_REQUEST);
    // The same session still serves a lone call (positive control for the refusal changing nothing).
    let (_, body) = session_post(&client, &endpoint, &new, call(9, "lone")).await;
    assert_eq!(rpc_response(&body)["result"]["content"][0]["text"], "lone");

    bridge.shutdown().await.unwrap();

    // Rate: a burst of 3 and no refill to speak of; opening the session takes 2, leaving one token, which a lone
    // request would get: the batch's second call needs one more, so the whole batch is refused.
    let bridge = start_bridge(
        &["--rate-per-token", "1", "--rate-token-burst", "3"],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let endpoint = url(&bridge);
    let old = open_session_at(&client, &endpoint, "2025-03-26").await;
    let response = client
        .post(&endpoint)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", old)
        .header("mcp-protocol-version", "2025-03-26")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    bridge.shutdown().await.unwrap();
}
