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
//!
//! Refills compete with the sessions they serve: a Python server's start is about a second of CPU, and on a
//! machine with one vCPU (Fly's shared-cpu-1x) a start running beside a session's calls slows those calls
//! several-fold. So the pool refills in the background, one process at a time per CPU this process may use
//! (starts are CPU-bound: more at once only slows each), and only once requests have stopped arriving for
//! [`QUIET`]: a session calling back to back is not charged for the next session's spare. A bridge busy without
//! pause keeps its pool as it is; a new session then starts its own server, as it would without a pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::child::{Child, ChildError, ChildSpec};

/// The most warm children one bridge keeps, whatever the flags say: each is a whole server process.
pub const MAX_WARM: usize = 8;

/// How long a burst of sessions keeps the pool at the size it needed.
pub const HORIZON: Duration = Duration::from_secs(300);

/// How long no request may have been in flight before the pool starts a process: longer than the pause between
/// a client's back-to-back calls, shorter than a person or a model takes between tool calls.
pub const QUIET: Duration = Duration::from_millis(250);

/// How long a warm process counts as still starting when no start has been measured yet.
const ASSUMED_START: Duration = Duration::from_secs(1);

/// Longest wait between two looks of a refill: a start may be measured or a request end meanwhile.
const POLL: Duration = Duration::from_millis(100);

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

/// Requests the bridge is serving, and when the last one ended: the pool starts processes only in a quiet moment.
pub struct Activity {
    quiet: Duration,
    in_flight: AtomicUsize,
    last_end: Mutex<Option<Instant>>,
}

/// One request in flight, until dropped.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap() = Some(Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn new(quiet: Duration) -> Arc<Self> {
        Arc::new(Self {
            quiet,
            in_flight: AtomicUsize::new(0),
            last_end: Mutex::new(None),
        })
    }

    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// How much longer to wait for the bridge to have been quiet long enough ([`QUIET`]); `None` once it has.
    fn until_quiet(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Some(self.quiet.max(POLL));
        }
        let ended = (*self.last_end.lock().unwrap())?;
        Some(self.quiet.saturating_sub(ended.elapsed())).filter(|left| !left.is_zero())
    }
}

pub struct WarmPool {
    spec: ChildSpec,
    floor: usize,
    ceiling: usize,
    /// Pool processes starting at once at most: the CPUs this process may use.
    max_starting: usize,
    assumed_start: Duration,
    state: Mutex<PoolState>,
    activity: Arc<Activity>,
    /// Processes the pool has started (`/metrics`).
    started: AtomicU64,
    /// Whether a refill task is running (one at a time).
    refilling: AtomicBool,
    /// Set by [`WarmPool::drain`]: nothing starts after shutdown.
    closed: AtomicBool,
    /// Times a refill waited (for a quiet moment or for a start to finish).
    waits: AtomicU64,
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
        let Some(start) = self.start_estimate() else {
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

    fn start_estimate(&self) -> Option<Duration> {
        self.starts.iter().min().copied()
    }

    /// How many idle processes are still starting (by the estimate, else `assumed`), and how long until the
    /// first of them is done.
    fn starting(&self, assumed: Duration) -> (usize, Duration) {
        let start = self.start_estimate().unwrap_or(assumed);
        let left: Vec<Duration> = self
            .idle
            .iter()
            .map(|warm| start.saturating_sub(warm.spawned.elapsed()))
            .filter(|left| !left.is_zero())
            .collect();
        (
            left.len(),
            left.iter().min().copied().unwrap_or(Duration::ZERO),
        )
    }
}

/// What a refill does next.
#[derive(Debug, PartialEq)]
enum Step {
    Started,
    Wait(Duration),
    Done,
}

impl WarmPool {
    /// A pool kept between `floor` and `ceiling` children (both capped at [`MAX_WARM`]); `floor` 0 turns it off.
    pub fn new(spec: ChildSpec, floor: usize, ceiling: usize) -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_timing(spec, floor, ceiling, cpus, QUIET, ASSUMED_START)
    }

