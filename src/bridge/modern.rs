//! The 2026-07-28 stateless envelope, translated onto a handshake-only stdio child.
//!
//! Modern requests have no session, so they are served by one shared, long-lived child (the "primary", which
//! also decides readiness) with id and `progressToken` remapping in [`super::child`]: any number of requests run
//! concurrently and each gets only its own progress and response. A pool of children would add memory (one node
//! process each, on 256 MB machines) without adding isolation a stateless protocol promises.
//!
//! What the bridge does for a modern request: validates the envelope (headers against `_meta`, version,
//! `Mcp-Param-*` against the tool's `x-mcp-header` annotations), answers `server/discover` itself from the
//! child's cached `InitializeResult`, strips the `io.modelcontextprotocol/*` `_meta` keys, forwards, and rewrites
//! the result (`resultType`, `ttlMs`, `cacheScope`, serverInfo in `_meta`, `-32002` → `-32602`).
//!
//! What the shared child sends on its own: its requests to the client (sampling, elicitation, roots) and its log
//! messages carry no link to the client request that caused them on stdio, so they go to a modern request only
//! when it is the one request the child is running ([`super::child::Child::attribute`]); the requests then
//! become `input_required` rounds ([`super::input_required`]) and the logs go on that request's stream if it set
//! `logLevel`. Otherwise (several requests in flight) a request is refused with an error and a log dropped:
//! guessing could show one client's data to another. `list_changed` and `resources/updated` go to every open
//! `subscriptions/listen` stream that asked for them.

use std::time::Duration;

use http::HeaderMap;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, watch};

use super::child::{Child, ChildSpec, error_response};

pub const MODERN_VERSION: &str = "2026-07-28";
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
pub const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
pub const META_SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
const META_PREFIX: &str = "io.modelcontextprotocol/";

pub const HEADER_MISMATCH: i64 = -32020;
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
pub const INVALID_PARAMS: i64 = -32602;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;

/// Methods that 2026-07-28 removed.
const NOT_SERVED: [&str; 5] = [
    "initialize",
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
];
/// The child's notifications that 2026-07-28 delivers on `subscriptions/listen` streams.
const LISTEN_METHODS: [&str; 4] = [
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
    "notifications/resources/updated",
];
/// Most resource URIs the bridge subscribes the shared child to (it never unsubscribes: listeners come and go,
/// and the child's subscription is shared by all of them).
const MAX_RESOURCE_SUBSCRIPTIONS: usize = 256;
/// Results that carry cache hints in 2026-07-28.
const CACHEABLE: [&str; 6] = [
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "server/discover",
];

