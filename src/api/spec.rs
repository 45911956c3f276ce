//! `MCPDeployment.spec`: what the user asks for.
//!
//! Doc comments on these types become the CRD's field descriptions (`kubectl explain mcpdeployment.spec`), so they
//! are written for the person writing a manifest. Validation lives next to each field: OpenAPI bounds and patterns
//! through `#[schemars(...)]`, cross-field rules as CEL through `#[x_kube(validation = ...)]`. The patterns and
//! bounds come from [`super::validation`], the one definition the CLI checks share.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, json_schema};
use serde::{Deserialize, Serialize};

use super::status::MCPDeploymentStatus;
use super::validation::{self as v, limits};

/// What to run (`source`, `env`, `credentials`), where (`fly`), who may call it (`access`), and how changes roll out.
// The printer columns repeat `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mcpfly.dev",
    version = "v1alpha1",
    kind = "MCPDeployment",
    plural = "mcpdeployments",
    singular = "mcpdeployment",
    shortname = "mcpd",
    category = "mcp",
    namespaced,
    status = "MCPDeploymentStatus",
    derive = "PartialEq",
    doc = "An MCP server run on Fly.io: the controller creates one Fly app per MCPDeployment, runs machines in the requested regions, delivers credentials as Fly app secrets, and serves the server over MCP Streamable HTTP at status.url.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the deployment serves requests at its URL"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the deployment is in its lifecycle"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        description = "The MCP endpoint"
    ),
    printcolumn(
        name = "Machines",
        type_ = "string",
        json_path = ".status.machinesSummary",
        description = "Ready machines / desired machines"
    ),
    printcolumn(
        name = "App",
        type_ = "string",
        json_path = ".status.app",
        description = "The Fly app",
        priority = 1
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.source.resolved",
        description = "The resolved package or image",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.credentials) || !has(self.env) || self.credentials.all(c, !(c.name in self.env))")
        .message("a credential and an env entry share a name; the Fly secret would silently win, so rename or remove one of them")
)]
#[x_kube(
    validation = Rule::new("!has(self.source.image) || !has(self.tools) || ((!has(self.tools.allow) || size(self.tools.allow) == 0) && (!has(self.tools.deny) || size(self.tools.deny) == 0) && (!has(self.tools.overrides) || size(self.tools.overrides) == 0) && (!has(self.tools.policy) || self.tools.policy != 'block'))")
        .message("tools.allow, tools.deny, tools.overrides and tools.policy: block are enforced by mcpfly's bridge, which an image source does not run; with an image use tools.pinned and policy warn only")
)]
#[serde(rename_all = "camelCase")]
pub struct MCPDeploymentSpec {
    /// The MCP server to run: exactly one of `npm`, `pypi` or `image`.
    pub source: Source,

    /// Non-secret environment variables for the server. Names match `^[A-Za-z_][A-Za-z0-9_]*$`, must not start
    /// with `MCPFLY_` or `FLY_` and must not be `MCP_AUTH_TOKEN`; at most 64 entries of at most 4096 characters each. Secrets belong in `credentials`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "env_schema")]
    pub env: BTreeMap<String, String>,

    /// Secrets for the server, delivered as Fly app secrets (never as plain machine env). Each has a unique `name`
    /// (the environment variable the server sees) and exactly one of `sealed` or `secretKeyRef`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::CREDENTIALS_MAX))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub credentials: Vec<Credential>,

    /// Where and how the server runs on Fly.io.
    pub fly: FlySpec,

    /// Who may call the endpoint.
    #[serde(default)]
    pub access: AccessSpec,

    /// How the bridge runs the server (npm and PyPI sources; an image serves HTTP itself and ignores this).
    #[serde(default, skip_serializing_if = "RuntimeSpec::is_default")]
    pub runtime: RuntimeSpec,

    /// Which tools clients see and may call, under which names, and the reviewed set of tools the server is
    /// expected to offer (see the README's "Tool review").
    #[serde(default, skip_serializing_if = "ToolsSpec::is_default")]
    pub tools: ToolsSpec,

