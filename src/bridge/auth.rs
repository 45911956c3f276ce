//! Who may call the MCP endpoint: a static bearer token, OAuth 2.1 access tokens from an external
//! authorization server ([`super::oauth`]), or, when turned off explicitly, anyone.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::oauth::{Principal, Refused, ResourceServer};

#[derive(Clone)]
enum Mode {
    /// Auth turned off explicitly (`--no-auth`).
    Disabled,
    Bearer(Zeroizing<String>),
    OAuth(Arc<ResourceServer>),
}

/// The endpoint's auth setting.
#[derive(Clone)]
pub struct Auth {
    mode: Mode,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.mode {
            Mode::Disabled => "none",
            Mode::Bearer(_) => "bearer",
            Mode::OAuth(_) => "oauth",
        };
        f.debug_struct("Auth").field("mode", &mode).finish()
    }
}

/// Why a request was not let in; each maps onto a status and a `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Invalid,
    /// OAuth: a valid token without these scopes (403).
    InsufficientScope(Vec<String>),
    /// OAuth: a token in the query string (RFC 6750 §2.3 is not offered; MCP forbids it): 400.
    TokenInQuery,
    /// OAuth: the authorization server's keys cannot be fetched, so no token can be checked (503).
    KeysUnavailable,
}

impl Denied {
    /// RFC 6750 §3: no error code when no credentials were sent, `invalid_token` when they were wrong.
    pub fn challenge(&self) -> &'static str {
        match self {
            Denied::Missing => r#"Bearer realm="mcpfly""#,
            Denied::TokenInQuery => r#"Bearer realm="mcpfly", error="invalid_request""#,
            _ => r#"Bearer realm="mcpfly", error="invalid_token""#,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Missing | Denied::Invalid => StatusCode::UNAUTHORIZED,
            Denied::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Denied::TokenInQuery => StatusCode::BAD_REQUEST,
            Denied::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The audit note: the reason class, never the token.
    pub fn note(&self) -> &'static str {
        match self {
            Denied::Missing | Denied::Invalid => "unauthorized",
            Denied::InsufficientScope(_) => "insufficient scope",
            Denied::TokenInQuery => "token in query",
            Denied::KeysUnavailable => "authorization server keys unavailable",
        }
    }
}

/// A request that was let in: the rate-limit identity (a digest, never the credential) and, with OAuth, whom
/// the token speaks for.
#[derive(Debug, Default)]
pub struct Granted {
    pub identity: Option<String>,
    pub principal: Option<Principal>,
}

impl Auth {
    pub fn bearer(token: String) -> Self {
        Self {
            mode: Mode::Bearer(Zeroizing::new(token)),
        }
    }

    pub fn disabled() -> Self {
        Self {
            mode: Mode::Disabled,
        }
    }

    pub fn oauth(server: ResourceServer) -> Self {
        Self {
            mode: Mode::OAuth(Arc::new(server)),
        }
    }

    pub fn enabled(&self) -> bool {
        !matches!(self.mode, Mode::Disabled)
    }

    /// The resource server, in OAuth mode only (which alone serves discovery).
    pub fn oauth_server(&self) -> Option<&Arc<ResourceServer>> {
        match &self.mode {
            Mode::OAuth(server) => Some(server),
            _ => None,
        }
    }

    /// Checks `Authorization: Bearer <token>` against the static token. Returns the presented token when it is
    /// accepted; `None` when auth is off. (OAuth mode goes through [`Auth::authorize`].)
    pub fn check<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, Denied> {
        let expected = match &self.mode {
            Mode::Disabled => return Ok(None),
            Mode::Bearer(expected) => expected,
            Mode::OAuth(_) => return Err(Denied::Invalid),
        };
        let presented = presented_token(headers).ok_or(Denied::Missing)?;
        // Constant time in the content; the length check leaks only the length, which a 256-bit token makes
        // worthless to learn.
        if presented.len() == expected.len()
            && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
        {
            Ok(Some(presented))
        } else {
            Err(Denied::Invalid)
        }
    }

