//! The controller's HTTP server: `/metrics`, `/healthz`, `/readyz` and the seal endpoint (`POST /seal`), on one
//! listener that the chart's Service exposes (port name `http`).
//!
//! The seal route is built from the key ring current at each request, so a rotation reaches it without a
//! restart; without a key ring it answers 503 and says why.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tower::ServiceExt as _;

use super::{Health, Metrics};
use crate::sealing::endpoint;

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
            "cannot listen on {addr} for /metrics, /healthz, /readyz and /seal ({e}); \
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
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /seal");
    Ok(ServerHandle { addr, task })
}

fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/seal", any(seal))
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

async fn seal(State(state): State<AppState>, request: Request<Body>) -> Response {
    let Some(ring) = state.health.keyring() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "error": "the controller has no key ring loaded; create the key-ring Secret (see `mcpfly keygen`)"
            })),
        )
            .into_response();
    };
    match endpoint::router(ring).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    async fn health_readiness_metrics_and_seal_follow_the_state() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::new();
        let slot: KeyringSlot = Arc::default();
        health.track_keyring(slot.clone(), "Secret ns/keys not found");
        let app = router(metrics.clone(), health.clone());

        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("keyring: Secret ns/keys not found"), "{body}");

        let seal_request = || {
            Request::post("/seal")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    r#"{"namespace":"team-a","name":"github","values":{"TOKEN":"s3cret"}}"#,
                ))
                .unwrap()
        };
        let response = app.clone().oneshot(seal_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

        health.pass(Check::Crd);
        health.pass(Check::Fly);
        let key = crate::sealing::generate_key();
        *slot.write().unwrap() = Some(Arc::new(KeyRing::parse(&key, "test").unwrap()));
        assert_eq!(get(&app, "/readyz").await, (StatusCode::OK, "ok\n".into()));

        let response = app.clone().oneshot(seal_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let sealed: endpoint::SealResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(sealed.credentials[0].name, "TOKEN");
        assert!(!String::from_utf8_lossy(&body).contains("s3cret"));

        metrics.set_leader(true);
        let (status, body) = get(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\nmcpfly_leader 1\n"), "{body}");
    }
}