    /// How changes reach running machines.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// What happens on Fly when this resource is deleted: `Delete` destroys the Fly app and its machines; `Orphan`
    /// leaves them running.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// When true the controller stops reconciling this resource and touches nothing on Fly (machines keep running
    /// as they are). Set back to false to resume.
    #[serde(default)]
    pub suspend: bool,
}

fn env_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    json_schema!({
        "type": "object",
        "maxProperties": limits::ENV_MAX,
        "additionalProperties": {
            "type": "string",
            "maxLength": limits::ENV_VALUE_MAX,
            "pattern": v::NO_NUL_PATTERN,
        },
        "x-kubernetes-validations": [
            {
                "rule": format!("self.all(k, k.matches('{}'))", v::ENV_NAME_PATTERN),
                "message": "env names must match ^[A-Za-z_][A-Za-z0-9_]*$ (letters, digits and underscores, not starting with a digit)",
            },
            {
                "rule": format!(
                    "self.all(k, {})",
                    v::RESERVED_ENV_PREFIXES.map(|p| format!("!k.startsWith('{p}')")).join(" && ")
                ),
                "message": "env names starting with MCPFLY_ or FLY_ are reserved (the runtime's and Fly's own variables); rename the variable",
            },
            {
                "rule": format!(
                    "self.all(k, !(k in [{}]))",
                    v::RESERVED_ENV_NAMES.map(|n| format!("'{n}'")).join(", ")
                ),
                "message": "MCP_AUTH_TOKEN is reserved for the endpoint token the controller generates; rename the variable",
            },
        ],
    })
}

/// The MCP server to run. Set exactly one of `npm`, `pypi` or `image`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.npm) ? 1 : 0) + (has(self.pypi) ? 1 : 0) + (has(self.image) ? 1 : 0) == 1")
        .message("set exactly one of source.npm, source.pypi or source.image")
)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// A stdio MCP server published on npm, run with `npx -y <package>@<version> <args...>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npm: Option<PackageSource>,
    /// A stdio MCP server published on PyPI, run with `uvx --from <package>==<version> <command> <args...>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pypi: Option<PypiSource>,
    /// A container image that already serves MCP Streamable HTTP itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
}

/// Which of the three sources a [`Source`] holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SourceKind<'a> {
    Npm(&'a PackageSource),
    Pypi(&'a PypiSource),
    Image(&'a ImageSource),
}

impl Source {
    /// The one source that is set, or `None` when admission was bypassed and zero or several are set.
    pub fn kind(&self) -> Option<SourceKind<'_>> {
        match (&self.npm, &self.pypi, &self.image) {
            (Some(n), None, None) => Some(SourceKind::Npm(n)),
            (None, Some(p), None) => Some(SourceKind::Pypi(p)),
            (None, None, Some(i)) => Some(SourceKind::Image(i)),
            _ => None,
        }
    }
}

/// An npm package. Arguments are passed to the server as an argv vector, never through a shell.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PackageSource {
    /// The npm package name, e.g. `@modelcontextprotocol/server-everything` (npm's naming rules: lowercase,
    /// optional `@scope/`, at most 214 characters).
    #[schemars(length(min = 1, max = limits::NPM_PACKAGE_MAX), pattern(v::NPM_PACKAGE_PATTERN))]
    pub package: String,
    /// A version, dist-tag or npm range (`2025.4.8`, `latest`, `^1.2`, `~1.2.3`, `>=1 <2`, `1.x`). The controller
    /// resolves it once to an exact version, records it in status.source, and keeps running that version until this
    /// field changes or a reconcile is forced. Unset means the `latest` dist-tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::VERSION_MAX), pattern(v::NPM_VERSION_PATTERN))]
    pub version: Option<String>,
    /// Arguments for the server (at most 64, each at most 1024 characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::ARGS_MAX),
        inner(length(max = limits::ARG_MAX), pattern(v::NO_NUL_PATTERN))
    )]
    pub args: Vec<String>,
}

