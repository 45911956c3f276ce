//! The controller's HTTP server: `/metrics`, `/healthz` and `/readyz`, on the listener that the chart's Service
//! exposes as port `http`. `/seal` has a listener of its own ([`crate::sealing::listener`]): it authenticates
//! every request, and a flood of them must not reach the probes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{Health, Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// A running server; dropping it does not stop it (the task ends with the runtime or on `shutdown`).
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `addr` (failing with a message that says what to change) and serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for /metrics, /healthz and /readyz ({e}); \
             choose another address with --metrics-addr / MCPFLY_METRICS_ADDR"
        )
    })?;
    let addr = listener.local_addr()?;
    let app = router(metrics, health);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(ServerHandle { addr, task })
}

fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, health })
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{problems}\n"),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let primary = state
        .health
        .keyring()
        .map(|ring| ring.primary_id().as_str().to_string());
    let body = state.metrics.render(primary.as_deref());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Request;
    use tower::ServiceExt as _;

    use crate::sealing::KeyRing;
    use crate::telemetry::{Check, KeyringSlot};

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_follow_the_state_and_seal_is_not_served_here() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::new();
        let slot: KeyringSlot = Arc::default();
        health.track_keyring(slot.clone(), "Secret ns/keys not found");
        let app = router(metrics.clone(), health.clone());

        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("keyring: Secret ns/keys not found"), "{body}");

        // /seal lives on its own authenticated listener, never next to the probes.
        let response = app
            .clone()
            .oneshot(
                Request::post("/seal")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(
                        r#"{"namespace":"team-a","name":"github","values":{"TOKEN":"s3cret"}}"#,
                    ))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        health.pass(Check::Crd);
        health.pass(Check::Fly);
        let key = crate::sealing::generate_key();
        *slot.write().unwrap() = Some(Arc::new(KeyRing::parse(&key, "test").unwrap()));
        assert_eq!(get(&app, "/readyz").await, (StatusCode::OK, "ok\n".into()));

        metrics.set_leader(true);
        let (status, body) = get(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\nmcpfly_leader 1\n"), "{body}");
    }
}