/// Whether a POST belongs to the modern era: the version header names it, the body carries its envelope, or it
/// is `server/discover`. Handshake-era messages carry none of these.
pub fn is_modern(headers: &HeaderMap, message: &Value) -> bool {
    header(headers, "mcp-protocol-version") == Some(MODERN_VERSION)
        || message.get("method").and_then(Value::as_str) == Some("server/discover")
        || message
            .pointer("/params/_meta")
            .and_then(Value::as_object)
            .is_some_and(|m| m.contains_key(META_PROTOCOL_VERSION))
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A JSON-RPC error for the modern path, with the HTTP status 2026-07-28 assigns to its code.
#[derive(Debug, PartialEq)]
pub struct Rejection {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

pub fn http_status(code: i64) -> u16 {
    match code {
        -32700 | -32600 | -32602 | -32020 | -32021 | -32022 => 400,
        -32601 => 404,
        _ => 200,
    }
}

/// The envelope checks, in the order the official SDKs apply them: `_meta` keys (-32602), routing headers against
/// the body (-32020), then the version (-32022).
pub fn validate(headers: &HeaderMap, message: &Value) -> Result<(), Rejection> {
    for name in ["mcp-protocol-version", "mcp-method", "mcp-name"] {
        if headers.get_all(name).iter().count() > 1 {
            return Err(rejection(
                HEADER_MISMATCH,
                &format!("{name} header is duplicated"),
            ));
        }
    }
    let Some(meta) = message.pointer("/params/_meta").and_then(Value::as_object) else {
        return Err(rejection(
            INVALID_PARAMS,
            "params._meta must carry the protocol version and client capabilities",
        ));
    };
    let missing: Vec<&str> = [META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES]
        .into_iter()
        .filter(|k| !meta.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        return Err(rejection(
            INVALID_PARAMS,
            &format!("params._meta is missing {}", missing.join(", ")),
        ));
    }
    let version = meta.get(META_PROTOCOL_VERSION);
    if header(headers, "mcp-protocol-version")
        .map(|h| json!(h))
        .as_ref()
        != version
    {
        return Err(rejection(
            HEADER_MISMATCH,
            "MCP-Protocol-Version header does not match the request's protocol version",
        ));
    }
    let method = message.get("method").and_then(Value::as_str);
    if header(headers, "mcp-method") != method {
        return Err(rejection(
            HEADER_MISMATCH,
            "Mcp-Method header does not match the request's method",
        ));
    }
    let name_key = match method {
        Some("tools/call") | Some("prompts/get") => Some("name"),
        Some("resources/read") => Some("uri"),
        _ => None,
    };
    if let Some(key) = name_key
        && let Some(body_value) = message
            .pointer(&format!("/params/{key}"))
            .and_then(Value::as_str)
        && header(headers, "mcp-name")
            .map(decode_header_value)
            .as_deref()
            != Some(body_value)
    {
        return Err(rejection(
            HEADER_MISMATCH,
            "Mcp-Name header does not match the request",
        ));
    }
    let version = version.and_then(Value::as_str);
    if version != Some(MODERN_VERSION) {
        return Err(Rejection {
            code: UNSUPPORTED_PROTOCOL_VERSION,
            message: "Unsupported protocol version".into(),
            data: Some(json!({"supported": [MODERN_VERSION], "requested": version})),
        });
    }
    Ok(())
}

/// Header values that are not plain ASCII are sent as `=?base64?...?=`.
fn decode_header_value(raw: &str) -> String {
    use base64::Engine;
    if let Some(inner) = raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
        && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(inner)
        && let Ok(text) = String::from_utf8(bytes)
    {
        return text;
    }
    raw.to_string()
}

fn rejection(code: i64, message: &str) -> Rejection {
    Rejection {
        code,
        message: message.into(),
        data: None,
    }
}

impl Rejection {
    pub fn to_response(&self, id: Value) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(data) = &self.data {
            error["data"] = data.clone();
        }
        json!({"jsonrpc": "2.0", "id": id, "error": error})
    }
}

/// Whether the bridge answers `method` with -32601 instead of forwarding it.
pub fn not_served(method: &str) -> bool {
    NOT_SERVED.contains(&method)
}

/// The `server/discover` result, from the child's `InitializeResult`.
pub fn discover_result(init: &Value) -> Value {
    let mut result = json!({
        "supportedVersions": [MODERN_VERSION],
        "capabilities": init.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {META_SERVER_INFO: server_info(init)},
    });
    if let Some(instructions) = init.get("instructions").filter(|i| i.is_string()) {
        result["instructions"] = instructions.clone();
    }
    result
}

pub fn server_info(init: &Value) -> Value {
    init.get("serverInfo")
        .cloned()
        .unwrap_or_else(|| json!({"name": "unknown", "version": "0"}))
}

/// Prepares a modern request for the handshake-era child: drops the envelope's `_meta` keys (the child would not
/// understand them, and they describe this request only).
pub fn to_child(mut message: Value) -> Value {
    if let Some(params) = message.get_mut("params").and_then(Value::as_object_mut) {
        if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
            meta.retain(|k, _| !k.starts_with(META_PREFIX));
            if meta.is_empty() {
                params.remove("_meta");
            }
        }
        // The 2026-07-28 retry fields are the bridge's business (see `input_required`), never the child's.
        params.remove("inputResponses");
        params.remove("requestState");
        if params.is_empty() {
            message.as_object_mut().unwrap().remove("params");
        }
    }
    message
}

/// Rewrites the child's answer for a modern client. Progress notifications pass unchanged.
pub fn from_child(mut message: Value, method: &str, init: &Value) -> Value {
    if let Some(result) = message.get_mut("result").and_then(Value::as_object_mut) {
        result.entry("resultType").or_insert(json!("complete"));
        if CACHEABLE.contains(&method) {
            result.entry("ttlMs").or_insert(json!(0));
            result.entry("cacheScope").or_insert(json!("private"));
        }
        let meta = result
            .entry("_meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert(META_SERVER_INFO.into(), server_info(init));
        }
    } else if let Some(error) = message.get_mut("error").and_then(Value::as_object_mut)
        && error.get("code").and_then(Value::as_i64) == Some(-32002)
    {
        // Resource not found moved from -32002 to -32602 in 2026-07-28.
        error.insert("code".into(), json!(INVALID_PARAMS));
    }
    message
}

