//! Waiting longer than Fly's 60 s long-poll limit.

use super::{FlyClient, FlyError, WaitResponse};
use std::time::Duration;
use tokio::time::Instant;

/// Right after create, GET and wait can 404 for a moment (eventual consistency): retry within this.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(3);

impl FlyClient {
    /// Wait until the machine reaches one of `states` (`started`, `stopped`, `suspended`,
    /// `destroyed`, `failed`, `settled`), looping Fly's 1–60 s wait until `timeout` has passed.
    /// On expiry: [`FlyError::Transient`] with status 408 ([`FlyError::is_wait_timeout`]).
    pub async fn wait_for_state(
        &self,
        app: &str,
        id: &str,
        states: &[&str],
        version: Option<&str>,
        timeout: Duration,
    ) -> Result<WaitResponse, FlyError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Fly accepts whole seconds in 1..=60 only.
            let secs = remaining.as_secs().clamp(1, 60);
            match self.wait_machine(app, id, states, secs, version).await {
                Ok(r) => return Ok(r),
                Err(e)
                    if e.is_wait_timeout()
                        || (e.is_not_found() && start.elapsed() < NOT_FOUND_GRACE) =>
                {
                    if Instant::now() >= deadline {
                        return Err(FlyError::Transient {
                            status: Some(408),
                            message: format!(
                                "machine {id} did not reach {states:?} within {timeout:?}"
                            ),
                            request_id: e.request_id().map(str::to_string),
                        });
                    }
                    if e.is_not_found() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}
