//! The controller's configuration: flags, each with an environment variable (listed in `.env.example`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args};

use crate::reconcile::desired::Settings;

#[derive(Args, Clone, Debug)]
pub struct ControllerConfig {
    /// Fly org token (an app-scoped deploy token cannot create apps). Never logged.
    #[arg(long, env = "FLY_API_TOKEN", hide_env_values = true)]
    pub fly_api_token: String,
    /// The Fly org apps are created in unless a resource sets spec.fly.org.
    #[arg(long, env = "FLY_ORG")]
    pub fly_org: String,
    /// Fly Machines API base URL (the emulator's, in tests and the demo).
    #[arg(
        long,
        env = "FLY_API_BASE_URL",
        default_value = "https://api.machines.dev/v1"
    )]
    pub fly_api_base_url: String,
    /// Part of every derived app name's hash, so two clusters sharing a Fly org never derive the same name.
    /// Unset: the UID of the cluster's kube-system namespace, which no other cluster shares.
    #[arg(long, env = "MCPFLY_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Further Fly orgs a resource may name in spec.fly.org (comma-separated); --fly-org is always allowed.
    /// Empty: only --fly-org.
    #[arg(long, env = "MCPFLY_ALLOWED_ORGS", value_delimiter = ',')]
    pub allowed_orgs: Vec<String>,
    /// Shared Fly private networks a resource may join through spec.fly.network (comma-separated). Empty:
    /// none, so every app has a network of its own.
    #[arg(long, env = "MCPFLY_ALLOWED_NETWORKS", value_delimiter = ',')]
    pub allowed_networks: Vec<String>,
    /// A name chosen in spec.fly.app must start with one of these prefixes (comma-separated; `{namespace}` is
    /// replaced by the resource's namespace, e.g. `{namespace}-`). Empty: any name.
    #[arg(long, env = "MCPFLY_ALLOWED_APP_PREFIXES", value_delimiter = ',')]
    pub allowed_app_prefixes: Vec<String>,
    /// Prefix of derived app names.
    #[arg(long, env = "MCPFLY_APP_PREFIX", default_value = "mcpfly")]
    pub app_prefix: String,
    /// Image with node, uv and the mcpfly binary that runs npm and PyPI servers behind the bridge.
    #[arg(
        long,
        env = "MCPFLY_RUNTIME_IMAGE",
        default_value = "registry.fly.io/mcpfly-runtime:0.1.0"
    )]
    pub runtime_image: String,
    /// Public URL of a deployment; `{app}` is replaced by the app name.
    #[arg(
        long,
        env = "MCPFLY_URL_TEMPLATE",
        default_value = "https://{app}.fly.dev/mcp"
    )]
    pub url_template: String,
    /// Watch only these namespaces (comma-separated); all namespaces when empty.
    #[arg(long = "namespace", env = "MCPFLY_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Watch only MCPDeployments matching this label selector (for sharding across controllers).
    #[arg(long, env = "MCPFLY_LABEL_SELECTOR")]
    pub label_selector: Option<String>,
    /// The key-ring Secret as NAMESPACE/NAME (key `keys`): watched, so a rotation reaches the controller
    /// without a restart and requeues every resource.
    #[arg(long, env = "MCPFLY_KEYRING_SECRET")]
    pub keyring_secret: Option<String>,
    /// A key-ring file (one Fernet key per line, primary first), e.g. a mounted Secret.
    #[arg(long, env = "MCPFLY_KEYRING_FILE")]
    pub keyring_file: Option<PathBuf>,
    /// Seconds between full checks of a Ready deployment while fleet-wide change detection works. Changes on
    /// Fly are noticed through the org-wide machine listing within --fleet-poll-seconds, but that listing is a
    /// point in time that can miss a change without saying so; this safety net bounds how long a machine
    /// destroyed by hand can go unrepaired to two days instead of a week (one machine listing per deployment per
    /// two days: at most 42/hour for 1,000 deployments, inside the idle budget in BENCHMARKS.md).
    #[arg(long, env = "MCPFLY_RESYNC_SECONDS", default_value_t = 48 * 3600)]
    pub resync_seconds: u64,
    /// Seconds between org-wide machine listings (one Fly call for the whole fleet); 0 turns fleet-wide
    /// change detection off, so every Ready deployment is polled every --fallback-resync-seconds.
    #[arg(long, env = "MCPFLY_FLEET_POLL_SECONDS", default_value_t = 60)]
    pub fleet_poll_seconds: u64,
    /// Seconds between checks of a Ready deployment when the org-wide listing is off or failing.
    #[arg(long, env = "MCPFLY_FALLBACK_RESYNC_SECONDS", default_value_t = 300)]
    pub fallback_resync_seconds: u64,
    /// Milliseconds between looks at a deployment that is converging.
    #[arg(long, env = "MCPFLY_CONVERGE_INTERVAL_MS", default_value_t = 1000)]
    pub converge_interval_ms: u64,
    /// After a deployment is Ready, perform an MCP handshake (initialize + tools/list) through its public URL
    /// and record the server's name, version, protocol and tools in status (condition Verified).
    #[arg(long, env = "MCPFLY_VERIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,
    /// What a tool that is new or changed since its review means for deployments whose `spec.tools.policy` is
    /// unset: `warn` (served; condition ToolsChanged, Event, metric) or `block` (the bridge refuses calls to it
    /// until approved). Image sources are always `warn`: no mcpfly bridge runs in front of them.
    #[arg(long, env = "MCPFLY_TOOLS_POLICY_DEFAULT", value_enum, default_value_t = crate::api::ToolsPolicy::Warn)]
    pub tools_policy: crate::api::ToolsPolicy,
    /// An org-wide cap on mutating Fly calls per second, if the org has one (Fly documents none; the emulator
    /// can impose one): the client then paces all mutations under it instead of collecting 429s.
    #[arg(long, env = "MCPFLY_FLY_ORG_MUTATIONS_PER_SECOND")]
    pub fly_org_mutations_per_second: Option<f64>,
    /// Burst of the org-wide mutation cap.
    #[arg(long, env = "MCPFLY_FLY_ORG_MUTATIONS_BURST", default_value_t = 20.0)]
    pub fly_org_mutations_burst: f64,
    /// Resources reconciled at once.
    #[arg(long, env = "MCPFLY_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    #[command(flatten)]
    pub operations: OperationsConfig,
    /// npm and PyPI registries, supply-chain policy and the resolution cache.
    #[command(flatten)]
    pub resolver: crate::packages::ResolverConfig,
}

