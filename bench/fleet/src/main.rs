//! `fleet-bench`: see BENCHMARKS.md. `hack/bench.sh` builds the release binaries and runs it.

mod bench;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Measures mcpfly against DESIGN §8: apply → Ready, Fly calls per create, idle Fly calls and Kubernetes writes,
/// controller RSS and CPU; the same for a naive per-resource-polling baseline.
#[derive(Parser, Debug)]
struct Args {
    /// Deployments applied at once.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Deployments applied one at a time for the single-deployment latency.
    #[arg(long, default_value_t = 20)]
    singles: usize,
    /// The mcpfly binary (default: target/release/mcpfly of this workspace).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Emulated machine start time.
    #[arg(long, default_value_t = 2000)]
    start_latency_ms: u64,
    /// An org-wide mutation cap imposed by the emulator (and announced to the controller). Fly documents none;
    /// unset, only Fly's documented per-action limits apply. The earlier benchmarks used 20.
    #[arg(long)]
    org_mutations_per_second: Option<f64>,
    /// The cap's burst (default: the rate).
    #[arg(long)]
    org_mutations_burst: Option<f64>,
    /// The idealised emulator timing (`Realism::fly`, sub-second windows) instead of Fly-like seconds.
    #[arg(long)]
    short_realism: bool,
    /// The controller's org-wide listing interval (production default 60).
    #[arg(long, default_value_t = 60)]
    fleet_poll_seconds: u64,
    /// Idle measurement window.
    #[arg(long, default_value_t = 300)]
    idle_seconds: u64,
    /// When the idle window starts after the fleet is Ready. The default includes the listings that report the
    /// convergence's own changes (within the listing's 60 s overlap); past about two poll intervals it measures
    /// the steady state. The convergence's call counts, RSS and CPU are taken at the same moment, so they include
    /// this wait.
    #[arg(long, default_value_t = 15)]
    idle_after_seconds: u64,
    /// Skip the naive baseline.
    #[arg(long)]
    no_baseline: bool,
    /// The baseline's per-resource polling interval.
    #[arg(long, default_value_t = 60)]
    baseline_resync_seconds: u64,
    #[arg(long, default_value_t = 180)]
    baseline_idle_seconds: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    #[arg(long, default_value_t = 1000)]
    converge_interval_ms: u64,
    /// Where the report (JSON, Markdown) and the controller logs go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| "fleet_bench=info,mcpfly_bench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let controller_bin = args
        .controller_bin
        .unwrap_or_else(|| workspace.join("target/release/mcpfly"));
    anyhow::ensure!(
        controller_bin.is_file(),
        "{} not found: build it first (`cargo build --release --bin mcpfly`) or pass --controller-bin",
        controller_bin.display()
    );
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let out_dir = args.out.join(format!("fleet-{stamp}"));
    let mut opts = bench::Options::full(args.n, controller_bin, out_dir.clone());
    opts.singles = args.singles;
    opts.start_latency = Duration::from_millis(args.start_latency_ms);
    opts.org_mutations = args
        .org_mutations_per_second
        .map(|rate| (rate, args.org_mutations_burst.unwrap_or(rate)));
    if args.short_realism {
        opts.realism = fly_emulator::Realism::fly();
    }
    opts.fleet_poll_seconds = args.fleet_poll_seconds;
    opts.idle_window = Duration::from_secs(args.idle_seconds);
    opts.settle = Duration::from_secs(args.idle_after_seconds);
    opts.baseline = !args.no_baseline;
    opts.baseline_resync_seconds = args.baseline_resync_seconds;
    opts.baseline_idle_window = Duration::from_secs(args.baseline_idle_seconds);
    opts.concurrency = args.concurrency;
    opts.converge_interval_ms = args.converge_interval_ms;
    let report = bench::run(&opts).await?;
    let markdown = bench::markdown(&report);
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("report.md"), &markdown)?;
    println!("{markdown}");
    eprintln!("report and controller logs: {}", out_dir.display());
    Ok(())
}
