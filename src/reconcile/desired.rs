//! What Fly should look like for one `MCPDeployment`: a pure function of the spec, the resolved source, the
//! digests of the secrets to deliver, and the controller's settings.

use std::collections::BTreeMap;

use fly_adapter::client::config::{CONFIG_HASH_METADATA_KEY, config_hash};
use fly_adapter::client::types::{
    Autostop, CheckConfig, FlyDuration, GuestConfig, InitConfig, MachineConfig, PortConfig,
    RestartPolicy, ServiceConfig,
};
use sha2::{Digest, Sha256};

use super::naming;
use crate::api::{AutoStop, MCPDeploymentSpec, RolloutStrategy};
use crate::packages::{Resolved, ResolvedKind, server_argv};

/// Machine metadata keys this controller owns. `fly_platform_version` is never set: Fly's CLI would treat such
/// machines as its own and redeploy them.
pub mod metadata {
    pub use fly_adapter::client::config::CONFIG_HASH_METADATA_KEY as CONFIG_HASH;
    pub const OWNER_UID: &str = "mcpfly_owner_uid";
    pub const RESOURCE: &str = "mcpfly_resource";
    /// A digest over the secrets' digests: part of the config, so new secret values roll machines.
    pub const SECRETS_DIGEST: &str = "mcpfly_secrets_digest";
    /// Unique per create call; finds our machine after an ambiguous create. Not part of the config hash.
    pub const LAUNCH_ID: &str = "mcpfly_launch_id";
}

/// The bridge's port inside the machine and the readiness path it serves.
pub const BRIDGE_PORT: u16 = 8080;
pub const BRIDGE_READY_PATH: &str = "/readyz";
pub const MCP_PATH: &str = "/mcp";
/// The env var naming the app's primary region (the first of `spec.fly.regions`), as flyctl sets it.
pub const PRIMARY_REGION_ENV: &str = "PRIMARY_REGION";
/// The Fly secret holding the endpoint's bearer token; the bridge reads it from its environment.
pub const AUTH_TOKEN_SECRET: &str = crate::api::validation::ENDPOINT_TOKEN_ENV;

/// Controller-wide settings the mapping depends on.
#[derive(Clone, Debug)]
pub struct Settings {
    pub app_prefix: String,
    pub cluster_name: String,
    pub default_org: String,
    /// Image holding node, uv and the mcpfly binary; runs npm and PyPI servers behind the bridge.
    pub runtime_image: String,
    /// `{app}` is replaced by the app name, e.g. `https://{app}.fly.dev/mcp`.
    pub url_template: String,
    /// The npm registry and PyPI index packages are resolved and checked against; machines fetch from the same.
    pub npm_registry: String,
    pub pypi_index: String,
    /// `--tools-policy`: for deployments whose `spec.tools.policy` is unset.
    pub tools_policy: crate::api::ToolsPolicy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DesiredDeployment {
    pub app: String,
    pub org: String,
    /// Empty: Fly's default network. By default each app gets a network named after itself (isolation).
    pub network: String,
    pub url: String,
    pub machines: Vec<DesiredMachine>,
    pub strategy: RolloutStrategy,
    pub max_unavailable: u32,
    /// Machines stopped or suspended by Fly's proxy are expected, not drift.
    pub autostop: bool,
    /// Secret name → digest of the value to deliver (credentials and the endpoint token).
    pub secrets: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DesiredMachine {
    pub name: String,
    pub region: String,
    /// Without the launch id, which is added per create.
    pub config: MachineConfig,
    pub config_hash: String,
}

/// The app name for a resource: the spec's, or the derived deterministic one.
pub fn app_name_for(
    spec: &MCPDeploymentSpec,
    settings: &Settings,
    namespace: &str,
    name: &str,
) -> String {
    match spec.fly.app.as_deref().filter(|a| !a.is_empty()) {
        Some(app) => app.to_string(),
        None => naming::app_name(
            &settings.app_prefix,
            &settings.cluster_name,
            namespace,
            name,
        ),
    }
}

/// The Fly org of a resource's app: the spec's, or the controller's default.
pub fn org_for(spec: &MCPDeploymentSpec, settings: &Settings) -> String {
    spec.fly
        .org
        .clone()
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| settings.default_org.clone())
}

/// The public URL: the template with `{app}` filled in; a trailing `/mcp` (the bridge's path) becomes the path an
/// image source serves on. Only the end is replaced: a host name may contain "mcp" too.
pub fn endpoint_url(template: &str, app: &str, path: &str) -> String {
    match template.strip_suffix(MCP_PATH) {
        Some(base) => format!("{}{path}", base.replace("{app}", app)),
        None => template.replace("{app}", app),
    }
}

/// Hash of a machine config as this controller compares it: Fly's echo and our desired config hash equal when
/// they mean the same; the per-create launch id does not count.
pub fn comparable_hash(config: &MachineConfig) -> String {
    let mut config = config.clone();
    config.metadata.remove(metadata::LAUNCH_ID);
    config.metadata.remove(CONFIG_HASH_METADATA_KEY);
    config_hash(&config)
}

pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub spec: &'a MCPDeploymentSpec,
    pub resolved: &'a Resolved,
    pub secrets: BTreeMap<String, String>,
    /// `status.tools.approved`: with `policy: block` the bridge serves only these tools.
    pub approved_tools: Option<&'a crate::api::ToolSet>,
}

