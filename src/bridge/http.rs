//! The HTTP side, on axum rather than rmcp's `StreamableHttpService`: the bridge relays raw messages between
//! two eras and must own every status code and header (401 before any child work, 404 meaning "session gone"
//! in one era and "method not found" in the other, per-era 405s), which a typed server stack built to host a
//! handler in-process does not expose.
//!
//! Order of checks on the MCP path: Origin (403) → bearer token or OAuth access token (401/403/400) → rate limit
//! (429): per identity (the token, or the OAuth issuer and subject) for authenticated requests, per client address
//! for unauthenticated ones (auth off, or a missing or wrong token, which then gets 401 while under the limit) →
//! method → body limit (413) → the era's own rules; per-tool OAuth scopes once the body is read (403). Nothing
//! reaches a child before auth. Keying authenticated traffic on the identity rather than the address keeps a team behind
//! one NAT (or every user of a hosted client) from sharing one address's budget.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State as AxumState};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::affinity::{self, Affinity};
use super::audit::{AuditRecord, Auditor};
use super::auth::{Auth, Denied, Granted};
use super::child::{
    CHILD_PROTOCOL_VERSION, Child, ChildError, ChildSpec, HANDSHAKE_VERSIONS, error_response,
    is_response,
};
use super::input_required::{self, Caller, Exchange, HeldTable};
use super::modern::{self, Primary};
use super::ratelimit::{Limiter, Rate};
use super::session::Sessions;
use super::tools_policy::{Admission, ToolsPolicy};
use super::warm::{Warm, WarmPool};
use super::{BridgeArgs, SessionIsolation};

pub const SESSION_HEADER: &str = "mcp-session-id";
pub const VERSION_HEADER: &str = "mcp-protocol-version";

/// Settings the handlers read, copied from [`BridgeArgs`].
#[derive(Clone, Debug)]
pub struct Config {
    pub path: String,
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub client_ip_header: String,
    pub request_timeout: Duration,
    pub init_timeout: Duration,
    pub session_idle_timeout_secs: u64,
    pub isolation: SessionIsolation,
}

pub struct State {
    pub config: Config,
    pub auth: Auth,
    pub spec: ChildSpec,
    pub primary: Primary,
    pub sessions: Arc<Sessions>,
    pub warm: Arc<WarmPool>,
    pub audit: Auditor,
    /// 2026-07-28 requests waiting for their client's `inputResponses`.
    pub held: Arc<HeldTable>,
    pub affinity: Affinity,
    /// Set from `--tools-policy` by [`super::start`].
    pub tools: ToolsPolicy,
    per_token: Limiter,
    per_client: Limiter,
    shutdown: watch::Receiver<bool>,
}

impl State {
    pub fn new(
        args: &BridgeArgs,
        auth: Auth,
        spec: ChildSpec,
        primary: Primary,
        warm: Arc<WarmPool>,
        audit: Auditor,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let affinity = Affinity::new(args.machine_id.as_deref());
        Self {
            config: Config {
                path: args.path.clone(),
                allowed_origins: args
                    .allowed_origins
                    .iter()
                    .map(|o| o.trim_end_matches('/').to_string())
                    .collect(),
                max_body_bytes: args.max_body_bytes,
                client_ip_header: args.client_ip_header.to_ascii_lowercase(),
                request_timeout: Duration::from_secs(args.request_timeout_secs),
                init_timeout: Duration::from_secs(args.init_timeout_secs),
                session_idle_timeout_secs: args.session_idle_timeout_secs,
                isolation: args.session_isolation,
            },
            auth,
            spec,
            primary,
            sessions: Sessions::new(
                args.max_sessions,
                Duration::from_secs(args.server_request_wait_secs),
            ),
            warm,
            audit,
            held: HeldTable::new(
                Duration::from_secs(args.input_timeout_secs),
                affinity.machine(),
            ),
            affinity,
            tools: ToolsPolicy::default(),
            per_token: Limiter::new(Rate {
                per_minute: args.rate_per_token,
                burst: args.rate_token_burst,
            }),
            per_client: Limiter::new(Rate {
                per_minute: args.rate_per_client,
                burst: args.rate_burst,
            }),
            shutdown,
        }
    }

    /// Warm children the session limit leaves room for.
    pub fn warm_room(&self) -> usize {
        self.sessions.max().saturating_sub(self.sessions.len())
    }

    /// Brings the warm pool to its target in the background ([`WarmPool::refill`]).
    pub fn refill_warm(self: &Arc<Self>) {
        let state = Arc::downgrade(self);
        self.warm
            .refill(move || state.upgrade().map_or(0, |state| state.warm_room()));
    }
}

pub fn router(state: Arc<State>) -> Router {
    let path = state.config.path.clone();
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(&path, any(mcp));
    // Discovery only in OAuth mode: a client such as Cursor drops its configured bearer header once a server
    // answers it.
    if state.auth.oauth_server().is_some() {
        let metadata = "/.well-known/oauth-protected-resource";
        router = router.route(metadata, get(resource_metadata)).route(
            &format!("{metadata}{}", path.trim_end_matches('/')),
            get(resource_metadata),
        );
    }
    router.with_state(state)
}

/// 200 once the server answered `initialize` ([`Primary::healthy`]); 503 while it first starts or restarts.
async fn readyz(AxumState(state): AxumState<Arc<State>>) -> Response {
    if state.primary.healthy() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "MCP server not ready").into_response()
    }
}

