//! One audit line per request on the `mcpfly::audit` tracing target. It records who did what and how it went,
//! never arguments or results: the fields are fixed here, and no JSON-RPC body reaches them.

use std::time::Instant;

pub const TARGET: &str = "mcpfly::audit";

/// Filled in as a request is handled; logged once when the response is ready (for a stream: when its head is).
pub struct AuditRecord {
    start: Instant,
    pub http_method: &'static str,
    pub client: String,
    pub session: Option<String>,
    pub era: &'static str,
    pub protocol_version: Option<String>,
    pub method: Option<String>,
    pub tool: Option<String>,
    pub rpc_error: Option<i64>,
    pub note: Option<&'static str>,
}

impl AuditRecord {
    pub fn new(http_method: &'static str, client: String) -> Self {
        Self {
            start: Instant::now(),
            http_method,
            client,
            session: None,
            era: "-",
            protocol_version: None,
            method: None,
            tool: None,
            rpc_error: None,
            note: None,
        }
    }

    /// Method and tool name of a JSON-RPC message; the tool name only for `tools/call` (names, not arguments).
    pub fn describe(&mut self, message: &serde_json::Value) {
        self.method = message.get("method").and_then(|m| m.as_str()).map(short);
        if self.method.as_deref() == Some("tools/call") {
            self.tool = message
                .pointer("/params/name")
                .and_then(|n| n.as_str())
                .map(short);
        }
        if self.method.is_none() && message.get("id").is_some() {
            self.method = Some("(response)".into());
        }
    }

    pub fn emit(&self, status: u16) {
        tracing::info!(
            target: TARGET,
            time_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            http_method = self.http_method,
            session = self.session.as_deref().unwrap_or("-"),
            client = %self.client,
            era = self.era,
            protocol_version = self.protocol_version.as_deref().unwrap_or("-"),
            method = self.method.as_deref().unwrap_or("-"),
            tool = self.tool.as_deref().unwrap_or("-"),
            status,
            rpc_error = self.rpc_error.unwrap_or(0),
            note = self.note.unwrap_or("-"),
            latency_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "mcp request"
        );
    }
}

/// Method and tool names come from the client: cap them so a log line stays a line.
fn short(s: &str) -> String {
    s.chars().take(128).collect()
}