    fn with_timing(
        spec: ChildSpec,
        floor: usize,
        ceiling: usize,
        max_starting: usize,
        quiet: Duration,
        assumed_start: Duration,
    ) -> Arc<Self> {
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
            max_starting: max_starting.max(1),
            assumed_start,
            state: Mutex::new(PoolState::default()),
            activity: Activity::new(quiet),
            started: AtomicU64::new(0),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waits: AtomicU64::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Processes the pool has started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// What the HTTP layer marks each request with, so refills wait for a quiet moment.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
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

    /// Brings the pool to its target in the background, within `room()` (what the session limit leaves, asked
    /// again before each start): idle processes beyond it are stopped at once (the newest: the least ready);
    /// missing ones are started one per step, each in a quiet moment and with fewer than `max_starting` of the
    /// pool's still starting. A command that cannot start is logged and not retried until the next refill, so a
    /// broken server cannot spin. One refill runs at a time; asking while one runs is enough for it to see the
    /// new target.
    pub fn refill(self: &Arc<Self>, room: impl Fn() -> usize + Send + 'static) {
        if self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                match pool.step(room()) {
                    Step::Started => {}
                    Step::Wait(wait) => {
                        pool.waits.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(wait.min(POLL)).await;
                    }
                    Step::Done => {
                        pool.refilling.store(false, Ordering::SeqCst);
                        // A take between the last step and the flag's reset found the flag still set: look again.
                        if pool.step_needed(room()) && !pool.refilling.swap(true, Ordering::SeqCst)
                        {
                            continue;
                        }
                        return;
                    }
                }
            }
        });
    }

    fn step_needed(&self, room: usize) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.len() != self.target().min(room)
    }

    fn step(&self, room: usize) -> Step {
        if self.closed.load(Ordering::SeqCst) {
            return Step::Done;
        }
        let target = self.target().min(room);
        let mut state = self.state.lock().unwrap();
        state.idle.retain(|warm| !warm.child.has_exited());
        if state.idle.len() >= target {
            while state.idle.len() > target {
                let Some(extra) = state.idle.pop_back() else {
                    break;
                };
                tokio::spawn(async move { extra.child.shutdown(Duration::from_secs(1)).await });
            }
            return Step::Done;
        }
        if let Some(wait) = self.activity.until_quiet() {
            return Step::Wait(wait);
        }
        let (starting, next_done) = state.starting(self.assumed_start);
        if starting >= self.max_starting {
            return Step::Wait(next_done);
        }
        match Warm::spawn(&self.spec) {
            Ok(warm) => {
                state.idle.push_back(warm);
                self.started.fetch_add(1, Ordering::Relaxed);
                Step::Started
            }
            Err(error) => {
                tracing::warn!(%error, "cannot start a warm MCP server");
                Step::Done
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

    /// Stops every idle child (shutdown); nothing is started afterwards.
    pub async fn drain(&self, grace: Duration) {
        self.closed.store(true, Ordering::SeqCst);
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

    fn sleeper() -> ChildSpec {
        ChildSpec {
            program: "sleep".into(),
            args: vec!["600".into()],
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_request_that_just_ended_is_not_a_quiet_moment() {
        let activity = Activity::new(Duration::from_secs(600));
        assert_eq!(activity.until_quiet(), None, "no request yet");
        let busy = activity.begin();
        assert_eq!(activity.until_quiet(), Some(Duration::from_secs(600)));
        drop(busy);
        assert!(activity.until_quiet() > Some(Duration::from_secs(500)));
        let no_window = Activity::new(Duration::ZERO);
        let busy = no_window.begin();
        assert!(
            no_window.until_quiet().is_some(),
            "in flight is never quiet"
        );
        drop(busy);
        assert_eq!(no_window.until_quiet(), None);
    }

    #[tokio::test]
    async fn no_spare_starts_while_a_request_is_in_flight_and_one_starts_once_it_ends() {
        let pool = WarmPool::with_timing(sleeper(), 1, 4, 1, Duration::ZERO, ASSUMED_START);
        let busy = pool.activity().begin();
        pool.refill(|| 8);
        // The refill looked several times and found the bridge busy each time.
        eventually("the refill waiting", || {
            pool.waits.load(Ordering::Relaxed) >= 3
        })
        .await;
        assert_eq!(pool.started(), 0, "a spare started beside a request");
        // The same refill starts the spare once the request is answered.
        drop(busy);
        eventually("the spare started", || pool.started() == 1).await;
        assert_eq!(pool.len(), 1);
        pool.drain(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn the_pool_starts_one_process_at_a_time_per_cpu() {
        // Three wanted, one CPU: the second starts only once the first is done starting.
        let long = Duration::from_secs(3600);
        let pool = WarmPool::with_timing(sleeper(), 3, 3, 1, Duration::ZERO, long);
        pool.refill(|| 8);
        eventually("the first start", || pool.started() == 1).await;
        let waits = pool.waits.load(Ordering::Relaxed);
        eventually("the refill waiting", || {
            pool.waits.load(Ordering::Relaxed) >= waits + 3
        })
        .await;
        assert_eq!(pool.started(), 1, "a second start beside the first");
        // A measured start time says the first is done: the next ones start, one after the other.
        pool.answered(Instant::now());
        eventually("all three started", || pool.started() == 3).await;
        assert_eq!(pool.len(), 3);
        pool.drain(Duration::from_secs(1)).await;

        // With as many CPUs as processes wanted, they start together.
        let pool = WarmPool::with_timing(sleeper(), 3, 3, 3, Duration::ZERO, long);
        pool.refill(|| 8);
        eventually("three starts", || pool.started() == 3).await;
        pool.drain(Duration::from_secs(1)).await;
    }
}
