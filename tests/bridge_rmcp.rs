//! The bridge driven by the official Rust SDK (rmcp 3.11) as a real client, on every handshake revision and on
//! 2026-07-28, in front of the stdio test server. Every test asserts the negotiated protocol version.
#![allow(deprecated)] // logging and roots: what today's servers still use

#[path = "support/bridge_env.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mcpfly::bridge::auth::Auth;
use rmcp::model::{
    CallToolRequestParams, ClientConfig, ListRootsResult, LoggingMessageNotificationParam,
    ProgressNotificationParam, ProtocolVersion, Root,
};
use rmcp::service::{
    ClientLifecycleMode, ClientServiceExt, NotificationContext, RequestContext, RoleClient,
    RunningService,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ErrorData};
use serde_json::json;
use support::*;

#[derive(Clone, Default)]
struct Counting {
    progress: Arc<AtomicUsize>,
    logs: Arc<AtomicUsize>,
    list_changed: Arc<AtomicUsize>,
    version: Option<ProtocolVersion>,
}

impl ClientHandler for Counting {
    fn get_info(&self) -> ClientConfig {
        let mut info = ClientConfig::default();
        if let Some(v) = &self.version {
            info.protocol_version = v.clone();
        }
        info.client_info.name = "bridge-test".into();
        info
    }
    async fn on_progress(&self, _: ProgressNotificationParam, _: NotificationContext<RoleClient>) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }
    async fn on_logging_message(
        &self,
        _: LoggingMessageNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.logs.fetch_add(1, Ordering::SeqCst);
    }
    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.list_changed.fetch_add(1, Ordering::SeqCst);
    }
    async fn list_roots(
        &self,
        _: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, ErrorData> {
        Ok(ListRootsResult::new(vec![
            Root::new("file:///a"),
            Root::new("file:///b"),
        ]))
    }
}

async fn connect(
    url: &str,
    handler: Counting,
    lifecycle: ClientLifecycleMode,
) -> RunningService<RoleClient, Counting> {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string()).auth_header(TOKEN);
    let transport = StreamableHttpClientTransport::from_config(config);
    handler
        .serve_with_lifecycle(transport, lifecycle)
        .await
        .expect("client connects")
}

fn negotiated(client: &RunningService<RoleClient, Counting>) -> String {
    client
        .peer_info()
        .expect("peer info")
        .protocol_version
        .to_string()
}

