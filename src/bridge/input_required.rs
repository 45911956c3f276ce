//! The 2026-07-28 `input_required` flow in front of a handshake-era child.
//!
//! The shared child asks "its client" for sampling, elicitation or roots with ordinary JSON-RPC requests. When
//! such a request can be attributed to one modern request ([`super::child::Child::attribute`]), the bridge holds
//! it and answers the HTTP request with `{resultType: "input_required", inputRequests, requestState}`. The
//! client retries the original request with `inputResponses` and the echoed `requestState`; the bridge answers
//! the held child request with them and relays the rest of the tool's run (which may ask again).
//!
//! `requestState` is attacker-controlled input: it is an HMAC-SHA256 token under a key made at start-up (so a
//! token from another machine or an earlier process is refused), naming the held exchange and the hash of the
//! request it was issued for (method and params without `_meta`, `inputResponses`, `requestState`), so it opens
//! only the exchange it was issued for, only for the same request, and only once. A held exchange not resumed
//! within `--input-timeout-secs` is dropped: the child's pending request gets an error and its tool call is
//! cancelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::child::{Child, error_response, is_response};
use super::modern::{self, META_CLIENT_CAPABILITIES, META_LOG_LEVEL};

pub const MISSING_CLIENT_CAPABILITY: i64 = -32021;
/// Most exchanges held at once; beyond it a new input request fails instead of growing memory without bound.
const MAX_HELD: usize = 1024;
const TOKEN_PREFIX: &str = "mcpfly1.";

/// The capabilities the bridge declares when it initializes the shared child: everything a modern client can
/// be asked through `input_required`, so servers that check their client's capabilities (the SDKs do) still ask.
/// Whether a given request may be asked is decided per request from its own `clientCapabilities`.
pub fn child_capabilities() -> Value {
    json!({
        "sampling": {"tools": {}},
        "elicitation": {"form": {}, "url": {}},
        "roots": {},
    })
}

/// The capability a child's request needs from the client (as `requiredCapabilities` reports it), or `None`
/// when the method is not one a modern client can be asked.
pub fn required_capability(method: &str, params: &Value) -> Option<Value> {
    match method {
        "sampling/createMessage" => {
            let tools = params.get("tools").is_some() || params.get("toolChoice").is_some();
            Some(if tools {
                json!({"sampling": {"tools": {}}})
            } else {
                json!({"sampling": {}})
            })
        }
        "elicitation/create" => Some(
            if params.get("mode").and_then(Value::as_str) == Some("url") {
                json!({"elicitation": {"url": {}}})
            } else {
                json!({"elicitation": {"form": {}}})
            },
        ),
        "roots/list" => Some(json!({"roots": {}})),
        _ => None,
    }
}

/// Whether `declared` (a request's `clientCapabilities`) covers `required`. A bare `elicitation: {}` is form
/// support (the only shape before modes existed); `sampling.tools` must be declared to sample with tools.
pub fn declares(declared: &Value, required: &Value) -> bool {
    let Some(required) = required.as_object() else {
        return true;
    };
    required.iter().all(|(name, sub)| {
        let Some(have) = declared.get(name).filter(|v| v.is_object()) else {
            return false;
        };
        match name.as_str() {
            "elicitation" if sub.get("form").is_some() => {
                have.get("form").is_some() || have.get("url").is_none()
            }
            _ => sub
                .as_object()
                .is_none_or(|keys| keys.keys().all(|k| have.get(k).is_some())),
        }
    })
}

/// The HMAC key for `requestState`, made at start-up and never leaving the process.
pub struct StateKey([u8; 32]);

impl StateKey {
    pub fn random() -> Self {
        Self(rand::random())
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(TOKEN_PREFIX.as_bytes());
        mac.update(payload);
        mac
    }

