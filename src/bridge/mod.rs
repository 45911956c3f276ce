//! `mcpfly bridge`: runs a stdio MCP server and serves it over MCP Streamable HTTP, inside each Fly machine.
//!
//! - [`http`]: the endpoint (auth, Origin/CORS, limits, both protocol eras, health and readiness).
//! - [`session`]: handshake-era sessions, one child each (or the shared one with `--session-isolation shared`);
//!   [`affinity`]: which machine a session lives on, and `fly-replay` to reach it;
//!   [`warm`]: children started ahead of sessions; [`modern`]: the 2026-07-28 envelope on a shared child;
//!   [`input_required`]: the shared child's questions to its client, as 2026-07-28 `input_required` rounds.
//! - [`child`]: the stdio process and JSON-RPC multiplexing; [`auth`], [`ratelimit`], [`audit`]: cross-cutting;
//!   [`oauth`]: the OAuth 2.1 resource server (`--oauth-issuer`).
//! - [`tools_policy`]: tool filters, renames, digests and `block` (both eras).
//! - [`verify`]: the MCP client the controller uses to check a deployment through its public URL.

pub mod affinity;
pub mod audit;
pub mod auth;
pub mod child;
pub mod http;
pub mod input_required;
pub mod modern;
pub mod oauth;
pub mod ratelimit;
pub mod session;
pub mod tools_policy;
pub mod verify;
pub mod verify_artifact;
pub mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use verify::{
    OAuthEndpoint, ServerInfo, VerifyError, unauthenticated_status, verify, verify_oauth,
};