/// How the controller runs as a service: its HTTP listeners and leader election.
#[derive(Args, Clone, Debug)]
pub struct OperationsConfig {
    /// Address of the HTTP server for /metrics, /healthz and /readyz (port 0: any free port).
    #[arg(long, env = "MCPFLY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of the seal listener (`POST /seal`; every request authenticated with a TokenReview and
    /// authorised with a SubjectAccessReview for `create` on `mcpdeployments/seal`).
    #[arg(long, env = "MCPFLY_SEAL_ADDR", default_value = "0.0.0.0:8081")]
    pub seal_addr: SocketAddr,
    /// Seal requests handled at once; more are refused with 429.
    #[arg(long, env = "MCPFLY_SEAL_MAX_IN_FLIGHT", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub seal_max_in_flight: u16,
    /// Reconcile only while holding the leader Lease, so that two replicas never both write.
    #[arg(long, env = "MCPFLY_LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease (controllers sharding by namespace or selector need one name per shard).
    #[arg(long, env = "MCPFLY_LEASE_NAME", default_value = "mcpfly-controller")]
    pub lease_name: String,
    /// Namespace of the leader Lease: the controller's own (the chart sets POD_NAMESPACE from the downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
}

impl OperationsConfig {
    /// For a controller inside a test process: no election, HTTP on a free loopback port.
    pub fn in_process() -> Self {
        Self {
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            seal_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            seal_max_in_flight: 16,
            leader_election: false,
            lease_name: "mcpfly-controller".into(),
            lease_namespace: None,
        }
    }

    /// `(namespace, name)` of the leader Lease, when election is on.
    pub fn lease(&self) -> anyhow::Result<Option<(String, String)>> {
        if !self.leader_election {
            return Ok(None);
        }
        match self.lease_namespace.as_deref() {
            Some(ns) if !ns.is_empty() => Ok(Some((ns.to_string(), self.lease_name.clone()))),
            _ => anyhow::bail!(
                "leader election needs the namespace of its Lease: set POD_NAMESPACE (the chart sets it from \
                 the downward API) or --lease-namespace, or run a single replica with --leader-election=false"
            ),
        }
    }
}

impl ControllerConfig {
    /// `cluster_identity`: see [`crate::controller::cluster_identity`].
    pub fn settings(&self, cluster_identity: String) -> Settings {
        Settings {
            app_prefix: self.app_prefix.clone(),
            cluster_name: cluster_identity,
            default_org: self.fly_org.clone(),
            runtime_image: self.runtime_image.clone(),
            url_template: self.url_template.clone(),
            npm_registry: self.resolver.npm_registry.clone(),
            pypi_index: self.resolver.pypi_index.clone(),
            tools_policy: self.tools_policy,
        }
    }

    /// The allowlists every resource is admitted against before any Fly call.
    pub fn policy(&self) -> crate::reconcile::policy::Policy {
        let listed = |values: &[String]| -> Vec<String> {
            values
                .iter()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect()
        };
        crate::reconcile::policy::Policy {
            default_org: self.fly_org.clone(),
            allowed_orgs: listed(&self.allowed_orgs),
            allowed_networks: listed(&self.allowed_networks),
            allowed_app_prefixes: listed(&self.allowed_app_prefixes),
        }
    }

    /// Fly's documented limits plus the org-wide mutation cap, with the client's margin.
    pub fn fly_rate_limits(&self) -> fly_adapter::token_bucket::RateLimits {
        let mut limits = fly_adapter::token_bucket::RateLimits::fly();
        limits.org_mutations = self
            .fly_org_mutations_per_second
            .map(|rate| fly_adapter::token_bucket::Limit::new(rate, self.fly_org_mutations_burst));
        limits.with_margin()
    }

    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds)
    }

    pub fn fallback_resync(&self) -> Duration {
        Duration::from_secs(self.fallback_resync_seconds)
    }

    /// `None` when fleet-wide change detection is off.
    pub fn fleet_poll(&self) -> Option<Duration> {
        (self.fleet_poll_seconds > 0).then(|| Duration::from_secs(self.fleet_poll_seconds))
    }

    pub fn converge_interval(&self) -> Duration {
        Duration::from_millis(self.converge_interval_ms)
    }

    /// `(namespace, name)` of the key-ring Secret.
    pub fn keyring_secret_ref(&self) -> anyhow::Result<Option<(String, String)>> {
        match &self.keyring_secret {
            None => Ok(None),
            Some(text) => match text.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                    Ok(Some((ns.into(), name.into())))
                }
                _ => anyhow::bail!("--keyring-secret must be NAMESPACE/NAME, got {text:?}"),
            },
        }
    }
}
