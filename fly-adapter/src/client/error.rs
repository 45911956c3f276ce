//! Errors of the Fly client, classified so callers can decide what to do without parsing text.

use std::time::Duration;

/// Every variant that comes from an HTTP answer carries Fly's `fly-request-id` (when sent) so an
/// error can be traced on Fly's side; the audit log and status messages should include it.
#[derive(Debug, thiserror::Error)]
pub enum FlyError {
    /// 404: app, machine, lease or IP not found.
    #[error("not found: {message} (request id {request_id:?})")]
    NotFound {
        message: String,
        request_id: Option<String>,
    },
    /// 409 about a lease: someone else holds the machine's lease, or a mutation lacked its nonce.
    #[error("lease conflict: {message} (request id {request_id:?})")]
    LeaseConflict {
        message: String,
        request_id: Option<String>,
    },
    /// 409 about a version: the machine changed since the `current_version` we sent was read. Read it again.
    #[error("version conflict: {message} (request id {request_id:?})")]
    VersionConflict {
        message: String,
        request_id: Option<String>,
    },
    /// 409 about capacity: the machine's host cannot take the change now. Nothing was done; back off and retry.
    #[error("no capacity on the host: {message} (request id {request_id:?})")]
    NoCapacity {
        message: String,
        request_id: Option<String>,
    },
    /// 412: wrong state for the action, `min_secrets_version` not reached, a volume in use. Retry after the
    /// machine settles.
    #[error("failed precondition: {message} (request id {request_id:?})")]
    Precondition {
        message: String,
        request_id: Option<String>,
    },
    /// 422 `name_taken`: the app name is used (by us or anyone).
    #[error("name taken: {message} (request id {request_id:?})")]
    NameTaken {
        message: String,
        request_id: Option<String>,
    },
    /// 403: the app exists but belongs to another organization.
    #[error("owned by another organization: {message} (request id {request_id:?})")]
    OwnedByOtherOrg {
        message: String,
        request_id: Option<String>,
    },
    /// 429 after the client's own retries.
    #[error("rate limited, retry after {retry_after:?} (request id {request_id:?})")]
    RateLimited {
        retry_after: Option<Duration>,
        request_id: Option<String>,
    },
    /// 401: bad or missing token (also briefly right after app creation).
    #[error("unauthorized: {message} (request id {request_id:?})")]
    Unauthorized {
        message: String,
        request_id: Option<String>,
    },
    /// 400 or 422 other than name_taken: Fly's own message, for the user.
    #[error("invalid request: {message} (request id {request_id:?})")]
    Invalid {
        message: String,
        request_id: Option<String>,
    },
    /// A read (or a request that never reached Fly) failed in a way worth retrying later.
    #[error("transient failure: {message} (request id {request_id:?})")]
    Transient {
        status: Option<u16>,
        message: String,
        request_id: Option<String>,
    },
    /// A mutating call whose outcome is unknown (408, 5xx, timeout, connection reset): it may have
    /// happened. Never retried blindly: observe (list / get) before trying again.
    #[error("ambiguous outcome of a mutating call: {message} (request id {request_id:?})")]
    Ambiguous {
        status: Option<u16>,
        message: String,
        request_id: Option<String>,
    },
    /// A success answer we could not decode.
    #[error("cannot decode Fly's answer: {message} (request id {request_id:?})")]
    Decode {
        message: String,
        request_id: Option<String>,
    },
    /// Client misconfiguration (bad base URL, token, TLS setup).
    #[error("client configuration: {0}")]
    Config(String),
    /// Any other status.
    #[error("unexpected status {status}: {message} (request id {request_id:?})")]
    Unexpected {
        status: u16,
        message: String,
        request_id: Option<String>,
    },
}

impl FlyError {
    pub fn request_id(&self) -> Option<&str> {
        match self {
            FlyError::NotFound { request_id, .. }
            | FlyError::LeaseConflict { request_id, .. }
            | FlyError::VersionConflict { request_id, .. }
            | FlyError::NoCapacity { request_id, .. }
            | FlyError::Precondition { request_id, .. }
            | FlyError::NameTaken { request_id, .. }
            | FlyError::OwnedByOtherOrg { request_id, .. }
            | FlyError::RateLimited { request_id, .. }
            | FlyError::Unauthorized { request_id, .. }
            | FlyError::Invalid { request_id, .. }
            | FlyError::Transient { request_id, .. }
            | FlyError::Ambiguous { request_id, .. }
            | FlyError::Decode { request_id, .. }
            | FlyError::Unexpected { request_id, .. } => request_id.as_deref(),
            FlyError::Config(_) => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, FlyError::NotFound { .. })
    }

    /// The 408 of an expired wait (or of [`super::FlyClient::wait_for_state`]'s deadline).
    pub fn is_wait_timeout(&self) -> bool {
        matches!(
            self,
            FlyError::Transient {
                status: Some(408),
                ..
            }
        )
    }

    /// Fly's 404 or 401 for an app this client created moments ago: not visible yet (REALISM.md §1), not missing
    /// or someone else's. Look again in a while.
    pub fn is_app_not_visible_yet(&self) -> bool {
        matches!(
            self,
            FlyError::Transient {
                status: Some(401 | 404),
                ..
            }
        )
    }

    /// Worth trying again later without first observing Fly's state.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FlyError::Transient { .. } | FlyError::RateLimited { .. } | FlyError::NoCapacity { .. }
        )
    }

    /// A short machine-readable class name, for metrics labels and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            FlyError::NotFound { .. } => "not_found",
            FlyError::LeaseConflict { .. } => "lease_conflict",
            FlyError::VersionConflict { .. } => "version_conflict",
            FlyError::NoCapacity { .. } => "no_capacity",
            FlyError::Precondition { .. } => "precondition",
            FlyError::NameTaken { .. } => "name_taken",
            FlyError::OwnedByOtherOrg { .. } => "owned_by_other_org",
            FlyError::RateLimited { .. } => "rate_limited",
            FlyError::Unauthorized { .. } => "unauthorized",
            FlyError::Invalid { .. } => "invalid",
            FlyError::Transient { .. } => "transient",
            FlyError::Ambiguous { .. } => "ambiguous",
            FlyError::Decode { .. } => "decode",
            FlyError::Config(_) => "config",
            FlyError::Unexpected { .. } => "unexpected",
        }
    }
}
