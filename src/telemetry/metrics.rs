//! Prometheus metrics (`prometheus-client`, OpenMetrics text). Every series is named `mcpfly_*`:
//!
//! | series | what |
//! |---|---|
//! | `mcpfly_reconciles_total{outcome}` | reconciles finished, `ok` or `error`; `unchanged`: skipped, nothing changed since the last one (e.g. the echo of its own status write) |
//! | `mcpfly_reconcile_errors_total{kind}` | failed reconciles by error kind (`kube`, `fly`, …) |
//! | `mcpfly_reconcile_duration_seconds` | time per reconcile (histogram) |
//! | `mcpfly_fly_api_calls_total{endpoint,status}` | Fly HTTP exchanges; status `error` when no response came |
//! | `mcpfly_fly_api_call_duration_seconds{endpoint}` | time per Fly exchange (histogram) |
//! | `mcpfly_fly_rate_limit_waits_total{endpoint}` | calls the client-side rate limiter held back |
//! | `mcpfly_fly_rate_limit_wait_seconds_total{endpoint}` | time spent held back |
//! | `mcpfly_deployments{phase}` | MCPDeployments seen by this controller, by `status.phase` |
//! | `mcpfly_credentials{key}` | delivered sealed credentials by the key that unsealed them |
//! | `mcpfly_credentials_non_primary` | of those, on a key other than the primary (left to reseal) |
//! | `mcpfly_leader` | 1 while this process holds the leader Lease (or runs without election) |
//!
//! Deployment and credential counts are computed at scrape time from the controller's own watch cache
//! (status is the record of what was delivered), so they never drift from what the API holds and need no
//! bookkeeping in the reconcile path.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fly_adapter::client::FlyObserver;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::api::{MCPDeployment, Phase};

