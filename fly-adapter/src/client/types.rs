//! Wire types of the Fly Machines API.
//!
//! Response types are lenient on purpose (reference §9.10): unknown fields are ignored, `null` where a
//! map or list is expected becomes empty, `autostop` is bool-or-string, durations are string-or-integer.
//! Request types skip empty optional fields so the server fills its own defaults.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroizing;

/// `null` (or a missing field) → `Default`.
pub fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A number that Fly sometimes sends as a string, or a string sometimes sent as a number.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    })
}

// ---------------------------------------------------------------- apps

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Organization {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub slug: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct App {
    #[serde(default, deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// `pending`, `deployed` or `suspended`.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    #[serde(default)]
    pub organization: Option<Organization>,
    #[serde(default, deserialize_with = "null_default")]
    pub network: String,
    #[serde(default)]
    pub machine_count: Option<u64>,
    #[serde(default)]
    pub volume_count: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateAppRequest {
    #[serde(rename = "name")]
    pub name: String,
    pub org_slug: String,
    /// A private network of its own isolates this app's machines from others (DESIGN §3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_subdomains: Option<bool>,
}

/// Create app answers 201 with little more than an id; GET the app for the rest (reference §2).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreatedApp {
    #[serde(default, deserialize_with = "string_or_number")]
    pub id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListAppsResponse {
    #[serde(default)]
    pub total_apps: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub apps: Vec<App>,
}

// ---------------------------------------------------------------- machine config

/// `autostop`: Fly accepts `false|true|"off"|"stop"|"suspend"` and answers off/stop as booleans.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Autostop {
    Bool(bool),
    Mode(String),
}

/// A duration as Fly accepts it: a Go duration string (`"15s"`) or integer nanoseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FlyDuration {
    Text(String),
    Nanos(i64),
}

impl FlyDuration {
    /// Nanoseconds, if the value parses (Go duration syntax subset: h, m, s, ms, us, ns).
    pub fn as_nanos(&self) -> Option<i64> {
        match self {
            FlyDuration::Nanos(n) => Some(*n),
            FlyDuration::Text(s) => parse_go_duration(s),
        }
    }
}

/// Parse a Go duration such as `"1m30s"`, `"500ms"`, `"15s"`.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "h" => 3.6e12,
            "m" => 6e10,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" => 1e3,
            "ns" => 1.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Some(total as i64)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestConfig {
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_default"
    )]
    pub cpu_kind: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mb: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InitConfig {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub exec: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub entrypoint: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_size_mb: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestartPolicy {
    /// `no`, `always` or `on-failure` (Fly's default).
    #[serde(default, deserialize_with = "null_default")]
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpHeader {
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub values: Vec<String>,
}

/// A health check, top-level (`config.checks`) or per service (`services[].checks`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckConfig {
    /// `http` or `tcp`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<FlyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<FlyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<FlyDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PortConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub handlers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_https: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Concurrency {
    /// `connections` or `requests`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceConfig {
    #[serde(default, deserialize_with = "null_default")]
    pub protocol: String,
    #[serde(default)]
    pub internal_port: u16,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub ports: Vec<PortConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostop: Option<Autostop>,
    /// Boolean only: Fly rejects strings here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub checks: Vec<CheckConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileConfig {
    pub guest_path: String,
    /// Base64 content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StopConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<FlyDuration>,
}

/// A machine's configuration. Fields this project does not model are kept as raw JSON where Fly
/// documents them (`mounts`, `processes`, `dns`, `statics`) so a full-config update does not drop them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineConfig {
    #[serde(default, deserialize_with = "null_default")]
    pub image: String,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub metadata: BTreeMap<String, String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub files: Vec<FileConfig>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub services: Vec<ServiceConfig>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_default"
    )]
    pub checks: BTreeMap<String, CheckConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_config: Option<StopConfig>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub mounts: Vec<Value>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub processes: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_default"
    )]
    pub statics: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

