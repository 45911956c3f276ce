#![allow(deprecated)] // logging and roots are what today's servers use; the bridge must relay them.
//! A small stdio MCP server for the bridge tests: it speaks only the handshake revisions (up to 2025-11-25),
//! like the npm and PyPI servers the bridge fronts, and offers tools that exercise each relay path:
//! plain results, a server notification, progress from a long call, a server-to-client request, and
//! per-process state so tests can tell children apart.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::handler::server::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam, ProtocolVersion,
    RequestMetaObject, ServerCapabilities, ServerConfig,
};
use rmcp::{Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Deserialize, JsonSchema)]
struct EchoArgs {
    /// Text returned as is.
    text: String,
}

#[derive(Deserialize, JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[derive(Deserialize, JsonSchema)]
struct SlowArgs {
    /// Number of progress steps.
    steps: u32,
    /// Delay between steps, in milliseconds.
    delay_ms: u64,
}

#[derive(Deserialize, JsonSchema)]
struct RememberArgs {
    value: String,
}

struct TestServer {
    tool_router: ToolRouter<Self>,
    /// Per-process state: a bridge that shared one child between sessions would leak it.
    remembered: Mutex<Option<String>>,
    /// What `roots_later`'s request got, once it got something.
    late_roots: Arc<Mutex<Option<String>>>,
}

#[tool_router]
impl TestServer {
    #[tool(description = "Return the text")]
    async fn echo(&self, Parameters(args): Parameters<EchoArgs>) -> String {
        args.text
    }

    #[tool(description = "Add two integers")]
    async fn add(&self, Parameters(args): Parameters<AddArgs>) -> String {
        (args.a + args.b).to_string()
    }

    #[tool(description = "Send a log notification and a tools/list_changed notification")]
    async fn announce(&self, peer: Peer<RoleServer>) -> String {
        let _ = peer
            .notify_logging_message(
                LoggingMessageNotificationParam::new(
                    LoggingLevel::Info,
                    serde_json::json!("announcement"),
                )
                .with_logger("test-server"),
            )
            .await;
        let _ = peer.notify_tool_list_changed().await;
        "announced".into()
    }

    #[tool(description = "A long call that reports progress")]
    async fn slow(
        &self,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
        Parameters(args): Parameters<SlowArgs>,
    ) -> String {
        for step in 1..=args.steps {
            tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
            if let Some(token) = meta.get_progress_token() {
                let _ = peer
                    .notify_progress(
                        ProgressNotificationParam::new(token, step as f64)
                            .with_total(args.steps as f64),
                    )
                    .await;
            }
        }
        format!("done after {} steps", args.steps)
    }

    #[tool(description = "Remember a value in this server process")]
    async fn remember(&self, Parameters(args): Parameters<RememberArgs>) -> String {
        *self.remembered.lock().unwrap() = Some(args.value.clone());
        args.value
    }

    #[tool(description = "Return the remembered value, or <none>")]
    async fn recall(&self) -> String {
        self.remembered
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "<none>".into())
    }

    #[tool(description = "Return this server process's id")]
    async fn pid(&self) -> String {
        std::process::id().to_string()
    }

    #[tool(description = "Ask the client for its roots (a server-to-client request)")]
    async fn roots(&self, peer: Peer<RoleServer>) -> String {
        match peer.list_roots().await {
            Ok(result) => format!("{} roots", result.roots.len()),
            Err(error) => format!("roots failed: {error}"),
        }
    }

    #[tool(
        description = "Answer now, then ask the client for its roots (a server request while no call is open)"
    )]
    async fn roots_later(&self, peer: Peer<RoleServer>) -> String {
        let late = self.late_roots.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let outcome = match peer.list_roots().await {
                Ok(result) => format!("{} roots", result.roots.len()),
                Err(error) => format!("roots failed: {error}"),
            };
            *late.lock().unwrap() = Some(outcome);
        });
        "asking later".into()
    }

    #[tool(description = "What roots_later's request got, or <pending>")]
    async fn roots_later_outcome(&self) -> String {
        self.late_roots
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "<pending>".into())
    }

    #[tool(description = "Exit the process (a crash, as the bridge sees it)")]
    async fn crash(&self) -> String {
        std::process::exit(3)
    }
}

// The instance's router (not a fresh `Self::tool_router()`), so a description set at startup is what is listed.
#[tool_handler(router = self.tool_router)]
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_logging()
                .build(),
        )
        .with_instructions("mcpfly bridge test server")
    }

    /// Handshake revisions only: the servers the bridge fronts do not speak 2026-07-28.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Owned(vec![
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_03_26,
            ProtocolVersion::V_2024_11_05,
        ])
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("MCP_TEST_SERVER_FAIL_START").is_some() {
        std::process::exit(2);
    }
    let mut tool_router = TestServer::tool_router();
    // Two "versions" of one server for the tool review tests: the same tools, echo's description changed.
    if let Ok(description) = std::env::var("MCP_TEST_SERVER_ECHO_DESCRIPTION") {
        tool_router
            .map
            .get_mut("echo")
            .expect("the echo tool")
            .attr
            .description = Some(description.into());
    }
    let server = TestServer {
        tool_router,
        remembered: Mutex::new(None),
        late_roots: Arc::default(),
    };
    let service = server.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
