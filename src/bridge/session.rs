//! Handshake-era sessions: one child process per `Mcp-Session-Id`.
//!
//! Why one child per session rather than one shared child with id remapping: an MCP server keeps per-connection
//! state (negotiated version, capabilities the client declared, log level, subscriptions, whatever a tool
//! remembers), and with one child per session none of it can leak from one client to another. It also routes the
//! child's own requests (sampling, elicitation, roots) and notifications to the one client that can answer them,
//! which a shared child cannot do without guessing. The cost is a process per session, bounded by
//! `--max-sessions` and reaped after `--session-idle-timeout`; [`super::warm`] keeps started processes ready so a
//! new session does not wait for one to start.
//!
//! `--session-isolation shared` trades that isolation away for servers known to be stateless: every session is
//! served by the one shared child of [`super::modern`] (see the README for what is lost).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use super::child::{Child, error_response};

/// Messages kept for a session while no stream is open to take them.
const BACKLOG: usize = 1000;
/// Events kept per session for `Last-Event-ID` resumption: the newest, at most this many and this many bytes
/// (a tool may answer with megabytes); older ones cannot be replayed.
const HISTORY: usize = 1000;
const HISTORY_BYTES: usize = 4 * 1024 * 1024;
/// The stream id of a session's GET stream in event ids; POST response streams are numbered from 1.
pub const GET_STREAM: u64 = 0;

pub struct Session {
    pub id: String,
    pub child: Arc<Child>,
    /// False for sessions on the shared child: ending the session must not stop it.
    pub owns_child: bool,
    pub protocol_version: String,
    outbound: Mutex<Outbound>,
    next_event: AtomicU64,
    next_stream: AtomicU64,
    last_seen: Mutex<Instant>,
    /// How long a server request may wait in the backlog (`--server-request-wait-secs`).
    request_wait: Duration,
    me: Weak<Session>,
}

#[derive(Default)]
struct Outbound {
    /// The session's GET stream, if one is open, and which opening it was (a resumed stream replaces it).
    get: Option<mpsc::UnboundedSender<Value>>,
    get_opened: u64,
    /// POST response streams still open: the fallback for server-initiated messages when no GET stream is, since
    /// a stdio child does not say which request a message relates to.
    posts: Vec<(u64, mpsc::UnboundedSender<Value>)>,
    backlog: VecDeque<Value>,
    history: History,
}

/// Events sent on a session's streams, newest last, within [`HISTORY`] events and [`HISTORY_BYTES`].
#[derive(Default)]
struct History {
    /// `(stream, event number, message, its size)`
    events: VecDeque<(u64, u64, Value, usize)>,
    bytes: usize,
}

impl History {
    fn push(&mut self, stream: u64, event: u64, message: &Value) {
        let size = message.to_string().len();
        self.events
            .push_back((stream, event, message.clone(), size));
        self.bytes += size;
        while self.events.len() > HISTORY || self.bytes > HISTORY_BYTES {
            let Some((_, _, _, dropped)) = self.events.pop_front() else {
                break;
            };
            self.bytes -= dropped;
        }
    }

    /// `(event id, message)` of `stream`'s events after event number `after`.
    fn after(&self, stream: u64, after: u64) -> Vec<(String, Value)> {
        self.events
            .iter()
            .filter(|(s, e, _, _)| *s == stream && *e > after)
            .map(|(s, e, m, _)| (event_id(*s, *e), m.clone()))
            .collect()
    }
}

/// A session's claim on one of its SSE streams (the GET stream or a POST response stream). Dropping it
/// unregisters the stream at once, so a closed GET stream frees its slot (a reopened one is not refused).
pub struct StreamClaim {
    stream: u64,
    /// For the GET stream: which opening this is, so a replaced stream does not free its successor's slot.
    opened: u64,
    session: Arc<Session>,
}

impl StreamClaim {
    /// The stream's number in its event ids.
    pub fn stream(&self) -> u64 {
        self.stream
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        let mut out = self.session.outbound.lock().unwrap();
        if self.stream == GET_STREAM {
            if out.get_opened == self.opened {
                out.get = None;
            }
        } else {
            out.posts.retain(|(id, _)| *id != self.stream);
        }
    }
}

/// An event id: the stream and a number unique in the session, so `Last-Event-ID` names both.
pub fn event_id(stream: u64, event: u64) -> String {
    format!("{stream}_{event}")
}

fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (stream, event) = id.trim().split_once('_')?;
    Some((stream.parse().ok()?, event.parse().ok()?))
}