// ---------------------------------------------------------------- machines

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageRef {
    #[serde(default, deserialize_with = "null_default")]
    pub registry: String,
    #[serde(default, deserialize_with = "null_default")]
    pub repository: String,
    #[serde(default, deserialize_with = "null_default")]
    pub tag: String,
    #[serde(default, deserialize_with = "null_default")]
    pub digest: String,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineEvent {
    #[serde(default, deserialize_with = "null_default")]
    pub id: String,
    /// `launch`, `start`, `stop`, `exit`, `update`, ...
    #[serde(rename = "type", default, deserialize_with = "null_default")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    /// `user` or `flyd`.
    #[serde(default, deserialize_with = "null_default")]
    pub source: String,
    /// Unix milliseconds.
    #[serde(default)]
    pub timestamp: i64,
    /// Arbitrary JSON (exit events carry `exit_event` and `restart_count`).
    #[serde(default)]
    pub request: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckStatus {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// `passing`, `warning` or `critical`.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    #[serde(default, deserialize_with = "null_default")]
    pub output: String,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    #[serde(default, deserialize_with = "null_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub state: String,
    #[serde(default, deserialize_with = "null_default")]
    pub region: String,
    /// Changes on every update; the `version` of wait.
    #[serde(default, deserialize_with = "null_default")]
    pub instance_id: String,
    #[serde(default, deserialize_with = "null_default")]
    pub private_ip: String,
    /// Missing when `host_status` is not `ok`.
    #[serde(default)]
    pub config: Option<MachineConfig>,
    #[serde(default)]
    pub incomplete_config: Option<Value>,
    #[serde(default)]
    pub image_ref: Option<ImageRef>,
    #[serde(default, deserialize_with = "null_default")]
    pub created_at: String,
    #[serde(default, deserialize_with = "null_default")]
    pub updated_at: String,
    /// Newest first.
    #[serde(default, deserialize_with = "null_default")]
    pub events: Vec<MachineEvent>,
    #[serde(default, deserialize_with = "null_default")]
    pub checks: Vec<CheckStatus>,
    /// Present when the response carries a lease (create with `lease_ttl`).
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub host_status: Option<String>,
    #[serde(default)]
    pub cordoned: Option<bool>,
    /// Only in the org-wide listing.
    #[serde(default)]
    pub app_name: Option<String>,
}

impl Machine {
    /// Persistent or terminal states, in which nothing moves without a new request.
    pub fn is_settled(&self) -> bool {
        is_settled_state(&self.state)
    }
}

/// `created`, `started`, `stopped`, `suspended`, `failed`, `destroyed`, `replaced`, `migrated`.
pub fn is_settled_state(state: &str) -> bool {
    matches!(
        state,
        "created"
            | "started"
            | "stopped"
            | "suspended"
            | "failed"
            | "destroyed"
            | "replaced"
            | "migrated"
    )
}

/// Body of create (and, with `current_version`, of update).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateMachineRequest {
    pub config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_launch: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_service_registration: Option<bool>,
    /// Seconds; the response's `nonce` then holds a lease on the new machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// The machine boots with at least this app secrets version (412 if the app has not reached it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_secrets_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_secrets: Option<bool>,
    /// Update only: the instance_id this update expects to replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
}

/// Update takes the create body (full config only, no PATCH).
pub type UpdateMachineRequest = CreateMachineRequest;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<FlyDuration>,
}