pub fn desired(inputs: &Inputs<'_>, settings: &Settings) -> DesiredDeployment {
    let spec = inputs.spec;
    let app = app_name_for(spec, settings, inputs.namespace, inputs.name);
    let network = match spec.fly.network.as_deref().filter(|n| !n.is_empty()) {
        Some(shared) => shared.to_string(),
        None => app.clone(),
    };
    let (mcp_path, internal_port) = match &inputs.resolved.kind {
        ResolvedKind::Image { .. } => {
            let image = spec.source.image.as_ref();
            (
                image
                    .map(|i| i.path.clone())
                    .unwrap_or_else(|| MCP_PATH.into()),
                image.map(|i| i.port as u16).unwrap_or(BRIDGE_PORT),
            )
        }
        _ => (MCP_PATH.to_string(), BRIDGE_PORT),
    };
    let url = endpoint_url(&settings.url_template, &app, &mcp_path);

    let mut base = base_config(inputs, settings, internal_port, &inputs.secrets);
    base.env.extend(oauth_env(spec, &url));
    let mut machines = Vec::new();
    for region in &spec.fly.regions {
        for index in 0..spec.fly.machines_per_region.max(0) as u32 {
            let mut config = base.clone();
            let hash = comparable_hash(&config);
            config
                .metadata
                .insert(metadata::CONFIG_HASH.to_string(), hash.clone());
            machines.push(DesiredMachine {
                name: naming::machine_name(region, index),
                region: region.clone(),
                config,
                config_hash: hash,
            });
        }
    }
    DesiredDeployment {
        app,
        org: org_for(spec, settings),
        network,
        url,
        machines,
        strategy: spec.rollout.strategy,
        max_unavailable: spec.rollout.max_unavailable.max(1) as u32,
        autostop: spec.fly.auto_stop != AutoStop::Off,
        secrets: inputs.secrets.clone(),
    }
}

/// With `auth: oauth`, the settings the bridge (or an image serving MCP itself) reads, as machine env: issuers,
/// the canonical URL as the resource, and what tokens must carry. None of it is secret.
pub fn oauth_env(spec: &crate::api::MCPDeploymentSpec, url: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let (Some(issuers), Some(oauth)) = (spec.access.oauth_issuers(), &spec.access.oauth) else {
        return env;
    };
    env.insert("MCPFLY_OAUTH_ISSUERS".into(), issuers.join(","));
    env.insert("MCPFLY_OAUTH_RESOURCE".into(), url.to_string());
    if let Some(audience) = &oauth.audience {
        env.insert("MCPFLY_OAUTH_AUDIENCE".into(), audience.clone());
    }
    if !oauth.required_scopes.is_empty() {
        env.insert(
            "MCPFLY_OAUTH_SCOPES".into(),
            oauth.required_scopes.join(","),
        );
    }
    if !oauth.tool_scopes.is_empty() {
        let pairs: Vec<String> = oauth
            .tool_scopes
            .iter()
            .map(|(tool, scope)| format!("{tool}={scope}"))
            .collect();
        env.insert("MCPFLY_OAUTH_TOOL_SCOPES".into(), pairs.join(","));
    }
    env
}

/// Bridge flags for what the spec sets beyond the bridge's defaults (unset fields add nothing, so the defaults
/// live in one place: `mcpfly bridge`).
fn bridge_tuning(spec: &crate::api::MCPDeploymentSpec) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(rate) = &spec.access.rate_limit {
        for (flag, value) in [
            ("--rate-per-token", rate.requests_per_minute),
            ("--rate-token-burst", rate.burst),
            ("--rate-per-client", rate.per_address_requests_per_minute),
            ("--rate-burst", rate.per_address_burst),
        ] {
            if let Some(value) = value {
                flags.push(flag.to_string());
                flags.push(value.to_string());
            }
        }
    }
    if spec.runtime.session_isolation == crate::api::SessionIsolation::Shared {
        flags.extend(["--session-isolation".to_string(), "shared".to_string()]);
    }
    flags
}

