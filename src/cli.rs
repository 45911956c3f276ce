//! Command-line interface: argument types and dispatch.

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Parser, Debug)]
#[command(
    name = "mcpfly",
    version,
    about = "Run MCP servers on Fly.io from Kubernetes MCPDeployment resources"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Log format: human-readable text, or one JSON object per line (for log pipelines).
    #[arg(long, global = true, env = "MCPFLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or `mcpfly=debug,kube=info`.
    #[arg(long, global = true, env = "MCPFLY_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller: reconcile MCPDeployments into Fly apps and machines.
    Controller(Box<mcpfly::controller::ControllerConfig>),
    /// Print the MCPDeployment CustomResourceDefinition (YAML), e.g. `mcpfly crd | kubectl apply --server-side -f -`.
    Crd,
    /// Print a new Fernet key (or add it as the new primary key of a key-ring file with --append).
    Keygen(crate::cli_sealing::KeygenArgs),
    /// Seal credentials for one MCPDeployment: prints a `credentials:` block or merges into a manifest.
    Seal(crate::cli_sealing::SealArgs),
    /// Re-encrypt every sealed value in manifests with the primary key (key rotation).
    Reseal(crate::cli_sealing::ResealArgs),
    /// Check that every sealed value in manifests unseals for its resource; prints nothing secret.
    Unseal(crate::cli_sealing::UnsealArgs),
    /// Serve a stdio MCP server over MCP Streamable HTTP (runs inside each Fly machine): `mcpfly bridge -- CMD ARGS...`.
    ///
    /// Handshake era (2024-11-05 to 2025-11-25): `Mcp-Session-Id` sessions, one GET stream each (resumable with
    /// `Last-Event-ID`), server requests and notifications relayed; with several machines, a request for another
    /// machine's session is sent there with `fly-replay` (see `--machine-id`).
    #[command(after_help = mcpfly::bridge::FEATURES_BY_ERA)]
    Bridge(Box<mcpfly::bridge::BridgeArgs>),
    /// Serve the Fly Machines API emulator (for local runs and benchmarks; API under /v1, admin under /__emulator/).
    #[cfg(feature = "demo")]
    Emulator(EmulatorArgs),
    /// Run everything on this machine: a local control plane, the Fly emulator running machines as local
    /// processes, and the controller; apply examples/ and show each deployment's phase, URL and tools.
    #[cfg(feature = "demo")]
    Demo(mcpfly::demo::DemoArgs),
    /// Not in this build: the local harness (`demo` feature) is left out of the images' binary.
    #[cfg(not(feature = "demo"))]
    #[command(hide = true)]
    Emulator(HarnessLeftOut),
    /// Not in this build: the local harness (`demo` feature) is left out of the images' binary.
    #[cfg(not(feature = "demo"))]
    #[command(hide = true)]
    Demo(HarnessLeftOut),
    /// The built-in example MCP server on stdio (what the runtime image runs without an init command).
    #[command(hide = true)]
    ExampleServer,
}

/// Whatever `mcpfly demo`/`mcpfly emulator` were given, in a build without them: they only get the explanation.
#[cfg(not(feature = "demo"))]
#[derive(Args, Debug)]
pub struct HarnessLeftOut {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _ignored: Vec<String>,
}

/// Why `mcpfly demo`/`mcpfly emulator` fail in the images' binary.
#[cfg(not(feature = "demo"))]
pub const HARNESS_LEFT_OUT: &str = "is not in this build: the images' binary is built without the local harness \
    (cargo feature `demo`: the demo, the Fly emulator and the local control plane). Run it from a source checkout \
    (`cargo run -- demo`) or a binary built with default features";

#[cfg(feature = "demo")]
#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 4280)]
    pub port: u16,
    /// How long a machine takes from starting to started.
    #[arg(long, default_value_t = 2000)]
    pub start_latency_ms: u64,
    /// Disable Fly's per-action rate limits.
    #[arg(long)]
    pub no_rate_limits: bool,
    /// Also cap all mutating calls of the org at this many per second (Fly documents no such limit; benchmarks
    /// set one). The controller must be told the same with --fly-org-mutations-per-second.
    #[arg(long)]
    pub org_mutations_per_second: Option<f64>,
    /// Burst of the org-wide mutation limit.
    #[arg(long, default_value_t = 20.0)]
    pub org_mutations_burst: f64,
    /// The API token the emulator accepts, and the org it belongs to.
    #[arg(long, env = "MCPFLY_EMULATOR_TOKEN", default_value = fly_emulator::DEFAULT_TOKEN, hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value = fly_emulator::DEFAULT_ORG)]
    pub org: String,
}

/// Logs go to stderr, or to `file` (without colour codes) when the command keeps the terminal for itself.
pub fn init_logging(args: &LogArgs, file: Option<&std::path::Path>) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = file.and_then(|path| match std::fs::File::create(path) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "cannot write logs to {}: {e}; logging to stderr",
                path.display()
            );
            None
        }
    });
    let (writer, ansi) = match file {
        Some(f) => (BoxMakeWriter::new(std::sync::Mutex::new(f)), false),
        None => (BoxMakeWriter::new(std::io::stderr), true),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Controller(config) => mcpfly::controller::run(*config).await,
        Command::Crd => {
            print!("{}", mcpfly::api::crd_yaml());
            Ok(())
        }
        Command::Keygen(args) => crate::cli_sealing::run_keygen(args).await,
        Command::Seal(args) => crate::cli_sealing::run_seal(args).await,
        Command::Reseal(args) => crate::cli_sealing::run_reseal(args).await,
        Command::Unseal(args) => crate::cli_sealing::run_unseal(args).await,
        Command::Bridge(args) => mcpfly::bridge::run(*args).await,
        #[cfg(not(feature = "demo"))]
        Command::Emulator(_) => anyhow::bail!("`mcpfly emulator` {HARNESS_LEFT_OUT}"),
        #[cfg(not(feature = "demo"))]
        Command::Demo(_) => anyhow::bail!("`mcpfly demo` {HARNESS_LEFT_OUT}"),
        #[cfg(feature = "demo")]
        Command::Emulator(args) => {
            let mut config = fly_emulator::EmulatorConfig::from_knobs(
                std::time::Duration::from_millis(args.start_latency_ms),
                !args.no_rate_limits,
                Some(&args.token),
                Some(&args.org),
            );
            if let Some(rate) = args.org_mutations_per_second {
                config = config.with_org_mutation_limit(rate, args.org_mutations_burst);
            }
            fly_emulator::serve(
                config,
                std::net::SocketAddr::from(([127, 0, 0, 1], args.port)),
            )
            .await?;
            Ok(())
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => mcpfly::demo::run(args).await,
        Command::ExampleServer => mcpfly::example_server::run().await,
    }
}