/// What works in which protocol era, for `mcpfly bridge --help` (the README's table says the same).
pub const FEATURES_BY_ERA: &str = "\
Features by protocol era:
  Handshake era (2024-11-05 .. 2025-11-25), --session-isolation per-session (default): everything the server
    does reaches the session's client: progress, sampling, elicitation, roots, logs (logging/setLevel),
    list_changed and resources/updated. JSON-RPC batches: accepted in a 2025-03-26 session (every request
    through the tool policy and rate limit; the answers as one JSON array, 202 for notifications only), refused
    with 400 from 2025-06-18 (the revision that removed them).
  Handshake era, --session-isolation shared: calls and progress; the server's requests get an error and its
    notifications are not relayed.
  2026-07-28 (one shared server process for every request):
    progress and logs (with the request's logLevel) on the request's SSE stream; sampling, elicitation and
    roots as input_required rounds (requestState HMAC-protected, single use, --input-timeout-secs), refused
    with -32021 when the request did not declare the capability; list_changed and resources/updated on
    subscriptions/listen; Mcp-Name and Mcp-Param-* headers validated (-32020); closing the stream cancels.
    Limit: stdio does not say which request a server's question or log belongs to, so they reach a client
    only while its request is the one the server is running; with several running, a question is answered
    with an error and a log dropped.";

/// Arguments of `mcpfly bridge [OPTIONS] -- CMD ARGS...`.
#[derive(Args, Debug, Clone)]
pub struct BridgeArgs {
    /// Address to listen on. `::` accepts IPv6 (Fly's private network) and, dual-stack, IPv4.
    #[arg(long, default_value = "::", env = "MCPFLY_BRIDGE_HOST")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080, env = "MCPFLY_BRIDGE_PORT")]
    pub port: u16,
    /// Path of the MCP endpoint.
    #[arg(long, default_value = "/mcp")]
    pub path: String,
    /// Serve without authentication. Without this flag, `MCP_AUTH_TOKEN` must hold the bearer token.
    #[arg(long)]
    pub no_auth: bool,
    /// OAuth 2.1 mode: accept JWT access tokens from this authorization server (repeat or comma-separate for
    /// several) instead of a static bearer token, and serve RFC 9728 metadata naming it. Needs `--oauth-resource`.
    #[arg(
        long = "oauth-issuer",
        env = "MCPFLY_OAUTH_ISSUERS",
        value_delimiter = ','
    )]
    pub oauth_issuers: Vec<String>,
    /// OAuth mode: the endpoint's canonical public URL (`https://APP.fly.dev/mcp`), advertised as the resource.
    #[arg(long, env = "MCPFLY_OAUTH_RESOURCE")]
    pub oauth_resource: Option<String>,
    /// OAuth mode: the `aud` a token must carry (default: the resource URL).
    #[arg(long, env = "MCPFLY_OAUTH_AUDIENCE")]
    pub oauth_audience: Option<String>,
    /// OAuth mode: scopes every request needs (repeat or comma-separate).
    #[arg(
        long = "oauth-scope",
        env = "MCPFLY_OAUTH_SCOPES",
        value_delimiter = ','
    )]
    pub oauth_scopes: Vec<String>,
    /// OAuth mode: `TOOL=SCOPE`, a scope a `tools/call` of TOOL needs besides the required ones (repeat or
    /// comma-separate).
    #[arg(
        long = "oauth-tool-scope",
        env = "MCPFLY_OAUTH_TOOL_SCOPES",
        value_delimiter = ','
    )]
    pub oauth_tool_scopes: Vec<String>,
    /// Browser origins allowed to call the endpoint (CORS allowlist; repeat or comma-separate). A request with
    /// any other `Origin` gets 403; requests without `Origin` (non-browser clients) are allowed.
    #[arg(
        long = "allowed-origin",
        env = "MCPFLY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted, in bytes (413 above it).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Requests per minute per authenticated identity (the bearer token), wherever its clients connect from
    /// (0: unlimited). A whole team behind one address shares this, not the per-address limit.
    #[arg(long, default_value_t = 6000)]
    pub rate_per_token: u32,
    /// Burst size of the per-identity limit.
    #[arg(long, default_value_t = 1000)]
    pub rate_token_burst: u32,
    /// Requests per minute per client address, for unauthenticated traffic only: every request when serving with
    /// `--no-auth`, and requests with a missing or wrong token (0: unlimited).
    #[arg(long, default_value_t = 600)]
    pub rate_per_client: u32,
    /// Burst size of the per-address limit.
    #[arg(long, default_value_t = 100)]
    pub rate_burst: u32,
    /// Header carrying the client's address, set by the proxy in front (Fly sets `Fly-Client-IP`). Empty: use
    /// the TCP peer address.
    #[arg(long, default_value = "fly-client-ip")]
    pub client_ip_header: String,
    /// Longest a single request may run, in seconds (the child is told to cancel it after that).
    #[arg(long, default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// How long the MCP server may take to answer `initialize`, in seconds (`npx -y` may download first).
    #[arg(long, default_value_t = 120)]
    pub init_timeout_secs: u64,
    /// Sessions idle this long, in seconds, with no stream open, are ended.
    #[arg(long, default_value_t = 1800)]
    pub session_idle_timeout_secs: u64,
    /// Most concurrent handshake-era sessions (each runs its own server process); 503 above it.
    #[arg(long, default_value_t = 32)]
    pub max_sessions: usize,
    /// Server processes kept started ahead of new sessions, so an `initialize` does not wait for a cold start
    /// (0: none). The pool grows above this when sessions arrive faster than the server starts (as many as arrived
    /// within one start time, remembered for 5 minutes), up to `--warm-sessions-max`; never more than
    /// `--max-sessions` leaves room for. Unused with `--session-isolation shared`.
    #[arg(long, default_value_t = 1)]
    pub warm_sessions: usize,
    /// Most server processes kept warm when sessions come in bursts (at most 8): each is a whole idle server, so
    /// this times the server's memory is what the pool can cost.
    #[arg(long, default_value_t = 4)]
    pub warm_sessions_max: usize,
    /// `per-session`: each handshake-era session runs its own server process (no state shared between
    /// clients). `shared`: every handshake-era session is served by the one process that also serves 2026-07-28
    /// requests — for servers known to be stateless; the server then cannot reach a handshake-era client
    /// (sampling, elicitation, roots, log and change notifications are not relayed to sessions).
    #[arg(long, value_enum, default_value_t = SessionIsolation::PerSession)]
    pub session_isolation: SessionIsolation,
    /// Start the server process that serves 2026-07-28 requests at boot and keep it running, so the first such
    /// request does not wait for a start. Without it, that process starts on the first 2026-07-28 request (with
    /// `--session-isolation shared` it serves every session and always starts at boot).
    #[arg(long)]
    pub modern_warm: bool,
    /// How long, in seconds, a 2026-07-28 request that returned `input_required` waits for its client to retry
    /// with `inputResponses`; after that the server's question gets an error and its request is cancelled.
    #[arg(long, default_value_t = 300)]
    pub input_timeout_secs: u64,
    /// How long a request from the server (sampling, elicitation, roots) waits, in seconds, for a client stream
    /// to carry it when the session has none open; then the server is answered with an error, so its tool fails
    /// instead of hanging until `--request-timeout-secs`.
    #[arg(long, default_value_t = 30)]
    pub server_request_wait_secs: u64,
    /// This machine's id, for session affinity when several machines serve one app (Fly sets
    /// `FLY_MACHINE_ID`): handshake-era session ids name their machine, and a request for another machine's
    /// session is answered with `fly-replay` so Fly's proxy sends it there (404 when that machine is gone).
    #[arg(long, env = "FLY_MACHINE_ID")]
    pub machine_id: Option<String>,
    /// Tool filters, renames and approved digests as JSON (see `tools_policy`); set by the controller from
    /// `spec.tools`. Unset: every tool as the server offers it.
    #[arg(long, env = tools_policy::POLICY_ENV, hide_env_values = true)]
    pub tools_policy: Option<String>,
    /// On SIGTERM, how long in-flight requests may finish, in seconds, before servers are stopped.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// The integrity the controller pinned for the server's package (npm SRI, PyPI `sha256:<hex>`). Set, the
    /// package is fetched once before the server runs, verified, and run from that file; a mismatch is refused.
    #[arg(long, env = crate::packages::artifact::INTEGRITY_ENV)]
    pub artifact_integrity: Option<String>,
    /// npm registry the pinned package is fetched from: npx's own setting, which the controller sets.
    #[arg(
        long,
        env = "npm_config_registry",
        default_value = "https://registry.npmjs.org",
        hide = true
    )]
    pub npm_registry: String,
    /// PyPI Simple API the pinned package is fetched from: uv's own setting, which the controller sets.
    #[arg(
        long,
        env = "UV_DEFAULT_INDEX",
        default_value = "https://pypi.org/simple",
        hide = true
    )]
    pub pypi_index: String,
    /// Folder the verified package is kept in (default: `mcpfly-artifacts` in the temporary folder).
    #[arg(long, env = "MCPFLY_ARTIFACT_DIR", hide = true)]
    pub artifact_dir: Option<std::path::PathBuf>,
    /// The stdio MCP server to run, after `--`: program and arguments, never through a shell.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// How handshake-era sessions map onto server processes (`--session-isolation`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionIsolation {
    PerSession,
    Shared,
}