/// The shared child: initialized by the bridge, restarted with backoff when it exits.
///
/// Restart rather than exit: exiting the bridge would also kill every healthy session's child and drop its
/// client, and Fly's restart of the whole machine is slower than restarting one process. Readiness is false
/// while the child is down, so Fly's health check and the controller see it.
///
/// Started at boot when it is known to be needed (`--session-isolation shared`: every session uses it) or asked
/// to be (`--modern-warm`); otherwise on the first request that needs it (a 2026-07-28 one): a bridge whose
/// clients all speak the handshake era then keeps no process for a path nobody uses. Readiness still means the
/// server answered `initialize`: at boot, a lazy primary starts once as a probe, is initialized and stopped. The
/// probe also runs any package install the first start does (`npx`/`uvx` into an empty cache) before the warm
/// pool starts anything ([`Primary::wait_answered`]), so two installs never race.
pub struct Primary {
    state: watch::Receiver<Option<Ready>>,
    /// True once a start answered `initialize`; false while the child is down after a crash or failed start.
    healthy: watch::Receiver<bool>,
    wanted: Arc<watch::Sender<bool>>,
    /// The `InitializeResult` of the latest start that answered (the probe's included).
    last_init: Arc<Mutex<Option<Value>>>,
}

/// Tool input schemas by tool name.
type ToolSchemas = HashMap<String, Value>;

#[derive(Clone)]
pub struct Ready {
    pub child: std::sync::Arc<Child>,
    pub init: Value,
    /// `list_changed` and `resources/updated` from the child, for `subscriptions/listen` streams.
    pub events: broadcast::Sender<Value>,
    /// Tool input schemas by name, for `Mcp-Param-*` validation; emptied when the child's tool list changes.
    tool_schemas: Arc<Mutex<Option<Arc<ToolSchemas>>>>,
    /// Resource URIs the child has been subscribed to.
    subscribed: Arc<Mutex<HashSet<String>>>,
}

pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A child that lived this long resets the backoff.
    pub healthy_after: Duration,
}

