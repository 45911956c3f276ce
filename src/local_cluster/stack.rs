//! A whole mcpfly system on one machine: the real control plane, a Fly emulator, and the controller running
//! in-process against both, scoped to one namespace so tests sharing a control plane stay independent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN, Emulator, EmulatorConfig, EmulatorHandle};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use super::ControlPlane;
use crate::api::MCPDeployment;
use crate::controller::ControllerConfig;
use crate::packages::{PinnedOnlyResolver, SourceResolver};

pub struct StackOptions {
    pub emulator: EmulatorConfig,
    /// Fernet key ring text (primary first) stored in the Secret `keyring` of the namespace.
    pub keyring: Option<String>,
    pub resync: Duration,
    /// Org-wide machine listing interval; `None` polls each Ready resource every `resync` instead.
    pub fleet_poll: Option<Duration>,
    /// Per-resource resync while the org-wide listing is failing; `None`: `resync`.
    pub fallback_resync: Option<Duration>,
    pub converge_interval: Duration,
    /// Handshake through each deployment's URL once Ready (needs machines that really run).
    pub verify: bool,
    /// Each deployment's public URL, `{app}` replaced by the app name and `{emulator}` by the emulator's address
    /// (whose proxy serves apps whose machines a local driver runs).
    pub url_template: String,
    /// Reconcile only MCPDeployments matching this label selector (sharding).
    pub label_selector: Option<String>,
    pub resolver: Arc<dyn SourceResolver>,
    /// `--cluster-name`; `None`: the default, the control plane's kube-system namespace UID.
    pub cluster_name: Option<String>,
    /// `--allowed-orgs`, `--allowed-networks`, `--allowed-app-prefixes`.
    pub allowed_orgs: Vec<String>,
    pub allowed_networks: Vec<String>,
    pub allowed_app_prefixes: Vec<String>,
    /// Another control plane than the shared one: a second cluster.
    pub control_plane: Option<&'static ControlPlane>,
    /// The controller talks to this Fly (e.g. another stack's emulator: two clusters sharing one org) instead
    /// of the stack's own emulator.
    pub fly_api_base_url: Option<String>,
    /// The controller's Kubernetes client (e.g. one that records its traffic); default: the admin's.
    pub client: Option<kube::Client>,
    /// `--tools-policy`.
    pub tools_policy: crate::api::ToolsPolicy,
    /// `--concurrency`: resources reconciled at once.
    pub concurrency: u16,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            emulator: EmulatorConfig::default(),
            keyring: None,
            resync: Duration::from_secs(3600),
            fleet_poll: None,
            fallback_resync: None,
            verify: false,
            url_template: "https://{app}.fly.dev/mcp".into(),
            label_selector: None,
            converge_interval: Duration::from_millis(200),
            resolver: Arc::new(PinnedOnlyResolver),
            cluster_name: Some("test".into()),
            allowed_orgs: Vec::new(),
            allowed_networks: Vec::new(),
            allowed_app_prefixes: Vec::new(),
            control_plane: None,
            fly_api_base_url: None,
            client: None,
            tools_policy: Default::default(),
            concurrency: 8,
        }
    }
}

impl StackOptions {
    /// Machines that really run, on `driver`: the controller handshakes through each app's URL on the emulator's
    /// proxy once Ready.
    pub fn with_local_machines(driver: &fly_emulator::local::LocalDriver) -> Self {
        Self {
            emulator: driver.emulator_config(),
            verify: true,
            url_template: "http://{emulator}/apps/{app}/mcp".into(),
            ..Default::default()
        }
    }
}

pub struct Stack {
    pub cp: &'static ControlPlane,
    pub namespace: String,
    pub emulator: EmulatorHandle,
    pub config: ControllerConfig,
    controller: tokio::task::JoinHandle<()>,
}