impl BridgeArgs {
    /// Parses bridge arguments alone, as `mcpfly bridge` would (for tests and embedding).
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BridgeArgs,
        }
        let matches = <Wrapper as clap::CommandFactory>::command()
            .no_binary_name(true)
            .try_get_matches_from(args)?;
        Ok(Wrapper::from_arg_matches(&matches)?.args)
    }

    /// The auth setting these arguments ask for, with the token from `token_env` (normally `MCP_AUTH_TOKEN`).
    /// Turning auth off must be explicit: no token, no `--oauth-issuer` and no `--no-auth` is an error.
    pub fn auth(&self, token_env: Option<String>) -> anyhow::Result<auth::Auth> {
        let token = token_env.filter(|t| !t.trim().is_empty());
        if !self.oauth_issuers.is_empty() {
            anyhow::ensure!(
                !self.no_auth,
                "--no-auth and --oauth-issuer contradict each other: pick one"
            );
            if token.is_some() {
                tracing::warn!(
                    "--oauth-issuer given: ignoring {} (OAuth access tokens only)",
                    child::TOKEN_ENV
                );
            }
            return Ok(auth::Auth::oauth(oauth::ResourceServer::new(
                self.oauth_config()?,
            )?));
        }
        match (self.no_auth, token) {
            (true, Some(_)) => {
                tracing::warn!(
                    "--no-auth given: ignoring MCP_AUTH_TOKEN and serving without authentication"
                );
                Ok(auth::Auth::disabled())
            }
            (true, None) => Ok(auth::Auth::disabled()),
            (false, Some(token)) => Ok(auth::Auth::bearer(token.trim().to_string())),
            (false, None) => anyhow::bail!(
                "{} is not set: set it to the endpoint's bearer token, pass --oauth-issuer to accept OAuth \
                 access tokens, or pass --no-auth to serve without authentication",
                child::TOKEN_ENV
            ),
        }
    }

    /// The OAuth settings these arguments ask for (meaningful with `--oauth-issuer`).
    pub fn oauth_config(&self) -> anyhow::Result<oauth::OAuthConfig> {
        let resource = self
            .oauth_resource
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("--oauth-issuer needs --oauth-resource (the endpoint's public URL)")
            })?;
        let config = oauth::OAuthConfig {
            issuers: self.oauth_issuers.clone(),
            audience: self
                .oauth_audience
                .clone()
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| resource.clone()),
            resource,
            required_scopes: self.oauth_scopes.clone(),
            tool_scopes: oauth::parse_tool_scopes(&self.oauth_tool_scopes)?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// A running bridge (for tests and for [`run`]).
pub struct Bridge {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// `None` when the server was refused before it started ([`verify_artifact`]).
    state: Option<Arc<http::State>>,
}

impl Bridge {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Server processes started and waiting for a session.
    pub fn warm_children(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.warm.len())
    }

    /// 2026-07-28 requests waiting for their client's `inputResponses`.
    pub fn held_for_input(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.held.len())
    }
    /// Audit lines shed so far because the log sink fell behind.
    pub fn audit_lines_shed(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.audit.shed())
    }

    /// Graceful shutdown, as on SIGTERM; waits until every server process is stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.done.await.context("bridge task")?
    }
}

