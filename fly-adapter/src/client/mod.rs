//! The typed Fly Machines API client.
//!
//! One [`FlyClient`] per controller: it holds the HTTP connection pool, the client-side rate limiter
//! (so Fly's documented limits are respected before Fly has to say 429), a global concurrency cap,
//! retry policy and counters. Every call carries an endpoint label (`"machines.create"`, see
//! [`endpoint`]) used by the stats, the observer and the emulator's counters alike.

pub mod config;
pub mod error;
pub mod lease;
pub mod ratelimit;
pub mod types;
pub mod wait;

pub use config::{CONFIG_HASH_METADATA_KEY, config_hash, configs_equivalent, normalize};
pub use error::FlyError;
pub use lease::LeaseGuard;
pub use types::*;

use crate::token_bucket::{RateLimits, bucket_identity};
use bytes::Bytes;
use rand::Rng;
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// Fly's public Machines API.
pub const DEFAULT_BASE_URL: &str = "https://api.machines.dev/v1";

/// Endpoint labels: the names under which calls are rate-limited, counted and reported.
pub mod endpoint {
    pub const APPS_LIST: &str = "apps.list";
    pub const APPS_GET: &str = "apps.get";
    pub const APPS_CREATE: &str = "apps.create";
    pub const APPS_DELETE: &str = "apps.delete";
    pub const MACHINES_LIST: &str = "machines.list";
    pub const MACHINES_GET: &str = "machines.get";
    pub const MACHINES_CREATE: &str = "machines.create";
    pub const MACHINES_UPDATE: &str = "machines.update";
    pub const MACHINES_DELETE: &str = "machines.delete";
    pub const MACHINES_START: &str = "machines.start";
    pub const MACHINES_STOP: &str = "machines.stop";
    pub const MACHINES_RESTART: &str = "machines.restart";
    pub const MACHINES_SUSPEND: &str = "machines.suspend";
    pub const MACHINES_CORDON: &str = "machines.cordon";
    pub const MACHINES_UNCORDON: &str = "machines.uncordon";
    pub const MACHINES_WAIT: &str = "machines.wait";
    pub const MACHINES_EVENTS: &str = "machines.events";
    pub const LEASES_ACQUIRE: &str = "leases.acquire";
    pub const LEASES_GET: &str = "leases.get";
    pub const LEASES_RELEASE: &str = "leases.release";
    pub const METADATA_GET: &str = "metadata.get";
    pub const METADATA_SET: &str = "metadata.set";
    pub const METADATA_DELETE: &str = "metadata.delete";
    pub const SECRETS_LIST: &str = "secrets.list";
    pub const SECRETS_SET: &str = "secrets.set";
    pub const SECRETS_SET_ONE: &str = "secrets.set_one";
    pub const SECRETS_DELETE_ONE: &str = "secrets.delete_one";
    pub const IPS_LIST: &str = "ips.list";
    pub const IPS_ASSIGN: &str = "ips.assign";
    pub const IPS_DELETE: &str = "ips.delete";
    pub const REGIONS_LIST: &str = "regions.list";
    pub const ORGS_MACHINES: &str = "orgs.machines";
}

/// After our own `POST /apps`, Fly answers 404 and then 401 for the app for a while (fly-go's `WaitForApp`
/// retries both): within this window, until the app first answers, such answers mean "not visible yet", never
/// "free" or "someone else's".
pub const APP_VISIBILITY_WINDOW: Duration = Duration::from_secs(120);
/// How long [`FlyClient::create_app`] waits for the new app to become visible before giving up for now.
const APP_WAIT: Duration = Duration::from_secs(60);

/// Retries for idempotent calls (reads) and for calls Fly refused before acting (429, connection
/// refused). Mutations whose outcome is unknown are never retried here.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts including the first.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// A hook for metrics (the controller feeds Prometheus from it).
pub trait FlyObserver: Send + Sync {
    /// Every HTTP exchange; `status` is `None` when no response arrived.
    fn on_call(&self, _label: &str, _status: Option<u16>, _elapsed: Duration) {}
    /// Time spent waiting on the client-side rate limiter.
    fn on_rate_limit_wait(&self, _label: &str, _waited: Duration) {}
}

#[derive(Clone)]
pub struct FlyClientConfig {
    pub base_url: String,
    /// An org token (`fm2_...` macaroons or a personal token); the auth scheme is chosen from it.
    pub token: Zeroizing<String>,
    /// The org this controller works in; used for app creation defaults and rate-limit identities.
    pub org: Option<String>,
    /// At most this many requests in flight (across all endpoints).
    pub max_concurrency: usize,
    pub retry: RetryPolicy,
    /// Per-request timeout; wait calls add their own long-poll time to it.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Client-side limits; defaults to Fly's documented limits with one token of burst held back.
    pub rate_limits: RateLimits,
    pub observer: Option<Arc<dyn FlyObserver>>,
}

