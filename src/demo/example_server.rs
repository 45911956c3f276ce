//! `mcpfly example-server`: the small stdio MCP server that ships in the mcpfly binary, so a deployment works
//! with no package registry at all. The runtime image runs it behind the bridge when a machine has no
//! `init.cmd` (`runtime/Dockerfile`'s CMD); `examples/offline.yaml` deploys it.

use std::borrow::Cow;

use rmcp::handler::server::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ProtocolVersion, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use sha2::{Digest, Sha256};

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
struct FingerprintArgs {
    /// Name of an environment variable delivered to this server (e.g. a sealed credential).
    name: String,
}

struct ExampleServer {
    #[allow(dead_code)]
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl ExampleServer {
    #[tool(description = "Return the text unchanged")]
    async fn echo(&self, Parameters(args): Parameters<EchoArgs>) -> String {
        args.text
    }

    #[tool(description = "Add two integers")]
    async fn add(&self, Parameters(args): Parameters<AddArgs>) -> String {
        args.a.saturating_add(args.b).to_string()
    }

    #[tool(
        description = "Show that a credential reached this server without revealing it: the first 8 hex digits \
                       of the SHA-256 of the named environment variable, or `unset`"
    )]
    async fn credential_fingerprint(
        &self,
        Parameters(args): Parameters<FingerprintArgs>,
    ) -> String {
        // The endpoint's own token is not a credential of the server: never fingerprint it.
        if args.name == crate::reconcile::desired::AUTH_TOKEN_SECRET {
            return "refused: the endpoint token is not exposed".into();
        }
        match std::env::var(&args.name) {
            Ok(value) => format!(
                "{}: set, sha256 {}",
                args.name,
                &hex::encode(Sha256::digest(value.as_bytes()))[..8]
            ),
            Err(_) => format!("{}: unset", args.name),
        }
    }
}

#[tool_handler]
impl ServerHandler for ExampleServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "mcpfly-example",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "mcpfly's built-in example server: echo, add, credential_fingerprint",
            )
    }

    /// The handshake revisions, like the npm and PyPI servers the bridge fronts.
    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Owned(vec![
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_03_26,
            ProtocolVersion::V_2024_11_05,
        ])
    }
}

/// Serves on stdin/stdout until stdin closes.
pub async fn run() -> anyhow::Result<()> {
    let server = ExampleServer {
        tool_router: ExampleServer::tool_router(),
    };
    let service = server.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
