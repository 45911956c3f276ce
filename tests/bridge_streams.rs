//! Handshake-era stream hygiene, on the wire: a closed GET stream frees its slot at once and what the server
//! sends meanwhile is not lost; `Last-Event-ID` replays what a stream missed (event ids name their stream);
//! `MCP-Protocol-Version` is checked on GET and DELETE too; a session of another machine is replayed there.

#[path = "support/bridge_env.rs"]
mod support;

use std::time::Duration;

use futures::StreamExt;
use mcpfly::bridge::auth::Auth;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

const ACCEPT: &str = "application/json, text/event-stream";
const VERSION: &str = "2025-11-25";

fn http() -> reqwest::Client {
    logs(); // installs the crypto provider too
    reqwest::Client::new()
}

async fn open_session(c: &reqwest::Client, url: &str) -> String {
    let init = c
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": VERSION, "capabilities": {"roots": {}},
            "clientInfo": {"name": "raw", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), StatusCode::OK);
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    init.bytes().await.unwrap();
    let initialized = c
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", VERSION)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(initialized.status(), StatusCode::ACCEPTED);
    session
}

/// An SSE response read event by event: `(id, data)`.
struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl Events {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event within `wait`, `None` when the stream ended or nothing came.
    async fn next(&mut self, wait: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .filter_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim_start().to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                let (id, data) = (field("id:"), field("data:"));
                if id.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((id, data));
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        }
    }

    /// Messages until one matches `until` (inclusive), within `wait` overall.
    async fn until(
        &mut self,
        wait: Duration,
        until: impl Fn(&Value) -> bool,
    ) -> Vec<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while let Some((id, data)) = self.next(deadline - tokio::time::Instant::now()).await {
            let Ok(message) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let stop = until(&message);
            out.push((id, message));
            if stop {
                break;
            }
        }
        out
    }
}

