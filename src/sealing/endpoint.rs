//! The controller's seal endpoint: `POST /seal` seals values with the primary key and returns the sealed
//! texts. It seals only: there is no route that unseals, lists or reveals keys.
//!
//! Meant to be reached through the Kubernetes API service proxy
//! (`/api/v1/namespaces/{ns}/services/{svc}:http/proxy/seal`), so Kubernetes RBAC (`services/proxy` on the
//! controller's Service) decides who may seal. Sealing grants nothing a key holder does not already
//! have: a sealed value only ever unseals into the scope written inside it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::envelope::{Scope, Target, validate_credential_name};
use super::keyring::KeyRing;
use super::secret_value::SecretValue;

/// At most this many values per request, and a small body: sealing is for credentials, not files.
const MAX_VALUES: usize = 100;
const MAX_BODY: usize = 256 * 1024;

/// The request body. `Debug` shows the values as `[redacted]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealRequest {
    pub namespace: String,
    pub name: String,
    /// `strict` (default), `namespace` or `cluster`.
    #[serde(default)]
    pub scope: Option<String>,
    pub values: BTreeMap<String, SecretValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SealResponse {
    /// The key that sealed the values (the primary).
    pub key_id: String,
    pub scope: String,
    pub credentials: Vec<SealedCredential>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealedCredential {
    pub name: String,
    pub sealed: String,
}

/// The router serving `POST /seal`; mount it on the controller's HTTP server.
pub fn router(ring: Arc<KeyRing>) -> Router {
    Router::new()
        .route("/seal", post(seal))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ring)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

async fn seal(
    State(ring): State<Arc<KeyRing>>,
    body: Result<Json<SealRequest>, JsonRejection>,
) -> Result<Json<SealResponse>, ApiError> {
    // The rejection's text can quote the offending JSON (a value); answer with a fixed message instead.
    let Json(req) = body.map_err(|r| {
        ApiError(
            r.status(),
            "expected a JSON body {namespace, name, scope?, values: {NAME: \"value\"}}".to_owned(),
        )
    })?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let scope: Scope = req
        .scope
        .as_deref()
        .unwrap_or("strict")
        .parse()
        .map_err(bad)?;
    if req.values.is_empty() || req.values.len() > MAX_VALUES {
        return Err(bad(format!("values must hold 1 to {MAX_VALUES} entries")));
    }
    let mut credentials = Vec::with_capacity(req.values.len());
    for (name, value) in req.values {
        validate_credential_name(&name).map_err(|e| bad(e.to_string()))?;
        let binding = Target::new(&req.namespace, &req.name, &name).binding(scope);
        let sealed = super::seal(&ring, binding, value).map_err(|e| bad(e.to_string()))?;
        credentials.push(SealedCredential { name, sealed });
    }
    tracing::info!(
        namespace = %req.namespace, name = %req.name, scope = %scope, count = credentials.len(),
        key_id = %ring.primary_id(), "sealed values through the seal endpoint"
    );
    Ok(Json(SealResponse {
        key_id: ring.primary_id().to_string(),
        scope: scope.to_string(),
        credentials,
    }))
}
