//! `mcpfly controller`: a kube-runtime controller over `MCPDeployment`s.
//!
//! - [`config`]: flags and environment.
//! - [`reconciler`]: one reconcile (Kubernetes side: finalizer, status, events, the connection Secret).
//! - [`status`]: status and conditions, built without I/O.
//! - [`backoff`]: per-resource waits after failures, and which failures stall instead of retrying.
//!
//! What triggers a reconcile: a change to the resource; a change to a Secret it references (`secretKeyRef`) or
//! owns (the connection Secret); a change to the key-ring Secret (all resources); the requeue a reconcile asks
//! for (soon while converging, the resync interval when Ready, capped backoff after errors, never while
//! Stalled).

pub mod backoff;
pub mod config;
pub mod fleet;
pub mod leader;
pub mod reconciler;
pub mod settled;
pub mod status;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tracing::{Instrument, error, info, info_span, warn};

use crate::api::MCPDeployment;
use crate::packages::SourceResolver;
use crate::reconcile::act::InFlight;
use crate::reconcile::desired::Settings;
use crate::sealing::KeyRing;
use crate::telemetry::{Check, Health, KeyringSlot, Metrics};
pub use config::{ControllerConfig, OperationsConfig};
use fly_adapter::client::{FlyClient, FlyClientConfig, FlyError};