/// Prometheus text: what an operator needs to see that no log line can say (a stalled log sink cannot report its
/// own shed lines). Beside `/healthz` and `/readyz`, outside the token like them, so Fly's checks and a scraper on
/// the internal port reach it; counts only: no identity, session id, tool name or argument.
async fn metrics(AxumState(state): AxumState<Arc<State>>) -> Response {
    let body = format!(
        "# HELP mcpfly_bridge_audit_lines_shed_total Audit lines dropped because the log sink fell behind.\n\
         # TYPE mcpfly_bridge_audit_lines_shed_total counter\n\
         mcpfly_bridge_audit_lines_shed_total {}\n\
         # HELP mcpfly_bridge_sessions Handshake-era sessions open.\n\
         # TYPE mcpfly_bridge_sessions gauge\n\
         mcpfly_bridge_sessions {}\n\
         # HELP mcpfly_bridge_warm_children Server processes started and waiting for a session.\n\
         # TYPE mcpfly_bridge_warm_children gauge\n\
         mcpfly_bridge_warm_children {}\n\
         # HELP mcpfly_bridge_warm_starts_total Server processes the warm pool has started.\n\
         # TYPE mcpfly_bridge_warm_starts_total counter\n\
         mcpfly_bridge_warm_starts_total {}\n",
        state.audit.shed(),
        state.sessions.len(),
        state.warm.len(),
        state.warm.started(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn mcp(
    AxumState(state): AxumState<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    // Until the handler answers (the whole call for a JSON answer): the warm pool starts nothing meanwhile.
    let _busy = state.warm.activity().begin();
    let client = client_address(&state.config, request.headers(), peer);
    let mut audit = AuditRecord::new(method_name(request.method()), client);
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let mut response = handle(&state, &mut audit, request).await;
    if let Some(origin) = origin.filter(|o| origin_allowed(&state.config, o)) {
        let h = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Mcp-Session-Id, WWW-Authenticate, Retry-After"),
        );
    }
    state.audit.submit(audit.finish(response.status().as_u16()));
    response
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn client_address(config: &Config, headers: &HeaderMap, peer: SocketAddr) -> String {
    if !config.client_ip_header.is_empty()
        && let Some(ip) = headers
            .get(config.client_ip_header.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
    {
        return ip.to_string();
    }
    peer.ip().to_string()
}

fn origin_allowed(config: &Config, origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    config
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o == origin)
}

async fn handle(state: &Arc<State>, audit: &mut AuditRecord, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    // DNS rebinding: a browser page on another origin must not reach the server (2025-11-25: 403).
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .is_ok_and(|o| origin_allowed(&state.config, o));
        if !ok {
            audit.note = Some("origin rejected");
            return plain(StatusCode::FORBIDDEN, "Origin not allowed");
        }
    }
    if parts.method == Method::OPTIONS {
        return preflight(&headers);
    }
    let granted = match state.auth.authorize(&headers, parts.uri.query()).await {
        Ok(granted) => granted,
        Err(denied) => {
            // Failed attempts count against the address, so guessing tokens is throttled too.
            if let Err(retry) = state.per_client.check(&audit.client) {
                audit.note = Some("rate limited (client)");
                return too_many(retry);
            }
            return refuse(state, audit, &denied);
        }
    };
    audit.subject = granted.principal.as_ref().map(|p| p.subject.clone());
    if let Some(limited) = rate_refusal(state, audit, &granted) {
        return limited;
    }
    let session_id = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    audit.session = session_id.clone();
    match parts.method {
        Method::POST => {
            let body = match axum::body::to_bytes(body, state.config.max_body_bytes).await {
                Ok(body) => body,
                Err(_) => {
                    audit.note = Some("body too large");
                    return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
                }
            };
            post(state, audit, &granted, &headers, session_id, &body).await
        }
        Method::GET => get_stream(state, audit, &headers, session_id),
        Method::DELETE => delete(state, audit, &headers, session_id).await,
        _ => {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            response
        }
    }
}

/// Counts one request against the caller's rate: per token when authenticated, else per address; the 429 when
/// over.
fn rate_refusal(state: &State, audit: &mut AuditRecord, granted: &Granted) -> Option<Response> {
    let limited = match &granted.identity {
        Some(identity) => state
            .per_token
            .check(identity)
            .map_err(|retry| ("rate limited (token)", retry)),
        None => state
            .per_client
            .check(&audit.client)
            .map_err(|retry| ("rate limited (client)", retry)),
    };
    limited.err().map(|(note, retry)| {
        audit.note = Some(note);
        too_many(retry)
    })
}

/// A refused credential: its status and the mode's `WWW-Authenticate` challenge; nothing reached a child.
fn refuse(state: &State, audit: &mut AuditRecord, denied: &Denied) -> Response {
    audit.note = Some(denied.note());
    let mut response = (denied.status(), denied.note().to_string()).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, state.auth.challenge(denied));
    response
}

/// RFC 9728 Protected Resource Metadata (OAuth mode only); public, so any origin may read it.
async fn resource_metadata(AxumState(state): AxumState<Arc<State>>) -> Response {
    let Some(server) = state.auth.oauth_server() else {
        return plain(StatusCode::NOT_FOUND, "Not Found");
    };
    let mut response = json_response(200, &server.config.metadata());
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

fn preflight(headers: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_static(
                "authorization, content-type, accept, mcp-session-id, mcp-protocol-version, mcp-method, mcp-name, last-event-id",
            )
        });
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

fn too_many(retry: Duration) -> Response {
    let mut response = plain(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    let secs = retry.as_secs_f64().ceil().max(1.0) as u64;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        body.to_string(),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn rpc_error(
    audit: &mut AuditRecord,
    status: u16,
    id: Value,
    code: i64,
    message: &str,
) -> Response {
    audit.rpc_error = Some(code);
    json_response(status, &error_response(id, code, message))
}

fn accepts(headers: &HeaderMap, kind: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            let v = v.trim();
            v.starts_with(kind) || v.starts_with("*/*")
        })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn post(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    granted: &Granted,
    headers: &HeaderMap,
    session_id: Option<String>,
    body: &[u8],
) -> Response {
    let json_content = header_str(headers, header::CONTENT_TYPE.as_str()).is_some_and(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/json")
    });
    if !json_content {
        audit.note = Some("content-type");
        return rpc_error(
            audit,
            400,
            Value::Null,
            -32600,
            "Content-Type must be application/json",
        );
    }
    let message: Value = match serde_json::from_slice(body) {
        Ok(message) => message,
        Err(_) => return rpc_error(audit, 400, Value::Null, -32700, "Parse error"),
    };
    if let Value::Array(batch) = message {
        audit.note = Some("batch");
        return post_batch(state, audit, granted, headers, session_id, batch).await;
    }
    if !message.is_object() {
        return rpc_error(audit, 400, Value::Null, -32600, "Invalid Request");
    }
    audit.describe(&message);
    if let Err(denied) = state.auth.allows(granted, &message) {
        return refuse(state, audit, &denied);
    }
    if modern::is_modern(headers, &message) {
        audit.era = "2026-07-28";
        audit.protocol_version = Some(modern::MODERN_VERSION.into());
        return modern_post(state, audit, headers, message).await;
    }
    audit.era = "handshake";
    if !(accepts(headers, "application/json") && accepts(headers, "text/event-stream")) {
        audit.note = Some("accept");
        return plain(
            StatusCode::NOT_ACCEPTABLE,
            "Accept must list application/json and text/event-stream",
        );
    }
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = message.get("id").cloned();
    if method.as_deref() == Some("initialize") && id.is_some() {
        return initialize(state, audit, message).await;
    }
    let Some(session_id) = session_id else {
        audit.note = Some("no session");
        return rpc_error(
            audit,
            400,
            id.unwrap_or(Value::Null),
            -32600,
            "Mcp-Session-Id header is required",
        );
    };
    if let Some(replay) = replay_elsewhere(state, audit, headers, &session_id) {
        return replay;
    }
    let Some(session) = state.sessions.get(&session_id) else {
        audit.note = Some("unknown session");
        return rpc_error(
            audit,
            404,
            id.unwrap_or(Value::Null),
            -32001,
            "Session not found",
        );
    };
    audit.protocol_version = Some(session.protocol_version.clone());
    if let Some(rejected) = unsupported_version(audit, headers, id.clone().unwrap_or(Value::Null)) {
        return rejected;
    }
    let (Some(method), Some(id)) = (method, id) else {
        return match forward_from_client(&session, message) {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(_) => rpc_error(audit, 404, Value::Null, -32001, "Session not found"),
        };
    };
    let mut message = message;
    if let Some(answer) = answered_at_bridge(state, &session, &mut message, &method, &id).await {
        return json_response(200, &answer);
    }
    let lists_tools = method == "tools/list";
    let handle = match session.child.request(message, Some(&session.id)) {
        Ok(handle) => handle,
        Err(_) => return rpc_error(audit, 404, id, -32001, "Session not found"),
    };
    // The request's own progress and response, plus what the child sends on its own while no GET stream is open
    // (this stream is then its fallback target). Disconnecting is not cancellation here: anything left goes to the
    // session's GET stream (or backlog).
    let (tx, mut rx) = mpsc::unbounded_channel();
    let registration = session.register_post(tx.clone());
    let child = session.child.clone();
    let relay_session = session.clone();
    let bridge_id = handle.bridge_id;
    let timeout = state.config.request_timeout;
    let list_state = state.clone();
    tokio::spawn(async move {
        let mut own = handle.rx;
        let result = tokio::time::timeout(timeout, async {
            while let Some(mut m) = own.recv().await {
                let last = is_response(&m);
                if last && lists_tools {
                    list_state.tools.rewrite_list(&mut m);
                }
                if let Err(mpsc::error::SendError(m)) = tx.send(m) {
                    relay_session.deliver(m);
                }
                if last {
                    return;
                }
            }
        })
        .await;
        if result.is_err() {
            child.cancel(bridge_id, "request timed out at the bridge");
            let _ = tx.send(error_response(id, -32603, "request timed out"));
        }
    });
    // JSON unless a stream is needed: the answer is plain JSON when the response is the first thing to send, and
    // becomes SSE only when progress or a message from the server comes first.
    let mut shutdown = state.shutdown.clone();
    let first = tokio::select! {
        m = rx.recv() => m,
        _ = modern::until_shutdown(&mut shutdown) => None,
    };
    let Some(first) = first else {
        return rpc_error(
            audit,
            503,
            Value::Null,
            -32603,
            "the bridge is shutting down",
        );
    };
    if is_response(&first) {
        // Whatever was routed here besides the answer goes back to the session.
        session.reclaim(registration, &mut rx);
        audit.rpc_error = first.pointer("/error/code").and_then(Value::as_i64);
        return json_response(200, &first);
    }
    let priming = session.protocol_version.as_str() >= "2025-11-25";
    sse(
        Some(first),
        rx,
        Some(session),
        priming,
        state.shutdown.clone(),
        Some(registration),
        None,
    )
}

/// A notification or a response (to a request the child made) from the session's client, passed to the child. A
/// shared child is not told one client's notifications (it was initialized once, by the bridge), except
/// cancellation.
fn forward_from_client(
    session: &super::session::Session,
    message: Value,
) -> Result<(), ChildError> {
    let forward = session.owns_child
        || message.get("method").and_then(Value::as_str) == Some("notifications/cancelled");
    if !forward {
        return Ok(());
    }
    session.child.send_from_client(message, &session.id)
}

/// The answer to a request that the bridge gives itself instead of the child: the tool policy's refusal, or a
/// shared child's `logging/setLevel` (one client must not change the level every other client gets).
async fn answered_at_bridge(
    state: &State,
    session: &super::session::Session,
    message: &mut Value,
    method: &str,
    id: &Value,
) -> Option<Value> {
    if !session.owns_child && method == "logging/setLevel" {
        return Some(json!({"jsonrpc": "2.0", "id": id, "result": {}}));
    }
    match state.tools.admit(message, &session.child).await {
        Admission::Answer(answer) => Some(answer),
        _ => None,
    }
}

/// A JSON-RPC batch: accepted only in a session negotiated at 2025-03-26, the one revision that has them (later
/// ones removed batching: 400). Every member passes the same checks as a lone message — authorization, rate (one
/// charge per request beyond the HTTP request's own), tool policy — and all are checked before any reaches the
/// child, so a refused batch changes nothing. Only notifications and responses → 202; else the responses as one
/// JSON array, while what the server sends meanwhile goes to the session's GET stream (or waits for one).
async fn post_batch(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    granted: &Granted,
    headers: &HeaderMap,
    session_id: Option<String>,
    batch: Vec<Value>,
) -> Response {
    if batch.is_empty() || !batch.iter().all(Value::is_object) {
        return rpc_error(audit, 400, Value::Null, -32600, "Invalid Request");
    }
    if !(accepts(headers, "application/json") && accepts(headers, "text/event-stream")) {
        audit.note = Some("accept");
        return plain(
            StatusCode::NOT_ACCEPTABLE,
            "Accept must list application/json and text/event-stream",
        );
    }
    let Some(session_id) = session_id else {
        return rpc_error(
            audit,
            400,
            Value::Null,
            -32600,
            "JSON-RPC batches are accepted only in a 2025-03-26 session (Mcp-Session-Id is required)",
        );
    };
    if let Some(replay) = replay_elsewhere(state, audit, headers, &session_id) {
        return replay;
    }
    let Some(session) = state.sessions.get(&session_id) else {
        audit.note = Some("unknown session");
        return rpc_error(audit, 404, Value::Null, -32001, "Session not found");
    };
    audit.era = "handshake";
    audit.protocol_version = Some(session.protocol_version.clone());
    if let Some(rejected) = unsupported_version(audit, headers, Value::Null) {
        return rejected;
    }
    if session.protocol_version != "2025-03-26" {
        return rpc_error(
            audit,
            400,
            Value::Null,
            -32600,
            "JSON-RPC batches are not supported after protocol version 2025-03-26; send one message per POST",
        );
    }
    let is_request = |m: &Value| m.get("method").is_some() && m.get("id").is_some();
    if batch
        .iter()
        .any(|m| m.get("method").and_then(Value::as_str) == Some("initialize"))
    {
        return rpc_error(
            audit,
            400,
            Value::Null,
            -32600,
            "initialize must not be part of a JSON-RPC batch",
        );
    }
    for message in &batch {
        if let Err(denied) = state.auth.allows(granted, message) {
            return refuse(state, audit, &denied);
        }
    }
    for _ in batch.iter().filter(|m| is_request(m)).skip(1) {
        if let Some(limited) = rate_refusal(state, audit, granted) {
            return limited;
        }
    }
    let mut requests = Vec::new();
    for message in batch {
        if !is_request(&message) {
            if forward_from_client(&session, message).is_err() {
                return rpc_error(audit, 404, Value::Null, -32001, "Session not found");
            }
            continue;
        }
        requests.push(message);
    }
    if requests.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let calls = requests.into_iter().map(|mut message| {
        let (state, session) = (state.clone(), session.clone());
        async move {
            let method = message["method"].as_str().unwrap_or_default().to_string();
            let id = message["id"].clone();
            if let Some(answer) =
                answered_at_bridge(&state, &session, &mut message, &method, &id).await
            {
                return answer;
            }
            let Ok(mut handle) = session.child.request(message, Some(&session.id)) else {
                return error_response(id, -32001, "Session not found");
            };
            let answer = tokio::time::timeout(state.config.request_timeout, async {
                while let Some(mut m) = handle.rx.recv().await {
                    if !is_response(&m) {
                        session.deliver(m);
                        continue;
                    }
                    if method == "tools/list" {
                        state.tools.rewrite_list(&mut m);
                    }
                    return Some(m);
                }
                None
            })
            .await;
            match answer {
                Ok(Some(answer)) => answer,
                // The client cancelled it: a cancelled request is not answered, so it has no entry here.
                Ok(None) => Value::Null,
                Err(_) => {
                    session
                        .child
                        .cancel(handle.bridge_id, "request timed out at the bridge");
                    error_response(id, -32603, "request timed out")
                }
            }
        }
    });
    let answers: Vec<Value> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|a| !a.is_null())
        .collect();
    json_response(200, &Value::Array(answers))
}