async fn call_text(
    client: &RunningService<RoleClient, Counting>,
    tool: &str,
    args: serde_json::Value,
) -> String {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Some(obj) = args.as_object() {
        params = params.with_arguments(obj.clone());
    }
    let result = client.call_tool(params).await.expect("tools/call");
    let value = serde_json::to_value(&result).unwrap();
    value["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_revisions_with_rmcp() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    for version in [
        ProtocolVersion::V_2025_11_25,
        ProtocolVersion::V_2025_06_18,
        ProtocolVersion::V_2025_03_26,
        ProtocolVersion::V_2024_11_05,
    ] {
        let handler = Counting {
            version: Some(version.clone()),
            ..Default::default()
        };
        let client = connect(
            &url(&bridge),
            handler.clone(),
            ClientLifecycleMode::Initialize,
        )
        .await;
        assert_eq!(
            negotiated(&client),
            version.to_string(),
            "negotiated version"
        );
        eprintln!("rmcp Initialize mode negotiated {}", negotiated(&client));

        let tools: Vec<String> = client
            .list_all_tools()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        for expected in ["echo", "add", "slow", "announce", "roots"] {
            assert!(
                tools.iter().any(|t| t == expected),
                "{expected} in {tools:?}"
            );
        }
        assert_eq!(
            call_text(&client, "echo", json!({"text": "hello"})).await,
            "hello"
        );
        assert_eq!(
            call_text(&client, "add", json!({"a": 2, "b": 40})).await,
            "42"
        );

        // Progress from a long call, relayed on the POST's SSE stream.
        let text = call_text(&client, "slow", json!({"steps": 3, "delay_ms": 30})).await;
        assert_eq!(text, "done after 3 steps");
        eventually("progress notifications", || {
            handler.progress.load(Ordering::SeqCst) >= 3
        })
        .await;

        // Server notifications sent on the child's own (log, list_changed): relayed over SSE.
        assert_eq!(call_text(&client, "announce", json!({})).await, "announced");
        eventually("log notification", || {
            handler.logs.load(Ordering::SeqCst) >= 1
        })
        .await;
        eventually("list_changed", || {
            handler.list_changed.load(Ordering::SeqCst) >= 1
        })
        .await;

        // A server-to-client request (roots/list) answered by the client through the bridge.
        assert_eq!(call_text(&client, "roots", json!({})).await, "2 roots");

        // Session end: closing the client DELETEs the session and the bridge stops its child.
        let pid: u32 = call_text(&client, "pid", json!({})).await.parse().unwrap();
        assert!(pid_alive(pid));
        client.cancel().await.unwrap();
        eventually("the session's child to exit", || !pid_alive(pid)).await;
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_envelope_with_rmcp_discover_and_auto() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    for lifecycle in [
        ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        },
        ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: Some(ProtocolVersion::V_2025_11_25),
        },
    ] {
        let handler = Counting::default();
        let client = connect(&url(&bridge), handler.clone(), lifecycle).await;
        assert_eq!(negotiated(&client), "2026-07-28");
        eprintln!("rmcp discover/auto negotiated {}", negotiated(&client));
        let info = client.peer_info().unwrap();
        assert_eq!(info.server_info.as_ref().unwrap().name, "rmcp");
        assert_eq!(
            info.instructions.as_deref(),
            Some("mcpfly bridge test server")
        );
        let tools = client.list_all_tools().await.unwrap();
        assert!(tools.iter().any(|t| t.name == "echo"));
        assert_eq!(
            call_text(&client, "echo", json!({"text": "modern"})).await,
            "modern"
        );
        let text = call_text(&client, "slow", json!({"steps": 3, "delay_ms": 30})).await;
        assert_eq!(text, "done after 3 steps");
        eventually("progress on the modern stream", || {
            handler.progress.load(Ordering::SeqCst) >= 3
        })
        .await;
        client.cancel().await.unwrap();
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_clients_get_their_own_answers() {
    let bridge = start_bridge(
        &[
            "--max-sessions",
            "40",
            "--rate-per-client",
            "0",
            "--rate-per-token",
            "0",
        ],
        Auth::bearer(TOKEN.into()),
    )
    .await;
    wait_ready(&bridge).await;
    let url = url(&bridge);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // Half handshake sessions (own child each), half modern (shared child, id remapping).
            let lifecycle = if i % 2 == 0 {
                ClientLifecycleMode::Initialize
            } else {
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                }
            };
            let client = connect(&url, Counting::default(), lifecycle).await;
            let expected_version = if i % 2 == 0 {
                "2025-11-25"
            } else {
                "2026-07-28"
            };
            assert_eq!(negotiated(&client), expected_version);
            for round in 0..5 {
                let text = format!("client-{i}-round-{round}");
                assert_eq!(
                    call_text(&client, "echo", json!({"text": text})).await,
                    text
                );
                assert_eq!(
                    call_text(&client, "add", json!({"a": i, "b": round * 1000})).await,
                    (i + round * 1000).to_string()
                );
            }
            if i % 2 == 0 {
                // Per-session state stays in the session's own child.
                let mine = format!("secret-of-{i}");
                call_text(&client, "remember", json!({"value": mine})).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(call_text(&client, "recall", json!({})).await, mine);
            }
            client.cancel().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_server_info_and_rejects_a_wrong_token() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&bridge).await;
    let info = mcpfly::bridge::verify(&url(&bridge), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(info.protocol_version, "2026-07-28");
    assert_eq!(info.name, "rmcp");
    assert!(info.tools.contains(&"echo".to_string()), "{:?}", info.tools);
    let denied = mcpfly::bridge::verify(&url(&bridge), Some("wrong"))
        .await
        .unwrap_err();
    assert!(
        matches!(denied, mcpfly::bridge::VerifyError::Unauthorized),
        "{denied:?}"
    );
    bridge.shutdown().await.unwrap();
}

/// The controller's proof that an endpoint requires its token (issue 15): an unauthenticated `initialize` is
/// refused by a bearer endpoint and answered by an open one, which the controller reports as
/// `Verified=False`, `EndpointUnauthenticated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_probe_tells_a_protected_endpoint_from_an_open_one() {
    let protected = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    wait_ready(&protected).await;
    assert_eq!(
        mcpfly::bridge::unauthenticated_status(&url(&protected))
            .await
            .unwrap(),
        401
    );
    protected.shutdown().await.unwrap();

    let open = start_bridge(&[], Auth::disabled()).await;
    wait_ready(&open).await;
    assert_eq!(
        mcpfly::bridge::unauthenticated_status(&url(&open))
            .await
            .unwrap(),
        200
    );
    open.shutdown().await.unwrap();
}