/// Errors that make a reconcile retry with backoff. Problems the user must fix are not errors: they become a
/// `Stalled` condition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Fly API: {0}")]
    Fly(#[from] FlyError),
    #[error("source resolution: {0}")]
    Resolve(crate::packages::ResolveError),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("resource has no namespace")]
    NotNamespaced,
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The `kind` label of `mcpfly_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Fly(_) => "fly",
            Error::Resolve(_) => "resolve",
            Error::Credentials(_) => "credentials",
            Error::NotNamespaced => "not_namespaced",
            Error::Internal(_) => "internal",
        }
    }
}

/// Shared by every reconcile: clients, settings and in-memory bookkeeping.
pub struct Context {
    pub client: kube::Client,
    pub fly: FlyClient,
    pub settings: Settings,
    /// The controller's allowlists.
    pub policy: crate::reconcile::policy::Policy,
    pub resolver: Arc<dyn SourceResolver>,
    /// Replaced when the key-ring Secret changes; shared with the seal endpoint and readiness.
    pub keyring: KeyringSlot,
    pub metrics: Arc<Metrics>,
    pub in_flight: InFlight,
    pub recorder: Recorder,
    /// Who holds leases, in lease descriptions (pod name or host).
    pub identity: String,
    pub resync: Duration,
    pub fallback_resync: Duration,
    pub fleet: Arc<fleet::FleetWatch>,
    pub converge_interval: Duration,
    /// How long Fly takes to start a machine, learned from what reconciles observe.
    pub start_times: crate::reconcile::timing::StartTimes,
    /// Verify each Ready deployment with an MCP handshake through its public URL.
    pub verify: bool,
    /// Per-resource waits after failures (every error path), reset only by a successful reconcile.
    pub backoff: backoff::Backoff,
    /// How each resource was left by its last reconcile and this process's own writes (echoes are skipped).
    pub settled: Arc<settled::Settled>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        fly: FlyClient,
        config: &ControllerConfig,
        cluster_identity: String,
        resolver: Arc<dyn SourceResolver>,
        keyring: Option<Arc<KeyRing>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("mcpfly-{}", std::process::id()));
        Self {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "mcpfly".into(),
                    instance: Some(identity.clone()),
                },
            ),
            client,
            fly,
            settings: config.settings(cluster_identity),
            policy: config.policy(),
            resolver,
            keyring: Arc::new(RwLock::new(keyring)),
            metrics,
            in_flight: InFlight::default(),
            identity,
            resync: config.resync(),
            fallback_resync: config.fallback_resync(),
            fleet: Arc::new(fleet::FleetWatch::default()),
            converge_interval: config.converge_interval(),
            start_times: Default::default(),
            verify: config.verify,
            backoff: backoff::Backoff::new(config.converge_interval(), backoff::CAP),
            settled: Arc::default(),
        }
    }

    /// When to look at a Ready resource again: rarely while the org-wide listing reports changes, otherwise
    /// per-resource polling. Jittered by up to a tenth so a fleet started together does not resync together.
    pub fn ready_requeue(&self) -> Duration {
        let base = if self.fleet.healthy() {
            self.resync
        } else {
            self.fallback_resync
        };
        let jitter = base.as_millis() as u64 / 10;
        base + Duration::from_millis(if jitter == 0 {
            0
        } else {
            rand::random::<u64>() % jitter
        })
    }

    fn forget(&self, obj: &MCPDeployment) {
        self.settled.forget(obj);
        self.backoff.succeeded(&obj.uid().unwrap_or_default());
    }
}

fn error_policy(obj: Arc<MCPDeployment>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let delay = ctx.backoff.failed(&obj.uid().unwrap_or_default());
    warn!(resource = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()), %error, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

async fn reconcile(obj: Arc<MCPDeployment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = info_span!(
        "reconcile",
        resource = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
        generation = obj.metadata.generation.unwrap_or_default()
    );
    let now = std::time::Instant::now();
    if let Some(next) = ctx.settled.echo(&obj, now) {
        ctx.metrics.reconcile_unchanged();
        return Ok(next.into());
    }
    let ticket = ctx.settled.begin(&obj);
    let timer = ctx.metrics.reconcile_started();
    let result = reconciler::reconcile(obj.clone(), ctx.clone())
        .instrument(span)
        .await;
    timer.finish(result.as_ref().err().map(Error::kind));
    match &result {
        Ok(next) => ctx.settled.settle(ticket, &obj, *next, now),
        Err(_) => ctx.settled.unsettle(&obj),
    }
    result.map(Into::into)
}

/// The cluster identity hashed into derived app names: `--cluster-name`, or else the UID of the kube-system
/// namespace, which no other cluster shares (a constant default would give two clusters syncing one GitOps
/// repository into one Fly org the same app names).
pub async fn cluster_identity(
    client: &kube::Client,
    config: &ControllerConfig,
) -> anyhow::Result<String> {
    if let Some(name) = config.cluster_name.as_deref().filter(|n| !n.is_empty()) {
        return Ok(name.to_string());
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let found = namespaces.get(CLUSTER_IDENTITY_NAMESPACE).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the UID of namespace {CLUSTER_IDENTITY_NAMESPACE}, the default cluster identity in derived \
             app names ({e}); allow `get` on it (the chart does) or set --cluster-name (MCPFLY_CLUSTER_NAME) to a \
             name no other cluster sharing the Fly org uses"
        )
    })?;
    found.metadata.uid.ok_or_else(|| {
        anyhow::anyhow!("namespace {CLUSTER_IDENTITY_NAMESPACE} has no UID; set --cluster-name")
    })
}

/// Every cluster has it, and its UID is assigned once when the cluster is created.
const CLUSTER_IDENTITY_NAMESPACE: &str = "kube-system";

/// Loads the key ring from the configured file, or from the Secret (whose changes [`watch_keyring`] follows).
pub async fn load_keyring(
    client: &kube::Client,
    config: &ControllerConfig,
) -> anyhow::Result<Option<Arc<KeyRing>>> {
    if let Some(path) = &config.keyring_file {
        return Ok(Some(Arc::new(KeyRing::from_file(path)?)));
    }
    let Some((namespace, name)) = config.keyring_secret_ref()? else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    match api.get_opt(&name).await? {
        Some(secret) => Ok(Some(Arc::new(keyring_from_secret(
            &secret, &namespace, &name,
        )?))),
        None => {
            warn!(secret = %format!("{namespace}/{name}"), "key-ring Secret not found; sealed credentials will stall until it exists");
            Ok(None)
        }
    }
}

fn keyring_from_secret(secret: &Secret, namespace: &str, name: &str) -> anyhow::Result<KeyRing> {
    let data = secret.data.as_ref().and_then(|d| d.get("keys")).ok_or_else(|| {
        anyhow::anyhow!("key-ring Secret {namespace}/{name} has no `keys` entry (one Fernet key per line, primary first)")
    })?;
    let text = std::str::from_utf8(&data.0)
        .map_err(|_| anyhow::anyhow!("key-ring Secret {namespace}/{name}: `keys` is not text"))?;
    Ok(KeyRing::parse(text, &format!("Secret {namespace}/{name}"))?)
}

/// Follows the key-ring Secret: reloads the ring and asks for every resource to be reconciled.
async fn watch_keyring(
    ctx: Arc<Context>,
    namespace: String,
    name: String,
    reconcile_all: Vec<mpsc::Sender<()>>,
) {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    // Backoff: a control plane that went away must not turn this loop hot.
    let mut stream = watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(secret) => match keyring_from_secret(&secret, &namespace, &name) {
                Ok(ring) => {
                    info!(keys = ?ring.key_ids(), "key ring loaded");
                    *ctx.keyring.write().unwrap() = Some(Arc::new(ring));
                    ctx.settled.touch_all();
                    for controller in &reconcile_all {
                        let _ = controller.try_send(());
                    }
                }
                Err(e) => {
                    error!(error = %e, "key-ring Secret is invalid; keeping the previous key ring")
                }
            },
            Err(e) => warn!(error = %e, "watching the key-ring Secret"),
        }
    }
}

/// MCPDeployments in `store` that reference Secret `namespace/name` (credentials or connection Secret).
fn referencing(
    store: &Store<MCPDeployment>,
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<MCPDeployment>> {
    store
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(namespace))
        .filter(|d| {
            d.spec
                .credentials
                .iter()
                .any(|c| c.secret_key_ref.as_ref().is_some_and(|r| r.name == name))
                || d.connection_secret_name() == name
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

pub async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let resolver = crate::packages::RegistryResolver::new(&config.resolver)
        .map_err(|e| anyhow::anyhow!("registry configuration: {e}"))?;
    run_with_client(client, config, Arc::new(resolver)).await
}

/// How long start-up waits for a busy or unreachable Fly before giving up.
const STARTUP_FLY_PATIENCE: Duration = Duration::from_secs(60);

pub async fn run_with_client(
    client: kube::Client,
    config: ControllerConfig,
    resolver: Arc<dyn SourceResolver>,
) -> anyhow::Result<()> {
    let lease = config.operations.lease()?;
    let shutdown = Shutdown::on_signals();
    let metrics = Arc::new(Metrics::new());
    let health = Health::new();
    // The HTTP server comes first: /healthz answers and /readyz says what is missing while start-up runs.
    let server = crate::telemetry::serve(
        config.operations.metrics_addr,
        metrics.clone(),
        health.clone(),
        shutdown.wait(),
    )
    .await?;
    // Background tasks end with this function, also when its future is dropped (an in-process controller in
    // the demo or a test is stopped by aborting it).
    let mut background = vec![AbortOnDrop(server.task)];
    let keyring_of = health.clone();
    let seal = crate::sealing::listener::router(
        Arc::new(move || keyring_of.keyring()),
        Arc::new(crate::sealing::listener::ApiServer(client.clone())),
        crate::sealing::listener::Limits {
            in_flight: config.operations.seal_max_in_flight.into(),
            ..Default::default()
        },
    );
    let (_, seal_task) =
        crate::sealing::listener::serve(config.operations.seal_addr, seal, shutdown.wait()).await?;
    background.push(AbortOnDrop(seal_task));

    let mut fly_config = FlyClientConfig::new(&config.fly_api_base_url, &config.fly_api_token);
    fly_config.org = Some(config.fly_org.clone());
    fly_config.observer = Some(metrics.clone());
    fly_config.rate_limits = config.fly_rate_limits();
    let fly = FlyClient::new(fly_config)?;
    // Fail at start-up with a clear message rather than on the first resource; a Fly that is only busy (429,
    // 5xx, unreachable for a moment) is waited for, so a restart during a rate-limit storm does not crash-loop.
    let deadline = std::time::Instant::now() + STARTUP_FLY_PATIENCE;
    let checked = loop {
        match fly.list_apps(&config.fly_org).await {
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                health.fail(
                    Check::Fly,
                    format!("Fly API busy or unreachable ({e}); retrying"),
                );
                warn!(error = %e, "checking the Fly token and org; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => break other,
        }
    };
    if let Err(e) = checked {
        let message = match e {
            FlyError::Unauthorized { .. } => format!(
                "the Fly token was refused: set FLY_API_TOKEN to an org token for {}",
                config.fly_org
            ),
            e => format!(
                "cannot list apps of Fly org {} with the configured token ({e}); check FLY_ORG and FLY_API_BASE_URL",
                config.fly_org
            ),
        };
        health.fail(Check::Fly, message.clone());
        anyhow::bail!(message);
    }
    health.pass(Check::Fly);

    // A namespace list runs one watch per namespace; its reconciles share one context.
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    // Fail early if the CRD is missing (or RBAC forbids listing) rather than retrying silently forever.
    for scope in &scopes {
        let deployments: Api<MCPDeployment> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        if let Err(e) = deployments.list(&ListParams::default().limit(1)).await {
            let message = format!(
                "cannot list MCPDeployments{} ({e}); is the CRD installed (`mcpfly crd | kubectl apply --server-side -f -`) and may this ServiceAccount list them?",
                scope
                    .as_ref()
                    .map(|ns| format!(" in {ns}"))
                    .unwrap_or_default()
            );
            health.fail(Check::Crd, message.clone());
            anyhow::bail!(message);
        }
    }
    health.pass(Check::Crd);

    let cluster = cluster_identity(&client, &config).await?;
    info!(cluster_identity = %cluster, "derived app names hash this cluster identity");
    let keyring = load_keyring(&client, &config).await?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        fly,
        &config,
        cluster,
        resolver,
        keyring,
        metrics.clone(),
    ));
    match (&config.keyring_file, config.keyring_secret_ref()?) {
        (Some(path), _) => health.track_keyring(
            ctx.keyring.clone(),
            format!("key-ring file {} not loaded", path.display()),
        ),
        (None, Some((namespace, name))) => health.track_keyring(
            ctx.keyring.clone(),
            format!("key-ring Secret {namespace}/{name} not found or invalid (key `keys`: one Fernet key per line, primary first; `mcpfly keygen`)"),
        ),
        (None, None) => health.keyring_not_required(),
    }

    let mut watch_config = watcher::Config::default().any_semantic();
    if let Some(selector) = &config.label_selector {
        watch_config = watch_config.labels(selector);
    }
    // One "reconcile everything" trigger per controller, fired when the key ring changes.
    let (reconcile_all_tx, reconcile_all_rx): (Vec<_>, Vec<_>) =
        scopes.iter().map(|_| mpsc::channel::<()>(1)).unzip();
    if let Some((namespace, name)) = config.keyring_secret_ref()? {
        background.push(AbortOnDrop(tokio::spawn(watch_keyring(
            ctx.clone(),
            namespace,
            name,
            reconcile_all_tx,
        ))));
    }

    // Followers stay ready (they serve /seal and can take over at once) but do not watch or reconcile.
    let mut elector = lease.map(|(namespace, name)| {
        leader::LeaderElector::new(
            client.clone(),
            &namespace,
            &name,
            &ctx.identity,
            leader::LeaseTiming::default(),
        )
    });
    if let Some(elector) = elector.as_mut() {
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown.wait() => return Ok(()),
        }
    }
    metrics.set_leader(true);

    let mut controllers = Vec::new();
    let mut fleet_routes = Vec::new();
    for (scope, reconcile_all) in scopes.into_iter().zip(reconcile_all_rx) {
        // Secrets are watched by metadata only (for `PartialObjectMeta`, kube asks the apiserver for
        // PartialObjectMetadata; tests/secrets_by_metadata.rs shows no Secret value arrives), and nothing of them
        // is cached: their values come from targeted GETs of the Secrets a resource names.
        let (deployments, secrets): (Api<MCPDeployment>, Api<PartialObjectMeta<Secret>>) =
            match &scope {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (Api::all(client.clone()), Api::all(client.clone())),
            };
        // A lean cache: the reconciler never reads managedFields or kubectl's last-applied copy of the spec,
        // which together are most of a cached object's size.
        let (store, writer) = kube::runtime::reflector::store();
        let deployment_changes = kube::runtime::reflector(
            writer,
            watcher(deployments, watch_config.clone()).modify(settled::lean),
        )
        .applied_objects();
        let controller = Controller::for_stream(deployment_changes, store.clone());
        metrics.watch_store(store.clone());
        let (fleet_trigger, fleet_changes) = mpsc::channel(1024);
        fleet_routes.push(fleet::Route {
            store: store.clone(),
            trigger: fleet_trigger,
        });
        let secret_changes =
            watcher(secrets, watcher::Config::default().any_semantic()).touched_objects();
        let settled = ctx.settled.clone();
        let controller = controller
            .watches_stream(secret_changes, move |secret| {
                let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
                if settled.own_secret(&namespace, &name, secret.resource_version().as_deref()) {
                    return Vec::new();
                }
                let owners = referencing(&store, &namespace, &name);
                owners.iter().for_each(|owner| settled.touch(owner));
                owners
            })
            .reconcile_all_on(receiver_stream(reconcile_all))
            .reconcile_on(receiver_stream(fleet_changes))
            .with_config(
                kube::runtime::controller::Config::default().concurrency(config.concurrency),
            )
            .graceful_shutdown_on(shutdown.wait())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            });
        controllers.push(controller);
    }
    if let Some(interval) = config.fleet_poll() {
        let watch = fleet::run(
            ctx.fleet.clone(),
            ctx.settled.clone(),
            ctx.fly.clone(),
            config.fly_org.clone(),
            interval,
            fleet_routes,
        );
        background.push(AbortOnDrop(tokio::spawn(watch)));
    }
    info!(org = %config.fly_org, identity = %ctx.identity, "controller running");
    let lost = async {
        match elector.as_mut() {
            Some(elector) => elector.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        error = lost => {
            // In-flight reconciles die with the process: nothing writes after this point.
            metrics.set_leader(false);
            anyhow::bail!("lost the leader lease ({error}); exiting so that only one replica writes (the Deployment restarts this one as a follower)");
        }
    }
    // Graceful shutdown: in-flight reconciles have finished; hand over at once.
    if let Some(elector) = elector.as_mut() {
        elector.release().await;
    }
    metrics.set_leader(false);
    info!("controller stopped");
    Ok(())
}

/// SIGINT or SIGTERM, observable by any number of waiters (controllers, the HTTP server, the elector).
#[derive(Clone)]
struct Shutdown(tokio::sync::watch::Receiver<bool>);

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Shutdown {
    fn on_signals() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        term.recv().await;
                    }
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term => {}
            }
            info!("shutting down: finishing in-flight reconciles");
            let _ = tx.send(true);
        });
        Self(rx)
    }

    fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

fn receiver_stream<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
