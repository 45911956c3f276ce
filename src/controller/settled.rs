//! What each resource looked like when this process last reconciled it, so that a reconcile nobody needed is not
//! run.
//!
//! Every status write comes back through the watch as a new resourceVersion and kube-runtime queues the resource
//! again. Without this, each of the four or five status changes of a create costs one more Fly machine listing.
//! A trigger carries news when
//! - the resource changed since the last reconcile (a resourceVersion other than the one that reconcile read or
//!   wrote itself),
//! - the look that reconcile scheduled is due, or
//! - something the resourceVersion does not show changed: a referenced Secret, a machine on Fly (the org-wide
//!   listing) or the key ring. Those triggers [`Settled::touch`] the resource (or [`Settled::touch_all`]) before
//!   they queue it.
//!
//! Anything else is an echo, and it gets the look that is already scheduled ([`Settled::echo`]). The record is
//! in memory only: after a restart every resource is reconciled once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::api::{MCPDeployment, MCPDeploymentStatus};

/// When a reconcile wants to look at its resource again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Next(Option<Duration>);

impl Next {
    pub fn after(delay: Duration) -> Self {
        Self(Some(delay))
    }

    /// Only when the resource (or something it references) changes.
    pub fn on_change() -> Self {
        Self(None)
    }
}

impl From<Next> for kube::runtime::controller::Action {
    fn from(next: Next) -> Self {
        match next.0 {
            Some(delay) => Self::requeue(delay),
            None => Self::await_change(),
        }
    }
}

type Key = (String, String);

fn key_of(obj: &MCPDeployment) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn version_of(obj: &MCPDeployment) -> Option<u64> {
    obj.resource_version()?.parse().ok()
}

#[derive(Default)]
pub struct Settled {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by [`Settled::touch_all`] (the key ring changed).
    epoch: u64,
    resources: HashMap<Key, Entry>,
    /// resourceVersions of the Secrets this process last wrote, so their echoes trigger nothing.
    own_secrets: HashMap<Key, String>,
}

#[derive(Default)]
struct Entry {
    /// Bumped by [`Settled::touch`].
    touches: u64,
    written: Option<Written>,
    last: Option<Reconciled>,
}

/// The last status this process wrote.
struct Written {
    resource_version: u64,
    status: MCPDeploymentStatus,
    /// Whether the object the write returned differs from what the reconcile read only in status (and its
    /// resourceVersion): otherwise someone changed it meanwhile, and its echo is news.
    only_status: bool,
}

/// How the last successful reconcile left the resource.
struct Reconciled {
    resource_version: u64,
    touches: u64,
    epoch: u64,
    due: Option<Instant>,
}

/// Taken when a reconcile starts: a touch after this moment is news to that reconcile.
pub struct Ticket {
    key: Key,
    touches: u64,
    epoch: u64,
}

impl Settled {
    /// Something this resource depends on changed where its resourceVersion does not show it.
    pub fn touch(&self, resource: &ObjectRef<MCPDeployment>) {
        let key = (
            resource.namespace.clone().unwrap_or_default(),
            resource.name.clone(),
        );
        self.inner
            .lock()
            .unwrap()
            .resources
            .entry(key)
            .or_default()
            .touches += 1;
    }

    pub fn touch_all(&self) {
        self.inner.lock().unwrap().epoch += 1;
    }

    /// The scheduled look, when `obj` is exactly what the last reconcile left and nothing touched it since:
    /// `None` means reconcile.
    pub fn echo(&self, obj: &MCPDeployment, now: Instant) -> Option<Next> {
        let inner = self.inner.lock().unwrap();
        let entry = inner.resources.get(&key_of(obj))?;
        let last = entry.last.as_ref()?;
        let unchanged = Some(last.resource_version) == version_of(obj)
            && last.touches == entry.touches
            && last.epoch == inner.epoch;
        match last.due {
            _ if !unchanged => None,
            Some(due) if due <= now => None,
            Some(due) => Some(Next::after(due - now)),
            None => Some(Next::on_change()),
        }
    }

