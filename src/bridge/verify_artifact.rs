//! The bridge's pre-start step: with a pinned integrity (`--artifact-integrity`, set by the controller), the
//! server's package is fetched once and verified before anything runs, and the server runs from that verified
//! file ([`crate::packages::artifact`]). A mismatch is refused: one error line in the log, and a bridge that
//! answers 503 to its readiness check and to MCP requests, so Fly never routes to it and the deployment never
//! reports Ready. A registry that cannot be reached is not a refusal: the bridge exits with an error and Fly's
//! restart policy starts it again.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Bridge, BridgeArgs, modern};
use crate::packages::artifact::{self, Sources};

/// What the server may do.
pub enum Prepared {
    /// Run this command (the verified local file, or the command as given when nothing is pinned).
    Run(Vec<String>),
    /// The package was refused; nothing may run.
    Refused,
}

/// The readiness answer of a refused bridge. The details (package, expected and found digests) are in the log, not
/// here: readiness may be reachable from outside and need not name the package.
const REFUSED: &str = "the MCP server's package failed its integrity check; see the machine's log";

pub async fn prepare(args: &BridgeArgs) -> anyhow::Result<Prepared> {
    let Some(pin) = args.artifact_integrity.as_deref().filter(|p| !p.is_empty()) else {
        return Ok(Prepared::Run(args.command.clone()));
    };
    let sources = Sources {
        npm_registry: args.npm_registry.clone(),
        pypi_simple: args.pypi_index.clone(),
        dir: args
            .artifact_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("mcpfly-artifacts")),
    };
    match artifact::fetch_verified(&args.command, pin, &sources).await {
        Ok(command) => {
            tracing::info!(pin, "the server's package matches its pinned integrity");
            Ok(Prepared::Run(command))
        }
        Err(error) if error.is_refusal() => {
            tracing::error!("{error}");
            Ok(Prepared::Refused)
        }
        Err(error) => Err(error).context("verifying the server's package before it runs"),
    }
}

/// A bridge that runs no server: liveness passes (restarting cannot help), readiness and MCP answer 503.
pub fn serve_refusal(listener: TcpListener) -> anyhow::Result<Bridge> {
    let addr: SocketAddr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let refused = || async { (StatusCode::SERVICE_UNAVAILABLE, REFUSED).into_response() };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(refused))
        .fallback(refused);
    let done = tokio::spawn(async move {
        let mut stop = shutdown_rx;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { modern::until_shutdown(&mut stop).await })
            .await
            .context("serving the refusal")
    });
    Ok(Bridge {
        addr,
        shutdown,
        done,
        state: None,
    })
}
