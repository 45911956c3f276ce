//! `bridge-bench`: `mcpfly bridge` side by side with the bridges a user would pick instead (supergateway,
//! mcp-proxy) and a canned server with no child at all (the floor), interleaved over rounds so that load from
//! elsewhere on the machine hits every contender alike. Run through `hack/bench-bridge.sh`, which installs the
//! peers and builds the release binaries; the report lands in `target/bench/bridge-<time>/`.
//!
//! Every contender runs as its own process on loopback, speaking MCP Streamable HTTP (protocol 2025-11-25) to the
//! same driver (this process): handshake latency (`initialize` + `notifications/initialized` on a fresh session),
//! sequential `tools/call` latency on one kept-alive connection, throughput with 1/8/32 clients (one session and
//! connection each), the bridge process's CPU per 1,000 calls (at 8 clients) and RSS per session (the whole
//! process tree with 8 sessions open, divided by 8).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "The bridge benchmark (BENCHMARKS.md); run it through hack/bench-bridge.sh")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// The `mcpfly` binary (release build).
    #[arg(long, default_value = "target/release/mcpfly")]
    mcpfly: PathBuf,
    /// supergateway's entry point (`node_modules/supergateway/dist/index.js`).
    #[arg(long)]
    supergateway_js: Option<PathBuf>,
    /// The `mcp-proxy` executable.
    #[arg(long)]
    mcp_proxy: Option<PathBuf>,
    /// Python with the MCP SDK, for the slow-starting child.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The slow-starting child's script.
    #[arg(long, default_value = "bench/bridge/slow_server.py")]
    slow_server: PathBuf,
    /// Rounds; each runs every contender once, in a rotated order.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Handshakes measured per contender and round.
    #[arg(long, default_value_t = 10)]
    handshakes: usize,
    /// Pause between handshakes, in ms (sessions do not arrive back to back; the same for every contender).
    #[arg(long, default_value_t = 1000)]
    handshake_gap_ms: u64,
    /// Sequential calls measured per contender and round.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Client counts for throughput.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Sessions open for the RSS measurement.
    #[arg(long, default_value_t = 8)]
    rss_sessions: usize,
    /// Pin every contender (and its children) to this CPU with taskset.
    #[arg(long)]
    pin: Option<u32>,
    /// Settle time after a contender answers its first handshake, in ms (its warm-up, the same for all).
    #[arg(long, default_value_t = 3000)]
    settle_ms: u64,
    /// Skip the slow-starting child.
    #[arg(long)]
    no_slow: bool,
    /// Skip the fast child.
    #[arg(long)]
    no_fast: bool,
    /// Only these contenders (a diagnosis, not a comparison): mcpfly, mcpfly-shared, supergateway, mcp-proxy,
    /// floor.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// An extra argument for both mcpfly contenders (repeat), e.g. `--mcpfly-arg=--warm-sessions-max=1`.
    #[arg(long, allow_hyphen_values = true)]
    mcpfly_arg: Vec<String>,
    /// A quick run: 1 round, few samples, 1 s throughput windows (a smoke test of the harness, not figures).
    #[arg(long)]
    smoke: bool,
    /// Where the report goes; default target/bench/bridge-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Sub {
    /// The floor: a canned Streamable HTTP server that answers without any child.
    Floor {
        #[arg(long)]
        port: u16,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Contender {
    Mcpfly,
    McpflyShared,
    Supergateway,
    McpProxy,
    Floor,
}

impl Contender {
    fn key(self) -> &'static str {
        match self {
            Contender::Mcpfly => "mcpfly",
            Contender::McpflyShared => "mcpfly-shared",
            Contender::Supergateway => "supergateway",
            Contender::McpProxy => "mcp-proxy",
            Contender::Floor => "floor",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Contender::Mcpfly => "mcpfly",
            Contender::McpflyShared => "mcpfly (shared)",
            Contender::Supergateway => "supergateway 4.0",
            Contender::McpProxy => "mcp-proxy 0.13",
            Contender::Floor => "floor (no child)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum ChildKind {
    Fast,
    Slow,
}

#[derive(Default)]
struct Samples {
    handshake_ms: Vec<f64>,
    call_ms: Vec<f64>,
    throughput: BTreeMap<usize, Vec<f64>>,
    cpu_ms_per_1000: Vec<f64>,
    /// Processes the contender started from the sequential phase's handshake to its last call.
    seq_starts: Vec<f64>,
    /// Times the contender's processes were preempted (involuntary context switches) per 100 sequential calls.
    seq_preempted: Vec<f64>,
    rss_per_session_mib: Vec<f64>,
    bridge_rss_mib: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(Sub::Floor { port }) = cli.command {
        return runtime.block_on(floor(port));
    }
    if cli.smoke {
        cli.rounds = 1;
        cli.handshakes = 2;
        cli.calls = 20;
        cli.seconds = 1.0;
        cli.settle_ms = 500;
        cli.handshake_gap_ms = 200;
        cli.rss_sessions = 2;
    }
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = chrono::Utc::now();
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "target/bench/bridge-{}",
            started.format("%Y%m%d-%H%M%S")
        ))
    });
    std::fs::create_dir_all(&out)?;
    let mut contenders = vec![Contender::Mcpfly, Contender::McpflyShared];
    if cli.supergateway_js.is_some() {
        contenders.push(Contender::Supergateway);
    }
    if cli.mcp_proxy.is_some() {
        contenders.push(Contender::McpProxy);
    }
    contenders.push(Contender::Floor);
    if !cli.only.is_empty() {
        contenders.retain(|c| cli.only.iter().any(|o| o == c.key()));
    }
    let mut kinds = Vec::new();
    if !cli.no_fast {
        kinds.push(ChildKind::Fast);
    }
    if !cli.no_slow {
        if cli.python.is_none() {
            bail!("--python is required for the slow-starting child (or pass --no-slow)");
        }
        kinds.push(ChildKind::Slow);
    }
    let mut results: BTreeMap<(ChildKind, Contender), Samples> = BTreeMap::new();
    for round in 0..cli.rounds {
        for &kind in &kinds {
            let mut order = contenders.clone();
            if kind == ChildKind::Slow {
                // The floor has no child: its figures do not depend on which child the others run.
                order.retain(|c| *c != Contender::Floor);
            }
            let n = order.len();
            order.rotate_left(round % n);
            for contender in order {
                eprintln!(
                    "round {}/{}: {:?} child, {}",
                    round + 1,
                    cli.rounds,
                    kind,
                    contender.name()
                );
                let samples = results.entry((kind, contender)).or_default();
                measure(&cli, contender, kind, samples)
                    .await
                    .with_context(|| format!("{} with the {kind:?} child", contender.name()))?;
            }
        }
    }
    let report = report(&cli, &results, &contenders, &kinds, started);
    std::fs::write(out.join("report.md"), &report)?;
    println!("{report}");
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}

