//! The controller's seal endpoint: `POST /seal` seals values with the primary key and returns the sealed
//! texts. It seals only: there is no route that unseals, lists or reveals keys.
//!
//! This module holds the request, the response and the sealing; [`super::listener`] serves it, deciding who may
//! seal. Sealing grants nothing a key holder does not already have: a sealed value only ever unseals into the
//! scope written inside it.

use std::collections::BTreeMap;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::envelope::{Scope, Target, validate_credential_name};
use super::keyring::KeyRing;
use super::secret_value::SecretValue;

/// At most this many values per request, and a small body: sealing is for credentials, not files.
const MAX_VALUES: usize = 100;
pub const MAX_BODY: usize = 256 * 1024;

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

/// A refusal: the status and a message that never quotes a submitted value.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl SealRequest {
    /// Parses a request body, answering with a fixed message: serde's text can quote the offending JSON (a
    /// value).
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "expected a JSON body {namespace, name, scope?, values: {NAME: \"value\"}}"
                    .to_owned(),
            )
        })
    }
}

/// Seals every value of `req` with the primary key of `ring`, bound to the request's target and scope.
pub fn seal_values(ring: &KeyRing, req: SealRequest) -> Result<SealResponse, ApiError> {
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
        let sealed = super::seal(ring, binding, value).map_err(|e| bad(e.to_string()))?;
        credentials.push(SealedCredential { name, sealed });
    }
    Ok(SealResponse {
        key_id: ring.primary_id().to_string(),
        scope: scope.to_string(),
        credentials,
    })
}