impl Stack {
    /// Starts an emulator and a controller watching only `namespace` (created if needed).
    pub async fn start(namespace: &str, options: StackOptions) -> anyhow::Result<Self> {
        let cp = match options.control_plane {
            Some(cp) => cp,
            None => ControlPlane::shared().await?,
        };
        cp.install_crds().await?;
        cp.create_namespace(namespace).await?;
        let emulator = Emulator::start(options.emulator).await?;
        let client = match &options.client {
            Some(client) => client.clone(),
            None => cp.client().await?,
        };
        if let Some(keys) = &options.keyring {
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "keyring", "namespace": namespace},
                "stringData": {"keys": keys},
            }))?;
            Api::<Secret>::namespaced(client.clone(), namespace)
                .patch(
                    "keyring",
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(&secret_with_kind(secret)?),
                )
                .await?;
        }
        let config = ControllerConfig {
            fly_api_token: DEFAULT_TOKEN.into(),
            fly_org: DEFAULT_ORG.into(),
            fly_api_base_url: options
                .fly_api_base_url
                .clone()
                .unwrap_or_else(|| emulator.base_url()),
            cluster_name: options.cluster_name.clone(),
            app_prefix: "mcpfly".into(),
            allowed_orgs: options.allowed_orgs.clone(),
            allowed_networks: options.allowed_networks.clone(),
            allowed_app_prefixes: options.allowed_app_prefixes.clone(),
            runtime_image: "registry.example/mcpfly-runtime:test".into(),
            url_template: options
                .url_template
                .replace("{emulator}", &emulator.addr().to_string()),
            namespaces: vec![namespace.to_string()],
            label_selector: options.label_selector.clone(),
            keyring_secret: options
                .keyring
                .as_ref()
                .map(|_| format!("{namespace}/keyring")),
            keyring_file: None,
            resync_seconds: options.resync.as_secs().max(1),
            fleet_poll_seconds: options.fleet_poll.map_or(0, |d| d.as_secs().max(1)),
            fallback_resync_seconds: options
                .fallback_resync
                .unwrap_or(options.resync)
                .as_secs()
                .max(1),
            converge_interval_ms: options.converge_interval.as_millis() as u64,
            concurrency: options.concurrency,
            fly_org_mutations_per_second: None,
            fly_org_mutations_burst: 20.0,
            operations: crate::controller::OperationsConfig::in_process(),
            resolver: Default::default(),
            // Emulated machines run nothing unless the stack has a machine driver, so there is no endpoint.
            verify: options.verify,
            tools_policy: options.tools_policy,
        };
        let run_config = config.clone();
        let resolver = options.resolver.clone();
        let controller = tokio::spawn(async move {
            if let Err(e) = crate::controller::run_with_client(client, run_config, resolver).await {
                tracing::error!(error = %format!("{e:#}"), "controller stopped");
            }
        });
        Ok(Self {
            cp,
            namespace: namespace.to_string(),
            emulator,
            config,
            controller,
        })
    }

    pub async fn deployments(&self) -> anyhow::Result<Api<MCPDeployment>> {
        Ok(Api::namespaced(self.cp.client().await?, &self.namespace))
    }

    /// Server-side applies a manifest (YAML of one MCPDeployment) into the stack's namespace.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<MCPDeployment> {
        let mut value: serde_json::Value = serde_yaml::from_str(yaml)?;
        value["metadata"]["namespace"] = serde_json::Value::String(self.namespace.clone());
        let name = value["metadata"]["name"]
            .as_str()
            .context("manifest has no metadata.name")?
            .to_string();
        let api = self.deployments().await?;
        Ok(api
            .patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&value),
            )
            .await?)
    }

    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.deployments()
            .await?
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// Polls the resource until `done` holds, failing with its last status after `timeout`.
    pub async fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&MCPDeployment) -> bool,
    ) -> anyhow::Result<MCPDeployment> {
        let api = self.deployments().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let current = api.get_opt(name).await?;
            if let Some(current) = &current
                && done(current)
            {
                return Ok(current.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name}: not {what} after {timeout:?}; status: {}",
                    current
                        .and_then(|c| c.status)
                        .map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                        .unwrap_or_else(|| "(gone or none)".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> anyhow::Result<MCPDeployment> {
        self.wait_for(name, timeout, "Ready", |d| {
            d.status.as_ref().is_some_and(|s| {
                s.observed_generation == d.metadata.generation
                    && s.condition(crate::api::ConditionType::Ready)
                        .is_some_and(|c| c.is_true())
            })
        })
        .await
    }

    /// Waits until the resource is `Stalled` and returns that condition.
    pub async fn wait_stalled(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<crate::api::Condition> {
        let stalled = |d: &MCPDeployment| {
            d.status
                .as_ref()
                .and_then(|s| s.condition(crate::api::ConditionType::Stalled))
                .filter(|c| c.is_true())
                .cloned()
        };
        let found = self
            .wait_for(name, timeout, "Stalled", |d| stalled(d).is_some())
            .await?;
        Ok(stalled(&found).expect("checked by wait_for"))
    }

    /// Waits until the resource no longer exists (finalizer released).
    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let api = self.deployments().await?;
        let deadline = Instant::now() + timeout;
        while api.get_opt(name).await?.is_some() {
            if Instant::now() > deadline {
                let left = api
                    .get_opt(name)
                    .await?
                    .map(|d| (d.finalizers().to_vec(), d.status));
                bail!("{name} still exists after {timeout:?}: {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

fn secret_with_kind(secret: Secret) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(secret)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    Ok(value)
}