/// Starts a session: a child of its own (warm if one is, else started now) with the client's `initialize`
/// forwarded to it (version capped at the newest handshake revision), or with `--session-isolation shared` the
/// shared child, answered from its cached `InitializeResult`; and `Mcp-Session-Id` on the answer.
async fn initialize(state: &Arc<State>, audit: &mut AuditRecord, mut message: Value) -> Response {
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    if state.sessions.has_room().is_err() {
        audit.note = Some("too many sessions");
        let mut response = rpc_error(audit, 503, id, -32603, "too many sessions; try again later");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5));
        return response;
    }
    let requested = message
        .pointer("/params/protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or(CHILD_PROTOCOL_VERSION)
        .to_string();
    if requested.as_str() > CHILD_PROTOCOL_VERSION {
        message["params"]["protocolVersion"] = json!(CHILD_PROTOCOL_VERSION);
    }
    if state.config.isolation == SessionIsolation::Shared {
        return initialize_shared(state, audit, id, &requested).await;
    }
    let spawned = match state.warm.take() {
        Some(warm) => {
            audit.note = Some("warm");
            Ok(warm)
        }
        None => Warm::spawn(&state.spec),
    };
    // Refilled once requests pause, within what the session limit leaves then.
    state.refill_warm();
    let Warm {
        child,
        unsolicited,
        spawned,
    } = match spawned {
        Ok(spawned) => spawned,
        Err(error) => {
            tracing::error!(%error, "cannot start a session's MCP server");
            return rpc_error(audit, 500, id, -32603, "cannot start the MCP server");
        }
    };
    let answer = tokio::time::timeout(state.config.init_timeout, async {
        let mut handle = child.request(message, None).ok()?;
        while let Some(m) = handle.rx.recv().await {
            if is_response(&m) {
                return Some(m);
            }
        }
        None
    })
    .await;
    let response = match answer {
        Ok(Some(response)) => {
            state.warm.answered(spawned);
            response
        }
        Ok(None) | Err(_) => {
            child.shutdown(Duration::from_secs(2)).await;
            return rpc_error(
                audit,
                500,
                id,
                -32603,
                "the MCP server did not answer initialize",
            );
        }
    };
    let Some(version) = response
        .pointer("/result/protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        // The server refused: pass its error on and drop the child.
        audit.rpc_error = response.pointer("/error/code").and_then(Value::as_i64);
        child.shutdown(Duration::from_secs(2)).await;
        return json_response(200, &response);
    };
    let session = state.sessions.insert(
        state.affinity.new_session_id(),
        child,
        Some(unsolicited),
        version.clone(),
    );
    session_started(audit, &session, &response)
}