/// A PyPI package. Arguments are passed to the server as an argv vector, never through a shell.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PypiSource {
    /// The PyPI project name, e.g. `mcp-server-fetch` (PEP 508: letters, digits, `.`, `_`, `-`, starting and
    /// ending with a letter or digit).
    #[schemars(length(min = 1, max = limits::PYPI_PACKAGE_MAX), pattern(v::PYPI_PACKAGE_PATTERN))]
    pub package: String,
    /// An exact PEP 440 version (`2025.4.7`). The controller records the resolved version in status.source. Unset
    /// means the latest release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::VERSION_MAX), pattern(v::PYPI_VERSION_PATTERN))]
    pub version: Option<String>,
    /// The console script to run from the package, when it differs from the package name (the `[project.scripts]`
    /// name, e.g. `mcp-server-git`). Unset means the package name. The server runs as
    /// `uvx --from <package>==<version> <command> <args...>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::PYPI_PACKAGE_MAX), pattern(v::CONSOLE_SCRIPT_PATTERN))]
    pub command: Option<String>,
    /// Arguments for the server (at most 64, each at most 1024 characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::ARGS_MAX),
        inner(length(max = limits::ARG_MAX), pattern(v::NO_NUL_PATTERN))
    )]
    pub args: Vec<String>,
}

/// A container image that serves MCP Streamable HTTP on `port` at `path`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// The image reference, `[registry/]repository[:tag][@sha256:digest]`. Pin a digest for reproducible rollouts.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1, max = limits::IMAGE_REF_MAX), pattern(v::IMAGE_REF_PATTERN))]
    pub reference: String,
    /// The port the image listens on.
    #[serde(default = "default_image_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The HTTP path of the MCP endpoint inside the image.
    #[serde(default = "default_image_path")]
    #[schemars(length(min = 1, max = limits::HTTP_PATH_MAX), pattern(v::HTTP_PATH_PATTERN))]
    pub path: String,
}

fn default_image_port() -> i32 {
    8080
}

fn default_image_path() -> String {
    "/mcp".into()
}

/// A secret delivered to the server as a Fly app secret under `name`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.sealed) != has(self.secretKeyRef)")
        .message("set exactly one of sealed or secretKeyRef on each credential")
)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    /// The environment variable name the server sees (`^[A-Za-z_][A-Za-z0-9_]*$`, unique, not starting with
    /// `MCPFLY_` or `FLY_`, not `MCP_AUTH_TOKEN`).
    #[schemars(length(min = 1, max = limits::NAME_MAX), pattern(v::ENV_NAME_PATTERN))]
    // The rules spell out `validation::RESERVED_ENV_PREFIXES` and `RESERVED_ENV_NAMES` (attributes take no
    // expressions); a unit test holds them to those constants.
    #[x_kube(
        validation = Rule::new("!self.startsWith('MCPFLY_') && !self.startsWith('FLY_')")
            .message("credential names starting with MCPFLY_ or FLY_ are reserved (the runtime's and Fly's own variables); rename the credential")
    )]
    #[x_kube(
        validation = Rule::new("self != 'MCP_AUTH_TOKEN'")
            .message("MCP_AUTH_TOKEN is reserved for the endpoint token the controller generates, which would replace this credential silently; rename the credential")
    )]
    pub name: String,
    /// A Fernet token made by `mcpfly seal` for this namespace and resource. Only the controller can unseal it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::SEALED_MAX), pattern(v::SEALED_PATTERN))]
    pub sealed: Option<String>,
    /// A key of a Kubernetes Secret in this namespace (for External Secrets and similar tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the MCPDeployment's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = limits::K8S_NAME_MAX), pattern(v::K8S_NAME_PATTERN))]
    pub name: String,
    /// The key inside the Secret's data.
    #[schemars(length(min = 1, max = limits::K8S_NAME_MAX), pattern(v::SECRET_KEY_PATTERN))]
    pub key: String,
}

