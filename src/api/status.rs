//! `MCPDeployment.status`: what the controller observed.
//!
//! Nothing here changes on every reconcile (no "last checked" timestamps): a status write re-triggers the watch, so
//! an idle deployment must produce identical status. Conditions follow kstatus (`Ready`, `Reconciling`, `Stalled`)
//! so `kubectl wait --for=condition=Ready`, Flux and Argo CD health checks understand them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the controller observed, on Fly and from the server itself.
// The apiserver fills in `observedGeneration: -1` until the controller writes one (as Flux's own CRDs do): kstatus
// and Argo CD then read a resource the controller has not picked up yet as in progress, not as healthy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("default" = {"observedGeneration": -1}))]
pub struct MCPDeploymentStatus {
    /// The metadata.generation this status describes (-1 until the controller has seen the resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = -1))]
    pub observed_generation: Option<i64>,
    /// Where the deployment is in its lifecycle: Pending, Deploying, Ready, Degraded, Failed, Deleting or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The MCP endpoint (Streamable HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The Fly app this deployment owns. Recorded before the app is created, so a crash never leaks an app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The id of that app: the one Fly returned to this controller's create (recorded with the create), or
    /// the app's id when ownership was first proven otherwise (owner metadata on its machines, the
    /// `mcpfly.dev/adopt-app` annotation). An app with another id is not this deployment's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// The exact package version or image the machines run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ResolvedSource>,
    /// The spec source `source` was resolved from (`npm:<package>@<version or range or tag>`, `pypi:<package>==<version>`,
    /// `image:<ref>`). While the spec asks for the same thing the controller reuses `source` without asking the
    /// registry again, so restarts and new upstream releases never change what runs; a force-reconcile resolves anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_requested: Option<String>,
    /// Digests of the delivered credentials (never their values) and the key that unsealed each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialStatus>,
    /// The Fly app secrets version the machines were last updated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_version: Option<i64>,
    /// The machines of the app as last observed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<MachineStatus>,
    /// Machines started and passing checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_machines: Option<i32>,
    /// Machines the spec asks for (regions x machinesPerRegion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_machines: Option<i32>,
    /// `ready/desired`, for the Machines printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines_summary: Option<String>,
    /// What the server said about itself in an MCP handshake through the public URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerInfo>,
    /// The tools the server offers through the endpoint (after `spec.tools` filters and renames), by digest, and
    /// the set last approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolsStatus>,
    /// The last value of the `mcpfly.dev/reconcile-requested-at` annotation the controller acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The last value of the `mcpfly.dev/rotate-token` annotation the controller acted on: setting the
    /// annotation to a new value replaces the endpoint token (connection Secret, Fly secret, machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_rotation: Option<String>,
    /// kstatus conditions: Ready, Reconciling, Stalled, SourceResolved, CredentialsReady, Verified, ToolsChanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl MCPDeploymentStatus {
    /// Set the machine counts and the `ready/desired` summary together, so they never disagree.
    pub fn set_machine_counts(&mut self, ready: i32, desired: i32) {
        self.ready_machines = Some(ready);
        self.desired_machines = Some(desired);
        self.machines_summary = Some(format!("{ready}/{desired}"));
    }

    /// The condition of this type, if present.
    pub fn condition(&self, type_: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_.as_str())
    }

    /// Insert or replace a condition. `lastTransitionTime` is kept when the status did not change, so re-asserting
    /// the same condition writes nothing new.
    pub fn set_condition(&mut self, mut condition: Condition) {
        match self
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition.type_)
        {
            Some(existing) => {
                if existing.status == condition.status {
                    condition.last_transition_time = existing.last_transition_time.clone();
                }
                *existing = condition;
            }
            None => self.conditions.push(condition),
        }
    }
}

/// Lifecycle phases, a summary of the conditions for humans.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    #[default]
    Pending,
    Deploying,
    Ready,
    Degraded,
    Failed,
    Deleting,
    Suspended,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Deploying => "Deploying",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
            Phase::Suspended => "Suspended",
        }
    }
}

/// The exact source the machines run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSource {
    /// `package@version` (npm), `package==version` (PyPI) or the image reference with its digest.
    pub resolved: String,
    /// The registry's integrity hash (npm `sha512-...`, PyPI `sha256:...`) or the image digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// A delivered credential, by digest.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The credential's name.
    pub name: String,
    /// `sha256:<hex>` over name and value, to detect change without reading values back.
    pub digest: String,
    /// The key that unsealed it (`<key name>:<key id>`), or `secret:<name>/<key>` for a Secret reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One Fly machine as last observed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// The Fly machine id.
    pub id: String,
    /// The region it runs in.
    pub region: String,
    /// Fly's machine state (started, stopped, suspended, ...).
    pub state: String,
    /// The machine's config version (Fly's instance id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Health checks summary: passing, warning or critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<String>,
}

/// What the server reported in its MCP handshake.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// serverInfo.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// serverInfo.version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The negotiated MCP protocol revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// Names of the tools the server offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