const PHASES: [Phase; 7] = [
    Phase::Pending,
    Phase::Deploying,
    Phase::Ready,
    Phase::Degraded,
    Phase::Failed,
    Phase::Deleting,
    Phase::Suspended,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointStatusLabel {
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms … ~41 s: a reconcile or a Fly call past that is a problem in itself.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// The controller's metrics. One per process, shared by the Fly client (as its observer), the reconciles
/// and the HTTP server.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<OutcomeLabel, Counter>,
    reconcile_errors: Family<KindLabel, Counter>,
    reconcile_duration: Histogram,
    fly_calls: Family<EndpointStatusLabel, Counter>,
    fly_call_duration: HistogramFamily<EndpointLabel>,
    rate_limit_waits: Family<EndpointLabel, Counter>,
    rate_limit_wait_seconds: Family<EndpointLabel, Counter<f64, AtomicU64>>,
    deployments: Family<PhaseLabel, Gauge>,
    credentials: Family<KeyLabel, Gauge>,
    credentials_non_primary: Gauge,
    tools_changed: Gauge,
    leader: Gauge,
    /// The watch caches of the running controllers (one per watched namespace), read at scrape time.
    stores: Mutex<Vec<Store<MCPDeployment>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mcpfly");
        let reconciles = Family::<OutcomeLabel, Counter>::default();
        let reconcile_errors = Family::<KindLabel, Counter>::default();
        let reconcile_duration = duration_histogram();
        let fly_calls = Family::<EndpointStatusLabel, Counter>::default();
        let fly_call_duration: HistogramFamily<EndpointLabel> =
            Family::new_with_constructor(duration_histogram);
        let rate_limit_waits = Family::<EndpointLabel, Counter>::default();
        let rate_limit_wait_seconds = Family::<EndpointLabel, Counter<f64, AtomicU64>>::default();
        let deployments = Family::<PhaseLabel, Gauge>::default();
        let credentials = Family::<KeyLabel, Gauge>::default();
        let credentials_non_primary = Gauge::default();
        let tools_changed = Gauge::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles finished, by outcome",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried, by error kind",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconcile",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register(
            "fly_api_calls",
            "Fly Machines API exchanges by endpoint and HTTP status (`error`: no response)",
            fly_calls.clone(),
        );
        registry.register_with_unit(
            "fly_api_call_duration",
            "Time per Fly Machines API exchange",
            Unit::Seconds,
            fly_call_duration.clone(),
        );
        registry.register(
            "fly_rate_limit_waits",
            "Fly calls held back by the client-side rate limiter",
            rate_limit_waits.clone(),
        );
        registry.register_with_unit(
            "fly_rate_limit_wait",
            "Time Fly calls spent held back by the client-side rate limiter",
            Unit::Seconds,
            rate_limit_wait_seconds.clone(),
        );
        registry.register(
            "deployments",
            "MCPDeployments watched by this controller, by status.phase",
            deployments.clone(),
        );
        registry.register(
            "credentials",
            "Delivered sealed credentials by the key id that unsealed them",
            credentials.clone(),
        );
        registry.register(
            "credentials_non_primary",
            "Delivered sealed credentials on a key other than the primary (reseal them before removing the key)",
            credentials_non_primary.clone(),
        );
        registry.register(
            "tools_changed",
            "MCPDeployments whose server offers tools that differ from the approved set (condition ToolsChanged)",
            tools_changed.clone(),
        );
        registry.register(
            "leader",
            "1 while this process is the leader and reconciles",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            fly_calls,
            fly_call_duration,
            rate_limit_waits,
            rate_limit_wait_seconds,
            deployments,
            credentials,
            credentials_non_primary,
            tools_changed,
            leader,
            stores: Mutex::new(Vec::new()),
        }
    }

    /// Call at the start of a reconcile; [`ReconcileTimer::finish`] records the outcome and duration.
    pub fn reconcile_started(self: &Arc<Self>) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }

    /// A reconcile skipped because nothing changed since the last one ([`crate::controller::settled`]).
    pub fn reconcile_unchanged(&self) {
        self.reconciles
            .get_or_create(&OutcomeLabel {
                outcome: "unchanged",
            })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Adds a controller's watch cache to the ones deployment and credential counts are taken from.
    pub fn watch_store(&self, store: Store<MCPDeployment>) {
        self.stores.lock().unwrap().push(store);
    }

    /// The OpenMetrics text of every series, with the scrape-time counts refreshed first. `primary_key` is the
    /// key ring's primary key id, when a ring is loaded.
    pub fn render(&self, primary_key: Option<&str>) -> String {
        self.refresh(primary_key);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn refresh(&self, primary_key: Option<&str>) {
        let mut phases: BTreeMap<&'static str, i64> =
            PHASES.iter().map(|p| (p.as_str(), 0)).collect();
        let mut keys: BTreeMap<String, i64> = BTreeMap::new();
        let mut tools_changed = 0;
        for store in self.stores.lock().unwrap().iter() {
            for d in store.state() {
                let status = d.status.as_ref();
                let phase = status.and_then(|s| s.phase).unwrap_or_default();
                if status
                    .and_then(|s| s.condition(crate::api::ConditionType::ToolsChanged))
                    .is_some_and(|c| c.is_true())
                {
                    tools_changed += 1;
                }
                *phases.entry(phase.as_str()).or_default() += 1;
                for c in status.map(|s| s.credentials.as_slice()).unwrap_or_default() {
                    if let Some(key) = &c.key {
                        *keys.entry(key.clone()).or_default() += 1;
                    }
                }
            }
        }
        for (phase, n) in phases {
            self.deployments.get_or_create(&PhaseLabel { phase }).set(n);
        }
        // Keys come and go with rotation: rebuild the family so a retired key's series disappears.
        self.credentials.clear();
        let mut non_primary = 0;
        for (key, n) in keys {
            if primary_key.is_some_and(|p| p != key) {
                non_primary += n;
            }
            self.credentials.get_or_create(&KeyLabel { key }).set(n);
        }
        self.credentials_non_primary.set(non_primary);
        self.tools_changed.set(tools_changed);
    }
}

impl FlyObserver for Metrics {
    fn on_call(&self, label: &str, status: Option<u16>, elapsed: Duration) {
        let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.fly_calls
            .get_or_create(&EndpointStatusLabel {
                endpoint: label.to_string(),
                status,
            })
            .inc();
        self.fly_call_duration
            .get_or_create(&EndpointLabel {
                endpoint: label.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn on_rate_limit_wait(&self, label: &str, waited: Duration) {
        let endpoint = EndpointLabel {
            endpoint: label.to_string(),
        };
        self.rate_limit_waits.get_or_create(&endpoint).inc();
        self.rate_limit_wait_seconds
            .get_or_create(&endpoint)
            .inc_by(waited.as_secs_f64());
    }
}

/// Measures one reconcile. Dropping it without [`finish`](Self::finish) records nothing (the reconcile was
/// cancelled, e.g. by shutdown).
#[must_use = "call finish() with the reconcile's outcome"]
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    started: Instant,
}

impl ReconcileTimer {
    /// `error_kind` is `None` on success, else a short stable label such as `kube` or `fly`.
    pub fn finish(self, error_kind: Option<&'static str>) {
        let m = &self.metrics;
        m.reconcile_duration
            .observe(self.started.elapsed().as_secs_f64());
        let outcome = if error_kind.is_some() { "error" } else { "ok" };
        m.reconciles.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Some(kind) = error_kind {
            m.reconcile_errors.get_or_create(&KindLabel { kind }).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialStatus, MCPDeploymentStatus};
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    /// The value of the series whose line starts with `prefix` (name plus labels).
    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn deployment(name: &str, phase: Option<Phase>, keys: &[&str]) -> MCPDeployment {
        let mut d: MCPDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "mcpfly.dev/v1alpha1", "kind": "MCPDeployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"source": {"image": {"ref": "ghcr.io/acme/mcp:1", "port": 8080}}, "fly": {"regions": ["iad"]}},
        }))
        .unwrap();
        d.status = Some(MCPDeploymentStatus {
            phase,
            credentials: keys
                .iter()
                .enumerate()
                .map(|(i, k)| CredentialStatus {
                    name: format!("C{i}"),
                    digest: "sha256:00".into(),
                    key: Some(k.to_string()),
                })
                .collect(),
            ..Default::default()
        });
        d
    }

    #[test]
    fn reconciles_and_fly_calls_are_counted() {
        let m = Arc::new(Metrics::new());
        m.reconcile_started().finish(None);
        m.reconcile_started().finish(None);
        m.reconcile_started().finish(Some("fly"));
        m.on_call("apps.create", Some(201), Duration::from_millis(20));
        m.on_call("apps.create", None, Duration::from_millis(20));
        m.on_rate_limit_wait("machines.create", Duration::from_millis(1500));
        m.set_leader(true);
        let text = m.render(None);
        assert_eq!(
            value(&text, "mcpfly_reconciles_total{outcome=\"ok\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "mcpfly_reconciles_total{outcome=\"error\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "mcpfly_reconcile_errors_total{kind=\"fly\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "mcpfly_reconcile_duration_seconds_count"),
            Some(3.0)
        );
        assert_eq!(
            value(
                &text,
                "mcpfly_fly_api_calls_total{endpoint=\"apps.create\",status=\"201\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "mcpfly_fly_api_calls_total{endpoint=\"apps.create\",status=\"error\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "mcpfly_fly_rate_limit_wait_seconds_total{endpoint=\"machines.create\"}"
            ),
            Some(1.5)
        );
        assert_eq!(value(&text, "mcpfly_leader"), Some(1.0));
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn deployments_by_phase_and_credentials_by_key_come_from_the_watch_cache() {
        let m = Metrics::new();
        let mut writer: Writer<MCPDeployment> = Writer::default();
        m.watch_store(writer.as_reader());
        for d in [
            deployment("a", Some(Phase::Ready), &["k-new", "k-old"]),
            deployment("b", Some(Phase::Ready), &["k-new"]),
            deployment("c", None, &[]),
        ] {
            writer.apply_watcher_event(&Event::Apply(d));
        }
        let text = m.render(Some("k-new"));
        assert_eq!(
            value(&text, "mcpfly_deployments{phase=\"Ready\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "mcpfly_deployments{phase=\"Pending\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "mcpfly_deployments{phase=\"Failed\"}"),
            Some(0.0)
        );
        assert_eq!(value(&text, "mcpfly_credentials{key=\"k-new\"}"), Some(2.0));
        assert_eq!(value(&text, "mcpfly_credentials{key=\"k-old\"}"), Some(1.0));
        assert_eq!(value(&text, "mcpfly_credentials_non_primary"), Some(1.0));

        // "a" is resealed on the new key: the old key's series goes away.
        writer.apply_watcher_event(&Event::Apply(deployment(
            "a",
            Some(Phase::Ready),
            &["k-new", "k-new"],
        )));
        let text = m.render(Some("k-new"));
        assert_eq!(value(&text, "mcpfly_credentials{key=\"k-old\"}"), None);
        assert_eq!(value(&text, "mcpfly_credentials_non_primary"), Some(0.0));
    }
}
