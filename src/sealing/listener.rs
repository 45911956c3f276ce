//! The seal listener: `POST /seal` on an address of its own, apart from `/metrics` and the probes, so that a
//! flood of seal requests cannot fail liveness. Every request is authenticated and authorised by the API
//! server before anything is sealed:
//!
//! 1. **Authentication**: the caller's bearer token, from `Authorization: Bearer …` or, through the API
//!    server's service proxy (which authenticates the caller itself and then drops `Authorization`), from
//!    [`TOKEN_HEADER`], goes to a `TokenReview`. No token or a refused one: 401.
//! 2. **Authorisation**: a `SubjectAccessReview` for that user: verb [`SEAL_VERB`] on
//!    `mcpdeployments/seal` ([`SEAL_GROUP`]) named like the target resource, in the target namespace.
//!    Refused: 403. So sealing for `team-a` is granted with a Role in `team-a`, like any other right there.
//! 3. **Limits**: at most [`Limits::in_flight`] requests at once (more: 429 at once, nothing queues), a body
//!    of at most [`MAX_BODY`] bytes (413) and a deadline per request (408), so slow or huge requests cannot
//!    hold the listener.
//!
//! The controller sees the caller's token only to have it reviewed; it never logs, stores or reuses it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tokio::sync::Semaphore;

use super::KeyRing;
use super::endpoint::{ApiError, MAX_BODY, SealRequest, SealResponse, seal_values};

/// The header that carries the caller's bearer token through the API server's service proxy.
pub const TOKEN_HEADER: &str = "x-mcpfly-authorization";
/// What the SubjectAccessReview asks: `create` on `mcpdeployments/seal` in group `mcpfly.dev`.
pub const SEAL_GROUP: &str = "mcpfly.dev";
pub const SEAL_RESOURCE: &str = "mcpdeployments";
pub const SEAL_SUBRESOURCE: &str = "seal";
pub const SEAL_VERB: &str = "create";

/// Who the API server says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides who may seal. [`ApiServer`] asks the Kubernetes API server; tests may decide in memory.
pub trait Gatekeeper: Send + Sync + 'static {
    /// The caller presenting `token`; `Ok(None)`: not authenticated. `Err`: the check itself failed.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<Caller>, String>>;
    /// May `caller` seal for the MCPDeployment `name` in `namespace`?
    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// TokenReview and SubjectAccessReview against the API server, as the controller's ServiceAccount
/// (which needs `create` on `tokenreviews` and `subjectaccessreviews`).
pub struct ApiServer(pub kube::Client);

impl Gatekeeper for ApiServer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<Caller>, String>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: None,
                },
                ..Default::default()
            };
            let reviewed = Api::<TokenReview>::all(self.0.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview failed: {e}"))?;
            let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
                return Ok(None);
            };
            let Some(user) = status.user.filter(|u| u.username.is_some()) else {
                return Ok(None);
            };
            Ok(Some(Caller {
                username: user.username.unwrap_or_default(),
                uid: user.uid,
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }))
        })
    }

    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(caller.username.clone()),
                    uid: caller.uid.clone(),
                    groups: Some(caller.groups.clone()),
                    extra: Some(caller.extra.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(SEAL_GROUP.into()),
                        resource: Some(SEAL_RESOURCE.into()),
                        subresource: Some(SEAL_SUBRESOURCE.into()),
                        verb: Some(SEAL_VERB.into()),
                        namespace: Some(namespace.into()),
                        name: Some(name.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let reviewed = Api::<SubjectAccessReview>::all(self.0.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("SubjectAccessReview failed: {e}"))?;
            Ok(reviewed.status.is_some_and(|s| s.allowed))
        })
    }
}

/// How much the listener takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests being handled at once; the next one is refused with 429.
    pub in_flight: usize,
    /// From the first byte of the request to the answer (408 after it).
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            in_flight: 16,
            deadline: Duration::from_secs(10),
        }
    }
}

/// The current key ring (it changes on rotation); `None` until one is loaded.
pub type KeyringSource = Arc<dyn Fn() -> Option<Arc<KeyRing>> + Send + Sync>;

