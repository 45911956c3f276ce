//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write (DESIGN §6).
//!
//! The client-go protocol, kept small:
//! - every write carries the resourceVersion it was computed from, so of two candidates racing for the same
//!   record the apiserver lets exactly one win (the other gets 409 and stays a follower);
//! - a follower judges expiry on its own clock, from when it last saw the record change, never from the
//!   holder's timestamps (clocks differ between nodes);
//! - the leader renews every [`LeaseTiming::renew_interval`] and gives up (the process stops reconciling)
//!   when it could not renew for [`LeaseTiming::renew_deadline`], which is shorter than the lease duration:
//!   it stops writing before anyone else may start;
//! - on graceful shutdown the leader clears the holder, so a follower takes over at its next retry instead of
//!   waiting for the lease to expire.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{debug, info, warn};

/// How long a lease lasts and how often it is renewed and retried.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// Written as `leaseDurationSeconds`: how long a follower waits, after the record last changed, before it
    /// takes over.
    pub lease_duration: Duration,
    /// The leader stops when it has not renewed for this long (less than `lease_duration`).
    pub renew_deadline: Duration,
    /// How often the leader renews.
    pub renew_interval: Duration,
    /// How often a follower looks at the lease.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_interval: Duration::from_secs(5),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Errors from the Lease API that are worth reporting (403 says which RBAC rule is missing).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("Lease {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What a follower last saw of the record, and when (on its own clock).
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
    at: Instant,
}

/// One candidate. Not `Clone`: one per process.
pub struct LeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Option<Observed>,
    /// The record as we last wrote it, while leader.
    held: Option<Lease>,
}

/// The pure part of the decision: may `identity` write itself into the record now?
fn may_take(identity: &str, spec: &LeaseSpec, observed_unchanged_for: Duration) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            observed_unchanged_for >= duration
        }
    }
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: LeaseTiming,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: None,
            held: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Kube {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// One attempt to become (or stay) the leader. `Ok(true)`: we hold the lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let current = match self.api.get_opt(&self.name).await {
            Ok(current) => current,
            Err(e) => return Err(self.err(e)),
        };
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec_for_us(None, &now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.held = Some(created);
                    Ok(true)
                }
                // Someone else created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.clone(),
            resource_version: current.metadata.resource_version.clone(),
            at: Instant::now(),
        };
        let changed = self.observed.as_ref().is_none_or(|o| {
            (&o.holder, &o.renew_time, &o.resource_version)
                != (&seen.holder, &seen.renew_time, &seen.resource_version)
        });
        if changed {
            self.observed = Some(seen);
        }
        let unchanged_for = self
            .observed
            .as_ref()
            .map_or(Duration::ZERO, |o| o.at.elapsed());
        if !may_take(&self.identity, &spec, unchanged_for) {
            self.held = None;
            return Ok(false);
        }
        let mut next = current.clone();
        next.spec = Some(self.spec_for_us(Some(&spec), &now));
        // `replace` sends the resourceVersion we read: 409 if anyone wrote in between.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observed = None;
                self.held = Some(written);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.held = None;
                Ok(false)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn spec_for_us(&self, previous: Option<&LeaseSpec>, now: &MicroTime) -> LeaseSpec {
        let ours =
            previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        let previous = previous.cloned().unwrap_or_default();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            renew_time: Some(now.clone()),
            acquire_time: if ours {
                previous.acquire_time
            } else {
                Some(now.clone())
            },
            lease_transitions: Some(
                previous.lease_transitions.unwrap_or(0)
                    + i32::from(!ours && previous.holder_identity.is_some()),
            ),
            ..previous
        }
    }

    /// Waits until this process is the leader. API errors are logged (a 403 names the missing permission) and
    /// retried.
    pub async fn acquire(&mut self) {
        let mut logged_waiting = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %format!("{}/{}", self.namespace, self.name), identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {
                    if !logged_waiting {
                        let holder = self.observed.as_ref().and_then(|o| o.holder.clone());
                        info!(lease = %format!("{}/{}", self.namespace, self.name), holder = ?holder, "another replica leads; following");
                        logged_waiting = true;
                    }
                }
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews while leader; returns when leadership is lost (someone else took the record, or no renewal
    /// succeeded within the renew deadline). The caller must stop writing at once.
    pub async fn hold(&mut self) -> LeaderError {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.renew_interval).await;
            let attempt = tokio::time::timeout(
                self.timing
                    .renew_deadline
                    .saturating_sub(last_renewed.elapsed()),
                self.try_acquire_or_renew(),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => {
                    last_renewed = Instant::now();
                    debug!("renewed the leader lease");
                }
                Ok(Ok(false)) => {
                    return self.err(kube::Error::Service(
                        "another replica holds the lease now".into(),
                    ));
                }
                Ok(Err(e)) if last_renewed.elapsed() < self.timing.renew_deadline => {
                    warn!(error = %e, "renewing the leader lease; retrying");
                }
                Ok(Err(e)) => return e,
                Err(_) => {
                    return self.err(kube::Error::Service(
                        format!("no renewal within {:?}", self.timing.renew_deadline).into(),
                    ));
                }
            }
        }
    }

    /// Clears the holder so a follower takes over at its next look (graceful shutdown). Best effort: a
    /// lease we no longer hold is left alone.
    pub async fn release(&mut self) {
        let Some(mut lease) = self.held.take() else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            // Expired at once for any client that still compares timestamps.
            spec.lease_duration_seconds = Some(1);
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                info!(lease = %format!("{}/{}", self.namespace, self.name), "released the leader lease")
            }
            Err(e) => {
                warn!(error = %self.err(e), "could not release the leader lease; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stayed_unchanged_for_its_duration() {
        let s = spec(Some("a"), 15);
        assert!(!may_take("b", &s, Duration::from_secs(14)));
        assert!(may_take("b", &s, Duration::from_secs(15)));
        // The holder always renews its own.
        assert!(may_take("a", &s, Duration::ZERO));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        assert!(may_take("b", &spec(None, 15), Duration::ZERO));
        assert!(may_take("b", &spec(Some(""), 15), Duration::ZERO));
    }

    #[test]
    fn the_deadline_is_shorter_than_the_lease() {
        let t = LeaseTiming::default();
        assert!(t.renew_deadline < t.lease_duration);
        assert!(t.renew_interval < t.renew_deadline);
    }
}