/// A session on the shared child: nothing is started; the answer is the shared child's `InitializeResult` at the
/// version the client asked for when the bridge speaks it (the child itself was initialized at the newest).
async fn initialize_shared(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    id: Value,
    requested: &str,
) -> Response {
    let Some(ready) = state.primary.wait_ready(state.config.init_timeout).await else {
        audit.note = Some("not ready");
        return rpc_error(audit, 503, id, -32603, "the MCP server is not ready");
    };
    let version = if HANDSHAKE_VERSIONS.contains(&requested) {
        requested
    } else {
        CHILD_PROTOCOL_VERSION
    };
    let mut result = ready.init.clone();
    result["protocolVersion"] = json!(version);
    let session = state.sessions.insert(
        state.affinity.new_session_id(),
        ready.child,
        None,
        version.to_string(),
    );
    session_started(
        audit,
        &session,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
    )
}

fn session_started(
    audit: &mut AuditRecord,
    session: &super::session::Session,
    response: &Value,
) -> Response {
    audit.session = Some(session.id.clone());
    audit.protocol_version = Some(session.protocol_version.clone());
    let mut http_response = json_response(200, response);
    http_response.headers_mut().insert(
        SESSION_HEADER,
        HeaderValue::from_str(&session.id).expect("session ids are ASCII letters, digits and -"),
    );
    http_response
}