/// Where and how the server runs on Fly.io.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.minMachinesRunning <= self.machinesPerRegion")
        .message("minMachinesRunning must not exceed machinesPerRegion")
)]
#[x_kube(
    validation = Rule::new("!has(self.guest) || self.guest.memoryMb <= 2048 || (has(self.autoStop) && self.autoStop != 'suspend')")
        .message("autoStop: suspend (the default) needs guest.memoryMb of at most 2048: Fly suspends only machines of up to 2 GB and stops larger ones instead; set autoStop to stop (or \"off\") or lower memoryMb")
)]
#[x_kube(
    validation = Rule::new("(has(self.app) ? self.app : '') == (has(oldSelf.app) ? oldSelf.app : '')")
        .message("fly.app cannot change: the deployment is bound to its Fly app; create a new MCPDeployment instead")
)]
#[x_kube(
    validation = Rule::new("(has(self.org) ? self.org : '') == (has(oldSelf.org) ? oldSelf.org : '')")
        .message("fly.org cannot change: the Fly app lives in its org; create a new MCPDeployment instead")
)]
#[x_kube(
    validation = Rule::new("(has(self.network) ? self.network : '') == (has(oldSelf.network) ? oldSelf.network : '')")
        .message("fly.network cannot change: a Fly app's network is fixed at creation; create a new MCPDeployment instead")
)]
#[serde(rename_all = "camelCase")]
pub struct FlySpec {
    /// The Fly organization slug. Unset: the controller's default org. Cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::FLY_NAME_MAX), pattern(v::FLY_NAME_PATTERN))]
    pub org: Option<String>,
    /// The Fly app name (lowercase letters, digits and dashes, at most 63 characters). Unset or empty: derived from
    /// the namespace and name, deterministic. Cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::FLY_NAME_MAX), pattern(v::FLY_NAME_PATTERN))]
    pub app: Option<String>,
    /// A Fly private network to share with other apps. Unset or empty: a network of the app's own, so no other
    /// deployment can reach its machines. Cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::FLY_NAME_MAX), pattern(v::FLY_NAME_PATTERN))]
    pub network: Option<String>,
    /// Fly region codes to run in (three lowercase letters such as `iad`, `ams`), unique, 1 to 20.
    #[schemars(
        length(min = 1, max = limits::REGIONS_MAX),
        inner(length(equal = 3), pattern(v::REGION_PATTERN))
    )]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub regions: Vec<String>,
    /// Machines in each region (0 to 10). 0 keeps the app but runs no machines.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = limits::MACHINES_PER_REGION_MAX))]
    pub machines_per_region: i32,
    /// The machine size. Fly accepts shared CPUs in {1,2,4,6,8} with 256-2048 MB per CPU in 256 MB steps, and
    /// performance CPUs in {1,2,4,8,16} with 2048-8192 MB per CPU in 1024 MB steps.
    #[serde(default)]
    pub guest: GuestSpec,
    /// What Fly does with idle machines: `off` keeps them running, `stop` stops them, `suspend` snapshots them
    /// for a fast resume. Fly starts them again on the next request. Fly suspends only machines with at most
    /// 2048 MB of memory, so `suspend` (the default) requires guest.memoryMb ≤ 2048. Quote `"off"` in YAML, where
    /// a plain off is the boolean false.
    #[serde(default)]
    pub auto_stop: AutoStop,
    /// Machines Fly keeps running even when idle, at most machinesPerRegion. Fly applies this in the app's
    /// primary region only (the first of regions, which the controller sets as PRIMARY_REGION in every machine's
    /// env); machines in the other regions may all be stopped when idle.
    #[serde(default)]
    #[schemars(range(min = 0, max = limits::MACHINES_PER_REGION_MAX))]
    pub min_machines_running: i32,
}

fn default_one() -> i32 {
    1
}

