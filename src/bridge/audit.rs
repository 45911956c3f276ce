//! One audit line per request on the `mcpfly::audit` tracing target. It records who did what and how it went,
//! never arguments or results: the fields are fixed here, and no JSON-RPC body reaches them.
//!
//! Lines are written off the request path: a handler hands its finished record to an [`Auditor`] (a bounded
//! queue, never waiting), and one thread formats and writes them, every [`FLUSH_EVERY`] or when a burst fills
//! half the queue. When the writer falls behind (a slow log sink),
//! records beyond the channel's capacity are shed rather than slowing requests, and every shed record is counted
//! and reported in a warning line when the writer catches up and on the bridge's `/metrics` (which a sink that
//! never catches up cannot block), so a gap in the audit trail is never silent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// OAuth mode: the access token's `sub` (never the token).
    pub subject: Option<String>,
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
            subject: None,
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

    /// The finished record with its status and latency, ready to be written by the audit task.
    pub fn finish(self, status: u16) -> Finished {
        Finished {
            latency_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            time_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            status,
            record: self,
        }
    }
}

/// A record whose request is done; written by [`Finished::write`].
pub struct Finished {
    record: AuditRecord,
    status: u16,
    latency_ms: f64,
    time_unix_ms: u64,
}

impl Finished {
    pub fn write(&self) {
        let r = &self.record;
        tracing::info!(
            target: TARGET,
            time_unix_ms = self.time_unix_ms,
            http_method = r.http_method,
            session = r.session.as_deref().unwrap_or("-"),
            client = %r.client,
            subject = r.subject.as_deref().map(short).as_deref().unwrap_or("-"),
            era = r.era,
            protocol_version = r.protocol_version.as_deref().unwrap_or("-"),
            method = r.method.as_deref().unwrap_or("-"),
            tool = r.tool.as_deref().unwrap_or("-"),
            status = self.status,
            rpc_error = r.rpc_error.unwrap_or(0),
            note = r.note.unwrap_or("-"),
            latency_ms = self.latency_ms,
            "mcp request"
        );
    }
}

/// Records waiting for the writer; beyond this a burst is shed (and counted) instead of queued without bound.
pub const QUEUE: usize = 4096;

/// How often the writer looks for records. It is not woken per record: on a machine with one vCPU, waking a
/// thread at every request costs a context switch on the request's own core (measured: one writer wake-up per
/// call). A burst that fills half the queue wakes it at once.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// The request side of the audit trail: hands records to the writer thread without ever waiting.
#[derive(Clone)]
pub struct Auditor {
    queue: Arc<Queue>,
}

struct Queue {
    records: Mutex<VecDeque<Finished>>,
    capacity: usize,
    closed: AtomicBool,
    shed: AtomicU64,
    writer: OnceLock<std::thread::Thread>,
    /// Times a submit or close woke the writer.
    wakes: AtomicU64,
}

impl Queue {
    fn wake_writer(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }
}

