//! Warm children: server processes started ahead of the sessions that will use them.
//!
//! A handshake-era session runs its own child, and a slow-starting server (a Python interpreter importing its
//! SDK, `npx` resolving a package) made every `initialize` wait for that start. The pool keeps processes started
//! and idle on stdin; a new session takes the oldest (the one most likely done starting) and forwards the client's
//! own `initialize` to it, so the client's capabilities and protocol version reach the server exactly as with a
//! cold start. Children are not initialized in advance: the bridge would have to declare capabilities and a
//! protocol version no client chose, and the server would keep them for the session's life.
//!
//! A started child is only useful once it has had its start time to get ready, so one spare is not enough when
//! sessions arrive faster than a server starts: a child refilled at one session's take is still importing when the
//! next one takes it. The pool therefore sizes itself by Little's law: it keeps as many children as sessions
//! arrived within one start time at the recent peak (start time estimated from how long recent children took to
//! answer their first `initialize`, counted from their spawn), between `--warm-sessions` and
//! `--warm-sessions-max`, and never more than the session limit leaves room for. Peaks are remembered for
//! [`HORIZON`], so a quiet moment at the start of the next burst does not shrink the pool just before it is needed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use super::child::{Child, ChildError, ChildSpec};

/// The most warm children one bridge keeps, whatever the flags say: each is a whole server process.
pub const MAX_WARM: usize = 8;

/// How long a burst of sessions keeps the pool at the size it needed.
pub const HORIZON: Duration = Duration::from_secs(300);

/// Start times remembered; the estimate is their minimum (a child taken long after it was ready adds its idle time).
const STARTS_KEPT: usize = 8;

/// A started child waiting for a session, and when it was started.
pub struct Warm {
    pub child: Arc<Child>,
    pub unsolicited: mpsc::UnboundedReceiver<Value>,
    pub spawned: Instant,
}

impl Warm {
    /// Starts a child now (a cold start when a session found no warm one).
    pub fn spawn(spec: &ChildSpec) -> Result<Self, ChildError> {
        let spawned = Instant::now();
        let (child, unsolicited) = Child::spawn(spec)?;
        Ok(Self {
            child,
            unsolicited,
            spawned,
        })
    }
}

pub struct WarmPool {
    spec: ChildSpec,
    floor: usize,
    ceiling: usize,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    idle: VecDeque<Warm>,
    /// When sessions took (or asked for) a child, within [`HORIZON`].
    takes: VecDeque<Instant>,
    /// Spawn-to-first-answer times of recent children.
    starts: VecDeque<Duration>,
}

impl PoolState {
    /// Children to keep: the most sessions that arrived within one start time, over the horizon. Unknown start
    /// time (no child has answered yet): nothing beyond the floor.
    fn demand(&self) -> usize {
        let Some(&start) = self.starts.iter().min() else {
            return 0;
        };
        let takes = &self.takes;
        let mut peak = 0;
        let mut first = 0;
        for (last, &at) in takes.iter().enumerate() {
            while at.duration_since(takes[first]) > start {
                first += 1;
            }
            peak = peak.max(last - first + 1);
        }
        peak
    }
}

impl WarmPool {
    /// A pool kept between `floor` and `ceiling` children (both capped at [`MAX_WARM`]); `floor` 0 turns it off.
    pub fn new(spec: ChildSpec, floor: usize, ceiling: usize) -> Arc<Self> {
        let floor = floor.min(MAX_WARM);
        let ceiling = if floor == 0 {
            0
        } else {
            ceiling.clamp(floor, MAX_WARM)
        };
        Arc::new(Self {
            spec,
            floor,
            ceiling,
            state: Mutex::new(PoolState::default()),
        })
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many children the pool aims to hold now, before the session limit's room.
    pub fn target(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        while state
            .takes
            .front()
            .is_some_and(|t| now.duration_since(*t) > HORIZON)
        {
            state.takes.pop_front();
        }
        state.demand().clamp(self.floor, self.ceiling)
    }

    /// Starts processes until the pool holds its target or `room` (what the session limit leaves) is used up, and
    /// stops idle ones beyond that (the newest: the least ready). A command that cannot start is logged once per
    /// call and not retried until the next call, so a broken server cannot spin.
    pub fn fill(&self, room: usize) {
        let target = self.target().min(room);
        let mut state = self.state.lock().unwrap();
        state.idle.retain(|warm| !warm.child.has_exited());
        while state.idle.len() < target {
            match Warm::spawn(&self.spec) {
                Ok(warm) => state.idle.push_back(warm),
                Err(error) => {
                    tracing::warn!(%error, "cannot start a warm MCP server");
                    return;
                }
            }
        }
        while state.idle.len() > target {
            let Some(extra) = state.idle.pop_back() else {
                break;
            };
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { extra.child.shutdown(Duration::from_secs(1)).await });
            }
        }
    }

    /// The oldest started child that is still running, if one is warm. Counts as demand either way.
    pub fn take(&self) -> Option<Warm> {
        let mut state = self.state.lock().unwrap();
        if self.ceiling > 0 {
            state.takes.push_back(Instant::now());
            if state.takes.len() > 4 * MAX_WARM {
                state.takes.pop_front();
            }
        }
        while let Some(warm) = state.idle.pop_front() {
            if !warm.child.has_exited() {
                return Some(warm);
            }
        }
        None
    }

    /// A child spawned at `spawned` answered its first `initialize` now: an upper bound of the server's start time.
    pub fn answered(&self, spawned: Instant) {
        let mut state = self.state.lock().unwrap();
        state.starts.push_back(spawned.elapsed());
        if state.starts.len() > STARTS_KEPT {
            state.starts.pop_front();
        }
    }

    /// Stops every idle child (shutdown).
    pub async fn drain(&self, grace: Duration) {
        let all: Vec<Warm> = self.state.lock().unwrap().idle.drain(..).collect();
        futures::future::join_all(all.iter().map(|warm| warm.child.shutdown(grace))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(starts: &[u64], takes_ms: &[u64]) -> PoolState {
        let base = Instant::now();
        PoolState {
            idle: VecDeque::new(),
            takes: takes_ms
                .iter()
                .map(|ms| base + Duration::from_millis(*ms))
                .collect(),
            starts: starts.iter().map(|ms| Duration::from_millis(*ms)).collect(),
        }
    }

    #[test]
    fn the_pool_keeps_the_sessions_that_arrive_within_one_start_time() {
        // A 2.3 s start and a session a second: a child refilled at one take is taken two takes later, still
        // starting, unless three are kept.
        assert_eq!(state(&[2300], &[0, 1000, 2000, 3000, 4000]).demand(), 3);
        // The estimate is the quickest recent start: a child that idled 60 s before its session says nothing.
        assert_eq!(
            state(&[60_000, 2300, 9000], &[0, 1000, 2000, 3000]).demand(),
            3
        );
        // A fast server needs one, however often sessions come.
        assert_eq!(state(&[30], &[0, 200, 400, 600]).demand(), 1);
        // The peak counts, not the latest take: a burst keeps the pool large after it.
        assert_eq!(state(&[1000], &[0, 100, 200, 300, 5000]).demand(), 4);
        // No child has answered yet: no estimate, nothing beyond the floor.
        assert_eq!(state(&[], &[0, 100, 200]).demand(), 0);
    }
}