/// A Fly machine size.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[schemars(transform = guest_rules)]
#[serde(rename_all = "camelCase")]
pub struct GuestSpec {
    /// `shared` or `performance`.
    #[serde(default)]
    pub cpu_kind: CpuKind,
    /// CPU count: shared {1,2,4,6,8}, performance {1,2,4,8,16}.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 16))]
    pub cpus: i32,
    /// Memory in MB: shared 256-2048 per CPU in 256 MB steps, performance 2048-8192 per CPU in 1024 MB steps.
    #[serde(default = "default_memory_mb")]
    #[schemars(range(min = 256, max = 131072))]
    pub memory_mb: i32,
}

/// CEL rules for the guest sizes Fly accepts, generated from the same table as [`v::guest_error`]. One memory rule
/// per CPU count, so each message can state the exact range: the apiserver refuses a `messageExpression` that
/// computes it (its estimated cost is over budget).
fn guest_rules(schema: &mut schemars::Schema) {
    let mut rules = Vec::new();
    for kind in [CpuKind::Shared, CpuKind::Performance] {
        let k = kind.as_str();
        let cpus = v::allowed_cpus(kind);
        let list = cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        rules.push(serde_json::json!({
            "rule": format!("self.cpuKind != '{k}' || self.cpus in [{}]", list.join(", ")),
            "message": format!("{k} guests take cpus {} or {}", list[..list.len() - 1].join(", "), list[list.len() - 1]),
        }));
        for &c in cpus {
            let (min, max, step) = v::memory_bounds(kind, c);
            rules.push(serde_json::json!({
                "rule": format!(
                    "self.cpuKind != '{k}' || self.cpus != {c} || (self.memoryMb >= {min} && self.memoryMb <= {max} && self.memoryMb % {step} == 0)"
                ),
                "message": format!(
                    "{k} guests with {c} CPU(s) take memoryMb as a multiple of {step} between {min} and {max}"
                ),
            }));
        }
    }
    schema.insert("x-kubernetes-validations".into(), rules.into());
}

fn default_memory_mb() -> i32 {
    256
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            cpu_kind: CpuKind::Shared,
            cpus: 1,
            memory_mb: default_memory_mb(),
        }
    }
}

/// Fly CPU kinds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuKind {
    #[default]
    Shared,
    Performance,
}

impl CpuKind {
    /// The name Fly and the manifest use.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuKind::Shared => "shared",
            CpuKind::Performance => "performance",
        }
    }
}

/// What Fly does with idle machines (the service's `autostop`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoStop {
    Off,
    Stop,
    #[default]
    Suspend,
}

impl AutoStop {
    /// The name Fly and the manifest use.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoStop::Off => "off",
            AutoStop::Stop => "stop",
            AutoStop::Suspend => "suspend",
        }
    }
}

/// Who may call the endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(self.auth == 'oauth') == has(self.oauth)")
        .message("access.oauth is required with auth: oauth and allowed only with it; set both or neither")
)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// `bearer`: callers must send the generated token (`Authorization: Bearer ...`), found in the connection
    /// Secret. `oauth`: callers present OAuth 2.1 access tokens from the authorization server in `oauth` (for
    /// Claude.ai, ChatGPT and other clients that accept only OAuth); the endpoint then also serves OAuth discovery,
    /// which some bearer-header clients (Cursor) obey instead of their configured header. `none`: the endpoint is
    /// open to anyone who knows the URL.
    #[serde(default)]
    pub auth: Auth,
    /// The authorization server and what its tokens must carry, with `auth: oauth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthSpec>,
    /// The Secret the controller writes in this namespace with `url` and `token` for MCP clients. Unset:
    /// `<metadata.name>-mcp-connection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::K8S_NAME_MAX), pattern(v::K8S_NAME_PATTERN))]
    pub connection_secret: Option<String>,
    /// Request rate limits at the bridge (npm and PyPI sources). Unset fields keep the bridge's defaults: 6000
    /// requests per minute with bursts of 1000 per identity, 600 per minute with bursts of 100 per address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// An external OAuth 2.1 authorization server (Entra ID, Okta, Auth0, Keycloak, Ory...) whose JWT access tokens