fn get_stream(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    headers: &HeaderMap,
    session_id: Option<String>,
) -> Response {
    if !accepts(headers, "text/event-stream") {
        audit.note = Some("accept");
        return plain(
            StatusCode::NOT_ACCEPTABLE,
            "Accept must list text/event-stream",
        );
    }
    let Some(session_id) = session_id else {
        return no_session(audit, headers);
    };
    audit.era = "handshake";
    audit.method = Some("(get stream)".into());
    if let Some(replay) = replay_elsewhere(state, audit, headers, &session_id) {
        return replay;
    }
    let Some(session) = state.sessions.get(&session_id) else {
        audit.note = Some("unknown session");
        return plain(StatusCode::NOT_FOUND, "Session not found");
    };
    audit.protocol_version = Some(session.protocol_version.clone());
    if let Some(rejected) = unsupported_version(audit, headers, Value::Null) {
        return rejected;
    }
    // Resumption: what the client missed of the stream its `Last-Event-ID` names comes first. The resumed GET
    // then carries on as the session's GET stream (for a POST stream too: the rest of that request's messages
    // reach the session's GET stream once the POST stream is gone).
    let missed = header_str(headers, "last-event-id").and_then(|id| session.missed(id));
    let replayed: Vec<Event> = missed
        .iter()
        .flat_map(|(_, events)| events)
        .map(|(id, message)| message_event(message).id(id.clone()))
        .collect();
    let resumed_get = missed
        .as_ref()
        .is_some_and(|(stream, _)| *stream == super::session::GET_STREAM);
    if missed.is_some() {
        audit.note = Some("resumed");
    }
    let Some((rx, claim)) = session.open_get(resumed_get) else {
        if missed.is_some() {
            // A POST stream resumed while the GET stream is open: what it missed, then the end.
            return sse_response(futures::stream::iter(
                replayed.into_iter().map(Ok::<Event, Infallible>),
            ));
        }
        audit.note = Some("second GET stream");
        return plain(
            StatusCode::CONFLICT,
            "a GET stream is already open for this session",
        );
    };
    // No priming event on a resumed stream: the client already has an event id to resume from.
    let priming = missed.is_none() && session.protocol_version.as_str() >= "2025-11-25";
    let live = sse_events(
        None,
        rx,
        Some(session),
        priming,
        state.shutdown.clone(),
        Some(claim),
        None,
    );
    sse_response(
        futures::stream::iter(replayed.into_iter().map(Ok::<Event, Infallible>)).chain(live),
    )
}