impl fmt::Debug for FlyClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlyClientConfig")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .field("org", &self.org)
            .field("max_concurrency", &self.max_concurrency)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl FlyClientConfig {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        FlyClientConfig {
            base_url: base_url.into(),
            token: Zeroizing::new(token.into()),
            org: None,
            max_concurrency: 32,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            rate_limits: RateLimits::fly().with_margin(),
            observer: None,
        }
    }

    /// `FLY_API_TOKEN`, `FLY_FLAPS_BASE_URL` (as Fly's own Go client reads it) and `FLY_ORG`.
    pub fn from_env() -> Result<Self, FlyError> {
        let token = std::env::var("FLY_API_TOKEN")
            .map_err(|_| FlyError::Config("FLY_API_TOKEN is not set".into()))?;
        let base = std::env::var("FLY_FLAPS_BASE_URL")
            .ok()
            .filter(|b| !b.trim().is_empty())
            .map_or_else(|| DEFAULT_BASE_URL.to_string(), |b| api_base_from_flaps(&b));
        let mut c = FlyClientConfig::new(base, token);
        c.org = std::env::var("FLY_ORG").ok().filter(|s| !s.is_empty());
        Ok(c)
    }
}

/// fly-go's `FLY_FLAPS_BASE_URL` names the host (`https://api.machines.dev`) and the client appends `/v1`
/// (REALISM.md §6); this client's base URL includes it.
pub fn api_base_from_flaps(flaps: &str) -> String {
    format!("{}/v1", flaps.trim().trim_end_matches('/'))
}

/// `Authorization` header value: macaroon tokens (`fm1r_`, `fm1a_`, `fm2_` parts) use `FlyV1`,
/// everything else `Bearer`; a scheme the user pasted in front is stripped first.
pub fn authorization_header(token: &str) -> String {
    let mut t = token.trim();
    for scheme in ["bearer ", "flyv1 "] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            t = t[scheme.len()..].trim();
        }
    }
    let macaroon = t
        .split(',')
        .map(str::trim)
        .any(|p| p.starts_with("fm1r_") || p.starts_with("fm1a_") || p.starts_with("fm2_"));
    if macaroon {
        format!("FlyV1 {t}")
    } else {
        format!("Bearer {t}")
    }
}

/// Counters kept by the client, readable at any time.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// Total time callers spent waiting on the client-side rate limiter.
    pub rate_limit_wait: Duration,
    /// Number of calls that had to wait.
    pub rate_limit_waits: u64,
    /// Responses by (endpoint label, status); status `"error"` when no response arrived.
    pub calls: BTreeMap<(String, String), u64>,
    pub retries: u64,
}

impl ClientStats {
    pub fn count(&self, label: &str, status: &str) -> u64 {
        self.calls
            .get(&(label.to_string(), status.to_string()))
            .copied()
            .unwrap_or(0)
    }
    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    auth: Zeroizing<String>,
    org: String,
    retry: RetryPolicy,
    request_timeout: Duration,
    limiter: ratelimit::ClientRateLimiter,
    sem: Semaphore,
    stats: Mutex<ClientStats>,
    observer: Option<Arc<dyn FlyObserver>>,
    /// Apps this client created, with when: 404/401 for them shortly after is Fly's visibility lag.
    own_app_creates: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// The Fly Machines API client. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct FlyClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for FlyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlyClient")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

/// One request as the core sees it.
struct Req<'a> {
    label: &'static str,
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    app: Option<&'a str>,
    machine: Option<&'a str>,
    nonce: Option<&'a str>,
    /// Extra time on top of the request timeout (long-poll waits).
    extra_timeout: Duration,
    /// Retry 408/5xx on reads; false for wait, whose helper loops itself.
    retry_transient: bool,
}

impl<'a> Req<'a> {
    fn new(label: &'static str, method: Method, path: String) -> Self {
        Req {
            label,
            method,
            path,
            query: Vec::new(),
            body: None,
            app: None,
            machine: None,
            nonce: None,
            extra_timeout: Duration::ZERO,
            retry_transient: true,
        }
    }
    fn app(mut self, app: &'a str) -> Self {
        self.app = Some(app);
        self
    }
    fn machine(mut self, app: &'a str, id: &'a str) -> Self {
        self.app = Some(app);
        self.machine = Some(id);
        self
    }
    fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.body = Some(serde_json::to_vec(body).expect("request bodies serialise"));
        self
    }
    fn nonce(mut self, nonce: Option<&'a str>) -> Self {
        self.nonce = nonce;
        self
    }
    fn q(mut self, k: &'static str, v: impl ToString) -> Self {
        self.query.push((k, v.to_string()));
        self
    }
}

struct Resp {
    status: u16,
    body: Bytes,
    request_id: Option<String>,
}

