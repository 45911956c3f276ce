//! The stdio MCP server process and a JSON-RPC multiplexer over its stdin/stdout.
//!
//! The bridge relays raw JSON values instead of rmcp's typed messages: a relay must pass through methods,
//! fields and revisions it does not model (a child written against a newer or older schema than rmcp's would
//! otherwise lose data or be rejected), and it must rewrite ids and progress tokens, which is simplest on the
//! raw form.
//!
//! Every request the bridge sends gets a bridge-chosen numeric id, and every `progressToken` a bridge-chosen
//! string, so one child can serve several callers at once (the shared child of the 2026-07-28 path) and the
//! bridge's own requests never collide with a client's. Responses and progress are routed back to the caller
//! that sent the request with the client's id and token restored. Everything else the child sends (requests to
//! the client, notifications without a known token) is "unsolicited" and goes to the owner's channel.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

/// The handshake revision the bridge speaks to children it initializes itself: the newest one with
/// `initialize`. A client's own `initialize` asking for something newer is capped to this.
pub const CHILD_PROTOCOL_VERSION: &str = "2025-11-25";
/// Handshake revisions, newest first.
pub const HANDSHAKE_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// The environment variable holding the endpoint token; never passed on to the child (it is untrusted code and
/// has no business knowing the credential that guards it).
pub const TOKEN_ENV: &str = "MCP_AUTH_TOKEN";
/// One line from the child longer than this is dropped (a guard against unbounded memory).
const MAX_LINE: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("starting the MCP server `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the MCP server exited")]
    Exited,
    #[error("the MCP server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the MCP server answered initialize with an error: {0}")]
    InitializeRejected(String),
}

/// What to run: the program and its arguments, never through a shell.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub program: String,
    pub args: Vec<String>,
}

struct Pending {
    origin: Origin,
    client_id: Value,
    client_key: Option<String>,
    progress_token: Option<String>,
    tx: mpsc::UnboundedSender<Value>,
}

struct Progress {
    client_token: Value,
    tx: mpsc::UnboundedSender<Value>,
}

/// Who sent a request to the child, for attributing what the child sends back on its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The bridge's own calls (`initialize`, subscriptions): they never ask the client anything.
    Bridge,
    /// A handshake-era client's request.
    Session,
    /// A 2026-07-28 request on the shared child.
    Modern,
}

/// How long a cancelled request still counts as running for attribution: a server may go on (and ask the client
/// something) shortly after being told to cancel, and that question must not be taken for another request's.
/// Servers do not answer a cancelled request, so this is a time bound: long enough for a server to notice the
/// cancellation, short enough that one client's disconnect does not refuse everyone's questions for long.
const CANCELLED_LINGER: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, Pending>,
    /// Requests cancelled by the bridge whose answer has not come back yet, and when they were cancelled.
    cancelled: HashMap<u64, tokio::time::Instant>,
    progress: HashMap<String, Progress>,
    /// Client id (serialized) → bridge id, so a session's `notifications/cancelled` can be translated.
    by_client: HashMap<String, u64>,
}

/// A running child and its multiplexer. Dropping the last handle kills the process (kill_on_drop) and its
/// process group.
pub struct Child {
    stdin: mpsc::UnboundedSender<String>,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    exited: watch::Receiver<bool>,
    pid: Option<u32>,
}

/// Messages for one request: progress notifications (with the client's token), then the response (with the
/// client's id). Ends after the response; a child that exits first yields a JSON-RPC error response.
pub struct RequestHandle {
    pub bridge_id: u64,
    pub rx: mpsc::UnboundedReceiver<Value>,
}