    /// The token for held exchange `held`, bound to the request hash `binding`.
    pub fn seal(&self, held: u64, binding: &[u8; 32]) -> String {
        let mut payload = held.to_be_bytes().to_vec();
        payload.extend_from_slice(binding);
        let tag = self.mac(&payload).finalize().into_bytes();
        format!(
            "{TOKEN_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The held exchange a token names, if this process issued it for a request with hash `binding`.
    pub fn open(&self, token: &str, binding: &[u8; 32]) -> Option<u64> {
        let (payload, tag) = token.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        // Constant-time comparison.
        self.mac(&payload).verify_slice(&tag).ok()?;
        if payload.len() != 40 || payload[8..] != binding[..] {
            return None;
        }
        Some(u64::from_be_bytes(payload[..8].try_into().ok()?))
    }
}

/// The hash a `requestState` is bound to: the method and the params a retry must repeat unchanged.
pub fn binding(method: &str, params: Option<&Value>) -> [u8; 32] {
    let mut params = params.cloned().unwrap_or_else(|| json!({}));
    if let Some(params) = params.as_object_mut() {
        for key in ["_meta", "inputResponses", "requestState"] {
            params.remove(key);
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(method.as_bytes());
    hasher.update([0]);
    canonical(&params, &mut hasher);
    hasher.finalize().into()
}

/// Feeds `value` with object keys sorted, so equal JSON hashes equally whatever the client's key order.
fn canonical(value: &Value, hasher: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            hasher.update(b"{");
            for key in keys {
                hasher.update(Value::String(key.clone()).to_string().as_bytes());
                hasher.update(b":");
                canonical(&map[key], hasher);
                hasher.update(b",");
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for item in items {
                canonical(item, hasher);
                hasher.update(b",");
            }
            hasher.update(b"]");
        }
        other => hasher.update(other.to_string().as_bytes()),
    }
}

/// A modern request running on the shared child: what is needed to go on relaying it across retries.
pub struct Exchange {
    pub child: Arc<Child>,
    pub bridge_id: u64,
    pub rx: mpsc::UnboundedReceiver<Value>,
    pub method: String,
    pub binding: [u8; 32],
}

/// A held exchange and the child's requests it waits to answer (`inputRequests` key → the child's request id).
struct Held {
    exchange: Exchange,
    asked: Vec<(String, Value)>,
}

/// The HTTP request currently relaying an exchange (the first one, or a retry).
pub struct Caller {
    pub id: Value,
    pub capabilities: Value,
    /// The least severe log level this request opted in to; `None`: no logs.
    pub log_level: Option<usize>,
    pub progress_token: Option<Value>,
}

impl Caller {
    pub fn from_request(message: &Value) -> Self {
        let meta = message.pointer("/params/_meta");
        Self {
            id: message.get("id").cloned().unwrap_or(Value::Null),
            capabilities: meta
                .and_then(|m| m.get(META_CLIENT_CAPABILITIES))
                .cloned()
                .unwrap_or_else(|| json!({})),
            log_level: meta
                .and_then(|m| m.get(META_LOG_LEVEL))
                .and_then(Value::as_str)
                .and_then(log_severity),
            progress_token: meta.and_then(|m| m.get("progressToken")).cloned(),
        }
    }
}

/// RFC 5424 levels as MCP names them, least severe first.
const LOG_LEVELS: [&str; 8] = [
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];

fn log_severity(level: &str) -> Option<usize> {
    LOG_LEVELS.iter().position(|l| *l == level)
}

/// Exchanges waiting for their client to come back with `inputResponses`.
pub struct HeldTable {
    key: StateKey,
    /// This machine's id (on Fly): a token starts with `<machine>-`, so a retry that Fly's proxy sends to
    /// another machine is replayed here ([`super::affinity`]), as for a handshake-era session id.
    machine: Option<String>,
    entries: Mutex<HashMap<u64, Held>>,
    next: AtomicU64,
    ttl: Duration,
}

#[derive(Debug, PartialEq)]
pub enum ResumeError {
    /// Not a token this process issued for this request, or already used, or expired.
    Invalid,
}

impl HeldTable {
    pub fn new(ttl: Duration, machine: Option<&str>) -> Arc<Self> {
        Arc::new(Self {
            key: StateKey::random(),
            machine: machine.map(str::to_string),
            entries: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            ttl,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds an exchange; returns its `requestState`, or gives the held parts back when the table is full.
    fn hold(self: &Arc<Self>, held: Held) -> Result<String, Held> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = match &self.machine {
            Some(machine) => format!("{machine}-{}", self.key.seal(id, &held.exchange.binding)),
            None => self.key.seal(id, &held.exchange.binding),
        };
        {
            let mut entries = self.entries.lock().unwrap();
            if entries.len() >= MAX_HELD {
                return Err(held);
            }
            entries.insert(id, held);
        }
        let table = Arc::downgrade(self);
        let ttl = self.ttl;
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let expired = table
                .upgrade()
                .and_then(|t| t.entries.lock().unwrap().remove(&id));
            if let Some(held) = expired {
                tracing::info!(
                    method = %held.exchange.method,
                    "a request waiting for client input was not resumed in time; cancelling it"
                );
                abandon(
                    held,
                    "the client did not answer within the bridge's input timeout",
                );
            }
        });
        Ok(token)
    }

    /// Takes the held exchange `token` names, answering the child's held requests from `responses`.
    pub fn resume(
        &self,
        token: &str,
        binding: &[u8; 32],
        responses: Option<&Map<String, Value>>,
    ) -> Result<Exchange, ResumeError> {
        let sealed = match &self.machine {
            Some(machine) => token
                .strip_prefix(machine.as_str())
                .and_then(|t| t.strip_prefix('-'))
                .ok_or(ResumeError::Invalid)?,
            None => token,
        };
        let id = self.key.open(sealed, binding).ok_or(ResumeError::Invalid)?;
        let held = self
            .entries
            .lock()
            .unwrap()
            .remove(&id)
            .ok_or(ResumeError::Invalid)?;
        for (key, child_id) in &held.asked {
            let answer = match responses.and_then(|r| r.get(key)) {
                Some(result) => json!({"jsonrpc": "2.0", "id": child_id, "result": result}),
                None => error_response(
                    child_id.clone(),
                    modern::INVALID_PARAMS,
                    "the client returned no response to this request",
                ),
            };
            let _ = held.exchange.child.send_from_client(answer, "");
        }
        Ok(held.exchange)
    }
}

/// Gives up a held exchange: the child's pending requests get an error and its request is cancelled.
fn abandon(held: Held, reason: &str) {
    for (_, child_id) in held.asked {
        let _ = held
            .exchange
            .child
            .send_from_client(error_response(child_id, -32603, reason), "");
    }
    held.exchange
        .child
        .cancel(held.exchange.bridge_id, "the client did not come back");
}

/// Relays an exchange for `caller` until the child answers, the child asks for input (the exchange is held and
/// an `input_required` result returned), or the child asks for something the request did not declare (`-32021`,
/// the child's request refused and its tool call cancelled). Progress and opted-in logs go to `emit`. Returns
/// the final message for the client, rewritten for 2026-07-28.
pub async fn drive(
    mut exchange: Exchange,
    caller: &Caller,
    table: &Arc<HeldTable>,
    init: &Value,
    emit: &mut (dyn FnMut(Value) + Send),
) -> Value {
    loop {
        let Some(mut message) = exchange.rx.recv().await else {
            return error_response(
                caller.id.clone(),
                -32603,
                "the MCP server exited or the request was cancelled before answering",
            );
        };
        if is_response(&message) {
            message["id"] = caller.id.clone();
            return modern::from_child(message, &exchange.method, init);
        }
        if message.get("id").is_none() {
            relay_notification(message, caller, emit);
            continue;
        }
        // The child asks its client something: collect what it asked at once, then answer the HTTP request.
        let mut asked = vec![message];
        while let Ok(more) = exchange.rx.try_recv() {
            if more.get("method").is_some() && more.get("id").is_some() {
                asked.push(more);
            } else if more.get("method").is_some() {
                relay_notification(more, caller, emit);
            } else {
                // The child answered after all: what it asked is moot.
                refuse_all(&exchange.child, &asked, "the request already completed");
                let mut more = more;
                more["id"] = caller.id.clone();
                return modern::from_child(more, &exchange.method, init);
            }
        }
        match ask_client(exchange, asked, caller, table, init) {
            Ok(answer) => return answer,
            // Nothing needed the client (a ping): the tool goes on.
            Err(unchanged) => exchange = unchanged,
        }
    }
}

fn relay_notification(mut message: Value, caller: &Caller, emit: &mut (dyn FnMut(Value) + Send)) {
    match message.get("method").and_then(Value::as_str) {
        Some("notifications/progress") => {
            if let Some(token) = &caller.progress_token {
                // A retry may carry a new token; progress belongs to the request now relaying.
                message["params"]["progressToken"] = token.clone();
                emit(message);
            }
        }
        Some("notifications/message") => {
            let severity = message
                .pointer("/params/level")
                .and_then(Value::as_str)
                .and_then(log_severity);
            if let (Some(wanted), Some(severity)) = (caller.log_level, severity)
                && severity >= wanted
            {
                emit(message);
            }
        }
        _ => {}
    }
}

fn refuse_all(child: &Child, asked: &[Value], reason: &str) {
    for request in asked {
        if let Some(id) = request.get("id") {
            let _ = child.send_from_client(error_response(id.clone(), -32603, reason), "");
        }
    }
}

fn ask_client(
    exchange: Exchange,
    asked: Vec<Value>,
    caller: &Caller,
    table: &Arc<HeldTable>,
    init: &Value,
) -> Result<Value, Exchange> {
    let mut input_requests = Map::new();
    let mut held_ids = Vec::new();
    for (n, request) in asked.iter().enumerate() {
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let params = request.get("params").cloned().unwrap_or_else(|| json!({}));
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        if method == "ping" {
            let _ = exchange
                .child
                .send_from_client(json!({"jsonrpc": "2.0", "id": id, "result": {}}), "");
            continue;
        }
        let Some(required) = required_capability(method, &params) else {
            let _ = exchange.child.send_from_client(
                error_response(
                    id,
                    modern::METHOD_NOT_FOUND,
                    "the client cannot be asked this",
                ),
                "",
            );
            continue;
        };
        if !declares(&caller.capabilities, &required) {
            refuse_all(
                &exchange.child,
                &asked,
                "the client did not declare the capability this request needs",
            );
            exchange
                .child
                .cancel(exchange.bridge_id, "missing client capability");
            return Ok(json!({"jsonrpc": "2.0", "id": caller.id, "error": {
                "code": MISSING_CLIENT_CAPABILITY,
                "message": format!("the server asked for {method}, which this request's clientCapabilities do not declare"),
                "data": {"requiredCapabilities": required},
            }}));
        }
        let key = format!("{}-{n}", method.replace('/', "-"));
        input_requests.insert(key.clone(), json!({"method": method, "params": params}));
        held_ids.push((key, id));
    }
    if held_ids.is_empty() {
        return Err(exchange);
    }
    let held = Held {
        exchange,
        asked: held_ids,
    };
    Ok(match table.hold(held) {
        Ok(state) => {
            let mut result = json!({
                "jsonrpc": "2.0", "id": caller.id,
                "result": {"resultType": "input_required", "inputRequests": input_requests, "requestState": state},
            });
            result["result"]["_meta"] =
                json!({modern::META_SERVER_INFO: modern::server_info(init)});
            result
        }
        Err(held) => {
            abandon(
                held,
                "the bridge is holding too many requests for client input",
            );
            error_response(
                caller.id.clone(),
                -32603,
                "the bridge is holding too many requests for client input; try again later",
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_state_opens_only_for_its_request_and_is_unforgeable() {
        let key = StateKey::random();
        let call = binding(
            "tools/call",
            Some(&json!({"name": "ask", "arguments": {"q": 1}, "_meta": {"progressToken": 1}})),
        );
        let token = key.seal(7, &call);
        assert_eq!(key.open(&token, &call), Some(7));
        // Key order, `_meta`, `inputResponses` and `requestState` do not change the binding.
        let retry = binding(
            "tools/call",
            Some(
                &json!({"arguments": {"q": 1}, "name": "ask", "inputResponses": {}, "requestState": token}),
            ),
        );
        assert_eq!(key.open(&token, &retry), Some(7));
        let other = binding(
            "tools/call",
            Some(&json!({"name": "ask", "arguments": {"q": 2}})),
        );
        assert_eq!(key.open(&token, &other), None, "other arguments");
        assert_eq!(
            key.open(
                &token,
                &binding(
                    "prompts/get",
                    Some(&json!({"name": "ask", "arguments": {"q": 1}}))
                )
            ),
            None,
            "other method"
        );
        // Another process's key, a changed id, a truncated tag: all refused.
        assert_eq!(StateKey::random().open(&token, &call), None);
        let (head, tag) = token.rsplit_once('.').unwrap();
        let forged_payload = {
            let mut payload = 8u64.to_be_bytes().to_vec();
            payload.extend_from_slice(&call);
            format!("{TOKEN_PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(payload))
        };
        assert_eq!(key.open(&forged_payload, &call), None);
        assert_eq!(key.open(&format!("{head}.{}", &tag[..10]), &call), None);
        assert_eq!(key.open("garbage", &call), None);
    }

    #[test]
    fn capabilities_are_checked_per_request() {
        let sampling =
            required_capability("sampling/createMessage", &json!({"messages": []})).unwrap();
        assert!(declares(&json!({"sampling": {}}), &sampling));
        assert!(!declares(&json!({}), &sampling));
        assert!(!declares(&json!({"roots": {}}), &sampling));
        let with_tools =
            required_capability("sampling/createMessage", &json!({"tools": []})).unwrap();
        assert!(!declares(&json!({"sampling": {}}), &with_tools));
        assert!(declares(&json!({"sampling": {"tools": {}}}), &with_tools));
        let form = required_capability("elicitation/create", &json!({"message": "m"})).unwrap();
        assert!(declares(&json!({"elicitation": {}}), &form));
        assert!(declares(&json!({"elicitation": {"form": {}}}), &form));
        assert!(!declares(&json!({"elicitation": {"url": {}}}), &form));
        let url = required_capability("elicitation/create", &json!({"mode": "url"})).unwrap();
        assert!(!declares(&json!({"elicitation": {}}), &url));
        let roots = required_capability("roots/list", &json!({})).unwrap();
        assert!(declares(&json!({"roots": {"listChanged": true}}), &roots));
        assert_eq!(required_capability("tools/call", &json!({})), None);
    }

    #[test]
    fn logs_pass_only_at_or_above_the_requested_level() {
        let mut seen = Vec::new();
        let caller = Caller::from_request(
            &json!({"id": 1, "params": {"_meta": {META_LOG_LEVEL: "warning"}}}),
        );
        for level in ["debug", "warning", "error"] {
            relay_notification(
                json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": level, "data": level}}),
                &caller,
                &mut |m| seen.push(m["params"]["data"].clone()),
            );
        }
        assert_eq!(seen, vec![json!("warning"), json!("error")]);
        let silent = Caller::from_request(&json!({"id": 1, "params": {"_meta": {}}}));
        relay_notification(
            json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "emergency"}}),
            &silent,
            &mut |m| seen.push(m),
        );
        assert_eq!(seen.len(), 2, "no logLevel: no logs");
    }
}