impl Primary {
    /// `eager`: start the child now and keep it; otherwise probe once and start it at the first
    /// [`Primary::wait_ready`].
    pub fn start(
        spec: ChildSpec,
        init_timeout: Duration,
        backoff: Backoff,
        mut shutdown: watch::Receiver<bool>,
        eager: bool,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        let (healthy_tx, healthy) = watch::channel(false);
        let wanted = Arc::new(watch::channel(eager).0);
        let mut wanted_rx = wanted.subscribe();
        let last_init = Arc::new(Mutex::new(None));
        let answered = last_init.clone();
        tokio::spawn(async move {
            let mut delay = backoff.initial;
            loop {
                if *shutdown.borrow() {
                    break;
                }
                let started = tokio::time::Instant::now();
                match Child::spawn(&spec) {
                    Ok((child, unsolicited)) => match child.initialize(init_timeout).await {
                        Ok(init) if !*wanted_rx.borrow_and_update() => {
                            *answered.lock().unwrap() = Some(init);
                            tracing::info!(
                                pid = child.pid(),
                                "MCP server answered initialize; ready (its 2026-07-28 process starts on first use)"
                            );
                            let _ = healthy_tx.send(true);
                            child.shutdown(Duration::from_secs(2)).await;
                            // Gone (the bridge dropped without a shutdown) is not a request to start.
                            tokio::select! {
                                wanted = wanted_rx.wait_for(|w| *w) => if wanted.is_ok() { continue } else { break },
                                _ = until_shutdown(&mut shutdown) => break,
                            }
                        }
                        Ok(init) => {
                            tracing::info!(
                                pid = child.pid(),
                                protocol_version = init
                                    .get("protocolVersion")
                                    .and_then(|v| v.as_str())
                                    .unwrap_or("-"),
                                "MCP server initialized; ready"
                            );
                            let ready = Ready {
                                child: child.clone(),
                                init,
                                events: broadcast::channel(64).0,
                                tool_schemas: Arc::default(),
                                subscribed: Arc::default(),
                            };
                            tokio::spawn(dispatch_unsolicited(ready.clone(), unsolicited));
                            *answered.lock().unwrap() = Some(ready.init.clone());
                            let _ = tx.send(Some(ready));
                            let _ = healthy_tx.send(true);
                            tokio::select! {
                                _ = child.wait_exit() => {
                                    tracing::warn!("MCP server exited; not ready until it is restarted");
                                }
                                _ = until_shutdown(&mut shutdown) => {
                                    child.shutdown(Duration::from_secs(5)).await;
                                    let _ = tx.send(None);
                                    break;
                                }
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "MCP server failed to initialize");
                            child.shutdown(Duration::from_secs(2)).await;
                        }
                    },
                    Err(error) => tracing::error!(%error, "cannot start the MCP server"),
                }
                let _ = tx.send(None);
                let _ = healthy_tx.send(false);
                if started.elapsed() >= backoff.healthy_after {
                    delay = backoff.initial;
                }
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "restarting the MCP server after a delay"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = until_shutdown(&mut shutdown) => break,
                }
                delay = (delay * 2).min(backoff.max);
            }
        });
        Self {
            state: rx,
            healthy,
            wanted,
            last_init,
        }
    }

    /// What the server answered to the bridge's latest `initialize` (the boot probe's for a lazy primary not yet
    /// used), for `server/discover`; `None` before any start answered.
    pub fn last_init(&self) -> Option<Value> {
        self.last_init.lock().unwrap().clone()
    }

    /// The running child, if it is initialized.
    pub fn current(&self) -> Option<Ready> {
        self.state.borrow().clone()
    }

    /// Readiness: the server answered `initialize` at its last start (the probe's, for a lazy primary not yet
    /// used), and the child is not down after a crash or a failed start.
    pub fn healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    /// Waits up to `timeout` for [`Primary::healthy`], without starting the child.
    pub async fn wait_answered(&self, timeout: Duration) -> bool {
        let mut healthy = self.healthy.clone();
        matches!(
            tokio::time::timeout(timeout, healthy.wait_for(|h| *h)).await,
            Ok(Ok(_))
        )
    }

    /// Starts the child if it is not (a lazy primary's first use) and waits up to `timeout` for it to be ready.
    pub async fn wait_ready(&self, timeout: Duration) -> Option<Ready> {
        self.wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
        let mut state = self.state.clone();
        let ready = tokio::time::timeout(timeout, state.wait_for(|s| s.is_some())).await;
        match ready {
            Ok(Ok(ready)) => ready.clone(),
            _ => None,
        }
    }
}

/// Resolves once shutdown is signalled (the watch guard is not held across an await, so futures stay `Send`).
pub async fn until_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// What the shared child sends on its own (see the module docs): change notifications to the listen streams,
/// its requests and logs to the one modern request they can belong to. A request that cannot be attributed is
/// answered with an error at once, so the tool fails instead of waiting for an answer that never comes.
async fn dispatch_unsolicited(ready: Ready, mut unsolicited: mpsc::UnboundedReceiver<Value>) {
    while let Some(message) = unsolicited.recv().await {
        let method = message.get("method").and_then(Value::as_str).unwrap_or("");
        if LISTEN_METHODS.contains(&method) {
            if method == "notifications/tools/list_changed" {
                *ready.tool_schemas.lock().unwrap() = None;
            }
            let _ = ready.events.send(message);
            continue;
        }
        // The child's reader attributed what belonged to the one modern request running; a request that comes
        // here had none (several in flight), and a log is dropped.
        if let Some(id) = message.get("id").cloned()
            && !method.is_empty()
        {
            let _ = ready.child.send_from_client(
                error_response(
                    id,
                    -32603,
                    "the bridge cannot tell which client this request is for: the shared MCP server is serving \
                     several requests at once",
                ),
                "",
            );
        }
    }
}

impl Ready {
    /// The input schema of tool `name`, from the child's `tools/list` (cached until its list changes). `None` when
    /// the child does not list it or cannot be asked: validation is then skipped, as the SDKs do.
    pub async fn tool_schema(&self, name: &str, timeout: Duration) -> Option<Value> {
        let cached = self.tool_schemas.lock().unwrap().clone();
        let schemas = match cached {
            Some(schemas) => schemas,
            None => {
                let schemas = Arc::new(self.list_tool_schemas(timeout).await?);
                *self.tool_schemas.lock().unwrap() = Some(schemas.clone());
                schemas
            }
        };
        schemas.get(name).cloned()
    }