impl Child {
    /// Starts the process. Its stdout is parsed line by line; unsolicited messages go to the returned receiver.
    pub fn spawn(
        spec: &ChildSpec,
    ) -> Result<(Arc<Child>, mpsc::UnboundedReceiver<Value>), ChildError> {
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_remove(TOKEN_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The server's own logs go to the machine's log stream, as with any stdio MCP host.
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            // Its own process group, so `npx`'s node grandchild is signalled too.
            .process_group(0);
        let mut process = command.spawn().map_err(|source| ChildError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let pid = process.id();
        let mut stdin = process.stdin.take().expect("piped stdin");
        let stdout = process.stdout.take().expect("piped stdout");
        let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<String>();
        let (unsolicited_tx, unsolicited_rx) = mpsc::unbounded_channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        let routes = Arc::new(Mutex::new(Routes::default()));

        tokio::spawn(async move {
            while let Some(mut line) = stdin_rx.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
            // Channel closed (child handle dropped) or the pipe broke: closing stdin asks the server to exit.
        });

        let reader_routes = routes.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.len() > MAX_LINE {
                    tracing::warn!(
                        bytes = buf.len(),
                        "dropping an oversized line from the MCP server"
                    );
                    continue;
                }
                let line = buf.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                // Parsed straight from the bytes: no UTF-8 copy of every line first.
                match serde_json::from_slice::<Value>(line) {
                    Ok(message) => route(&reader_routes, message, &unsolicited_tx),
                    // Content is not logged: it may be anything the server prints, including data.
                    Err(_) => tracing::warn!(
                        bytes = line.len(),
                        "non-JSON line on the MCP server's stdout"
                    ),
                }
            }
            // stdout closed: the process is gone or going. Reap it, then fail whatever is still waiting.
            let status = tokio::time::timeout(Duration::from_secs(5), process.wait()).await;
            if status.is_err() {
                let _ = process.start_kill();
                let _ = process.wait().await;
            }
            tracing::info!(pid, status = ?status.ok().and_then(|s| s.ok()), "MCP server exited");
            let routes = std::mem::take(&mut *reader_routes.lock().unwrap());
            for (_, pending) in routes.pending {
                let _ = pending.tx.send(error_response(
                    pending.client_id,
                    -32603,
                    "the MCP server exited before answering",
                ));
            }
            let _ = exited_tx.send(true);
        });

        Ok((
            Arc::new(Child {
                stdin: stdin_tx,
                routes,
                next_id: AtomicU64::new(1),
                exited: exited_rx,
                pid,
            }),
            unsolicited_rx,
        ))
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Resolves when the child has exited.
    pub async fn wait_exit(&self) {
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(|e| *e).await;
    }

    fn write(&self, message: &Value) -> Result<(), ChildError> {
        if self.has_exited() {
            return Err(ChildError::Exited);
        }
        self.stdin
            .send(message.to_string())
            .map_err(|_| ChildError::Exited)
    }

    /// Sends a request (any id), routing its progress and response back to the handle. `client_scope` records
    /// the client's id under that scope (a session id) so a later `notifications/cancelled` from the same client
    /// can be translated; the scope keeps equal ids of different sessions on a shared child apart.
    pub fn request(
        &self,
        message: Value,
        client_scope: Option<&str>,
    ) -> Result<RequestHandle, ChildError> {
        self.send_request(message, client_scope, Origin::Session)
    }

    /// Sends a 2026-07-28 request: like [`Child::request`], and a request or log message the child sends while
    /// this is the only request it is serving is routed to this handle (see [`attribute`]).
    pub fn request_modern(&self, message: Value) -> Result<RequestHandle, ChildError> {
        self.send_request(message, None, Origin::Modern)
    }

    fn send_request(
        &self,
        mut message: Value,
        client_scope: Option<&str>,
        origin: Origin,
    ) -> Result<RequestHandle, ChildError> {
        let bridge_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client_id = message.get("id").cloned().unwrap_or(Value::Null);
        message["id"] = json!(bridge_id);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut progress_token = None;
        if let Some(meta) = message
            .get_mut("params")
            .and_then(|p| p.get_mut("_meta"))
            .and_then(Value::as_object_mut)
            && let Some(client_token) = meta.get("progressToken").cloned()
        {
            let token = format!("mcpfly-{bridge_id}");
            meta.insert("progressToken".into(), json!(token));
            self.routes.lock().unwrap().progress.insert(
                token.clone(),
                Progress {
                    client_token,
                    tx: tx.clone(),
                },
            );
            progress_token = Some(token);
        }
        let client_key = client_scope.map(|scope| client_key(scope, &client_id));
        {
            let mut routes = self.routes.lock().unwrap();
            if let Some(key) = &client_key {
                routes.by_client.insert(key.clone(), bridge_id);
            }
            routes.pending.insert(
                bridge_id,
                Pending {
                    origin,
                    client_id,
                    client_key,
                    progress_token,
                    tx,
                },
            );
        }
        if let Err(error) = self.write(&message) {
            self.forget(bridge_id);
            return Err(error);
        }
        Ok(RequestHandle { bridge_id, rx })
    }

