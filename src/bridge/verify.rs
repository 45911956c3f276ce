//! The check the controller runs after a deployment is Ready: an MCP handshake and `tools/list` through the
//! public URL with the endpoint's bearer token, as a client in its default mode would do it (rmcp's `Auto`
//! lifecycle: `server/discover`, falling back to `initialize`).

use std::time::Duration;

use rmcp::model::{ClientConfig, ProtocolVersion};
use rmcp::service::{ClientInitializeError, ClientLifecycleMode, ClientServiceExt};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

/// What the handshake learned; recorded in the resource's `status.server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub name: String,
    pub version: String,
    pub protocol_version: String,
    pub tools: Vec<String>,
    /// The tools by digest, as clients of the endpoint see them.
    pub tool_set: crate::api::ToolSet,
}

/// Why verification failed. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the endpoint rejected the credentials (401/403)")]
    Unauthorized,
    #[error("MCP handshake with {url} failed: {message}")]
    Handshake { url: String, message: String },
    #[error("listing tools at {url} failed: {message}")]
    ListTools { url: String, message: String },
    #[error("OAuth discovery at {url} is not what auth: oauth needs: {message}")]
    OAuthDiscovery { url: String, message: String },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP status `url` answers to an MCP `initialize` sent without credentials. An endpoint that requires a
/// bearer token must refuse it with 401 or 403: nothing in front of an image source does it for the image.
pub async fn unauthenticated_status(url: &str) -> Result<u16, VerifyError> {
    let failed = |message: String| VerifyError::Handshake {
        url: url.to_string(),
        message,
    };
    let client = probe_client().map_err(failed)?;
    let response = unauthenticated_initialize(&client, url)
        .await
        .map_err(failed)?;
    Ok(response.status().as_u16())
}

/// A client for the checks made without credentials.
fn probe_client() -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| e.to_string())
}

/// An MCP `initialize` posted to `url` without credentials, as a client that has none yet sends it.
async fn unauthenticated_initialize(
    client: &reqwest::Client,
    url: &str,
) -> Result<reqwest::Response, String> {
    client
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize_request())
        .send()
        .await
        .map_err(|e| format!("unauthenticated probe: {e}"))
}

/// What an OAuth-mode endpoint showed a client without a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthEndpoint {
    /// Where its RFC 9728 metadata is, from the 401 challenge.
    pub metadata_url: String,
    pub authorization_servers: Vec<String>,
}

/// The check for `auth: oauth`, which has no token to handshake with: an MCP `initialize` without a token must
/// get 401 with a `WWW-Authenticate` challenge naming the resource metadata, and that document must name `url`
/// as its resource and `issuers` as its authorization servers — what Claude.ai or ChatGPT read first.
pub async fn verify_oauth(url: &str, issuers: &[String]) -> Result<OAuthEndpoint, VerifyError> {
    let failed = |message: String| VerifyError::OAuthDiscovery {
        url: url.to_string(),
        message,
    };
    let client = probe_client().map_err(failed)?;
    let response = unauthenticated_initialize(&client, url)
        .await
        .map_err(failed)?;
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if status != 401 {
        return Err(failed(format!(
            "an initialize without a token got HTTP {status}, not 401"
        )));
    }
    let metadata_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            failed(format!(
                "the 401 challenge names no resource_metadata: {challenge:?}"
            ))
        })?
        .to_string();
    let metadata: serde_json::Value = client
        .get(&metadata_url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| failed(format!("{metadata_url}: {e}")))?
        .json()
        .await
        .map_err(|e| failed(format!("{metadata_url}: {e}")))?;
    if metadata["resource"].as_str() != Some(url) {
        return Err(failed(format!(
            "{metadata_url} names resource {}, not {url}",
            metadata["resource"]
        )));
    }
    let authorization_servers: Vec<String> = metadata["authorization_servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    if authorization_servers != issuers {
        return Err(failed(format!(
            "{metadata_url} names authorization servers {authorization_servers:?}, not {issuers:?}"
        )));
    }
    Ok(OAuthEndpoint {
        metadata_url,
        authorization_servers,
    })
}

fn initialize_request() -> serde_json::Value {
    serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": ProtocolVersion::V_2025_11_25.to_string(),
            "capabilities": {},
            "clientInfo": {"name": "mcpfly-verify", "version": env!("CARGO_PKG_VERSION")},
        },
    })
}

/// Connects to `url` (e.g. `https://app.fly.dev/mcp`), handshakes, lists tools, and closes the session.
pub async fn verify(url: &str, token: Option<&str>) -> Result<ServerInfo, VerifyError> {
    // reqwest is built without a default crypto provider; install ring's if the process has none yet.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tokio::time::timeout(TIMEOUT, verify_inner(url, token)).await {
        Ok(result) => result,
        Err(_) => Err(VerifyError::Timeout {
            url: url.to_string(),
            timeout: TIMEOUT,
        }),
    }
}

async fn verify_inner(url: &str, token: Option<&str>) -> Result<ServerInfo, VerifyError> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    if let Some(token) = token {
        config = config.auth_header(token.to_string());
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    let mut info = ClientConfig::default();
    info.client_info.name = "mcpfly-verify".into();
    info.client_info.version = env!("CARGO_PKG_VERSION").into();
    let lifecycle = ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: Some(ProtocolVersion::V_2025_11_25),
    };
    let client = info
        .serve_with_lifecycle(transport, lifecycle)
        .await
        .map_err(|error| classify(url, error))?;
    let peer = client.peer_info();
    let protocol_version = peer
        .as_ref()
        .map(|i| i.protocol_version.to_string())
        .unwrap_or_default();
    let (name, version) = peer
        .as_ref()
        .and_then(|i| i.server_info.as_ref())
        .map(|s| (s.name.clone(), s.version.clone()))
        .unwrap_or_default();
    let tools = client
        .list_all_tools()
        .await
        .map_err(|error| VerifyError::ListTools {
            url: url.to_string(),
            message: error.to_string(),
        })?;
    let _ = client.cancel().await;
    let definitions: Vec<serde_json::Value> = tools
        .iter()
        .filter_map(|t| serde_json::to_value(t).ok())
        .collect();
    Ok(ServerInfo {
        name,
        version,
        protocol_version,
        tools: tools.into_iter().map(|t| t.name.to_string()).collect(),
        tool_set: super::tools_policy::tool_set(&definitions),
    })
}

fn classify(url: &str, error: ClientInitializeError) -> VerifyError {
    let message = error.to_string();
    let lower = message.to_ascii_lowercase();
    if lower.contains("401")
        || lower.contains("403")
        || lower.contains("unauthorized")
        || lower.contains("auth")
    {
        return VerifyError::Unauthorized;
    }
    VerifyError::Handshake {
        url: url.to_string(),
        message,
    }
}