    async fn list_tool_schemas(&self, timeout: Duration) -> Option<ToolSchemas> {
        let mut schemas = HashMap::new();
        let mut cursor: Option<Value> = None;
        // A bound on pages: a server returning a cursor cycle must not hold a request forever.
        for _ in 0..100 {
            let mut request = json!({"jsonrpc": "2.0", "id": 0, "method": "tools/list"});
            if let Some(cursor) = &cursor {
                request["params"] = json!({"cursor": cursor});
            }
            let response = self.child.call(request, timeout).await.ok()?;
            let result = response.get("result")?;
            for tool in result.get("tools").and_then(Value::as_array)? {
                if let Some(name) = tool.get("name").and_then(Value::as_str) {
                    schemas.insert(
                        name.to_string(),
                        tool.get("inputSchema").cloned().unwrap_or(Value::Null),
                    );
                }
            }
            match result.get("nextCursor").filter(|c| !c.is_null()) {
                Some(next) => cursor = Some(next.clone()),
                None => return Some(schemas),
            }
        }
        None
    }

    /// What of a `subscriptions/listen` filter the bridge honours: change notifications of every kind of thing
    /// the child serves (servers send `list_changed` whether or not they declare `listChanged`, and the bridge
    /// relays whatever comes), and resource subscriptions when the child supports them (subscribing it to each
    /// URI first).
    pub async fn honour_listen(&self, requested: &Value, timeout: Duration) -> Value {
        let caps = self.init.get("capabilities").cloned().unwrap_or_default();
        let mut honoured = Map::new();
        for (key, capability) in [
            ("toolsListChanged", "tools"),
            ("promptsListChanged", "prompts"),
            ("resourcesListChanged", "resources"),
        ] {
            if requested.get(key) == Some(&json!(true)) && caps.get(capability).is_some() {
                honoured.insert(key.into(), json!(true));
            }
        }
        let uris: Vec<&str> = requested
            .get("resourceSubscriptions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if caps.pointer("/resources/subscribe") == Some(&json!(true)) && !uris.is_empty() {
            let mut accepted = Vec::new();
            for uri in uris {
                let new = {
                    let subscribed = self.subscribed.lock().unwrap();
                    if subscribed.contains(uri) {
                        false
                    } else if subscribed.len() >= MAX_RESOURCE_SUBSCRIPTIONS {
                        continue;
                    } else {
                        true
                    }
                };
                if new {
                    let request = json!({"jsonrpc": "2.0", "id": 0, "method": "resources/subscribe",
                        "params": {"uri": uri}});
                    match self.child.call(request, timeout).await {
                        Ok(response) if response.get("result").is_some() => {
                            self.subscribed.lock().unwrap().insert(uri.to_string());
                        }
                        _ => continue,
                    }
                }
                accepted.push(json!(uri));
            }
            honoured.insert("resourceSubscriptions".into(), Value::Array(accepted));
        }
        Value::Object(honoured)
    }
}

/// A child notification as a frame of the listen stream `subscription_id`, if the honoured filter covers it.
pub fn listen_frame(event: &Value, honoured: &Value, subscription_id: &Value) -> Option<Value> {
    let method = event.get("method").and_then(Value::as_str)?;
    let wanted = match method {
        "notifications/tools/list_changed" => {
            honoured.get("toolsListChanged") == Some(&json!(true))
        }
        "notifications/prompts/list_changed" => {
            honoured.get("promptsListChanged") == Some(&json!(true))
        }
        "notifications/resources/list_changed" => {
            honoured.get("resourcesListChanged") == Some(&json!(true))
        }
        "notifications/resources/updated" => {
            let uri = event.pointer("/params/uri")?;
            honoured
                .get("resourceSubscriptions")
                .and_then(Value::as_array)
                .is_some_and(|uris| uris.contains(uri))
        }
        _ => false,
    };
    if !wanted {
        return None;
    }
    let mut frame = json!({"jsonrpc": "2.0", "method": method, "params": event.get("params").cloned().unwrap_or_else(|| json!({}))});
    frame["params"]["_meta"] = json!({META_SUBSCRIPTION_ID: subscription_id});
    Some(frame)
}

/// The first frame of a listen stream: what the bridge honours of what was asked.
pub fn listen_acknowledgement(honoured: &Value, subscription_id: &Value) -> Value {
    json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {
        "notifications": honoured, "_meta": {META_SUBSCRIPTION_ID: subscription_id}}})
}