struct SealState {
    keyring: KeyringSource,
    gate: Arc<dyn Gatekeeper>,
    slots: Arc<Semaphore>,
    limits: Limits,
}

/// `POST /seal`, guarded as the module describes; nothing else.
pub fn router(keyring: KeyringSource, gate: Arc<dyn Gatekeeper>, limits: Limits) -> Router {
    Router::new()
        .route("/seal", post(seal))
        .with_state(Arc::new(SealState {
            keyring,
            gate,
            slots: Arc::new(Semaphore::new(limits.in_flight)),
            limits,
        }))
}

/// Binds `addr` (failing with a message that says what to change) and serves [`router`] until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for /seal ({e}); choose another address with --seal-addr / MCPFLY_SEAL_ADDR"
        )
    })?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "seal listener stopped");
        }
    });
    tracing::info!(%addr, "serving /seal (TokenReview + SubjectAccessReview)");
    Ok((addr, task))
}

async fn seal(State(state): State<Arc<SealState>>, request: Request<Body>) -> Response {
    let Ok(_slot) = state.slots.clone().try_acquire_owned() else {
        return ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many seal requests at once; retry shortly".into(),
        )
        .into_response();
    };
    match tokio::time::timeout(state.limits.deadline, guarded(&state, request)).await {
        Ok(Ok(sealed)) => axum::Json(sealed).into_response(),
        Ok(Err(refused)) => refused.into_response(),
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            "the request took too long".into(),
        )
        .into_response(),
    }
}

async fn guarded(state: &SealState, request: Request<Body>) -> Result<SealResponse, ApiError> {
    let unauthenticated = |why: &str| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "{why}: send a Kubernetes bearer token (`Authorization: Bearer …`, or `{TOKEN_HEADER}: Bearer …` through the API server's service proxy; `mcpfly seal --via-cluster` sends your kubeconfig's token)"
            ),
        )
    };
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "seal request: asking the API server failed");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server could not be asked who may seal; retry".into(),
        )
    };
    let token = bearer_token(request.headers()).ok_or_else(|| unauthenticated("no token"))?;
    let caller = state
        .gate
        .authenticate(&token)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unauthenticated("the token was not accepted"))?;
    drop(token);

    let body = read_body(request.into_body()).await?;
    let req = SealRequest::from_json(&body)?;
    let allowed = state
        .gate
        .authorize(&caller, &req.namespace, &req.name)
        .await
        .map_err(unavailable)?;
    if !allowed {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not seal for {}/{}: needs `{SEAL_VERB}` on `{SEAL_RESOURCE}/{SEAL_SUBRESOURCE}` (API group {SEAL_GROUP}) in namespace {}",
                caller.username, req.namespace, req.name, req.namespace
            ),
        ));
    }
    let ring = (state.keyring)().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has no key ring loaded; create the key-ring Secret (see `mcpfly keygen`)".into(),
        )
    })?;
    let (namespace, name) = (req.namespace.clone(), req.name.clone());
    let sealed = seal_values(&ring, req)?;
    tracing::info!(
        user = %caller.username, %namespace, %name, scope = %sealed.scope,
        count = sealed.credentials.len(), key_id = %sealed.key_id, "sealed values through the seal endpoint"
    );
    Ok(sealed)
}

/// The bearer token of `Authorization` or, when the service proxy dropped that, of [`TOKEN_HEADER`].
fn bearer_token(headers: &HeaderMap) -> Option<zeroize::Zeroizing<String>> {
    [header::AUTHORIZATION.as_str(), TOKEN_HEADER]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .find_map(|value| {
            let (scheme, token) = value.split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
                .then(|| zeroize::Zeroizing::new(token.to_owned()))
        })
}

/// The body, at most [`MAX_BODY`] bytes (413 beyond, without reading the rest).
async fn read_body(body: Body) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than {MAX_BODY} bytes; sealing is for credentials, not files"
            ),
        )
    };
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large())
            } else {
                Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "could not read the request body".into(),
                ))
            }
        }
    }
}