impl Session {
    pub fn touch(&self) {
        *self.last_seen.lock().unwrap() = Instant::now();
    }

    /// Records a message sent on `stream` for resumption; returns its event id.
    pub fn record(&self, stream: u64, message: &Value) -> String {
        let event = self.next_event.fetch_add(1, Ordering::Relaxed);
        let mut out = self.outbound.lock().unwrap();
        out.history.push(stream, event, message);
        event_id(stream, event)
    }

    /// An event id for an event that carries no message (SSE priming).
    pub fn priming_id(&self, stream: u64) -> String {
        event_id(stream, self.next_event.fetch_add(1, Ordering::Relaxed))
    }

    /// What a client that saw `last_event_id` missed of that stream: `(stream, [(event id, message)])`; `None`
    /// when the id is not one of this session's.
    pub fn missed(&self, last_event_id: &str) -> Option<(u64, Vec<(String, Value)>)> {
        let (stream, after) = parse_event_id(last_event_id)?;
        if after >= self.next_event.load(Ordering::Relaxed) {
            return None;
        }
        let missed = self.outbound.lock().unwrap().history.after(stream, after);
        Some((stream, missed))
    }

    /// Opens the GET stream; `None` if one is already open (→ 409), unless `resumed`: a client resuming with
    /// `Last-Event-ID` has lost its stream, whether or not the bridge noticed yet, so the new one replaces it.
    /// Backlogged messages come first.
    pub fn open_get(
        self: &Arc<Self>,
        resumed: bool,
    ) -> Option<(mpsc::UnboundedReceiver<Value>, StreamClaim)> {
        let mut out = self.outbound.lock().unwrap();
        if !resumed && out.get.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for message in out.backlog.drain(..) {
            let _ = tx.send(message);
        }
        out.get = Some(tx);
        out.get_opened += 1;
        let claim = StreamClaim {
            stream: GET_STREAM,
            opened: out.get_opened,
            session: self.clone(),
        };
        Some((rx, claim))
    }

    pub fn register_post(self: &Arc<Self>, tx: mpsc::UnboundedSender<Value>) -> StreamClaim {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.outbound.lock().unwrap().posts.push((stream, tx));
        StreamClaim {
            stream,
            opened: 0,
            session: self.clone(),
        }
    }

    /// Takes back what a closing stream had received but not sent: `claim` is dropped first, so nothing new is
    /// routed to it, then the rest is delivered again (another stream, or the backlog until one opens).
    pub fn reclaim(&self, claim: StreamClaim, rx: &mut mpsc::UnboundedReceiver<Value>) {
        drop(claim);
        rx.close();
        while let Ok(message) = rx.try_recv() {
            self.deliver(message);
        }
    }

    /// Delivers a message the child sent on its own: GET stream, else the newest open POST stream, else backlog.
    pub fn deliver(&self, message: Value) {
        let mut out = self.outbound.lock().unwrap();
        if let Some(tx) = &out.get {
            match tx.send(message) {
                Ok(()) => return,
                Err(mpsc::error::SendError(m)) => {
                    out.get = None;
                    return self.deliver_fallback(&mut out, m);
                }
            }
        }
        self.deliver_fallback(&mut out, message)
    }

    fn deliver_fallback(&self, out: &mut Outbound, mut message: Value) {
        while let Some((_, tx)) = out.posts.last() {
            match tx.send(message) {
                Ok(()) => return,
                Err(mpsc::error::SendError(m)) => {
                    message = m;
                    out.posts.pop();
                }
            }
        }
        if out.backlog.len() >= BACKLOG {
            out.backlog.pop_front();
        }
        let request_id = message.get("method").and(message.get("id")).cloned();
        out.backlog.push_back(message.clone());
        if let Some(id) = request_id {
            // A server request waits for a stream only so long: its tool must not hang on a client that went away.
            let (session, wait) = (self.me.clone(), self.request_wait);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let Some(session) = session.upgrade() else {
                    return;
                };
                let expired = {
                    let mut out = session.outbound.lock().unwrap();
                    let at = out.backlog.iter().position(|m| *m == message);
                    at.and_then(|at| out.backlog.remove(at)).is_some()
                };
                if expired {
                    tracing::info!(session = %session.id, "server request found no client stream; answered with an error");
                    let answer = error_response(
                        id,
                        -32603,
                        "the client has no stream open to receive this request",
                    );
                    let _ = session.child.send_from_client(answer, &session.id);
                }
            });
        }
    }
}