impl FlyClient {
    pub fn new(cfg: FlyClientConfig) -> Result<Self, FlyError> {
        // reqwest is built with `rustls-no-provider`: the process needs one crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .user_agent(concat!("mcpfly-fly-adapter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FlyError::Config(format!("building HTTP client: {e}")))?;
        if cfg.token.trim().is_empty() {
            return Err(FlyError::Config("empty Fly API token".into()));
        }
        Ok(FlyClient {
            inner: Arc::new(Inner {
                http,
                base_url: cfg.base_url.trim_end_matches('/').to_string(),
                auth: Zeroizing::new(authorization_header(&cfg.token)),
                org: cfg.org.clone().unwrap_or_else(|| "default".into()),
                retry: cfg.retry.clone(),
                request_timeout: cfg.request_timeout,
                limiter: ratelimit::ClientRateLimiter::new(cfg.rate_limits.clone()),
                sem: Semaphore::new(cfg.max_concurrency.max(1)),
                stats: Mutex::new(ClientStats::default()),
                observer: cfg.observer.clone(),
                own_app_creates: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn from_env() -> Result<Self, FlyError> {
        Self::new(FlyClientConfig::from_env()?)
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// A snapshot of the client's counters.
    pub fn stats(&self) -> ClientStats {
        self.inner.stats.lock().expect("stats poisoned").clone()
    }

    fn record(&self, label: &str, status: Option<u16>, elapsed: Duration) {
        let key = (
            label.to_string(),
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "error".into()),
        );
        *self
            .inner
            .stats
            .lock()
            .expect("stats poisoned")
            .calls
            .entry(key)
            .or_default() += 1;
        if let Some(o) = &self.inner.observer {
            o.on_call(label, status, elapsed);
        }
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra;
        }
        let p = &self.inner.retry;
        let exp = p
            .base_delay
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(p.max_delay);
        // Full jitter in [exp/2, exp]: spreads retries of many reconciles hitting the same outage.
        let ms = exp.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
    }

    /// The request core: rate limit, concurrency cap, send, classify, retry.
    async fn send(&self, r: Req<'_>) -> Result<Resp, FlyError> {
        let mutating = r.method != Method::GET;
        let identity = bucket_identity(r.label, &self.inner.org, r.app, r.machine);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let wait = self.inner.limiter.delay(r.label, &identity, mutating);
            if !wait.is_zero() {
                {
                    let mut s = self.inner.stats.lock().expect("stats poisoned");
                    s.rate_limit_wait += wait;
                    s.rate_limit_waits += 1;
                }
                if let Some(o) = &self.inner.observer {
                    o.on_rate_limit_wait(r.label, wait);
                }
                tokio::time::sleep(wait).await;
            }
            let permit = self
                .inner
                .sem
                .acquire()
                .await
                .expect("semaphore never closed");
            let url = format!("{}{}", self.inner.base_url, r.path);
            let mut rb = self
                .inner
                .http
                .request(r.method.clone(), &url)
                .header(reqwest::header::AUTHORIZATION, self.inner.auth.as_str())
                .timeout(self.inner.request_timeout + r.extra_timeout);
            if !r.query.is_empty() {
                rb = rb.query(&r.query);
            }
            if let Some(n) = r.nonce {
                rb = rb.header("fly-machine-lease-nonce", n);
            }
            if let Some(b) = &r.body {
                rb = rb
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let started = tokio::time::Instant::now();
            let result = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let request_id = resp
                        .headers()
                        .get("fly-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64);
                    match resp.bytes().await {
                        Ok(body) => Ok((status, body, request_id, retry_after)),
                        Err(e) => Err((e, request_id)),
                    }
                }
                Err(e) => Err((e, None)),
            };
            drop(permit);
            let elapsed = started.elapsed();
            match result {
                Ok((status, body, request_id, retry_after)) => {
                    self.record(r.label, Some(status), elapsed);
                    if (200..300).contains(&status) {
                        if let Some(app) = r.app {
                            self.confirm_visible(app);
                        }
                        if mutating {
                            audit(&r, Some(status), request_id.as_deref(), "ok");
                        }
                        return Ok(Resp {
                            status,
                            body,
                            request_id,
                        });
                    }
                    let mut err = classify(status, &body, request_id, retry_after, mutating);
                    let not_visible_yet = matches!(status, 401 | 404)
                        && r.app.is_some_and(|app| self.recently_created(app));
                    if not_visible_yet {
                        err = FlyError::Transient {
                            status: Some(status),
                            message: format!(
                                "app {} is not visible yet after our create: {err}",
                                r.app.unwrap_or_default()
                            ),
                            request_id: err.request_id().map(str::to_string),
                        };
                    }
                    // 429 means Fly did nothing: safe to retry any call. 408/5xx only for reads.
                    let retry = status == 429
                        || (r.retry_transient && !mutating && (status == 408 || status >= 500));
                    if retry && attempt < self.inner.retry.max_attempts {
                        self.inner.stats.lock().expect("stats poisoned").retries += 1;
                        tokio::time::sleep(self.backoff(attempt, retry_after)).await;
                        continue;
                    }
                    // A 404 is often the answer the caller asked for ("is this name free?"), and our own new app
                    // answering 404/401 is Fly's lag: neither is a warning.
                    if status == 404 || not_visible_yet {
                        tracing::debug!(label = r.label, status, request_id = err.request_id(), error = %err, "fly call: not found");
                    } else {
                        tracing::warn!(label = r.label, status, request_id = err.request_id(), error = %err, "fly call failed");
                    }
                    if mutating {
                        audit(&r, Some(status), err.request_id(), err.kind());
                    }
                    return Err(err);
                }
                Err((e, request_id)) => {
                    self.record(r.label, None, elapsed);
                    // A connect error means nothing reached Fly: retryable even for mutations.
                    let not_sent = e.is_connect();
                    let message = format!("{} {}: {e}", r.method, r.path);
                    if (not_sent || (!mutating && r.retry_transient))
                        && attempt < self.inner.retry.max_attempts
                    {
                        self.inner.stats.lock().expect("stats poisoned").retries += 1;
                        tokio::time::sleep(self.backoff(attempt, None)).await;
                        continue;
                    }
                    let err = if mutating && !not_sent {
                        FlyError::Ambiguous {
                            status: None,
                            message,
                            request_id,
                        }
                    } else {
                        FlyError::Transient {
                            status: None,
                            message,
                            request_id,
                        }
                    };
                    tracing::warn!(label = r.label, request_id = err.request_id(), error = %err, "fly call failed");
                    if mutating {
                        audit(&r, None, err.request_id(), err.kind());
                    }
                    return Err(err);
                }
            }
        }
    }

    async fn json<T: DeserializeOwned>(&self, r: Req<'_>) -> Result<T, FlyError> {
        let resp = self.send(r).await?;
        decode(&resp)
    }

    async fn unit(&self, r: Req<'_>) -> Result<(), FlyError> {
        self.send(r).await.map(|_| ())
    }

    // ------------------------------------------------------------ apps

    pub async fn list_apps(&self, org: &str) -> Result<ListAppsResponse, FlyError> {
        self.json(Req::new(endpoint::APPS_LIST, Method::GET, "/apps".into()).q("org_slug", org))
            .await
    }

    /// 200 ours (or visible to us), 404 free, 401 in an org this token cannot see
    /// ([`FlyError::OwnedByOtherOrg`], as fly-go's `AppNameAvailable` reads it; the token itself is validated at
    /// start-up). Shortly after our own create, 404 and 401 are [`FlyError::Transient`] instead: not visible yet.
    pub async fn get_app(&self, app: &str) -> Result<App, FlyError> {
        let result = self
            .json(Req::new(endpoint::APPS_GET, Method::GET, format!("/apps/{app}")).app(app))
            .await;
        match result {
            Err(FlyError::Unauthorized {
                message,
                request_id,
            }) => Err(FlyError::OwnedByOtherOrg {
                message,
                request_id,
            }),
            other => other,
        }
    }

    /// `app` answered: from now on its 404/401 mean what they say (a vanished machine is not a lagging app).
    fn confirm_visible(&self, app: &str) {
        let mut own = self
            .inner
            .own_app_creates
            .lock()
            .expect("own creates poisoned");
        if !own.is_empty() {
            own.remove(app);
        }
    }

    /// Whether this client created `app` within [`APP_VISIBILITY_WINDOW`] and has not seen it answer since.
    pub fn recently_created(&self, app: &str) -> bool {
        let mut own = self
            .inner
            .own_app_creates
            .lock()
            .expect("own creates poisoned");
        own.retain(|_, at| at.elapsed() < APP_VISIBILITY_WINDOW);
        own.contains_key(app)
    }

    /// As fly-go's `CreateApp` + `WaitForApp`: [`FlyClient::send_app_create`], then GET until the app is visible
    /// (Fly answers 404, then 401, for a while). If it is not visible within a minute the answer is a retryable
    /// [`FlyError::Transient`]; the create is remembered either way, so later 404/401 are not misread.
    pub async fn create_app(&self, req: &CreateAppRequest) -> Result<CreatedApp, FlyError> {
        let created = self.send_app_create(req).await?;
        self.wait_for_app(&req.name, APP_WAIT).await?;
        Ok(created)
    }

    /// `POST /apps?wait=true`, remembered as this client's own create, without waiting for the app to become
    /// visible: until it does, calls naming it fail with [`FlyError::is_app_not_visible_yet`]. For a caller that
    /// looks again later instead of holding a worker through Fly's lag (the controller).
    pub async fn send_app_create(&self, req: &CreateAppRequest) -> Result<CreatedApp, FlyError> {
        let created: CreatedApp = self
            .json(
                Req::new(endpoint::APPS_CREATE, Method::POST, "/apps".into())
                    .q("wait", "true")
                    .app(&req.name)
                    .json(req),
            )
            .await?;
        self.inner
            .own_app_creates
            .lock()
            .expect("own creates poisoned")
            .insert(req.name.clone(), tokio::time::Instant::now());
        Ok(created)
    }

    /// GET the app until it answers 200; 404/401 (for an app this client just created) mean "not yet".
    pub async fn wait_for_app(&self, app: &str, timeout: Duration) -> Result<App, FlyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.get_app(app).await {
                Err(e @ FlyError::Transient { .. }) if tokio::time::Instant::now() >= deadline => {
                    return Err(e);
                }
                Err(FlyError::Transient { .. }) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// 202: deletion is asynchronous and destroys the app's machines; `force` stops them first.
    pub async fn delete_app(&self, app: &str, force: bool) -> Result<(), FlyError> {
        let mut r = Req::new(
            endpoint::APPS_DELETE,
            Method::DELETE,
            format!("/apps/{app}"),
        )
        .app(app);
        if force {
            r = r.q("force", "true");
        }
        self.unit(r).await
    }

    // ------------------------------------------------------------ machines

    /// Rate-limited at ~1/s per app by Fly: poll single machines with get/wait, not with list.
    pub async fn list_machines(
        &self,
        app: &str,
        q: &ListMachinesQuery,
    ) -> Result<Vec<Machine>, FlyError> {
        let mut r = Req::new(
            endpoint::MACHINES_LIST,
            Method::GET,
            format!("/apps/{app}/machines"),
        )
        .app(app);
        if q.include_deleted {
            r = r.q("include_deleted", "true");
        }
        if let Some(region) = &q.region {
            r = r.q("region", region);
        }
        if !q.states.is_empty() {
            r = r.q("state", q.states.join(","));
        }
        if q.summary {
            r = r.q("summary", "true");
        }
        self.json(r).await
    }

    pub async fn get_machine(&self, app: &str, id: &str) -> Result<Machine, FlyError> {
        self.json(
            Req::new(
                endpoint::MACHINES_GET,
                Method::GET,
                format!("/apps/{app}/machines/{id}"),
            )
            .machine(app, id),
        )
        .await
    }

    /// Not idempotent: an [`FlyError::Ambiguous`] answer means the machine may exist — list and look
    /// for your launch id before trying again.
    pub async fn create_machine(
        &self,
        app: &str,
        req: &CreateMachineRequest,
    ) -> Result<Machine, FlyError> {
        self.json(
            Req::new(
                endpoint::MACHINES_CREATE,
                Method::POST,
                format!("/apps/{app}/machines"),
            )
            .app(app)
            .json(req),
        )
        .await
    }

    /// Full config only; reboots the machine (a stopped one stays stopped).
    pub async fn update_machine(
        &self,
        app: &str,
        id: &str,
        req: &UpdateMachineRequest,
        nonce: Option<&str>,
    ) -> Result<Machine, FlyError> {
        let r = Req::new(
            endpoint::MACHINES_UPDATE,
            Method::POST,
            format!("/apps/{app}/machines/{id}"),
        )
        .machine(app, id)
        .json(req)
        .nonce(nonce);
        self.json(r).await
    }

    pub async fn delete_machine(
        &self,
        app: &str,
        id: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let mut r = Req::new(
            endpoint::MACHINES_DELETE,
            Method::DELETE,
            format!("/apps/{app}/machines/{id}"),
        )
        .machine(app, id)
        .nonce(nonce);
        if force {
            r = r.q("force", "true");
        }
        self.unit(r).await
    }

    async fn action(
        &self,
        label: &'static str,
        app: &str,
        id: &str,
        action: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let r = Req::new(
            label,
            Method::POST,
            format!("/apps/{app}/machines/{id}/{action}"),
        )
        .machine(app, id)
        .nonce(nonce);
        self.unit(r).await
    }

    pub async fn start_machine(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        self.action(endpoint::MACHINES_START, app, id, "start", nonce)
            .await
    }

    pub async fn stop_machine(
        &self,
        app: &str,
        id: &str,
        req: &StopRequest,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let r = Req::new(
            endpoint::MACHINES_STOP,
            Method::POST,
            format!("/apps/{app}/machines/{id}/stop"),
        )
        .machine(app, id)
        .json(req)
        .nonce(nonce);
        self.unit(r).await
    }

    pub async fn restart_machine(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        self.action(endpoint::MACHINES_RESTART, app, id, "restart", nonce)
            .await
    }

    pub async fn suspend_machine(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        self.action(endpoint::MACHINES_SUSPEND, app, id, "suspend", nonce)
            .await
    }

    /// Removes the machine from proxy routing.
    pub async fn cordon_machine(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        self.action(endpoint::MACHINES_CORDON, app, id, "cordon", nonce)
            .await
    }

    pub async fn uncordon_machine(
        &self,
        app: &str,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        self.action(endpoint::MACHINES_UNCORDON, app, id, "uncordon", nonce)
            .await
    }

    /// One long-poll of at most 60 s (Fly rejects other timeouts with 400). Expiry is
    /// [`FlyError::Transient`] with status 408 ([`FlyError::is_wait_timeout`]); see
    /// [`FlyClient::wait_for_state`] for longer waits.
    pub async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        states: &[&str],
        timeout_secs: u64,
        version: Option<&str>,
    ) -> Result<WaitResponse, FlyError> {
        let mut r = Req::new(
            endpoint::MACHINES_WAIT,
            Method::GET,
            format!("/apps/{app}/machines/{id}/wait"),
        )
        .machine(app, id)
        .q("state", states.join(","))
        .q("timeout", timeout_secs);
        if let Some(v) = version {
            r = r.q("version", v);
        }
        r.extra_timeout = Duration::from_secs(timeout_secs);
        r.retry_transient = false;
        self.json(r).await
    }

    pub async fn machine_events(
        &self,
        app: &str,
        id: &str,
        limit: u32,
    ) -> Result<Vec<MachineEvent>, FlyError> {
        let r = Req::new(
            endpoint::MACHINES_EVENTS,
            Method::GET,
            format!("/apps/{app}/machines/{id}/events"),
        )
        .machine(app, id)
        .q("limit", limit.min(50));
        self.json(r).await
    }

    // ------------------------------------------------------------ leases

    /// Acquire (no nonce) or refresh (with the held nonce). Another holder → [`FlyError::LeaseConflict`].
    pub async fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl_secs: u64,
        description: &str,
        nonce: Option<&str>,
    ) -> Result<Lease, FlyError> {
        let r = Req::new(
            endpoint::LEASES_ACQUIRE,
            Method::POST,
            format!("/apps/{app}/machines/{id}/lease"),
        )
        .machine(app, id)
        .q("ttl", ttl_secs)
        .json(&serde_json::json!({"ttl": ttl_secs, "description": description}))
        .nonce(nonce);
        lease_answer(&self.send(r).await?)
    }

    pub async fn refresh_lease(
        &self,
        app: &str,
        id: &str,
        nonce: &str,
        ttl_secs: u64,
    ) -> Result<Lease, FlyError> {
        self.acquire_lease(app, id, ttl_secs, "", Some(nonce)).await
    }

    /// 404 when no lease is held.
    pub async fn get_lease(&self, app: &str, id: &str) -> Result<Lease, FlyError> {
        let r = Req::new(
            endpoint::LEASES_GET,
            Method::GET,
            format!("/apps/{app}/machines/{id}/lease"),
        )
        .machine(app, id);
        lease_answer(&self.send(r).await?)
    }

    /// Releasing an expired lease answers 404 "lease not found"; callers may treat that as done.
    pub async fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<(), FlyError> {
        let r = Req::new(
            endpoint::LEASES_RELEASE,
            Method::DELETE,
            format!("/apps/{app}/machines/{id}/lease"),
        )
        .machine(app, id)
        .nonce(Some(nonce));
        self.unit(r).await
    }

    /// Acquire a lease held until the guard is released or dropped, refreshed in the background.
    pub async fn lease_guard(
        &self,
        app: &str,
        id: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<LeaseGuard, FlyError> {
        LeaseGuard::acquire(self.clone(), app, id, ttl, description).await
    }

    // ------------------------------------------------------------ metadata

    pub async fn get_metadata(
        &self,
        app: &str,
        id: &str,
    ) -> Result<BTreeMap<String, String>, FlyError> {
        let r = Req::new(
            endpoint::METADATA_GET,
            Method::GET,
            format!("/apps/{app}/machines/{id}/metadata"),
        )
        .machine(app, id);
        let v: Option<BTreeMap<String, String>> = self.json(r).await?;
        Ok(v.unwrap_or_default())
    }

    /// Changes metadata without rebooting the machine (204).
    pub async fn set_metadata(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let r = Req::new(
            endpoint::METADATA_SET,
            Method::POST,
            format!("/apps/{app}/machines/{id}/metadata/{key}"),
        )
        .machine(app, id)
        .json(&serde_json::json!({ "value": value }))
        .nonce(nonce);
        self.unit(r).await
    }

    pub async fn delete_metadata(
        &self,
        app: &str,
        id: &str,
        key: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlyError> {
        let r = Req::new(
            endpoint::METADATA_DELETE,
            Method::DELETE,
            format!("/apps/{app}/machines/{id}/metadata/{key}"),
        )
        .machine(app, id)
        .nonce(nonce);
        self.unit(r).await
    }

    // ------------------------------------------------------------ secrets

    /// Set (`Some`) and unset (`None`) in one call; returns the new app secrets version. Running
    /// machines are not touched: update them with `min_secrets_version`.
    pub async fn set_secrets(
        &self,
        app: &str,
        values: &BTreeMap<String, Option<SecretValue>>,
    ) -> Result<SetSecretsResponse, FlyError> {
        let r = Req::new(
            endpoint::SECRETS_SET,
            Method::POST,
            format!("/apps/{app}/secrets"),
        )
        .app(app)
        .json(&serde_json::json!({ "values": values }));
        self.json(r).await
    }

    /// Names and digests only; values cannot be read back.
    pub async fn list_secrets(
        &self,
        app: &str,
        min_version: Option<u64>,
    ) -> Result<ListSecretsResponse, FlyError> {
        let mut r = Req::new(
            endpoint::SECRETS_LIST,
            Method::GET,
            format!("/apps/{app}/secrets"),
        )
        .app(app);
        if let Some(v) = min_version {
            r = r.q("min_version", v);
        }
        self.json(r).await
    }

    // ------------------------------------------------------------ ips, regions, org listing

    pub async fn list_ips(&self, app: &str) -> Result<Vec<IpAssignment>, FlyError> {
        let r = Req::new(
            endpoint::IPS_LIST,
            Method::GET,
            format!("/apps/{app}/ip_assignments"),
        )
        .app(app);
        let v: ListIpsResponse = self.json(r).await?;
        Ok(v.ips)
    }

    pub async fn assign_ip(
        &self,
        app: &str,
        req: &AssignIpRequest,
    ) -> Result<IpAssignment, FlyError> {
        let r = Req::new(
            endpoint::IPS_ASSIGN,
            Method::POST,
            format!("/apps/{app}/ip_assignments"),
        )
        .app(app)
        .json(req);
        self.json(r).await
    }

    pub async fn delete_ip(&self, app: &str, ip: &str) -> Result<(), FlyError> {
        let r = Req::new(
            endpoint::IPS_DELETE,
            Method::DELETE,
            format!("/apps/{app}/ip_assignments/{ip}"),
        )
        .app(app);
        self.unit(r).await
    }

    pub async fn list_regions(&self) -> Result<RegionsResponse, FlyError> {
        self.json(Req::new(
            endpoint::REGIONS_LIST,
            Method::GET,
            "/platform/regions".into(),
        ))
        .await
    }

    /// Machines of the whole org changed after `updated_after`: one call for fleet-wide change
    /// detection instead of a list per app.
    pub async fn list_org_machines(
        &self,
        org: &str,
        q: &OrgMachinesQuery,
    ) -> Result<OrgMachinesResponse, FlyError> {
        let mut r = Req::new(
            endpoint::ORGS_MACHINES,
            Method::GET,
            format!("/orgs/{org}/machines"),
        );
        if let Some(u) = &q.updated_after {
            r = r.q("updated_after", u);
        }
        if let Some(c) = &q.cursor {
            r = r.q("cursor", c);
        }
        if let Some(l) = q.limit {
            r = r.q("limit", l);
        }
        if q.include_deleted {
            r = r.q("include_deleted", "true");
        }
        if q.summary {
            r = r.q("summary", "true");
        }
        self.json(r).await
    }
}

fn decode<T: DeserializeOwned>(resp: &Resp) -> Result<T, FlyError> {
    let body: &[u8] = if resp.body.is_empty() || resp.status == 204 {
        b"null"
    } else {
        &resp.body
    };
    serde_json::from_slice(body).map_err(|e| FlyError::Decode {
        message: e.to_string(),
        request_id: resp.request_id.clone(),
    })
}

/// A lease answer in either shape Fly is documented to use: fly-go's envelope `{status, data}` or the OpenAPI's
/// bare `Lease` (REALISM.md §6).
fn lease_answer(resp: &Resp) -> Result<Lease, FlyError> {
    let v: serde_json::Value = decode(resp)?;
    let lease = match v.get("data") {
        Some(data) => data.clone(),
        None => v,
    };
    let lease: Lease = serde_json::from_value(lease).map_err(|e| FlyError::Decode {
        message: e.to_string(),
        request_id: resp.request_id.clone(),
    })?;
    if lease.nonce.is_empty() {
        return Err(FlyError::Decode {
            message: "lease answer without a nonce".into(),
            request_id: resp.request_id.clone(),
        });
    }
    Ok(lease)
}

/// Map an error answer to a [`FlyError`], preferring the machine-readable `status` field.
fn classify(
    status: u16,
    body: &[u8],
    request_id: Option<String>,
    retry_after: Option<Duration>,
    mutating: bool,
) -> FlyError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let detail = parsed.message.as_deref().filter(|m| !m.is_empty());
    // Fly's 409 body is `{"status":"error","message":...}`: the message is the whole story there.
    let message = match (parsed.error.is_empty(), detail) {
        (false, Some(m)) => format!("{} ({m})", parsed.error),
        (false, None) => parsed.error.clone(),
        (true, Some(m)) => m.to_string(),
        (true, None) => String::from_utf8_lossy(body).chars().take(500).collect(),
    };
    let code = parsed.status.as_deref().unwrap_or_default();
    match status {
        404 => FlyError::NotFound {
            message,
            request_id,
        },
        409 => classify_conflict(message, request_id),
        412 => FlyError::Precondition {
            message,
            request_id,
        },
        422 if code == "name_taken" || message.contains("already been taken") => {
            FlyError::NameTaken {
                message,
                request_id,
            }
        }
        400 | 422 => FlyError::Invalid {
            message,
            request_id,
        },
        403 => FlyError::OwnedByOtherOrg {
            message,
            request_id,
        },
        401 => FlyError::Unauthorized {
            message,
            request_id,
        },
        429 => FlyError::RateLimited {
            retry_after,
            request_id,
        },
        408 | 500..=599 if mutating => FlyError::Ambiguous {
            status: Some(status),
            message,
            request_id,
        },
        408 | 500..=599 => FlyError::Transient {
            status: Some(status),
            message,
            request_id,
        },
        _ => FlyError::Unexpected {
            status,
            message,
            request_id,
        },
    }
}

/// Fly answers 409 for three different things and says which only in the message (REALISM.md §6).
fn classify_conflict(message: String, request_id: Option<String>) -> FlyError {
    let lower = message.to_ascii_lowercase();
    if ["capacity", "insufficient", "could not reserve"]
        .iter()
        .any(|w| lower.contains(w))
    {
        FlyError::NoCapacity {
            message,
            request_id,
        }
    } else if lower.contains("version") && !lower.contains("lease") {
        FlyError::VersionConflict {
            message,
            request_id,
        }
    } else {
        // A lease message, or one we do not know: a lease conflict is the 409 a client meets most, and its
        // handling (read again, retry later) is also right for an unknown conflict.
        FlyError::LeaseConflict {
            message,
            request_id,
        }
    }
}

/// Target of the audit log: one line per mutating call on Fly, whatever its outcome.
pub const AUDIT_TARGET: &str = "mcpfly::audit";

/// One audit line for a mutating call. Emitted inside the caller's span, so the controller's reconcile span
/// adds the resource. Never carries a request or response body (secrets travel in bodies).
fn audit(r: &Req<'_>, status: Option<u16>, request_id: Option<&str>, outcome: &str) {
    tracing::info!(
        target: AUDIT_TARGET,
        action = r.label,
        method = %r.method,
        app = r.app,
        machine = r.machine,
        status,
        fly_request_id = request_id,
        outcome,
        "fly mutation"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_scheme() {
        assert_eq!(authorization_header("abc"), "Bearer abc");
        assert_eq!(authorization_header("Bearer abc"), "Bearer abc");
        assert_eq!(
            authorization_header("FlyV1 fm2_xyz,fm2_abc"),
            "FlyV1 fm2_xyz,fm2_abc"
        );
        assert_eq!(authorization_header("fm1r_a"), "FlyV1 fm1r_a");
        assert_eq!(authorization_header("x, fm1a_b"), "FlyV1 x, fm1a_b");
    }

    #[test]
    fn flaps_base_url_excludes_v1() {
        assert_eq!(
            api_base_from_flaps("https://api.machines.dev"),
            DEFAULT_BASE_URL
        );
        assert_eq!(
            api_base_from_flaps("http://127.0.0.1:4280/"),
            "http://127.0.0.1:4280/v1"
        );
    }

    #[test]
    fn classification() {
        let b =
            br#"{"error":"Validation failed: Name has already been taken","status":"name_taken"}"#;
        assert!(matches!(
            classify(422, b, None, None, true),
            FlyError::NameTaken { .. }
        ));
        assert!(matches!(
            classify(503, b"", None, None, true),
            FlyError::Ambiguous { .. }
        ));
        assert!(matches!(
            classify(503, b"", None, None, false),
            FlyError::Transient { .. }
        ));
        assert!(matches!(
            classify(408, b"", None, None, true),
            FlyError::Ambiguous { .. }
        ));
        let e = classify(
            400,
            br#"{"error":"invalid_argument: x"}"#,
            Some("r1".into()),
            None,
            false,
        );
        assert_eq!(e.request_id(), Some("r1"));
        assert!(
            matches!(e, FlyError::Invalid { ref message, .. } if message == "invalid_argument: x")
        );
    }
}