/// `Mcp-Param-{Name}` headers against a `tools/call`'s arguments, for every property the tool's input schema
/// annotates with `x-mcp-header` (reached through `properties` only, as the SDKs walk it): present together
/// and equal, or absent together; duplicates refused. `-32020` on the first disagreement.
pub fn check_param_headers(
    schema: &Value,
    arguments: &Value,
    headers: &HeaderMap,
) -> Result<(), Rejection> {
    let mut annotated = Vec::new();
    annotated_properties(schema, &mut Vec::new(), &mut annotated, 0);
    for (path, token, property) in annotated {
        let name = format!("Mcp-Param-{token}");
        let mut raws = headers.get_all(name.to_ascii_lowercase().as_str()).iter();
        let raw = raws.next().map(|v| v.to_str().unwrap_or("\u{fffd}"));
        if raws.next().is_some() {
            return Err(rejection(
                HEADER_MISMATCH,
                &format!("{name} header appears more than once"),
            ));
        }
        let argument = path.join(".");
        let value = path
            .iter()
            .try_fold(arguments, |node, key| node.get(key))
            .filter(|v| !v.is_null());
        let rendered = value.and_then(|v| match v {
            Value::Bool(b) => Some(b.to_string()),
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        match (raw, value, rendered) {
            (None, None, _) | (None, Some(_), None) => {}
            (Some(_), None, _) => {
                return Err(rejection(
                    HEADER_MISMATCH,
                    &format!(
                        "{name} header is present but the request's {argument:?} argument is absent"
                    ),
                ));
            }
            (None, Some(_), Some(_)) => {
                return Err(rejection(
                    HEADER_MISMATCH,
                    &format!(
                        "{name} header is missing but the request's {argument:?} argument is present"
                    ),
                ));
            }
            (Some(raw), Some(value), rendered) => {
                let decoded = decode_header_value(raw);
                let matches = rendered.as_deref() == Some(decoded.as_str())
                    || (property.get("type") == Some(&json!("integer"))
                        && same_integer(value, &decoded));
                if !matches {
                    return Err(rejection(
                        HEADER_MISMATCH,
                        &format!(
                            "{name} header does not match the request's {argument:?} argument"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn annotated_properties<'s>(
    schema: &'s Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, String, &'s Value)>,
    depth: usize,
) {
    // Schemas are client-visible data of an untrusted server: bound the walk.
    if depth > 32 {
        return;
    }
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, property) in properties {
        path.push(name.clone());
        if let Some(token) = property.get("x-mcp-header").and_then(Value::as_str) {
            out.push((path.clone(), token.to_string(), property));
        }
        annotated_properties(property, path, out, depth + 1);
        path.pop();
    }
}

/// An integer argument against a header written as a plain decimal (`42` and `42.0` agree), as the spec says
/// integers SHOULD compare.
fn same_integer(value: &Value, header: &str) -> bool {
    let (whole, fraction) = header.split_once('.').unwrap_or((header, ""));
    if !fraction.chars().all(|c| c == '0') || whole.is_empty() {
        return false;
    }
    let Ok(header) = whole.parse::<i128>() else {
        return false;
    };
    match (value.as_i64(), value.as_u64(), value.as_f64()) {
        (Some(i), _, _) => i128::from(i) == header,
        (_, Some(u), _) => i128::from(u) == header,
        (_, _, Some(f)) => f.fract() == 0.0 && f == header as f64,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn call(version: &str) -> Value {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "echo", "arguments": {"text": "x"},
            "_meta": {META_PROTOCOL_VERSION: version, META_CLIENT_CAPABILITIES: {}, "progressToken": 7}}})
    }

    #[test]
    fn validation_ladder_codes() {
        let good = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-name", "echo"),
        ]);
        assert_eq!(validate(&good, &call(MODERN_VERSION)), Ok(()));
        let no_meta = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
        assert_eq!(validate(&good, &no_meta).unwrap_err().code, INVALID_PARAMS);
        let wrong_name = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-name", "other"),
        ]);
        assert_eq!(
            validate(&wrong_name, &call(MODERN_VERSION))
                .unwrap_err()
                .code,
            HEADER_MISMATCH
        );
        let no_method = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-name", "echo"),
        ]);
        assert_eq!(
            validate(&no_method, &call(MODERN_VERSION))
                .unwrap_err()
                .code,
            HEADER_MISMATCH
        );
        let dup = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "echo"),
        ]);
        assert_eq!(
            validate(&dup, &call(MODERN_VERSION)).unwrap_err().code,
            HEADER_MISMATCH
        );
        let future = headers(&[
            ("mcp-protocol-version", "2099-01-01"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "echo"),
        ]);
        let rejected = validate(&future, &call("2099-01-01")).unwrap_err();
        assert_eq!(rejected.code, UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(rejected.data.unwrap()["supported"], json!([MODERN_VERSION]));
        let b64 = headers(&[
            ("mcp-protocol-version", MODERN_VERSION),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?ZWNobw==?="),
        ]);
        assert_eq!(validate(&b64, &call(MODERN_VERSION)), Ok(()));
    }

    #[test]
    fn envelope_is_stripped_and_results_rewritten() {
        let child_msg = to_child(call(MODERN_VERSION));
        assert_eq!(child_msg["params"]["_meta"], json!({"progressToken": 7}));
        let bare = to_child(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list",
            "params": {"_meta": {META_PROTOCOL_VERSION: MODERN_VERSION}}}));
        assert!(bare.get("params").is_none());

        let init =
            json!({"serverInfo": {"name": "s", "version": "1"}, "capabilities": {"tools": {}}});
        let list = from_child(
            json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}),
            "tools/list",
            &init,
        );
        assert_eq!(list["result"]["resultType"], "complete");
        assert_eq!(list["result"]["ttlMs"], 0);
        assert_eq!(list["result"]["cacheScope"], "private");
        assert_eq!(list["result"]["_meta"][META_SERVER_INFO]["name"], "s");
        let call = from_child(
            json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}),
            "tools/call",
            &init,
        );
        assert!(call["result"].get("ttlMs").is_none());
        let missing = from_child(
            json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32002, "message": "nf"}}),
            "resources/read",
            &init,
        );
        assert_eq!(missing["error"]["code"], INVALID_PARAMS);

        let discover = discover_result(&init);
        assert_eq!(discover["supportedVersions"], json!([MODERN_VERSION]));
        assert_eq!(discover["capabilities"], json!({"tools": {}}));
        assert_eq!(discover["_meta"][META_SERVER_INFO]["version"], "1");
    }

    #[test]
    fn param_headers_follow_x_mcp_header_annotations() {
        let schema = json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "count": {"type": "integer", "x-mcp-header": "Count"},
            "target": {"type": "object", "properties": {"zone": {"type": "string", "x-mcp-header": "Zone"}}},
            "plain": {"type": "string"},
        }});
        let args = json!({"region": "ams", "count": 42, "target": {"zone": "z1"}, "plain": "p"});
        let ok = headers(&[
            ("mcp-param-region", "ams"),
            ("mcp-param-count", "42.0"),
            ("mcp-param-zone", "=?base64?ejE=?="),
        ]);
        assert_eq!(check_param_headers(&schema, &args, &ok), Ok(()));
        for bad in [
            // Wrong value, missing header, fractional integer, duplicated header.
            headers(&[
                ("mcp-param-region", "fra"),
                ("mcp-param-count", "42"),
                ("mcp-param-zone", "z1"),
            ]),
            headers(&[("mcp-param-count", "42"), ("mcp-param-zone", "z1")]),
            headers(&[
                ("mcp-param-region", "ams"),
                ("mcp-param-count", "42.5"),
                ("mcp-param-zone", "z1"),
            ]),
            headers(&[
                ("mcp-param-region", "ams"),
                ("mcp-param-region", "ams"),
                ("mcp-param-count", "42"),
                ("mcp-param-zone", "z1"),
            ]),
        ] {
            assert_eq!(
                check_param_headers(&schema, &args, &bad).unwrap_err().code,
                HEADER_MISMATCH
            );
        }
        // A header for an absent argument is refused; no header and no argument is fine.
        let absent = json!({"count": 1});
        let stray = headers(&[("mcp-param-count", "1"), ("mcp-param-region", "x")]);
        assert_eq!(
            check_param_headers(&schema, &absent, &stray)
                .unwrap_err()
                .code,
            HEADER_MISMATCH
        );
        let fine = headers(&[("mcp-param-count", "1")]);
        assert_eq!(check_param_headers(&schema, &absent, &fine), Ok(()));
    }
}