/// Query of `GET /apps/{app}/machines`.
#[derive(Debug, Clone, Default)]
pub struct ListMachinesQuery {
    pub include_deleted: bool,
    pub region: Option<String>,
    pub states: Vec<String>,
    pub summary: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WaitResponse {
    #[serde(default)]
    pub ok: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub state: String,
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    #[serde(default, deserialize_with = "null_default")]
    pub event_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    #[serde(default, deserialize_with = "null_default")]
    pub nonce: String,
    /// Unix seconds.
    #[serde(default)]
    pub expires_at: i64,
    #[serde(default, deserialize_with = "null_default")]
    pub owner: String,
    #[serde(default, deserialize_with = "null_default")]
    pub description: String,
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
}

/// The org-wide listing (`GET /orgs/{org}/machines`), for cheap fleet-wide change detection.
#[derive(Debug, Clone, Default)]
pub struct OrgMachinesQuery {
    /// RFC 3339; only machines updated strictly after this.
    pub updated_after: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
    pub include_deleted: bool,
    pub summary: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrgMachinesResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub machines: Vec<Machine>,
    #[serde(default)]
    pub next_cursor: Option<String>,
    #[serde(default)]
    pub last_updated_at: Option<String>,
    /// Regions that did not answer: the listing is partial when this is not empty.
    #[serde(default, deserialize_with = "null_default")]
    pub error_regions: Vec<String>,
}

// ---------------------------------------------------------------- secrets

/// A secret's plaintext: zeroized on drop, redacted in `Debug`, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(s: impl Into<String>) -> Self {
        SecretValue(Zeroizing::new(s.into()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SecretInfo {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub digest: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListSecretsResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub secrets: Vec<SecretInfo>,
}

/// Fly may send both `version` and `Version`; only `version` is declared (an alias would make serde
/// report a duplicate field).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetSecretsResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub secrets: Vec<SecretInfo>,
    #[serde(default)]
    pub version: u64,
}

// ---------------------------------------------------------------- ips, regions

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpAssignment {
    #[serde(default, deserialize_with = "null_default")]
    pub ip: String,
    #[serde(default, deserialize_with = "null_default")]
    pub region: String,
    #[serde(default, deserialize_with = "null_default")]
    pub service_name: String,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub created_at: Option<String>,
    /// The kind when Fly says it (`v6`, `private_v6`, `egress`, ...); empty otherwise.
    #[serde(default, rename = "type", deserialize_with = "null_default")]
    pub kind: String,
}

impl IpAssignment {
    /// A dedicated public v6: neither Flycast (a private address in fc00::/7, Fly's `fdaa:`) nor an egress
    /// address (REALISM.md §6).
    pub fn is_public_v6(&self) -> bool {
        let Ok(addr) = self.ip.parse::<std::net::Ipv6Addr>() else {
            return false;
        };
        let unique_local = addr.segments()[0] & 0xfe00 == 0xfc00;
        !self.shared && !unique_local && !self.kind.eq_ignore_ascii_case("egress")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListIpsResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub ips: Vec<IpAssignment>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AssignIpRequest {
    /// `v6`, `shared_v4`, `v4` or `private_v6`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// flyctl always sends it and fly-go's request carries it (REALISM.md §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_slug: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Region {
    pub code: String,
    pub name: String,
}

/// Region keys may arrive capitalised (`Code`, `Name`): accept either.
impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Map::<String, Value>::deserialize(d)?;
        let get = |k: &str| {
            v.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Ok(Region {
            code: get("code"),
            name: get("name"),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RegionsResponse {
    pub regions: Vec<Region>,
    pub nearest: Option<String>,
}

impl<'de> Deserialize<'de> for RegionsResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Map::<String, Value>::deserialize(d)?;
        let find = |k: &str| {
            v.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let regions = match find("regions") {
            Some(r) => serde_json::from_value(r).map_err(serde::de::Error::custom)?,
            None => Vec::new(),
        };
        let nearest = find("nearest").and_then(|n| n.as_str().map(str::to_string));
        Ok(RegionsResponse { regions, nearest })
    }
}

/// Fly's error body: prefer `status` (machine-readable) over parsing `error`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default, deserialize_with = "null_default")]
    pub error: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub details: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_machine() {
        let m: Machine = serde_json::from_str(
            r#"{"id":"abc","state":"started","config":{"image":"x","env":null,"metadata":null,
            "services":[{"protocol":"tcp","internal_port":8080,"autostop":"suspend","autostart":true}],
            "checks":{"h":{"type":"http","interval":15000000000,"grace_period":"5s"}}},
            "events":[{"type":"launch","request":{"anything":[1,2]}}],"unknown_field":1}"#,
        )
        .unwrap();
        let c = m.config.unwrap();
        assert!(c.env.is_empty());
        assert_eq!(
            c.services[0].autostop,
            Some(Autostop::Mode("suspend".into()))
        );
        assert_eq!(
            c.checks["h"].interval.as_ref().unwrap().as_nanos(),
            Some(15_000_000_000)
        );
        assert_eq!(
            c.checks["h"].grace_period.as_ref().unwrap().as_nanos(),
            Some(5_000_000_000)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn secrets_version_both_cases() {
        let r: SetSecretsResponse =
            serde_json::from_str(r#"{"secrets":[],"version":3,"Version":3}"#).unwrap();
        assert_eq!(r.version, 3);
        assert_eq!(
            format!("{:?}", SecretValue::new("hunter2")),
            "SecretValue(<redacted>)"
        );
    }

    #[test]
    fn regions_capitalised() {
        let r: RegionsResponse = serde_json::from_str(
            r#"{"Regions":[{"Code":"iad","Name":"Ashburn"}],"Nearest":"iad"}"#,
        )
        .unwrap();
        assert_eq!(r.regions[0].code, "iad");
        assert_eq!(r.nearest.as_deref(), Some("iad"));
    }
}