/// `MCP-Protocol-Version`, when present, must be a handshake revision the bridge speaks (400 otherwise), on
/// every handshake-era request: POST, GET and DELETE.
fn unsupported_version(
    audit: &mut AuditRecord,
    headers: &HeaderMap,
    id: Value,
) -> Option<Response> {
    let version = header_str(headers, VERSION_HEADER)?;
    if HANDSHAKE_VERSIONS.contains(&version) {
        return None;
    }
    audit.note = Some("protocol version header");
    Some(rpc_error(
        audit,
        400,
        id,
        -32600,
        "Unsupported MCP-Protocol-Version",
    ))
}

/// A session of another machine: 404 with `fly-replay`, which Fly's proxy consumes and replays the request to
/// that machine (see [`affinity`]); where nothing acts on it, the client sees "session gone".
fn replay_elsewhere(
    state: &State,
    audit: &mut AuditRecord,
    headers: &HeaderMap,
    session_id: &str,
) -> Option<Response> {
    let machine = state.affinity.replay_target(headers, session_id)?;
    audit.note = Some("replayed to its machine");
    let mut response = plain(StatusCode::NOT_FOUND, "Session not found on this machine");
    response
        .headers_mut()
        .insert(affinity::REPLAY, affinity::replay_header(machine));
    Some(response)
}

/// Without a session id: the modern era has no GET/DELETE (405, `Allow: POST`); the handshake era needs one (400).
fn no_session(audit: &mut AuditRecord, headers: &HeaderMap) -> Response {
    if header_str(headers, VERSION_HEADER) == Some(modern::MODERN_VERSION) {
        audit.era = "2026-07-28";
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "2026-07-28 serves POST only",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    audit.note = Some("no session");
    plain(StatusCode::BAD_REQUEST, "Mcp-Session-Id header is required")
}

async fn delete(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    headers: &HeaderMap,
    session_id: Option<String>,
) -> Response {
    let Some(session_id) = session_id else {
        return no_session(audit, headers);
    };
    audit.era = "handshake";
    audit.method = Some("(end session)".into());
    if let Some(replay) = replay_elsewhere(state, audit, headers, &session_id) {
        return replay;
    }
    if let Some(rejected) = unsupported_version(audit, headers, Value::Null) {
        return rejected;
    }
    if state
        .sessions
        .end(&session_id, Duration::from_secs(3))
        .await
    {
        StatusCode::OK.into_response()
    } else {
        audit.note = Some("unknown session");
        plain(StatusCode::NOT_FOUND, "Session not found")
    }
}

/// Sends `notifications/cancelled` to the shared child when a modern response is dropped before its answer
/// (2026-07-28: closing the stream is cancellation).
struct CancelOnDrop {
    child: Arc<Child>,
    bridge_id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.child.cancel(self.bridge_id, "client disconnected");
        }
    }
}