/// All live sessions.
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    max: usize,
    request_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("too many sessions (limit {0})")]
pub struct TooMany(pub usize);

impl Sessions {
    pub fn new(max: usize, request_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            max,
            request_wait,
        })
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session limit (`--max-sessions`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether a new session may start; checked before spawning a child for it.
    pub fn has_room(&self) -> Result<(), TooMany> {
        if self.len() >= self.max {
            Err(TooMany(self.max))
        } else {
            Ok(())
        }
    }

    /// Registers an initialized child as a session. With `unsolicited` (a child of its own), what the child sends
    /// on its own is relayed to the session, and the session ends when the child exits; without (the shared
    /// child), the session is gone once that child has exited (see [`Sessions::get`]).
    pub fn insert(
        self: &Arc<Self>,
        id: String,
        child: Arc<Child>,
        unsolicited: Option<mpsc::UnboundedReceiver<Value>>,
        protocol_version: String,
    ) -> Arc<Session> {
        let session = Arc::new_cyclic(|me| Session {
            id: id.clone(),
            child,
            owns_child: unsolicited.is_some(),
            protocol_version,
            outbound: Mutex::new(Outbound::default()),
            next_event: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            last_seen: Mutex::new(Instant::now()),
            request_wait: self.request_wait,
            me: me.clone(),
        });
        self.map.lock().unwrap().insert(id.clone(), session.clone());
        let Some(mut unsolicited) = unsolicited else {
            return session;
        };
        let sessions = Arc::downgrade(self);
        let weak = Arc::downgrade(&session);
        tokio::spawn(async move {
            while let Some(message) = unsolicited.recv().await {
                match weak.upgrade() {
                    Some(session) => session.deliver(message),
                    None => return,
                }
            }
            // The child is gone: so is the session (its client gets 404 and re-initializes).
            if let Some(sessions) = sessions.upgrade() {
                sessions.map.lock().unwrap().remove(&id);
            }
        });
        session
    }

    /// A live session by id; a session whose child has exited counts as gone.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.map.lock().unwrap();
        let session = map.get(id)?.clone();
        if session.child.has_exited() {
            map.remove(id);
            return None;
        }
        session.touch();
        Some(session)
    }

    /// Ends a session (DELETE, idle, shutdown): forgets it and stops its child.
    pub async fn end(&self, id: &str, grace: Duration) -> bool {
        let session = self.map.lock().unwrap().remove(id);
        match session {
            Some(session) => {
                if session.owns_child {
                    session.child.shutdown(grace).await;
                }
                true
            }
            None => false,
        }
    }

    pub async fn end_all(&self, grace: Duration) {
        let all: Vec<_> = self.map.lock().unwrap().drain().map(|(_, s)| s).collect();
        futures::future::join_all(
            all.iter()
                .filter(|s| s.owns_child)
                .map(|s| s.child.shutdown(grace)),
        )
        .await;
    }

    /// Ends sessions idle for longer than `idle` with no GET stream open.
    pub async fn reap(&self, idle: Duration, grace: Duration) {
        let stale: Vec<String> = self
            .map
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                s.last_seen.lock().unwrap().elapsed() > idle
                    && s.outbound.lock().unwrap().get.is_none()
            })
            .map(|s| s.id.clone())
            .collect();
        for id in stale {
            tracing::info!(session = %id, "ending idle session");
            self.end(&id, grace).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_replays_one_stream_and_stays_within_its_bounds() {
        let mut history = History::default();
        for event in 1..=4 {
            history.push(event % 2, event, &serde_json::json!({"n": event}));
        }
        let odd = history.after(1, 1);
        assert_eq!(odd, vec![("1_3".to_string(), serde_json::json!({"n": 3}))]);
        assert_eq!(parse_event_id("1_3"), Some((1, 3)));
        assert_eq!(parse_event_id("x"), None);

        // A few large answers push older events out: the byte budget holds.
        let big = serde_json::json!("x".repeat(HISTORY_BYTES / 3));
        for event in 5..=9 {
            history.push(0, event, &big);
        }
        assert!(history.bytes <= HISTORY_BYTES, "{}", history.bytes);
        assert!(history.after(0, 0).len() <= 3);
        assert!(history.after(0, 8).len() == 1, "the newest is kept");
        for event in 10..(10 + HISTORY as u64 + 5) {
            history.push(0, event, &serde_json::json!(1));
        }
        assert_eq!(history.events.len(), HISTORY);
    }
}
