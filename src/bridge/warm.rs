//! Warm children: server processes started ahead of the sessions that will use them.
//!
//! A handshake-era session runs its own child, and a slow-starting server (a Python interpreter importing its
//! SDK, `npx` resolving a package) made every `initialize` wait for that start. The pool keeps up to
//! `--warm-sessions` processes started and idle on stdin; a new session takes one and forwards the client's own
//! `initialize` to it, so the client's capabilities and protocol version reach the server exactly as with a cold
//! start (a child initialized in advance by the bridge would have to be told capabilities no client declared).
//! The pool is refilled in the background after each take, and never holds more processes than the session limit
//! leaves room for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::child::{Child, ChildSpec};

/// The most warm children one bridge keeps, whatever `--warm-sessions` says: each is a whole server process.
pub const MAX_WARM: usize = 8;

type Spawned = (Arc<Child>, mpsc::UnboundedReceiver<Value>);

pub struct WarmPool {
    spec: ChildSpec,
    size: usize,
    idle: Mutex<VecDeque<Spawned>>,
}

impl WarmPool {
    pub fn new(spec: ChildSpec, size: usize) -> Arc<Self> {
        Arc::new(Self {
            spec,
            size: size.min(MAX_WARM),
            idle: Mutex::new(VecDeque::new()),
        })
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts processes until the pool is full or `room` (what the session limit leaves) is used up. A command that
    /// cannot start is logged once per call and not retried until the next take, so a broken server cannot spin.
    pub fn fill(&self, room: usize) {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|(child, _)| !child.has_exited());
        while idle.len() < self.size.min(room) {
            match Child::spawn(&self.spec) {
                Ok(spawned) => idle.push_back(spawned),
                Err(error) => {
                    tracing::warn!(%error, "cannot start a warm MCP server");
                    return;
                }
            }
        }
    }

    /// A started child that is still running, if one is warm.
    pub fn take(&self) -> Option<Spawned> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((child, unsolicited)) = idle.pop_front() {
            if !child.has_exited() {
                return Some((child, unsolicited));
            }
        }
        None
    }

    /// Stops every idle child (shutdown).
    pub async fn drain(&self, grace: Duration) {
        let all: Vec<Spawned> = self.idle.lock().unwrap().drain(..).collect();
        futures::future::join_all(all.iter().map(|(child, _)| child.shutdown(grace))).await;
    }
}