async fn modern_post(
    state: &Arc<State>,
    audit: &mut AuditRecord,
    headers: &HeaderMap,
    message: Value,
) -> Response {
    let id = message.get("id").cloned();
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (Some(method), Some(id)) = (method, id) else {
        if message.get("method").is_some() {
            // Notifications carry nothing a stateless, handshake-era child can use (cancellation is closing
            // the stream); accepted and dropped.
            return StatusCode::ACCEPTED.into_response();
        }
        return rpc_error(
            audit,
            400,
            Value::Null,
            modern::INVALID_REQUEST,
            "a response is not a request",
        );
    };
    if let Err(rejection) = modern::validate(headers, &message) {
        return modern_rejection(audit, &rejection, id);
    }
    if modern::not_served(&method) {
        return rpc_error(audit, 404, id, modern::METHOD_NOT_FOUND, "Method not found");
    }
    // What the server said when it last answered `initialize` (the boot probe's, for a lazy primary): discover
    // needs nothing else, so it neither starts nor waits for the shared process.
    if method == "server/discover"
        && let Some(init) = state.primary.last_init()
    {
        return json_response(
            200,
            &json!({"jsonrpc": "2.0", "id": id, "result": modern::discover_result(&init)}),
        );
    }
    // discover must answer well inside the clients' 10 s probe timeout; other methods may wait for a cold start.
    let wait = if method == "server/discover" {
        Duration::from_secs(8).min(state.config.init_timeout)
    } else {
        state.config.init_timeout
    };
    let Some(ready) = state.primary.wait_ready(wait).await else {
        audit.note = Some("not ready");
        return rpc_error(audit, 503, id, -32603, "the MCP server is not ready");
    };
    if method == "server/discover" {
        return json_response(
            200,
            &json!({"jsonrpc": "2.0", "id": id, "result": modern::discover_result(&ready.init)}),
        );
    }
    if method == "subscriptions/listen" {
        return listen(state, &ready, id, &message).await;
    }
    let caller = Caller::from_request(&message);
    let binding = input_required::binding(&method, message.get("params"));
    let exchange = match message
        .pointer("/params/requestState")
        .and_then(Value::as_str)
    {
        // A retry after `input_required`: the held request goes on; nothing new is sent to the child.
        Some(token) => {
            if let Some(machine) = state.affinity.replay_target(headers, token) {
                audit.note = Some("replayed to its machine");
                let mut response = rpc_error(
                    audit,
                    400,
                    id,
                    modern::INVALID_PARAMS,
                    "requestState belongs to another machine; send the request again without it",
                );
                response
                    .headers_mut()
                    .insert(affinity::REPLAY, affinity::replay_header(machine));
                return response;
            }
            let responses = message
                .pointer("/params/inputResponses")
                .and_then(Value::as_object);
            match state.held.resume(token, &binding, responses) {
                Ok(exchange) => exchange,
                Err(_) => {
                    audit.note = Some("requestState refused");
                    return rpc_error(
                        audit,
                        400,
                        id,
                        modern::INVALID_PARAMS,
                        "requestState is invalid, expired, already used, or not for this request; send the \
                         request again without it",
                    );
                }
            }
        }
        None => {
            // Decided on what the child would get: the envelope's `_meta` keys are not for it, and a renamed
            // tool's parameters are checked against the child's own schema.
            let mut message = modern::to_child(message);
            if let Admission::Answer(answer) = state.tools.admit(&mut message, &ready.child).await {
                let answer = modern::from_child(answer, &method, &ready.init);
                let code = answer.pointer("/error/code").and_then(Value::as_i64);
                audit.rpc_error = code;
                return json_response(code.map(modern::http_status).unwrap_or(200), &answer);
            }
            if method == "tools/call"
                && let Err(rejection) = check_param_headers(state, &ready, headers, &message).await
            {
                return modern_rejection(audit, &rejection, id);
            }
            match ready.child.request_modern(message) {
                Ok(handle) => Exchange {
                    child: ready.child.clone(),
                    bridge_id: handle.bridge_id,
                    rx: handle.rx,
                    method,
                    binding,
                },
                Err(_) => return rpc_error(audit, 503, id, -32603, "the MCP server is not ready"),
            }
        }
    };
    let lists_tools = exchange.method == "tools/list";
    let mut guard = CancelOnDrop {
        child: exchange.child.clone(),
        bridge_id: exchange.bridge_id,
        armed: true,
    };
    let timeout = state.config.request_timeout;
    let held = state.held.clone();
    let init = ready.init.clone();
    // Progress and logs need a stream; without either, the answer is plain JSON.
    let wants_stream = (caller.progress_token.is_some() || caller.log_level.is_some())
        && accepts(headers, "text/event-stream");
    if !wants_stream {
        let answer = tokio::time::timeout(
            timeout,
            input_required::drive(exchange, &caller, &held, &init, &mut |_| {}),
        )
        .await;
        return match answer {
            Ok(mut response) => {
                guard.armed = false;
                if lists_tools {
                    state.tools.rewrite_list(&mut response);
                }
                let code = response.pointer("/error/code").and_then(Value::as_i64);
                audit.rpc_error = code;
                json_response(code.map(modern::http_status).unwrap_or(200), &response)
            }
            Err(_) => rpc_error(audit, 200, id, -32603, "request timed out"),
        };
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let list_state = state.clone();
    tokio::spawn(async move {
        let progress = tx.clone();
        let answer = tokio::time::timeout(
            timeout,
            input_required::drive(exchange, &caller, &held, &init, &mut |m| {
                let _ = progress.send(m);
            }),
        )
        .await;
        let mut answer = answer.unwrap_or_else(|_| error_response(id, -32603, "request timed out"));
        if lists_tools {
            list_state.tools.rewrite_list(&mut answer);
        }
        let _ = tx.send(answer);
    });
    sse(
        None,
        rx,
        None,
        false,
        state.shutdown.clone(),
        None,
        Some(guard),
    )
}

fn modern_rejection(audit: &mut AuditRecord, rejection: &modern::Rejection, id: Value) -> Response {
    audit.rpc_error = Some(rejection.code);
    json_response(
        modern::http_status(rejection.code),
        &rejection.to_response(id),
    )
}

/// `Mcp-Param-*` headers of a `tools/call` against the tool's `x-mcp-header` annotations. Skipped (as the SDKs
/// do) when nothing could disagree or the tool's schema is unknown.
async fn check_param_headers(
    state: &State,
    ready: &modern::Ready,
    headers: &HeaderMap,
    message: &Value,
) -> Result<(), modern::Rejection> {
    let arguments = message
        .pointer("/params/arguments")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let has_param_headers = headers.keys().any(|k| k.as_str().starts_with("mcp-param-"));
    if !has_param_headers && arguments.as_object().is_none_or(|a| a.is_empty()) {
        return Ok(());
    }
    let Some(name) = message.pointer("/params/name").and_then(Value::as_str) else {
        return Ok(());
    };
    match ready
        .tool_schema(name, state.config.init_timeout.min(Duration::from_secs(10)))
        .await
    {
        Some(schema) => modern::check_param_headers(&schema, &arguments, headers),
        None => Ok(()),
    }
}

/// `subscriptions/listen`: an SSE stream acknowledging what the bridge honours, then the child's matching change
/// notifications, until the client closes it or the bridge shuts down.
async fn listen(state: &State, ready: &modern::Ready, id: Value, message: &Value) -> Response {
    let requested = message
        .pointer("/params/notifications")
        .cloned()
        .unwrap_or_else(|| json!({}));
    // Subscribed before the child is asked, so nothing sent in between is missed.
    let mut events = ready.events.subscribe();
    let honoured = ready
        .honour_listen(
            &requested,
            state.config.init_timeout.min(Duration::from_secs(10)),
        )
        .await;
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(modern::listen_acknowledgement(&honoured, &id));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        if let Some(frame) = modern::listen_frame(&event, &honoured, &id)
                            && tx.send(frame).is_err()
                        {
                            return;
                        }
                    }
                    // A listener that fell behind missed level triggers; the next one still says "refetch".
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    sse(None, rx, None, false, state.shutdown.clone(), None, None)
}