/// The tool set seen at the last verification, and the one approved.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolsStatus {
    /// The set the server offers now: what to review, and to approve (`spec.tools.pinned` or the
    /// `mcpfly.dev/approve-tools` annotation).
    #[serde(flatten)]
    pub observed: ToolSet,
    /// The set last approved: recorded when an approval matched what the server offered. With `policy: block`
    /// the bridge serves only tools whose digest is in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<ToolSet>,
}

/// A set of tools by digest.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolSet {
    /// `sha256:<hex>` over every tool's name and digest.
    pub digest: String,
    /// Per tool, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolDigest>,
}

/// One tool by digest: of the whole definition, and of the parts a change report names.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolDigest {
    /// The name clients see.
    pub name: String,
    /// `sha256:<hex>` of the canonical JSON of name, title, description, inputSchema, outputSchema and annotations.
    pub digest: String,
    /// Short digest of title and description.
    pub description: String,
    /// Short digest of inputSchema and outputSchema.
    pub schema: String,
}

/// A kstatus-style condition.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// `type_` and `reason` are strings rather than enums so conditions other tools add never break parsing; the
// controller writes them through `ConditionType` and `reason`.
pub struct Condition {
    /// The condition type: Ready, Reconciling, Stalled, SourceResolved, CredentialsReady or Verified.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A machine-readable CamelCase reason, e.g. AppNameTaken or CredentialScopeMismatch.
    pub reason: String,
    /// What happened and what to do about it.
    #[serde(default)]
    pub message: String,
    /// The metadata.generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl Condition {
    /// A condition whose `lastTransitionTime` is now; [`MCPDeploymentStatus::set_condition`] keeps the old time
    /// when the status did not change.
    pub fn new(
        type_: ConditionType,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
    ) -> Self {
        Self {
            type_: type_.as_str().to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
            observed_generation,
            last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Condition statuses.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// The condition types the controller sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The endpoint serves requests with the current spec.
    Ready,
    /// The controller is making progress towards the spec (kstatus).
    Reconciling,
    /// The controller cannot make progress without a change from the user (kstatus).
    Stalled,
    /// The package version or image was resolved.
    SourceResolved,
    /// Every credential was unsealed or read and delivered.
    CredentialsReady,
    /// An MCP handshake through the public URL succeeded.
    Verified,
    /// The server offers tools that differ from the approved set (`spec.tools.pinned`, the
    /// `mcpfly.dev/approve-tools` annotation). Present only while tool review is in use.
    ToolsChanged,
}

impl ConditionType {
    pub const ALL: [ConditionType; 7] = [
        ConditionType::Ready,
        ConditionType::Reconciling,
        ConditionType::Stalled,
        ConditionType::SourceResolved,
        ConditionType::CredentialsReady,
        ConditionType::Verified,
        ConditionType::ToolsChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
            ConditionType::SourceResolved => "SourceResolved",
            ConditionType::CredentialsReady => "CredentialsReady",
            ConditionType::Verified => "Verified",
            ConditionType::ToolsChanged => "ToolsChanged",
        }
    }
}

/// Every condition reason the controller sets, in one place (the README's troubleshooting table follows it).
/// Stalled reasons name what the user must fix; the others describe progress.
pub mod reason {
    // Ready / Reconciling.
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    /// A Fly call failed in a way that retrying can fix (5xx, 429, lease held by someone else).
    pub const FLY_CALL_FAILED: &str = "FlyCallFailed";
    // SourceResolved / CredentialsReady / Verified, when fine or in progress.
    pub const RESOLVED: &str = "Resolved";
    pub const UNSEALED: &str = "Unsealed";
    pub const VERIFICATION_PENDING: &str = "Pending";
    pub const HANDSHAKE_SUCCEEDED: &str = "HandshakeSucceeded";
    // ToolsChanged.
    pub const TOOLS_APPROVED: &str = "ToolsApproved";
    pub const TOOLS_CHANGED: &str = "ToolsChanged";
    pub const TOOLS_NOT_APPROVED: &str = "ToolsNotApproved";
    /// `auth: oauth`: the endpoint refuses a call without a token with 401 and serves discovery naming the
    /// configured authorization servers (no token to handshake with).
    pub const OAUTH_DISCOVERY_SERVED: &str = "OAuthDiscoveryServed";
    /// The machines run but the endpoint does not answer MCP (phase Degraded; `Reconciling`, retried).
    pub const HANDSHAKE_FAILED: &str = "HandshakeFailed";
    /// `spec.suspend` is true: nothing is changed on Fly (`Ready=False`, neither `Reconciling` nor `Stalled`).
    pub const SUSPENDED: &str = "Suspended";

    // Stalled on Fly.
    pub const APP_NAME_TAKEN: &str = "AppNameTaken";
    pub const APP_NOT_OWNED: &str = "AppNotOwned";
    /// Fly refused the request as invalid (422/400): the spec asks for something Fly will not do.
    pub const FLY_REJECTED: &str = "FlyRejected";