    /// Sends a notification or a response from the client of `client_scope`. `notifications/cancelled` naming a
    /// request id tracked in that scope is translated to the bridge's id, and the request is then answered no more
    /// (a cancelled request gets no response, and the client may already have closed); one naming an unknown id
    /// is dropped.
    pub fn send_from_client(
        &self,
        mut message: Value,
        client_scope: &str,
    ) -> Result<(), ChildError> {
        if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
            let key = client_key(
                client_scope,
                message.pointer("/params/requestId").unwrap_or(&Value::Null),
            );
            let bridge_id = self.routes.lock().unwrap().by_client.get(&key).copied();
            match bridge_id {
                Some(id) if self.mark_cancelled(id) => message["params"]["requestId"] = json!(id),
                _ => return Ok(()),
            }
        }
        self.write(&message)
    }

    /// Cancels a request the bridge sent (the caller went away): tells the child and drops what it still sends.
    pub fn cancel(&self, bridge_id: u64, reason: &str) {
        if self.mark_cancelled(bridge_id) {
            let _ = self.write(&json!({
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": bridge_id, "reason": reason},
            }));
        }
    }

    /// Stops routing anything of `bridge_id` back (its waiter sees its channel close, with no answer) and keeps it
    /// counted as running for a while, for attribution. False when it was not pending.
    fn mark_cancelled(&self, bridge_id: u64) -> bool {
        if !self.forget(bridge_id) {
            return false;
        }
        let mut routes = self.routes.lock().unwrap();
        let now = tokio::time::Instant::now();
        routes
            .cancelled
            .retain(|_, at| now.duration_since(*at) < CANCELLED_LINGER);
        routes.cancelled.insert(bridge_id, now);
        true
    }

    fn forget(&self, bridge_id: u64) -> bool {
        let mut routes = self.routes.lock().unwrap();
        match routes.pending.remove(&bridge_id) {
            Some(pending) => {
                if let Some(token) = pending.progress_token {
                    routes.progress.remove(&token);
                }
                if let Some(key) = pending.client_key {
                    routes.by_client.remove(&key);
                }
                true
            }
            None => false,
        }
    }

    /// Sends a request and waits for its response (progress is ignored).
    pub async fn call(&self, message: Value, timeout: Duration) -> Result<Value, ChildError> {
        let mut handle = self.send_request(message, None, Origin::Bridge)?;
        let wait = async {
            while let Some(message) = handle.rx.recv().await {
                if is_response(&message) {
                    return Ok(message);
                }
            }
            Err(ChildError::Exited)
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => {
                self.cancel(handle.bridge_id, "timeout");
                Err(ChildError::Timeout(timeout))
            }
        }
    }

    /// The bridge's own handshake: `initialize` at [`CHILD_PROTOCOL_VERSION`] and `notifications/initialized`.
    /// Returns the `InitializeResult`.
    pub async fn initialize(&self, timeout: Duration) -> Result<Value, ChildError> {
        let response = self
            .call(
                json!({
                    "jsonrpc": "2.0", "id": 0, "method": "initialize",
                    "params": {
                        "protocolVersion": CHILD_PROTOCOL_VERSION,
                        "capabilities": super::input_required::child_capabilities(),
                        "clientInfo": {"name": "mcpfly-bridge", "version": env!("CARGO_PKG_VERSION")},
                    },
                }),
                timeout,
            )
            .await?;
        match response.get("result") {
            Some(result) => {
                self.write(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
                Ok(result.clone())
            }
            None => Err(ChildError::InitializeRejected(
                response
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("no result")
                    .chars()
                    .take(200)
                    .collect(),
            )),
        }
    }

    /// Stops the child: closes stdin, gives it `grace` to exit, then kills its process group.
    pub async fn shutdown(&self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        if let Some(pid) = self.pid {
            // SIGTERM to the group first: `npx` does not always forward stdin EOF to node.
            // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is touched.
            unsafe { libc::kill(-(pid as i32), libc::SIGTERM) };
        }
        if tokio::time::timeout(grace, self.wait_exit()).await.is_err()
            && let Some(pid) = self.pid
        {
            // SAFETY: as above.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = tokio::time::timeout(Duration::from_secs(2), self.wait_exit()).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.has_exited()
            && let Some(pid) = self.pid
        {
            // kill_on_drop kills only the direct child; take its group (npx's node) with it.
            // SAFETY: signals the process group this module created.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

fn route(routes: &Mutex<Routes>, mut message: Value, unsolicited: &mpsc::UnboundedSender<Value>) {
    if is_response(&message) {
        let Some(bridge_id) = message.get("id").and_then(Value::as_u64) else {
            return;
        };
        let pending = {
            let mut routes = routes.lock().unwrap();
            let pending = routes.pending.remove(&bridge_id);
            routes.cancelled.remove(&bridge_id);
            if let Some(pending) = &pending {
                if let Some(token) = &pending.progress_token {
                    routes.progress.remove(token);
                }
                if let Some(key) = &pending.client_key {
                    routes.by_client.remove(key);
                }
            }
            pending
        };
        // A response to a cancelled or unknown request is dropped.
        if let Some(pending) = pending {
            message["id"] = pending.client_id;
            let _ = pending.tx.send(message);
        }
        return;
    }
    if message.get("method").and_then(Value::as_str) == Some("notifications/progress")
        && message.get("id").is_none()
        && let Some(token) = message
            .pointer("/params/progressToken")
            .and_then(Value::as_str)
    {
        let routes = routes.lock().unwrap();
        if let Some(progress) = routes.progress.get(token) {
            message["params"]["progressToken"] = progress.client_token.clone();
            let _ = progress.tx.send(message);
        }
        // Progress for a token we do not know (cancelled, or invented by the server) is dropped.
        return;
    }
    // Attributed here, in the order the child wrote, not later by the owner: a server usually writes the answer
    // right behind a log, and once the answer is routed nothing is left running to attribute the log to.
    let message = if needs_attribution(&message) {
        match attribute(&mut routes.lock().unwrap(), message) {
            Ok(()) => return,
            Err(message) => message,
        }
    } else {
        message
    };
    let _ = unsolicited.send(message);
}

/// What the child sends on its own that belongs to the client request that caused it: its requests to the client
/// (sampling, elicitation, roots) and its log messages.
fn needs_attribution(message: &Value) -> bool {
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return false;
    };
    message.get("id").is_some() || method == "notifications/message"
}

/// Routes a message the child sent on its own to the one 2026-07-28 request it can belong to: stdio carries no
/// link between a server's request or log and the client request that caused it, so it is attributed only when
/// exactly one client request (counting ones cancelled within [`CANCELLED_LINGER`]) is running and that one is
/// modern. Anything else is ambiguous, and guessing could show one client's data to another: the message is
/// handed back (to the owner's channel: a session's child sends it to its session).
fn attribute(routes: &mut Routes, message: Value) -> Result<(), Value> {
    let now = tokio::time::Instant::now();
    routes
        .cancelled
        .retain(|_, at| now.duration_since(*at) < CANCELLED_LINGER);
    let mut running = routes
        .pending
        .values()
        .filter(|p| p.origin != Origin::Bridge);
    let (Some(only), None) = (running.next(), running.next()) else {
        return Err(message);
    };
    if only.origin != Origin::Modern || !routes.cancelled.is_empty() {
        return Err(message);
    }
    only.tx.send(message).map_err(|e| e.0)
}

fn client_key(scope: &str, client_id: &Value) -> String {
    format!("{scope}/{client_id}")
}

pub fn is_response(message: &Value) -> bool {
    message.get("method").is_none()
        && message.get("id").is_some()
        && (message.get("result").is_some() || message.get("error").is_some())
}

pub fn error_response(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that logs and answers in one breath: the log must reach the request before its answer, even when
    /// the owner's channel (where unattributed messages go) is not read at all.
    #[tokio::test]
    async fn a_log_written_just_before_the_answer_reaches_the_one_modern_request() {
        let script = r#"read line
id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
printf '%s\n%s\n' '{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"warning","data":"warning line"}}' "{\"jsonrpc\":\"2.0\",\"id\":$id,\"result\":{}}"
sleep 30"#;
        let spec = ChildSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        };
        let (child, _never_read) = Child::spawn(&spec).unwrap();
        let mut handle = child
            .request_modern(
                json!({"jsonrpc": "2.0", "id": "client-1", "method": "tools/call",
                                   "params": {"name": "chatty"}}),
            )
            .unwrap();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), handle.rx.recv())
                .await
                .expect("the child answers")
                .expect("the request's channel stays open until its answer")
        };
        let first = next().await;
        assert_eq!(first["method"], "notifications/message", "{first}");
        let second = next().await;
        assert_eq!(second["id"], "client-1", "{second}");
        child.shutdown(Duration::from_millis(100)).await;
    }
}