/// the endpoint accepts, per the MCP authorization spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("has(self.issuer) != has(self.authorizationServers)")
        .message("set exactly one of oauth.issuer or oauth.authorizationServers")
)]
#[serde(rename_all = "camelCase")]
pub struct OAuthSpec {
    /// The authorization server's issuer URL (`https://login.example.com/realms/mcp`): tokens must carry it as
    /// `iss`, and its keys are found through its RFC 8414 or OpenID discovery document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::URL_MAX), pattern(v::ISSUER_URL_PATTERN))]
    pub issuer: Option<String>,
    /// Several accepted issuers instead of `issuer` (advertised in this order; clients use the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = limits::AUTHORIZATION_SERVERS_MAX),
        inner(length(min = 1, max = limits::URL_MAX), pattern(v::ISSUER_URL_PATTERN))
    )]
    pub authorization_servers: Option<Vec<String>>,
    /// The `aud` a token must carry. Default: the endpoint's canonical URL (`https://APP.fly.dev/mcp`), which
    /// MCP clients request as the RFC 8707 `resource`. Set it for servers that put their own identifier in `aud`
    /// (Entra: `api://CLIENT-ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::URL_MAX), pattern(v::AUDIENCE_PATTERN))]
    pub audience: Option<String>,
    /// Scopes every request needs (`scope` or `scp` claim); clients are told to ask for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::SCOPES_MAX),
        inner(length(min = 1, max = limits::SCOPE_MAX), pattern(v::SCOPE_PATTERN))
    )]
    pub required_scopes: Vec<String>,
    /// Scopes a tool needs besides the required ones: tool name to scope. A call without it gets
    /// `403 insufficient_scope`, which tells the client to ask for it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "tool_scopes_schema")]
    pub tool_scopes: BTreeMap<String, String>,
}

impl AccessSpec {
    /// With `auth: oauth`, the accepted issuers in the order they are advertised; `None` in other modes.
    pub fn oauth_issuers(&self) -> Option<Vec<String>> {
        let oauth = self.oauth.as_ref().filter(|_| self.auth == Auth::OAuth)?;
        Some(
            oauth
                .issuer
                .iter()
                .chain(oauth.authorization_servers.iter().flatten())
                .cloned()
                .collect(),
        )
    }
}

fn tool_scopes_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    json_schema!({
        "type": "object",
        "maxProperties": limits::SCOPES_MAX,
        "additionalProperties": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits::SCOPE_MAX,
            "pattern": v::SCOPE_PATTERN,
        },
        "x-kubernetes-validations": [{
            "rule": format!(
                "self.all(k, size(k) <= {} && k.matches('{}'))",
                limits::NAME_MAX,
                v::TOOL_NAME_PATTERN
            ),
            "message": "toolScopes keys are tool names: letters, digits, _, -, . and / (at most 128)",
        }],
    })
}

/// Rate limits. Authenticated requests are counted per identity (the bearer token), so clients sharing one
/// address (a company NAT, a hosted client's egress) do not share a budget; unauthenticated requests (`auth: none`,
/// or a missing or wrong token) are counted per client address.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Requests per minute per identity; 0 turns the limit off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = limits::RATE_PER_MINUTE_MAX))]
    pub requests_per_minute: Option<u32>,
    /// Requests an identity may send at once above the rate (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = limits::RATE_BURST_MAX))]
    pub burst: Option<u32>,
    /// Requests per minute per client address for unauthenticated requests; 0 turns the limit off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = limits::RATE_PER_MINUTE_MAX))]
    pub per_address_requests_per_minute: Option<u32>,
    /// Unauthenticated requests one address may send at once above the rate (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = limits::RATE_BURST_MAX))]
    pub per_address_burst: Option<u32>,
}