    /// Lets a request in or says why not, in every mode.
    pub async fn authorize(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Granted, Denied> {
        let Mode::OAuth(server) = &self.mode else {
            return Ok(Granted {
                identity: self.check(headers)?.map(digest),
                principal: None,
            });
        };
        if query.is_some_and(|q| {
            q.split('&')
                .any(|pair| pair.split('=').next() == Some("access_token"))
        }) {
            return Err(Denied::TokenInQuery);
        }
        let token = presented_token(headers).ok_or(Denied::Missing)?;
        let principal = server.validate(token).await.map_err(|refused| {
            if let Refused::Invalid(reason) = &refused {
                tracing::info!(reason, "access token refused");
            }
            denied(refused)
        })?;
        Ok(Granted {
            identity: Some(digest(&format!(
                "{}\n{}",
                principal.issuer, principal.subject
            ))),
            principal: Some(principal),
        })
    }

    /// OAuth: whether the token's scopes allow this JSON-RPC message (per-tool scopes on `tools/call`).
    pub fn allows(&self, granted: &Granted, message: &serde_json::Value) -> Result<(), Denied> {
        let (Mode::OAuth(server), Some(principal)) = (&self.mode, &granted.principal) else {
            return Ok(());
        };
        if message.get("method").and_then(|m| m.as_str()) != Some("tools/call") {
            return Ok(());
        }
        let tool = message
            .pointer("/params/name")
            .and_then(|n| n.as_str())
            .unwrap_or_default();
        server
            .require(principal, server.config.scopes_for_tool(tool))
            .map_err(denied)
    }

    /// The `WWW-Authenticate` value for `denied`: in OAuth mode it names the metadata document (and scopes) a
    /// client needs to start the authorization flow.
    pub fn challenge(&self, denied: &Denied) -> HeaderValue {
        let Mode::OAuth(server) = &self.mode else {
            return HeaderValue::from_static(denied.challenge());
        };
        let mut value = format!(
            r#"Bearer resource_metadata="{}""#,
            server.config.metadata_url()
        );
        let scopes = match denied {
            Denied::InsufficientScope(scopes) => {
                value.push_str(r#", error="insufficient_scope""#);
                scopes.clone()
            }
            Denied::Invalid => {
                value.push_str(r#", error="invalid_token""#);
                server.config.required_scopes.clone()
            }
            Denied::TokenInQuery => {
                value.push_str(r#", error="invalid_request""#);
                server.config.required_scopes.clone()
            }
            _ => server.config.required_scopes.clone(),
        };
        if !scopes.is_empty() {
            value.push_str(&format!(r#", scope="{}""#, scopes.join(" ")));
        }
        HeaderValue::from_str(&value)
            .unwrap_or_else(|_| HeaderValue::from_static(denied.challenge()))
    }
}

fn denied(refused: Refused) -> Denied {
    match refused {
        Refused::Invalid(_) => Denied::Invalid,
        Refused::InsufficientScope(scopes) => Denied::InsufficientScope(scopes),
        Refused::KeysUnavailable => Denied::KeysUnavailable,
    }
}

fn presented_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
}

/// A short digest naming a credential or a principal in rate limiting, never the thing itself.
fn digest(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        let auth = Auth::bearer("s3cret-token".into());
        assert_eq!(
            auth.check(&headers("Bearer s3cret-token")),
            Ok(Some("s3cret-token"))
        );
        assert_eq!(
            auth.check(&headers("bearer s3cret-token")),
            Ok(Some("s3cret-token"))
        );
        assert_eq!(
            auth.check(&headers("Bearer s3cret-tokem")),
            Err(Denied::Invalid)
        );
        assert_eq!(auth.check(&headers("Bearer s3cret")), Err(Denied::Invalid));
        assert_eq!(
            auth.check(&headers("Basic s3cret-token")),
            Err(Denied::Missing)
        );
        assert_eq!(auth.check(&HeaderMap::new()), Err(Denied::Missing));
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn disabled_auth_lets_everything_in() {
        assert_eq!(Auth::disabled().check(&HeaderMap::new()), Ok(None));
    }
}