async fn get(
    c: &reqwest::Client,
    url: &str,
    session: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = c
        .get(url)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", VERSION);
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

async fn call(
    c: &reqwest::Client,
    url: &str,
    session: &str,
    id: u64,
    tool: &str,
    args: Value,
) -> Events {
    let mut params = json!({"name": tool, "arguments": args});
    if tool == "slow" {
        params["_meta"] = json!({"progressToken": "p1"});
    }
    let r = c
        .post(url)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", VERSION)
        .json(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let json = r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json");
    if json {
        // A JSON answer: one message, presented as one event without an id.
        let body = r.text().await.unwrap();
        let stream =
            futures::stream::iter([Ok(axum::body::Bytes::from(format!("data: {body}\n\n")))]);
        return Events {
            body: stream.boxed(),
            buffer: String::new(),
        };
    }
    Events::new(r)
}

fn is_answer(id: u64) -> impl Fn(&Value) -> bool {
    move |m| m["id"] == id && m.get("method").is_none()
}

fn is_log(m: &Value) -> bool {
    m["method"] == "notifications/message"
}

/// Before the fix, the GET stream's slot and receiver lived in a relay task that noticed the client's
/// disconnect only when the next message came: that message was taken from the session, "sent" into the dead
/// stream and lost, and every reopen got 409 until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_get_stream_frees_its_slot_at_once_and_loses_no_message() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    let (c, u) = (http(), url(&bridge));
    let session = open_session(&c, &u).await;
    let first = get(&c, &u, &session, &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    let mut first = Events::new(first);
    assert!(
        first.next(Duration::from_secs(5)).await.is_some(),
        "priming event"
    );
    // Positive control: while it is open, a second GET stream is refused.
    assert_eq!(
        get(&c, &u, &session, &[]).await.status(),
        StatusCode::CONFLICT
    );
    drop(first);

    // The server's log notification, sent while no GET stream is open, must reach the client: on this call's
    // own stream, or on the GET stream reopened below.
    let mut answer = call(&c, &u, &session, 2, "announce", json!({})).await;
    let mut seen: Vec<Value> = answer
        .until(Duration::from_secs(10), is_answer(2))
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert!(seen.iter().any(is_answer(2)), "announce answered: {seen:?}");

    let mut reopened = None;
    for _ in 0..40 {
        let r = get(&c, &u, &session, &[]).await;
        if r.status() == StatusCode::OK {
            reopened = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::CONFLICT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reopened = reopened.expect("the closed GET stream's slot was never freed (409 for 2 s)");
    if !seen.iter().any(is_log) {
        let mut events = Events::new(reopened);
        seen.extend(
            events
                .until(Duration::from_secs(5), is_log)
                .await
                .into_iter()
                .map(|(_, m)| m),
        );
    }
    assert!(
        seen.iter()
            .any(|m| is_log(m) && m["params"]["data"] == "announcement"),
        "the log notification was lost: {seen:?}"
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_replays_what_a_stream_missed_and_event_ids_name_their_stream() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    let (c, u) = (http(), url(&bridge));
    let session = open_session(&c, &u).await;

    // The GET stream receives the server's own messages; the client reads them, then loses the connection.
    let mut stream = Events::new(get(&c, &u, &session, &[]).await);
    let (priming, data) = stream.next(Duration::from_secs(5)).await.unwrap();
    assert!(
        data.is_empty() && !priming.is_empty(),
        "priming event with an id"
    );
    let mut answer = call(&c, &u, &session, 2, "announce", json!({})).await;
    answer.until(Duration::from_secs(10), is_answer(2)).await;
    let on_get = stream
        .until(Duration::from_secs(5), |m| {
            m["method"] == "notifications/tools/list_changed"
        })
        .await;
    assert_eq!(
        on_get.len(),
        2,
        "log and list_changed on the GET stream: {on_get:?}"
    );
    drop(stream);

    // Resuming from the priming event replays both, with their original ids; from the first, only the second.
    let resumed = get(&c, &u, &session, &[("last-event-id", &priming)]).await;
    assert_eq!(
        resumed.status(),
        StatusCode::OK,
        "a resumed GET stream is not refused"
    );
    let mut resumed = Events::new(resumed);
    let replayed = resumed
        .until(Duration::from_secs(5), |m| {
            m["method"] == "notifications/tools/list_changed"
        })
        .await;
    assert_eq!(replayed, on_get, "replayed with the same ids and messages");
    drop(resumed);
    let mut resumed = Events::new(get(&c, &u, &session, &[("last-event-id", &on_get[0].0)]).await);
    let replayed = resumed.until(Duration::from_secs(5), |_| true).await;
    assert_eq!(replayed, on_get[1..], "only what came after the given id");

    // A POST stream's events name that stream, so resuming it replays its progress and answer, not the GET's.
    let mut slow = call(
        &c,
        &u,
        &session,
        3,
        "slow",
        json!({"steps": 2, "delay_ms": 20}),
    )
    .await;
    let (post_priming, _) = slow.next(Duration::from_secs(5)).await.unwrap();
    let post_events = slow.until(Duration::from_secs(10), is_answer(3)).await;
    assert!(
        post_events.len() >= 2,
        "progress and answer: {post_events:?}"
    );
    let stream_of = |id: &str| id.split('_').next().unwrap().to_string();
    assert_ne!(
        stream_of(&post_priming),
        stream_of(&priming),
        "ids name their stream"
    );
    drop(resumed);
    let mut resumed = Events::new(get(&c, &u, &session, &[("last-event-id", &post_priming)]).await);
    let replayed = resumed.until(Duration::from_secs(5), is_answer(3)).await;
    assert_eq!(replayed, post_events);
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_is_checked_on_get_and_delete_too() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    let (c, u) = (http(), url(&bridge));
    let session = open_session(&c, &u).await;
    let bad = [("mcp-protocol-version", "1999-01-01")];
    let r = c
        .get(&u)
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .header(bad[0].0, bad[0].1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "GET");
    let r = c
        .delete(&u)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &session)
        .header(bad[0].0, bad[0].1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "DELETE");
    // The refused DELETE ended nothing; with a good version both work.
    assert_eq!(get(&c, &u, &session, &[]).await.status(), StatusCode::OK);
    let r = c
        .delete(&u)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", VERSION)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_another_machine_is_replayed_there_once() {
    let bridge = start_bridge(&["--machine-id", "e7843201"], Auth::bearer(TOKEN.into())).await;
    let (c, u) = (http(), url(&bridge));
    let own = open_session(&c, &u).await;
    assert!(
        own.starts_with("e7843201-"),
        "session ids name the machine: {own}"
    );
    let other = "d8e6a1f0-00112233445566778899aabbccddeeff";
    for replayed in [false, true] {
        for method in ["POST", "GET", "DELETE"] {
            let mut r = c
                .request(method.parse().unwrap(), &u)
                .bearer_auth(TOKEN)
                .header("accept", ACCEPT)
                .header("mcp-session-id", other)
                .header("mcp-protocol-version", VERSION);
            if method == "POST" {
                r = r.json(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}));
            }
            if replayed {
                r = r.header("fly-replay-src", "instance=e7843201;region=iad;t=1");
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
            let replay = r
                .headers()
                .get("fly-replay")
                .map(|v| v.to_str().unwrap().to_string());
            if replayed {
                assert_eq!(
                    replay, None,
                    "{method}: a replayed request is never replayed again"
                );
            } else {
                assert_eq!(
                    replay.as_deref(),
                    Some("prefer_instance=d8e6a1f0"),
                    "{method}"
                );
            }
        }
    }
    // Unauthenticated requests learn nothing about where sessions live.
    let r = c
        .post(&u)
        .header("accept", ACCEPT)
        .header("mcp-session-id", other)
        .json(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("fly-replay").is_none());
    bridge.shutdown().await.unwrap();
}

async fn tool_text(c: &reqwest::Client, url: &str, session: &str, id: u64, tool: &str) -> String {
    let mut events = call(c, url, session, id, tool, json!({})).await;
    let answer = events.until(Duration::from_secs(10), is_answer(id)).await;
    let (_, answer) = answer.last().expect("an answer");
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Before the fix, a server request that found no stream waited in the backlog forever, and the tool that made
/// it hung until the request timeout (600 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_request_with_no_client_stream_waits_bounded_then_fails_instead_of_hanging() {
    let bridge = start_bridge(
        &["--server-request-wait-secs", "1"],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    let (c, u) = (http(), url(&bridge));

    // Positive control: with a GET stream open, the request reaches the client and its answer the server.
    let session = open_session(&c, &u).await;
    let mut stream = Events::new(get(&c, &u, &session, &[]).await);
    stream.next(Duration::from_secs(5)).await.expect("priming");
    assert_eq!(
        tool_text(&c, &u, &session, 2, "roots_later").await,
        "asking later"
    );
    let asked = stream
        .until(Duration::from_secs(5), |m| m["method"] == "roots/list")
        .await;
    let (_, request) = asked.last().expect("roots/list on the GET stream");
    assert_eq!(request["method"], "roots/list");
    let answered = c
        .post(&u)
        .bearer_auth(TOKEN)
        .header("accept", ACCEPT)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", VERSION)
        .json(&json!({"jsonrpc": "2.0", "id": request["id"], "result": {"roots": []}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), StatusCode::ACCEPTED);
    let outcome = settled_roots_outcome(&c, &u, &session, 10).await;
    assert_eq!(outcome, "0 roots");

    // No stream at all while the server asks: after the wait (1 s here) the server gets an error. The first look
    // comes once the bridge has logged that, since a look is a POST whose stream would carry the request; the
    // error then still has to reach the server, so the look repeats while it says pending.
    let session = open_session(&c, &u).await;
    assert_eq!(
        tool_text(&c, &u, &session, 2, "roots_later").await,
        "asking later"
    );
    let logs = logs();
    let expired = || {
        logs.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| {
                l["session"] == session.as_str()
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("server request found no client stream"))
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !expired() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server request never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = settled_roots_outcome(&c, &u, &session, 3).await;
    assert!(outcome.starts_with("roots failed"), "{outcome}");
    bridge.shutdown().await.unwrap();
}

/// What `roots_later_outcome` says once it no longer says pending (looked at up to 50 times, 100 ms apart), the
/// looks numbered from `first_id`.
async fn settled_roots_outcome(
    c: &reqwest::Client,
    u: &str,
    session: &str,
    first_id: u64,
) -> String {
    let mut outcome = String::new();
    for n in 0..50 {
        outcome = tool_text(c, u, session, first_id + n, "roots_later_outcome").await;
        if outcome != "<pending>" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outcome
}