fn base_config(
    inputs: &Inputs<'_>,
    settings: &Settings,
    internal_port: u16,
    secrets: &BTreeMap<String, String>,
) -> MachineConfig {
    let spec = inputs.spec;
    let (image, init) = match server_argv(inputs.resolved) {
        Some(server) => {
            let mut cmd: Vec<String> = [
                "mcpfly",
                "bridge",
                "--port",
                &BRIDGE_PORT.to_string(),
                "--path",
                MCP_PATH,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if spec.access.auth == crate::api::Auth::None {
                // Turning auth off must be explicit all the way down to the bridge.
                cmd.push("--no-auth".into());
            }
            cmd.extend(bridge_tuning(spec));
            cmd.push("--".into());
            cmd.extend(server);
            (
                settings.runtime_image.clone(),
                Some(InitConfig {
                    cmd,
                    ..Default::default()
                }),
            )
        }
        None => match &inputs.resolved.kind {
            ResolvedKind::Image { reference } => (reference.clone(), None),
            _ => unreachable!("server_argv is None only for images"),
        },
    };
    let autostop = match spec.fly.auto_stop {
        AutoStop::Off => Autostop::Bool(false),
        AutoStop::Stop => Autostop::Bool(true),
        AutoStop::Suspend => Autostop::Mode("suspend".into()),
    };
    let readiness = CheckConfig {
        kind: Some(if init.is_some() { "http" } else { "tcp" }.into()),
        port: Some(internal_port),
        interval: Some(FlyDuration::Text("10s".into())),
        timeout: Some(FlyDuration::Text("2s".into())),
        grace_period: Some(FlyDuration::Text("5s".into())),
        method: init.is_some().then(|| "GET".into()),
        path: init.is_some().then(|| BRIDGE_READY_PATH.into()),
        ..Default::default()
    };
    let mut metadata_map = BTreeMap::new();
    metadata_map.insert(metadata::OWNER_UID.to_string(), inputs.uid.to_string());
    metadata_map.insert(
        metadata::RESOURCE.to_string(),
        format!("{}/{}", inputs.namespace, inputs.name),
    );
    if !secrets.is_empty() {
        metadata_map.insert(
            metadata::SECRETS_DIGEST.to_string(),
            secrets_digest(secrets),
        );
    }
    let mut env = spec.env.clone();
    env.extend(registry_env(&inputs.resolved.kind, settings));
    // The bridge verifies the fetched package against this before running it; `MCPFLY_` is reserved in spec.env.
    if init.is_some()
        && let Some(pin) = crate::packages::artifact::machine_pin(inputs.resolved)
    {
        env.insert(crate::packages::artifact::INTEGRITY_ENV.to_string(), pin);
    }
    if init.is_some() {
        // Only the bridge enforces tool policy; `MCPFLY_` is reserved in spec.env, so a deployment cannot set it.
        let mode = crate::bridge::tools_policy::effective_mode(spec, settings.tools_policy);
        if let Some(policy) =
            crate::bridge::tools_policy::for_machines(&spec.tools, mode, inputs.approved_tools)
                .to_env()
        {
            env.insert(crate::bridge::tools_policy::POLICY_ENV.to_string(), policy);
        }
    }
    // Fly keeps `min_machines_running` only in the app's primary region, which flyctl names in every machine's
    // env (REALISM.md §7); the first listed region is ours.
    if let Some(primary) = spec.fly.regions.first() {
        env.insert(PRIMARY_REGION_ENV.into(), primary.clone());
    }
    MachineConfig {
        image,
        env,
        init,
        guest: Some(GuestConfig {
            cpu_kind: spec.fly.guest.cpu_kind.as_str().to_string(),
            cpus: spec.fly.guest.cpus as u32,
            memory_mb: spec.fly.guest.memory_mb as u32,
        }),
        restart: Some(RestartPolicy {
            policy: "always".into(),
            max_retries: None,
        }),
        metadata: metadata_map,
        services: vec![ServiceConfig {
            protocol: "tcp".into(),
            internal_port,
            ports: vec![
                PortConfig {
                    port: Some(443),
                    handlers: vec!["tls".into(), "http".into()],
                    force_https: None,
                },
                PortConfig {
                    port: Some(80),
                    handlers: vec!["http".into()],
                    force_https: Some(true),
                },
            ],
            autostop: Some(autostop),
            autostart: Some(true),
            min_machines_running: Some(spec.fly.min_machines_running.max(0) as u32),
            // A service check: Fly's proxy routes on service checks only, so an unready server gets no traffic.
            checks: vec![readiness],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Points the machine's `npx` / `uvx` at the registry the controller resolved and checked the package against.
/// Without it they fetch from the public registries, so a private `@acme/x` checked on a mirror would be fetched
/// from public npm at boot (dependency confusion). Set after `spec.env`, so a deployment cannot point it
/// elsewhere. Registry credentials are never passed: a machine reaching a private registry needs a credential
/// scoped for that, delivered as a sealed secret.
fn registry_env(kind: &ResolvedKind, settings: &Settings) -> Vec<(String, String)> {
    match kind {
        ResolvedKind::Npm { .. } => vec![(
            "npm_config_registry".to_string(),
            settings.npm_registry.clone(),
        )],
        // uv's default index, replacing PyPI (the resolver reads `<index>/simple/<name>/` too).
        ResolvedKind::Pypi { .. } => vec![(
            "UV_DEFAULT_INDEX".to_string(),
            format!("{}/simple", settings.pypi_index.trim_end_matches('/')),
        )],
        ResolvedKind::Image { .. } => vec![],
    }
}

/// One digest over every secret's digest, so machines learn "secrets changed" without seeing any value.
pub fn secrets_digest(secrets: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    for (name, digest) in secrets {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(digest.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())[..16].to_string()
}

#[cfg(test)]
mod url_tests {
    use super::endpoint_url;

    #[test]
    fn only_a_trailing_mcp_path_is_replaced() {
        let fly = "https://{app}.fly.dev/mcp";
        assert_eq!(endpoint_url(fly, "a", "/mcp"), "https://a.fly.dev/mcp");
        assert_eq!(
            endpoint_url(fly, "mcpfly-x", "/rpc"),
            "https://mcpfly-x.fly.dev/rpc"
        );
        let local = "http://127.0.0.1:4280/apps/{app}/mcp";
        assert_eq!(
            endpoint_url(local, "mcp-app", "/v1/mcp"),
            "http://127.0.0.1:4280/apps/mcp-app/v1/mcp"
        );
        assert_eq!(
            endpoint_url("https://{app}.example/", "a", "/rpc"),
            "https://a.example/"
        );
    }
}

#[cfg(test)]
mod oauth_env_tests {
    use super::oauth_env;
    use crate::bridge::BridgeArgs;

    #[test]
    fn oauth_settings_reach_the_bridge_as_env_it_parses() {
        let spec: crate::api::MCPDeploymentSpec = serde_json::from_value(serde_json::json!({
            "source": {"npm": {"package": "x", "version": "1.0.0"}},
            "fly": {"regions": ["iad"]},
            "access": {"auth": "oauth", "oauth": {
                "authorizationServers": ["https://a.example", "https://b.example/t"],
                "requiredScopes": ["mcp", "read"],
                "toolScopes": {"delete": "write"},
            }},
        }))
        .unwrap();
        let env = oauth_env(&spec, "https://app.fly.dev/mcp");
        assert_eq!(
            env["MCPFLY_OAUTH_ISSUERS"],
            "https://a.example,https://b.example/t"
        );
        assert_eq!(env["MCPFLY_OAUTH_RESOURCE"], "https://app.fly.dev/mcp");
        assert!(
            !env.contains_key("MCPFLY_OAUTH_AUDIENCE"),
            "default: the resource"
        );
        // The bridge reads the same names, split the same way (clap's env and its value delimiter).
        let command = <BridgeArgsParser as clap::CommandFactory>::command();
        let mut args: Vec<String> = Vec::new();
        for arg in command.get_arguments() {
            if let (Some(name), Some(long)) = (arg.get_env(), arg.get_long())
                && let Some(value) = env.get(name.to_str().unwrap())
            {
                for v in value.split(',') {
                    args.extend([format!("--{long}"), v.to_string()]);
                }
            }
        }
        assert_eq!(
            args.len(),
            2 * 6,
            "every variable has a bridge flag: {args:?}"
        );
        args.extend(["--".into(), "server".into()]);
        let parsed = BridgeArgs::parse_from(args).unwrap();
        let config = parsed.oauth_config().unwrap();
        assert_eq!(config.issuers, ["https://a.example", "https://b.example/t"]);
        assert_eq!(config.audience, "https://app.fly.dev/mcp");
        assert_eq!(config.required_scopes, ["mcp", "read"]);
        assert_eq!(
            config.tool_scopes,
            [("delete".to_string(), "write".to_string())]
        );

        let mut bearer = spec.clone();
        bearer.access.auth = crate::api::Auth::Bearer;
        assert!(oauth_env(&bearer, "https://app.fly.dev/mcp").is_empty());
    }

    #[derive(clap::Parser)]
    struct BridgeArgsParser {
        #[command(flatten)]
        args: BridgeArgs,
    }
}