impl Auditor {
    /// The auditor and its writer thread, which writes each record with `write` and ends after [`Auditor::close`]
    /// (or once every clone is dropped), with the queue drained.
    pub fn start(
        capacity: usize,
        write: impl Fn(&Finished) + Send + 'static,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let queue = Arc::new(Queue {
            records: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            closed: AtomicBool::new(false),
            shed: AtomicU64::new(0),
            writer: OnceLock::new(),
            wakes: AtomicU64::new(0),
        });
        let shared = queue.clone();
        // A thread of its own: a stalled sink (a full stderr pipe) then holds no async worker either.
        let writer = tokio::task::spawn_blocking(move || {
            let queue = shared;
            let _ = queue.writer.set(std::thread::current());
            let mut shed_reported = 0;
            loop {
                // Closed (or every auditor dropped) is read before draining, so nothing queued before it is lost.
                let last = queue.closed.load(Ordering::SeqCst) || Arc::strong_count(&queue) == 1;
                let batch = std::mem::take(&mut *queue.records.lock().unwrap());
                for finished in &batch {
                    write(finished);
                }
                let shed_now = queue.shed.load(Ordering::Relaxed);
                if shed_now != shed_reported {
                    tracing::warn!(
                        target: TARGET,
                        audit_lines_shed = shed_now - shed_reported,
                        audit_lines_shed_total = shed_now,
                        "audit lines shed: the log sink fell behind"
                    );
                    shed_reported = shed_now;
                }
                if last {
                    return;
                }
                std::thread::park_timeout(FLUSH_EVERY);
            }
        });
        (Self { queue }, writer)
    }

    /// Queues a finished record; never waits. A full queue sheds the record and counts it.
    pub fn submit(&self, finished: Finished) {
        let queue = &self.queue;
        let queued = {
            let mut records = queue.records.lock().unwrap();
            if records.len() >= queue.capacity {
                None
            } else {
                records.push_back(finished);
                Some(records.len())
            }
        };
        match queued {
            None => {
                queue.shed.fetch_add(1, Ordering::Relaxed);
            }
            Some(len) if len * 2 >= queue.capacity => queue.wake_writer(),
            Some(_) => {}
        }
    }

    /// Asks the writer to write what is queued and stop.
    pub async fn close(&self) {
        self.queue.closed.store(true, Ordering::SeqCst);
        self.queue.wake_writer();
    }

    /// Records shed so far (also reported in the audit stream as `audit_lines_shed`).
    pub fn shed(&self) -> u64 {
        self.queue.shed.load(Ordering::Relaxed)
    }
}

/// Method and tool names come from the client: cap them so a log line stays a line.
fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_log_sink_never_blocks_a_request_and_shedding_is_counted() {
        // The sink blocks until released, as a stalled stderr pipe would, and says when it is entered.
        let gate = Arc::new(std::sync::Barrier::new(2));
        let written = Arc::new(Mutex::new(0u32));
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (sink_gate, sink_written) = (gate.clone(), written.clone());
        let first = Arc::new(AtomicBool::new(true));
        let (auditor, writer) = Auditor::start(2, move |_| {
            if first.swap(false, Ordering::SeqCst) {
                let _ = entered_tx.send(());
                sink_gate.wait();
            }
            *sink_written.lock().unwrap() += 1;
        });
        let submitted = std::time::Instant::now();
        auditor.submit(AuditRecord::new("POST", "a".into()).finish(200));
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        for _ in 0..9 {
            auditor.submit(AuditRecord::new("POST", "a".into()).finish(200));
        }
        assert!(
            submitted.elapsed() < Duration::from_secs(2),
            "submitting waited for the sink"
        );
        // One record is in the stuck sink, two fit the queue: seven were shed, and counted.
        assert_eq!(auditor.shed(), 7);
        gate.wait();
        auditor.close().await;
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*written.lock().unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_do_not_wake_the_writer_one_by_one_and_all_are_written() {
        let written = Arc::new(AtomicU64::new(0));
        let sink = written.clone();
        let (auditor, writer) = Auditor::start(QUEUE, move |_| {
            sink.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..200 {
            auditor.submit(AuditRecord::new("POST", "a".into()).finish(200));
        }
        assert_eq!(auditor.queue.wakes.load(Ordering::SeqCst), 0);
        // Written on the writer's own round, without a wake-up.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while written.load(Ordering::SeqCst) < 200 {
            assert!(std::time::Instant::now() < deadline, "records not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A burst filling half the queue wakes it at once.
        for _ in 0..QUEUE / 2 {
            auditor.submit(AuditRecord::new("POST", "a".into()).finish(200));
        }
        assert!(auditor.queue.wakes.load(Ordering::SeqCst) >= 1);
        auditor.close().await;
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(written.load(Ordering::SeqCst), 200 + QUEUE as u64 / 2);
    }
}