    // Stalled by the controller's policy, before any Fly call.
    /// `spec.fly.org` is not the controller's org nor in `--allowed-orgs`.
    pub const ORG_NOT_ALLOWED: &str = "OrgNotAllowed";
    /// `spec.fly.network` names a shared network not in `--allowed-networks`.
    pub const NETWORK_NOT_ALLOWED: &str = "NetworkNotAllowed";
    /// `spec.fly.app` does not start with one of `--allowed-app-prefixes`.
    pub const APP_NAME_NOT_ALLOWED: &str = "AppNameNotAllowed";
    /// `access.auth: none` with credentials, without the acknowledgement annotation.
    pub const OPEN_ENDPOINT_NOT_ACKNOWLEDGED: &str = "OpenEndpointNotAcknowledged";

    // Stalled in Kubernetes.
    /// The connection Secret exists and is not controlled by this resource.
    pub const CONNECTION_SECRET_NOT_OWNED: &str = "ConnectionSecretNotOwned";

    // Verified=False.
    /// With `access.auth: bearer`, the endpoint answered a request without the token.
    pub const ENDPOINT_UNAUTHENTICATED: &str = "EndpointUnauthenticated";

    // Stalled on the source (supply-chain checks and policy).
    pub const PACKAGE_NOT_FOUND: &str = "PackageNotFound";
    pub const VERSION_NOT_FOUND: &str = "VersionNotFound";
    pub const VERSION_NOT_PINNED: &str = "VersionNotPinned";
    pub const SECURITY_PLACEHOLDER: &str = "SecurityPlaceholder";
    /// A warning on SourceResolved, or Stalled when the policy blocks deprecated versions.
    pub const PACKAGE_DEPRECATED: &str = "PackageDeprecated";
    pub const RELEASE_YANKED: &str = "ReleaseYanked";
    pub const PROJECT_QUARANTINED: &str = "ProjectQuarantined";
    pub const PROJECT_ARCHIVED: &str = "ProjectArchived";
    pub const INVALID_PACKAGE_NAME: &str = "InvalidPackageName";
    pub const INVALID_VERSION: &str = "InvalidVersion";
    pub const PACKAGE_DENIED: &str = "PackageDenied";
    pub const PACKAGE_NOT_ALLOWED: &str = "PackageNotAllowed";
    pub const VERSION_REQUIRED: &str = "VersionRequired";
    pub const INVALID_SOURCE: &str = "InvalidSource";
    /// Transient: the registry timed out, answered 5xx/429, refused our credentials or sent something unreadable.
    pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";

    // Stalled on credentials.
    pub const KEY_RING_MISSING: &str = "KeyRingMissing";
    pub const CREDENTIAL_SCOPE_MISMATCH: &str = "CredentialScopeMismatch";
    pub const CREDENTIAL_INVALID_TOKEN: &str = "CredentialInvalidToken";
    pub const CREDENTIAL_UNKNOWN_KEY: &str = "CredentialUnknownKey";
    pub const CREDENTIAL_UNSUPPORTED_VERSION: &str = "CredentialUnsupportedVersion";
    pub const CREDENTIAL_INVALID_NAME: &str = "CredentialInvalidName";
    pub const CREDENTIAL_SECRET_NOT_FOUND: &str = "CredentialSecretNotFound";
    /// A `secretKeyRef` names a Secret without the `mcpfly.dev/allow-reference: "true"` label.
    pub const CREDENTIAL_SECRET_NOT_OPTED_IN: &str = "CredentialSecretNotOptedIn";
    pub const CREDENTIAL_SECRET_KEY_NOT_FOUND: &str = "CredentialSecretKeyNotFound";
    pub const CREDENTIAL_SECRET_NOT_UTF8: &str = "CredentialSecretNotUtf8";
    pub const CREDENTIAL_SECRET_READ_FAILED: &str = "CredentialSecretReadFailed";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut status = MCPDeploymentStatus::default();
        let mut first = Condition::new(
            ConditionType::Ready,
            ConditionStatus::False,
            reason::PROGRESSING,
            "creating machines",
            Some(1),
        );
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        first.last_transition_time = Some(t0.clone());
        status.set_condition(first);

        status.set_condition(Condition::new(
            ConditionType::Ready,
            ConditionStatus::False,
            reason::PROGRESSING,
            "1/2 machines started",
            Some(1),
        ));
        let ready = status.condition(ConditionType::Ready).unwrap();
        assert_eq!(ready.last_transition_time, Some(t0.clone()));
        assert_eq!(ready.reason, reason::PROGRESSING);

        status.set_condition(Condition::new(
            ConditionType::Ready,
            ConditionStatus::True,
            reason::READY,
            "",
            Some(1),
        ));
        let ready = status.condition(ConditionType::Ready).unwrap();
        assert_ne!(ready.last_transition_time, Some(t0));
        assert!(ready.is_true());
        assert_eq!(status.conditions.len(), 1);
    }

    #[test]
    fn machine_summary_follows_counts() {
        let mut status = MCPDeploymentStatus::default();
        status.set_machine_counts(1, 2);
        assert_eq!(status.machines_summary.as_deref(), Some("1/2"));
        assert_eq!(status.ready_machines, Some(1));
        assert_eq!(status.desired_machines, Some(2));
    }
}