    pub fn begin(&self, obj: &MCPDeployment) -> Ticket {
        let inner = self.inner.lock().unwrap();
        let key = key_of(obj);
        let touches = inner.resources.get(&key).map_or(0, |e| e.touches);
        Ticket {
            key,
            touches,
            epoch: inner.epoch,
        }
    }

    /// Records a successful reconcile of `read` (the object it started from) that asked for `next`.
    pub fn settle(&self, ticket: Ticket, read: &MCPDeployment, next: Next, now: Instant) {
        // A resource being deleted is looked at until it is gone, then forgotten: keep no record of it.
        if read.metadata.deletion_timestamp.is_some() {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        let entry = inner.resources.entry(ticket.key).or_default();
        let read_version = version_of(read).unwrap_or(0);
        // The state this reconcile ends on: its own status write when that is newer than what it read.
        let version = match &entry.written {
            Some(w) if w.resource_version > read_version && !w.only_status => {
                entry.last = None;
                return;
            }
            Some(w) if w.resource_version > read_version => w.resource_version,
            _ => read_version,
        };
        entry.last = Some(Reconciled {
            resource_version: version,
            touches: ticket.touches,
            epoch: ticket.epoch,
            due: next.0.map(|delay| now + delay),
        });
    }

    /// A failed reconcile: its retry must run.
    pub fn unsettle(&self, obj: &MCPDeployment) {
        if let Some(entry) = self.inner.lock().unwrap().resources.get_mut(&key_of(obj)) {
            entry.last = None;
        }
    }

    /// The resource is gone (its finalizer removed).
    pub fn forget(&self, obj: &MCPDeployment) {
        let key = key_of(obj);
        let mut inner = self.inner.lock().unwrap();
        inner.resources.remove(&key);
        // Its connection Secret goes with it (owner reference).
        inner
            .own_secrets
            .remove(&(key.0, obj.connection_secret_name()));
    }

    /// Remembers a status write of `read` that returned `written`.
    pub fn wrote_status(&self, read: &MCPDeployment, written: &MCPDeployment) {
        let (Some(version), Some(status)) = (version_of(written), written.status.clone()) else {
            return;
        };
        let only_status = same_except_status(read, written);
        self.inner
            .lock()
            .unwrap()
            .resources
            .entry(key_of(written))
            .or_default()
            .written = Some(Written {
            resource_version: version,
            status,
            only_status,
        });
    }

    /// `obj` with the status this process last wrote, when the cached copy predates that write: a reconcile
    /// queued by our own change must not act on the status before it.
    pub fn freshest(&self, obj: Arc<MCPDeployment>) -> Arc<MCPDeployment> {
        let seen = version_of(&obj).unwrap_or(0);
        let inner = self.inner.lock().unwrap();
        match inner
            .resources
            .get(&key_of(&obj))
            .and_then(|e| e.written.as_ref())
        {
            Some(w) if w.resource_version > seen => {
                let mut newer = (*obj).clone();
                newer.status = Some(w.status.clone());
                Arc::new(newer)
            }
            _ => obj,
        }
    }

    pub fn wrote_secret(&self, namespace: &str, name: &str, resource_version: Option<String>) {
        let key = (namespace.to_string(), name.to_string());
        let mut inner = self.inner.lock().unwrap();
        match resource_version {
            Some(version) => inner.own_secrets.insert(key, version),
            None => inner.own_secrets.remove(&key),
        };
    }

    /// Whether this Secret event is the echo of this process's own last write of it.
    pub fn own_secret(&self, namespace: &str, name: &str, resource_version: Option<&str>) -> bool {
        let inner = self.inner.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        resource_version.is_some()
            && inner.own_secrets.get(&key).map(String::as_str) == resource_version
    }
}

/// Metadata and spec equal (the fields a reconcile reads), ignoring what only the API server or a lean cache
/// changes.
fn same_except_status(read: &MCPDeployment, written: &MCPDeployment) -> bool {
    let mut written = written.clone();
    lean(&mut written);
    let (a, b) = (&read.metadata, &written.metadata);
    read.spec == written.spec
        && a.generation == b.generation
        && a.uid == b.uid
        && read.labels() == written.labels()
        && read.annotations() == written.annotations()
        && read.finalizers() == written.finalizers()
        && a.deletion_timestamp == b.deletion_timestamp
}

/// Drops what no reconcile reads and most of a cached object's size: managedFields and kubectl's last-applied
/// copy of the spec. Applied to the watch cache and before comparing a written object with a cached one.
pub fn lean(obj: &mut MCPDeployment) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MCPDeploymentSpec, Phase};

    fn deployment(version: u64) -> MCPDeployment {
        let spec: MCPDeploymentSpec = serde_json::from_value(serde_json::json!({
            "source": {"image": {"ref": "ghcr.io/example/server:1", "port": 8080}},
            "fly": {"regions": ["iad"]}
        }))
        .unwrap();
        let mut d = MCPDeployment::new("echo", spec);
        d.metadata.namespace = Some("team".into());
        d.metadata.resource_version = Some(version.to_string());
        d.metadata.generation = Some(1);
        d
    }

    fn with_status(mut d: MCPDeployment, version: u64, phase: Phase) -> MCPDeployment {
        d.metadata.resource_version = Some(version.to_string());
        d.status = Some(MCPDeploymentStatus {
            phase: Some(phase),
            ..Default::default()
        });
        d
    }

    /// A reconcile of `read` that wrote `written` and asked to look again after `next`.
    fn reconciled(
        s: &Settled,
        read: &MCPDeployment,
        written: Option<&MCPDeployment>,
        next: Next,
        now: Instant,
    ) {
        let ticket = s.begin(read);
        if let Some(written) = written {
            s.wrote_status(read, written);
        }
        s.settle(ticket, read, next, now);
    }

    const MINUTE: Duration = Duration::from_secs(60);

    /// A reconcile that read version 10, wrote `phase` as version 11 and asked to look again after `next`.
    fn after_a_status_write(
        phase: Phase,
        next: Next,
    ) -> (Settled, Instant, MCPDeployment, MCPDeployment) {
        let (s, now) = (Settled::default(), Instant::now());
        let read = deployment(10);
        let written = with_status(read.clone(), 11, phase);
        reconciled(&s, &read, Some(&written), next, now);
        (s, now, read, written)
    }

    #[test]
    fn the_echo_of_our_own_status_write_waits_for_the_scheduled_look() {
        let (s, now, _, written) =
            after_a_status_write(Phase::Deploying, Next::after(Duration::from_secs(3)));
        assert_eq!(
            s.echo(&written, now + Duration::from_secs(1)),
            Some(Next::after(Duration::from_secs(2)))
        );
        // The scheduled look itself runs.
        assert_eq!(s.echo(&written, now + Duration::from_secs(3)), None);
    }

    #[test]
    fn a_stalled_resource_waits_for_a_change() {
        let (s, now, _, written) = after_a_status_write(Phase::Failed, Next::on_change());
        assert_eq!(
            s.echo(&written, now + Duration::from_secs(3600)),
            Some(Next::on_change())
        );
    }

    #[test]
    fn any_other_resource_version_is_news() {
        let (s, now, read, written) =
            after_a_status_write(Phase::Deploying, Next::after(Duration::from_secs(3)));
        let mut edited = written.clone();
        edited.metadata.resource_version = Some("12".into());
        assert_eq!(s.echo(&edited, now), None);
        // What the reconcile read is older than its own write: not the state it left.
        assert_eq!(s.echo(&read, now), None);
    }

    #[test]
    fn a_reconcile_without_a_write_settles_on_what_it_read() {
        let (s, now) = (Settled::default(), Instant::now());
        let read = with_status(deployment(10), 10, Phase::Ready);
        reconciled(&s, &read, None, Next::after(MINUTE), now);
        // A watch relist delivers the same object again.
        assert!(s.echo(&read, now + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn touches_and_key_ring_changes_are_news() {
        let (s, now, _, written) = after_a_status_write(Phase::Ready, Next::after(MINUTE));
        s.touch(&ObjectRef::from_obj(&written));
        assert_eq!(s.echo(&written, now), None);

        reconciled(&s, &written, None, Next::after(MINUTE), now);
        assert!(s.echo(&written, now).is_some());
        s.touch_all();
        assert_eq!(s.echo(&written, now), None);
    }

    #[test]
    fn a_touch_during_the_reconcile_is_news_afterwards() {
        let (s, now) = (Settled::default(), Instant::now());
        let read = deployment(10);
        let written = with_status(read.clone(), 11, Phase::Ready);
        let ticket = s.begin(&read);
        s.touch(&ObjectRef::from_obj(&read));
        s.wrote_status(&read, &written);
        s.settle(ticket, &read, Next::after(MINUTE), now);
        assert_eq!(s.echo(&written, now), None);
    }

    #[test]
    fn a_write_that_carries_someone_elses_change_is_news() {
        let (s, now) = (Settled::default(), Instant::now());
        let read = deployment(10);
        // The spec was edited between our read and our status write; the write returns the new spec.
        let mut written = with_status(read.clone(), 12, Phase::Ready);
        written.spec.fly.regions = vec!["ams".into()];
        written.metadata.generation = Some(2);
        reconciled(&s, &read, Some(&written), Next::after(MINUTE), now);
        assert_eq!(s.echo(&written, now), None);
        // An annotation (force reconcile, token rotation) does not bump the generation but is news too.
        let mut annotated = with_status(read.clone(), 13, Phase::Ready);
        annotated
            .annotations_mut()
            .insert(crate::api::ROTATE_TOKEN_ANNOTATION.into(), "1".into());
        reconciled(&s, &read, Some(&annotated), Next::after(MINUTE), now);
        assert_eq!(s.echo(&annotated, now), None);
    }

    #[test]
    fn fields_the_api_server_adds_do_not_count_as_changes() {
        let (s, now) = (Settled::default(), Instant::now());
        let read = deployment(10);
        let mut written = with_status(read.clone(), 11, Phase::Ready);
        written.metadata.managed_fields = Some(vec![Default::default()]);
        reconciled(&s, &read, Some(&written), Next::after(MINUTE), now);
        assert!(s.echo(&written, now).is_some());
    }

    #[test]
    fn a_failed_reconcile_and_a_deleted_resource_leave_nothing_to_skip() {
        let (s, now) = (Settled::default(), Instant::now());
        let read = with_status(deployment(10), 10, Phase::Ready);
        reconciled(&s, &read, None, Next::after(MINUTE), now);
        s.unsettle(&read);
        assert_eq!(s.echo(&read, now), None);
        reconciled(&s, &read, None, Next::after(MINUTE), now);
        s.forget(&read);
        assert_eq!(s.echo(&read, now), None);
        // The reconcile that removed the finalizer settles after the forget: nothing is recorded again.
        let mut deleting = read.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        reconciled(&s, &deleting, None, Next::on_change(), now);
        assert!(s.inner.lock().unwrap().resources.is_empty());
    }

    #[test]
    fn freshest_replaces_a_lagging_cached_status_with_our_write() {
        let s = Settled::default();
        let read = deployment(10);
        let written = with_status(read.clone(), 11, Phase::Deploying);
        s.wrote_status(&read, &written);
        let fresh = s.freshest(Arc::new(read.clone()));
        assert_eq!(fresh.status.as_ref().unwrap().phase, Some(Phase::Deploying));
        let newer = with_status(read, 12, Phase::Ready);
        let kept = s.freshest(Arc::new(newer));
        assert_eq!(kept.status.as_ref().unwrap().phase, Some(Phase::Ready));
    }

    #[test]
    fn only_the_echo_of_our_own_secret_write_is_ignored() {
        let s = Settled::default();
        s.wrote_secret("team", "echo-mcp", Some("20".into()));
        assert!(s.own_secret("team", "echo-mcp", Some("20")));
        assert!(!s.own_secret("team", "echo-mcp", Some("21")));
        assert!(!s.own_secret("team", "other", Some("20")));
        assert!(!s.own_secret("team", "echo-mcp", None));
    }
}