/// A contender's process (its own process group, so its children go with it).
struct Running {
    process: tokio::process::Child,
    pid: u32,
    url: String,
}

impl Running {
    async fn stop(mut self) {
        // SAFETY: signals the process group created for this contender.
        unsafe { libc::kill(-(self.pid as i32), libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(5), self.process.wait())
            .await
            .is_err()
        {
            // SAFETY: as above.
            unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            let _ = self.process.wait().await;
        }
        // Children that outlived their parent (stdio servers waiting on a closed pipe) go too.
        // SAFETY: as above.
        unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn child_command(cli: &Cli, kind: ChildKind) -> Vec<String> {
    match kind {
        ChildKind::Fast => vec![
            cli.mcpfly.display().to_string(),
            "example-server".to_string(),
        ],
        ChildKind::Slow => vec![
            cli.python.as_ref().expect("checked").display().to_string(),
            cli.slow_server.display().to_string(),
        ],
    }
}

async fn start(cli: &Cli, contender: Contender, kind: ChildKind) -> anyhow::Result<Running> {
    let port = free_port()?;
    let child = child_command(cli, kind);
    let port_s = port.to_string();
    let mut argv: Vec<String> = match contender {
        Contender::Mcpfly | Contender::McpflyShared => {
            let mut a: Vec<String> = [
                cli.mcpfly.display().to_string().as_str(),
                "bridge",
                "--no-auth",
                "--host",
                "127.0.0.1",
                "--port",
                &port_s,
                "--path",
                "/mcp",
                "--rate-per-client",
                "0",
                "--rate-per-token",
                "0",
                "--max-sessions",
                "128",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if contender == Contender::McpflyShared {
                a.extend(["--session-isolation".into(), "shared".into()]);
            }
            a.extend(cli.mcpfly_arg.iter().cloned());
            a.push("--".into());
            a.extend(child);
            a
        }
        Contender::Supergateway => vec![
            "node".into(),
            cli.supergateway_js
                .as_ref()
                .expect("checked")
                .display()
                .to_string(),
            "--stdio".into(),
            child.join(" "),
            "--outputTransport".into(),
            "streamableHttp".into(),
            // One child per session, as mcpfly's default (its stateless mode starts a child per request).
            "--stateful".into(),
            "--port".into(),
            port_s.clone(),
            "--streamableHttpPath".into(),
            "/mcp".into(),
            "--logLevel".into(),
            "none".into(),
        ],
        Contender::McpProxy => {
            let mut a = vec![
                cli.mcp_proxy
                    .as_ref()
                    .expect("checked")
                    .display()
                    .to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port_s.clone(),
                "--log-level".into(),
                "WARNING".into(),
                "--".into(),
            ];
            a.extend(child);
            a
        }
        Contender::Floor => vec![
            std::env::current_exe()?.display().to_string(),
            "floor".into(),
            "--port".into(),
            port_s.clone(),
        ],
    };
    if let Some(cpu) = cli.pin {
        let mut pinned = vec!["taskset".to_string(), "-c".into(), cpu.to_string()];
        pinned.append(&mut argv);
        argv = pinned;
    }
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .process_group(0)
        .kill_on_drop(true);
    let process = command
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let pid = process.id().context("pid")?;
    Ok(Running {
        process,
        pid,
        url: format!("http://127.0.0.1:{port}/mcp"),
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .expect("HTTP client")
}

const ACCEPT: &str = "application/json, text/event-stream";
const VERSION: &str = "2025-11-25";

/// The JSON-RPC response in a JSON or SSE body.
fn response_of(body: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return Some(v);
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m.get("id").is_some() && m.get("method").is_none())
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    session: Option<&str>,
    body: &Value,
) -> anyhow::Result<(reqwest::StatusCode, Option<String>, String)> {
    let mut request = http
        .post(url)
        .header("accept", ACCEPT)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", VERSION);
    }
    let response = request.send().await?;
    let status = response.status();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((status, session, response.text().await?))
}

/// initialize + notifications/initialized; the session id.
async fn handshake(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "bridge-bench", "version": "1"}}});
    let (status, session, body) = post(http, url, None, &init).await?;
    if !status.is_success() {
        bail!("initialize: {status} {body}");
    }
    let session = session.context("no Mcp-Session-Id")?;
    let response = response_of(&body).context("no initialize response")?;
    if response.get("result").is_none() {
        bail!("initialize failed: {response}");
    }
    let (status, _, _) = post(
        http,
        url,
        Some(&session),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await?;
    if !status.is_success() {
        bail!("initialized: {status}");
    }
    Ok(session)
}

async fn end(http: &reqwest::Client, url: &str, session: &str) {
    let _ = http
        .delete(url)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", VERSION)
        .send()
        .await;
}

async fn call(http: &reqwest::Client, url: &str, session: &str, id: u64) -> anyhow::Result<()> {
    let text = format!("call-{id}");
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}}});
    let (status, _, body) = post(http, url, Some(session), &body).await?;
    if !status.is_success() {
        bail!("tools/call: {status} {body}");
    }
    let response = response_of(&body).context("no tools/call response")?;
    if response
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        != Some(text.as_str())
    {
        bail!("unexpected tools/call answer: {response}");
    }
    Ok(())
}