/// An SSE response relaying `first`, then `rx`, until a response message (or shutdown).
fn sse(
    first: Option<Value>,
    rx: mpsc::UnboundedReceiver<Value>,
    session: Option<Arc<super::session::Session>>,
    priming: bool,
    shutdown: watch::Receiver<bool>,
    registration: Option<super::session::StreamClaim>,
    cancel: Option<CancelOnDrop>,
) -> Response {
    sse_response(sse_events(
        first,
        rx,
        session,
        priming,
        shutdown,
        registration,
        cancel,
    ))
}

fn message_event(message: &Value) -> Event {
    Event::default().event("message").data(message.to_string())
}

/// The events of [`sse`]. On a session's stream (`session` and `registration`), every event is recorded with an
/// id naming the stream, for `Last-Event-ID`; and when the stream ends (the client went away, or the request was
/// answered), what it had received but not sent goes back to the session instead of being lost.
fn sse_events(
    first: Option<Value>,
    rx: mpsc::UnboundedReceiver<Value>,
    session: Option<Arc<super::session::Session>>,
    priming: bool,
    shutdown: watch::Receiver<bool>,
    registration: Option<super::session::StreamClaim>,
    cancel: Option<CancelOnDrop>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    struct StreamState {
        first: Option<Value>,
        rx: mpsc::UnboundedReceiver<Value>,
        session: Option<Arc<super::session::Session>>,
        priming: bool,
        shutdown: watch::Receiver<bool>,
        done: bool,
        registration: Option<super::session::StreamClaim>,
        cancel: Option<CancelOnDrop>,
    }
    impl Drop for StreamState {
        fn drop(&mut self) {
            if let (Some(session), Some(claim)) = (&self.session, self.registration.take()) {
                session.reclaim(claim, &mut self.rx);
            }
        }
    }
    let st = StreamState {
        first,
        rx,
        session,
        priming,
        shutdown,
        done: false,
        registration,
        cancel,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let stream = st.registration.as_ref().map(|c| c.stream());
        if st.priming {
            // 2025-11-25 SSE priming: an event with an id and empty data, so the client can resume from it.
            st.priming = false;
            let id = match (&st.session, stream) {
                (Some(session), Some(stream)) => session.priming_id(stream),
                _ => String::new(),
            };
            return Some((Ok::<_, Infallible>(Event::default().id(id).data("")), st));
        }
        let message = match st.first.take() {
            Some(first) => Some(first),
            None => tokio::select! {
                m = st.rx.recv() => m,
                _ = modern::until_shutdown(&mut st.shutdown) => None,
            },
        };
        let message = message?;
        if is_response(&message)
            && message.get("method").is_none()
            && stream != Some(super::session::GET_STREAM)
        {
            // The end of a request stream (a GET stream carries responses only when it resumes a POST stream's).
            st.done = true;
            if let Some(cancel) = &mut st.cancel {
                cancel.armed = false;
            }
        }
        let mut event = message_event(&message);
        if let (Some(session), Some(stream)) = (&st.session, stream) {
            event = event.id(session.record(stream, &message));
        }
        Some((Ok(event), st))
    })
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::modern::Backoff;
    use axum::body::Body;
    use tower::ServiceExt as _;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shed_audit_lines_show_on_metrics_which_the_token_does_not_guard() {
        let args = BridgeArgs::parse_from(["--", "/nonexistent/mcp-server"]).unwrap();
        let spec = ChildSpec {
            program: "/nonexistent/mcp-server".into(),
            args: vec![],
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let primary = Primary::start(
            spec.clone(),
            Duration::from_secs(1),
            Backoff {
                initial: Duration::from_secs(30),
                max: Duration::from_secs(30),
                healthy_after: Duration::from_secs(60),
            },
            shutdown_rx.clone(),
            true,
        );
        // A sink that never returns, as a stalled stderr pipe: one line sits in it, one in the queue of one, and
        // the rest is shed — and no log line can say so.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = std::sync::Mutex::new(stuck);
        let (auditor, writer) = Auditor::start(1, move |_| {
            let _ = stuck.lock().unwrap().recv();
        });
        let state = Arc::new(State::new(
            &args,
            Auth::bearer("the-token".into()),
            spec.clone(),
            primary,
            WarmPool::new(spec, 0, 0),
            auditor.clone(),
            shutdown_rx,
        ));
        for _ in 0..10 {
            auditor.submit(AuditRecord::new("POST", "a".into()).finish(200));
        }
        let shed = auditor.shed();
        assert!(shed >= 8, "shed {shed}");
        let response = router(state)
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains(&format!("\nmcpfly_bridge_audit_lines_shed_total {shed}\n")),
            "{body}"
        );
        assert!(body.contains("\nmcpfly_bridge_sessions 0\n"), "{body}");
        drop(release);
        drop(auditor);
        let _ = shutdown_tx.send(true);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
    }
}
