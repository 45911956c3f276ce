//! A machine lease held for the duration of a scope.
//!
//! A leaked lease blocks every other writer until it expires, so the guard refreshes in the
//! background (TTL/3, like Fly's CLI: 13 s TTL refreshed every ~4 s) and always releases: explicitly
//! with [`LeaseGuard::release`], or from `Drop` when the holder returns early, errors or is cancelled.

use super::{FlyClient, FlyError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct LeaseGuard {
    client: FlyClient,
    app: String,
    machine: String,
    nonce: String,
    lost: Arc<AtomicBool>,
    refresher: Option<JoinHandle<()>>,
    released: bool,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("app", &self.app)
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

impl LeaseGuard {
    pub async fn acquire(
        client: FlyClient,
        app: &str,
        machine: &str,
        ttl: Duration,
        description: &str,
    ) -> Result<Self, FlyError> {
        let ttl_secs = ttl.as_secs().max(1);
        let lease = client
            .acquire_lease(app, machine, ttl_secs, description, None)
            .await?;
        let lost = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (client, app, machine, nonce, lost) = (
                client.clone(),
                app.to_string(),
                machine.to_string(),
                lease.nonce.clone(),
                lost.clone(),
            );
            // At most one refresh a second: leases share Fly's 1 req/s per-machine action limit.
            let every = Duration::from_millis((ttl_secs * 1000 / 3).max(1000));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match client.refresh_lease(&app, &machine, &nonce, ttl_secs).await {
                        Ok(_) => {}
                        // Someone else holds it now, or it expired: the holder must stop writing.
                        Err(FlyError::LeaseConflict { .. } | FlyError::NotFound { .. }) => {
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        // Transient trouble: try again at the next tick, the TTL leaves room.
                        Err(e) => tracing::debug!(error = %e, "lease refresh failed"),
                    }
                }
            })
        };
        Ok(LeaseGuard {
            client,
            app: app.to_string(),
            machine: machine.to_string(),
            nonce: lease.nonce,
            lost,
            refresher: Some(refresher),
            released: false,
        })
    }

    /// The nonce to send with every mutation of the machine while the lease is held.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// True when a refresh found the lease gone or taken: stop mutating the machine.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Release now and report the outcome; an already expired lease (404) counts as released.
    pub async fn release(mut self) -> Result<(), FlyError> {
        self.released = true;
        if let Some(h) = self.refresher.take() {
            h.abort();
        }
        match self
            .client
            .release_lease(&self.app, &self.machine, &self.nonce)
            .await
        {
            Ok(()) | Err(FlyError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.take() {
            h.abort();
        }
        if self.released {
            return;
        }
        // Dropped without release (early return, error, cancellation): release in the background.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, app, machine, nonce) = (
                self.client.clone(),
                self.app.clone(),
                self.machine.clone(),
                self.nonce.clone(),
            );
            rt.spawn(async move {
                if let Err(e) = client.release_lease(&app, &machine, &nonce).await
                    && !e.is_not_found()
                {
                    tracing::warn!(error = %e, app, machine, "releasing dropped lease failed");
                }
            });
        }
    }
}