/// Starts serving on `listener`. With `--artifact-integrity`, the server's package is fetched and verified first;
/// a refused package leaves the bridge serving only its refusal (never ready).
pub async fn start(
    mut args: BridgeArgs,
    auth: auth::Auth,
    listener: TcpListener,
) -> anyhow::Result<Bridge> {
    match verify_artifact::prepare(&args).await? {
        verify_artifact::Prepared::Run(command) => args.command = command,
        verify_artifact::Prepared::Refused => return verify_artifact::serve_refusal(listener),
    }
    let addr = listener.local_addr()?;
    let tools = tools_policy::ToolsPolicy::parse(args.tools_policy.as_deref().unwrap_or(""))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let spec = child::ChildSpec {
        program: args.command[0].clone(),
        args: args.command[1..].to_vec(),
    };
    let primary = modern::Primary::start(
        spec.clone(),
        Duration::from_secs(args.init_timeout_secs),
        modern::Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        },
        shutdown_rx.clone(),
        args.modern_warm || args.session_isolation == SessionIsolation::Shared,
    );
    let (auditor, audit_writer) = audit::Auditor::start(audit::QUEUE, audit::Finished::write);
    let warm = warm::WarmPool::new(
        spec.clone(),
        match args.session_isolation {
            SessionIsolation::PerSession => args.warm_sessions,
            SessionIsolation::Shared => 0,
        },
        args.warm_sessions_max,
    );
    let mut state = http::State::new(
        &args,
        auth,
        spec,
        primary,
        warm,
        auditor,
        shutdown_rx.clone(),
    );
    state.tools = tools;
    let state = Arc::new(state);
    // Warm children start once the primary (or its probe) has answered: a first start may download the package
    // (`npx`/`uvx` into an empty cache, as on every boot of a stopped machine), and two installs racing into one
    // cache corrupt it for good (npm: ENOTEMPTY, then modules missing on every restart).
    let warm_state = state.clone();
    tokio::spawn(async move {
        if warm_state
            .primary
            .wait_answered(Duration::from_secs(24 * 3600))
            .await
        {
            warm_state.refill_warm();
        }
    });
    let bridge_state = state.clone();
    let reaper_state = state.clone();
    let mut reaper_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        let idle = Duration::from_secs(reaper_state.config.session_idle_timeout_secs);
        let mut tick = tokio::time::interval(Duration::from_secs(30).min(idle));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    reaper_state.sessions.reap(idle, Duration::from_secs(2)).await;
                    // Once a burst is past the pool's horizon, its extra idle servers are stopped here. Not before
                    // the server has answered once: the first tick comes at once, while a first start may still be
                    // installing.
                    if reaper_state.primary.healthy() {
                        reaper_state.refill_warm();
                    }
                }
                _ = modern::until_shutdown(&mut reaper_shutdown) => break,
            }
        }
    });
    tracing::info!(%addr, path = %args.path, auth = state.auth.enabled(), "bridge listening");
    let app = http::router(state.clone());
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let mut serve_shutdown = shutdown_rx.clone();
    let done = tokio::spawn(async move {
        // Nagle off on every connection: an SSE answer goes out in several writes, and with Nagle the later ones
        // wait for the client's delayed ACK (~40 ms per call on a kept-alive connection).
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "cannot set TCP_NODELAY on a connection");
            }
        });
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { modern::until_shutdown(&mut serve_shutdown).await });
        let mut wait_shutdown = shutdown_rx.clone();
        let server = async move { server.await };
        tokio::pin!(server);
        // In-flight requests get `grace` after the signal; then the servers are stopped regardless.
        tokio::select! {
            result = &mut server => result?,
            _ = async {
                modern::until_shutdown(&mut wait_shutdown).await;
                tokio::time::sleep(grace).await;
            } => tracing::warn!("shutdown grace period over; stopping with requests in flight"),
        }
        state.sessions.end_all(Duration::from_secs(3)).await;
        state.warm.drain(Duration::from_secs(1)).await;
        // The primary's supervisor stops its child on the same signal; wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while state.primary.current().is_some() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The last audit lines are written before the bridge reports itself stopped.
        state.audit.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), audit_writer).await;
        Ok(())
    });
    Ok(Bridge {
        addr,
        shutdown: shutdown_tx,
        done,
        state: Some(bridge_state),
    })
}

/// `mcpfly bridge`: serve until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(args: BridgeArgs) -> anyhow::Result<()> {
    let auth = args.auth(std::env::var(child::TOKEN_ENV).ok())?;
    let host: std::net::IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {} is not an IP address", args.host))?;
    let listener = TcpListener::bind(SocketAddr::new(host, args.port))
        .await
        .with_context(|| format!("listening on [{host}]:{}", args.port))?;
    let bridge = start(args, auth, listener).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    bridge.shutdown().await
}