/// Waits until the contender completes a handshake (it is up and its child answers).
async fn wait_up(running: &Running) -> anyhow::Result<()> {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match handshake(&http, &running.url).await {
            Ok(session) => {
                end(&http, &running.url, &session).await;
                return Ok(());
            }
            Err(error) if Instant::now() > deadline => return Err(error.context("never came up")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn measure(
    cli: &Cli,
    contender: Contender,
    kind: ChildKind,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let running = start(cli, contender, kind).await?;
    let result = measure_running(cli, &running, kind, samples).await;
    running.stop().await;
    result
}

async fn measure_running(
    cli: &Cli,
    running: &Running,
    kind: ChildKind,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let url = running.url.as_str();
    wait_up(running).await?;
    tokio::time::sleep(Duration::from_millis(cli.settle_ms)).await;

    // RSS first, before other phases leave sessions behind (a bridge that does not end sessions on DELETE would
    // otherwise be charged for them): the whole process tree with the sessions open (each has made a call, so a
    // lazy server has done its work), divided by their number.
    let mut open = Vec::new();
    for _ in 0..cli.rss_sessions {
        let http = client();
        let session = handshake(&http, url).await?;
        call(&http, url, &session, 1).await?;
        open.push((http, session));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tree = tree_rss_kib(running.pid);
    samples
        .rss_per_session_mib
        .push(tree as f64 / 1024.0 / cli.rss_sessions as f64);
    samples
        .bridge_rss_mib
        .push(rss_kib(running.pid) as f64 / 1024.0);
    for (http, session) in &open {
        end(http, url, session).await;
    }
    tokio::time::sleep(Duration::from_millis(cli.settle_ms)).await;

    // Handshakes, each on a fresh connection as a new client would open one.
    for _ in 0..cli.handshakes {
        let http = client();
        let t = Instant::now();
        let session = handshake(&http, url).await?;
        samples.handshake_ms.push(ms(t.elapsed()));
        end(&http, url, &session).await;
        tokio::time::sleep(Duration::from_millis(cli.handshake_gap_ms)).await;
    }

    // Sequential calls on one kept-alive connection.
    let before = descendants(running.pid);
    let http = client();
    let session = handshake(&http, url).await?;
    for id in 0..10 {
        call(&http, url, &session, id).await?;
    }
    let preempted_before = preemptions(running.pid);
    for id in 0..cli.calls as u64 {
        let t = Instant::now();
        call(&http, url, &session, 100 + id).await?;
        samples.call_ms.push(ms(t.elapsed()));
    }
    let preempted = preemptions(running.pid).saturating_sub(preempted_before);
    samples
        .seq_preempted
        .push(preempted as f64 * 100.0 / cli.calls.max(1) as f64);
    let started = descendants(running.pid)
        .iter()
        .filter(|pid| !before.contains(pid))
        .count();
    samples.seq_starts.push(started as f64);
    end(&http, url, &session).await;

    if kind == ChildKind::Fast {
        for &clients in &cli.clients {
            let (calls, elapsed, cpu) = throughput(running, clients, cli.seconds).await?;
            samples
                .throughput
                .entry(clients)
                .or_default()
                .push(calls as f64 / elapsed.as_secs_f64());
            if clients == 8 && calls > 0 {
                samples
                    .cpu_ms_per_1000
                    .push(cpu.as_secs_f64() * 1000.0 / calls as f64 * 1000.0);
            }
        }
    }

    Ok(())
}

/// `clients` sessions calling back to back for `seconds`: calls completed, time, and the contender's CPU time.
async fn throughput(
    running: &Running,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<(u64, Duration, Duration)> {
    let mut sessions = Vec::new();
    for _ in 0..clients {
        let http = client();
        let session = handshake(&http, &running.url).await?;
        call(&http, &running.url, &session, 1).await?;
        sessions.push((http, session));
    }
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_time(running.pid);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = sessions
        .iter()
        .cloned()
        .map(|(http, session)| {
            let url = running.url.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut id = 10;
                while Instant::now() < until {
                    call(&http, &url, &session, id).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    id += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(running.pid).saturating_sub(cpu_before);
    for (http, session) in &sessions {
        end(http, &running.url, session).await;
    }
    Ok((done.load(Ordering::Relaxed), elapsed, cpu))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// User + system CPU time of one process (not its children).
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start at index 2 (state).
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS of `root` and every descendant.
fn tree_rss_kib(root: u32) -> u64 {
    descendants(root).iter().map(|pid| rss_kib(*pid)).sum()
}

/// Involuntary context switches of `root` and its descendants, all their threads: each is a moment a runnable
/// thread of the contender waited for the CPU while something else ran.
fn preemptions(root: u32) -> u64 {
    let mut total = 0;
    for pid in descendants(root) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// `root` and every process below it.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some((_, rest)) = stat.rsplit_once(')')
                && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
            {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// One report row: a figure per contender, then mcpfly's ratios to the comparable peers (>1 means mcpfly is better).
struct Row {
    name: String,
    lower_is_better: bool,
    values: Vec<f64>,
}

fn report(
    cli: &Cli,
    results: &BTreeMap<(ChildKind, Contender), Samples>,
    contenders: &[Contender],
    kinds: &[ChildKind],
    started: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = String::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    out.push_str(&format!(
        "Bridge benchmark, {} UTC; {} rounds, interleaved; {} CPUs ({}); pinned: {}; load average at the end: {}\n\n",
        started.format("%Y-%m-%d %H:%M"),
        cli.rounds,
        cpus,
        machine,
        cli.pin.map(|c| format!("CPU {c}")).unwrap_or_else(|| "no".into()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ));
    for &kind in kinds {
        let columns: Vec<Contender> = contenders
            .iter()
            .copied()
            .filter(|c| results.contains_key(&(kind, *c)))
            .collect();
        let get = |c: Contender| results.get(&(kind, c)).expect("filtered");
        let mut rows = vec![
            Row {
                name: "handshake p50 (ms)".into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| median(&get(*c).handshake_ms))
                    .collect(),
            },
            Row {
                name: "handshake p99 (ms)".into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| percentile(&get(*c).handshake_ms, 99.0))
                    .collect(),
            },
            Row {
                name: "sequential call p50 (ms)".into(),
                lower_is_better: true,
                values: columns.iter().map(|c| median(&get(*c).call_ms)).collect(),
            },
            Row {
                name: "sequential call p99 (ms)".into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| percentile(&get(*c).call_ms, 99.0))
                    .collect(),
            },
            Row {
                name: "preemptions per 100 sequential calls (contender's processes)".into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| median(&get(*c).seq_preempted))
                    .collect(),
            },
            Row {
                name:
                    "processes started, sequential phase (its handshake included; most in a round)"
                        .into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| percentile(&get(*c).seq_starts, 100.0))
                    .collect(),
            },
        ];
        if kind == ChildKind::Fast {
            for &clients in &cli.clients {
                rows.push(Row {
                    name: format!("throughput, {clients} clients (calls/s)"),
                    lower_is_better: false,
                    values: columns
                        .iter()
                        .map(|c| {
                            median(
                                get(*c)
                                    .throughput
                                    .get(&clients)
                                    .map(Vec::as_slice)
                                    .unwrap_or(&[]),
                            )
                        })
                        .collect(),
                });
            }
            rows.push(Row {
                name: "bridge CPU per 1,000 calls (ms, 8 clients)".into(),
                lower_is_better: true,
                values: columns
                    .iter()
                    .map(|c| median(&get(*c).cpu_ms_per_1000))
                    .collect(),
            });
        }
        rows.push(Row {
            name: format!("RSS per session (MiB; process tree / {})", cli.rss_sessions),
            lower_is_better: true,
            values: columns
                .iter()
                .map(|c| median(&get(*c).rss_per_session_mib))
                .collect(),
        });
        rows.push(Row {
            name: "bridge process RSS (MiB)".into(),
            lower_is_better: true,
            values: columns
                .iter()
                .map(|c| median(&get(*c).bridge_rss_mib))
                .collect(),
        });
        out.push_str(&format!(
            "### {} child: {}\n\n",
            match kind {
                ChildKind::Fast => "Fast",
                ChildKind::Slow => "Slow-starting",
            },
            match kind {
                ChildKind::Fast => "`mcpfly example-server`",
                ChildKind::Slow => "`bench/bridge/slow_server.py` (official Python SDK)",
            }
        ));
        // Like with like: mcpfly's per-session mode against supergateway (stateful, a child per session), its
        // shared mode against mcp-proxy (one shared child), and each mode against the floor.
        let index = |c: Contender| columns.iter().position(|x| *x == c);
        let pairs: Vec<(usize, usize)> = [
            (Contender::Mcpfly, Contender::Supergateway),
            (Contender::McpflyShared, Contender::McpProxy),
            (Contender::Mcpfly, Contender::Floor),
            (Contender::McpflyShared, Contender::Floor),
        ]
        .into_iter()
        .filter_map(|(ours, peer)| Some((index(ours)?, index(peer)?)))
        .collect();
        out.push_str("| | ");
        out.push_str(
            &columns
                .iter()
                .map(|c| c.name().to_string())
                .collect::<Vec<_>>()
                .join(" | "),
        );
        for &(ours, peer) in &pairs {
            out.push_str(&format!(
                " | {} vs {}",
                columns[ours].name(),
                columns[peer].name()
            ));
        }
        out.push_str(" |\n|---|");
        out.push_str(&"---:|".repeat(columns.len() + pairs.len()));
        out.push('\n');
        for row in &rows {
            out.push_str(&format!("| {} |", row.name));
            for v in &row.values {
                out.push_str(&format!(" {} |", fmt(*v)));
            }
            // As a factor, > 1: mcpfly is ahead (against the floor, < 1 is expected: 0.5× is twice its time).
            for &(ours, peer) in &pairs {
                let (ours, peer) = (row.values[ours], row.values[peer]);
                // A count (processes started) has no meaningful factor when one side is zero.
                if ours == 0.0 || peer == 0.0 {
                    out.push_str(" – |");
                    continue;
                }
                let ratio = if row.lower_is_better {
                    peer / ours
                } else {
                    ours / peer
                };
                out.push_str(&format!(" {}× |", fmt(ratio)));
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The floor: what answering costs with no child and no relay at all.
async fn floor(port: u16) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let sessions = Arc::new(AtomicU64::new(1));
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::any(move |method: axum::http::Method, body: axum::body::Bytes| {
            let sessions = sessions.clone();
            async move { floor_answer(&sessions, method, &body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await?;
    Ok(())
}

fn floor_answer(
    sessions: &AtomicU64,
    method: axum::http::Method,
    body: &[u8],
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    if method == axum::http::Method::DELETE {
        return StatusCode::OK.into_response();
    }
    let Ok(message) = serde_json::from_slice::<Value>(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(id) = message.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    let json_type = [(header::CONTENT_TYPE, "application/json")];
    match message.get("method").and_then(Value::as_str) {
        Some("initialize") => {
            let session = format!("floor-{}", sessions.fetch_add(1, Ordering::Relaxed));
            let answer = json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocolVersion": VERSION, "capabilities": {"tools": {}},
                "serverInfo": {"name": "floor", "version": "1"}}});
            (
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (header::HeaderName::from_static("mcp-session-id"), session),
                ],
                answer.to_string(),
            )
                .into_response()
        }
        _ => {
            let text = message
                .pointer("/params/arguments/text")
                .cloned()
                .unwrap_or(Value::Null);
            let answer = json!({"jsonrpc": "2.0", "id": id, "result": {
                "content": [{"type": "text", "text": text}], "isError": false}});
            (json_type, answer.to_string()).into_response()
        }
    }
}