/// How the bridge maps clients onto server processes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// `PerSession` (default): every MCP session gets a server process of its own, so nothing a server keeps in
    /// memory (log level, subscriptions, whatever a tool remembers) is shared between clients, and the server can
    /// ask its client for sampling, elicitation or roots. Costs a process per session. `Shared`: one process
    /// serves every session, for servers known to keep no per-client state: less memory and no per-session start,
    /// but the server cannot reach a client (its requests are refused, its notifications dropped) and a crash ends
    /// every session at once.
    #[serde(default)]
    pub session_isolation: SessionIsolation,
}

impl RuntimeSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// See [`RuntimeSpec::session_isolation`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionIsolation {
    #[default]
    PerSession,
    Shared,
}

/// How callers authenticate to the endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    #[default]
    Bearer,
    None,
    #[serde(rename = "oauth")]
    OAuth,
}

/// Tool governance: a filter and renames applied by the bridge, and the reviewed tool set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolsSpec {
    /// Globs (`*` any run of characters, `?` one character) over the server's own tool names: when set, only
    /// matching tools are listed and callable. Unset: every tool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::TOOL_GLOBS_MAX), inner(length(min = 1, max = limits::TOOL_NAME_MAX), pattern(v::TOOL_GLOB_PATTERN)))]
    pub allow: Vec<String>,
    /// Globs over the server's own tool names that are never listed nor callable; wins over `allow`. A hidden
    /// tool looks exactly like one the server does not have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::TOOL_GLOBS_MAX), inner(length(min = 1, max = limits::TOOL_NAME_MAX), pattern(v::TOOL_GLOB_PATTERN)))]
    pub deny: Vec<String>,
    /// Per server tool name: the name and/or description clients see instead. Clients call the new name; the
    /// old one is then absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = limits::TOOL_OVERRIDES_MAX))]
    #[x_kube(
        validation = Rule::new("self.all(k, size(k) <= 128 && k.matches('^[A-Za-z0-9_.-]+$'))")
            .message("tools.overrides keys are the server's tool names: 1 to 128 of A-Z a-z 0-9 _ - .")
    )]
    pub overrides: BTreeMap<String, ToolOverride>,
    /// The approved tool set: the `status.tools.digest` a person reviewed (`sha256:<64 hex>`). The annotation
    /// `mcpfly.dev/approve-tools` approves the same way. A server offering another set gets `ToolsChanged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71), pattern(v::TOOLS_DIGEST_PATTERN))]
    pub pinned: Option<String>,
    /// What a changed or new tool means: `warn` keeps serving it (condition, Event, metric); `block` has the
    /// bridge refuse calls to it until the set is approved. Unset: the controller's `--tools-policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ToolsPolicy>,
}

impl ToolsSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What clients see of one server tool instead of what the server says.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("has(self.name) || has(self.description)")
        .message("a tools.overrides entry must set name, description or both")
)]
#[serde(rename_all = "camelCase")]
pub struct ToolOverride {
    /// The name clients see and call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::TOOL_NAME_MAX), pattern(v::TOOL_NAME_PATTERN))]
    pub name: Option<String>,
    /// The description clients (and their models) see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::TOOL_DESCRIPTION_MAX))]
    pub description: Option<String>,
}

/// See [`ToolsSpec::policy`].
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Default,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ToolsPolicy {
    #[default]
    Warn,
    Block,
}

/// How changes reach running machines.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `rolling`: update machines a few at a time, each started and passing checks before the next. `immediate`:
    /// update all machines at once.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// How many machines a rolling update may take down at once (at least 1).
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = limits::MAX_UNAVAILABLE_MAX))]
    pub max_unavailable: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::Rolling,
            max_unavailable: 1,
        }
    }
}

/// Rollout strategies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStrategy {
    #[default]
    Rolling,
    Immediate,
}

/// What happens on Fly when the resource is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Orphan,
}

impl MCPDeployment {
    /// The Secret holding the endpoint's `url` and `token`: `spec.access.connectionSecret`, or
    /// `<name>-mcp-connection`.
    pub fn connection_secret_name(&self) -> String {
        match &self.spec.access.connection_secret {
            Some(name) => name.clone(),
            None => format!(
                "{}-mcp-connection",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}
