//! Bearer-token authentication for the MCP endpoint.

use http::HeaderMap;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The expected token, or none when auth was turned off explicitly (`--no-auth`).
#[derive(Clone)]
pub struct Auth {
    token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

/// Why a request was not let in; each maps onto a `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Invalid,
}

impl Denied {
    /// RFC 6750 §3: no error code when no credentials were sent, `invalid_token` when they were wrong.
    pub fn challenge(&self) -> &'static str {
        match self {
            Denied::Missing => r#"Bearer realm="mcpfly""#,
            Denied::Invalid => r#"Bearer realm="mcpfly", error="invalid_token""#,
        }
    }
}

impl Auth {
    pub fn bearer(token: String) -> Self {
        Self {
            token: Some(Zeroizing::new(token)),
        }
    }

    pub fn disabled() -> Self {
        Self { token: None }
    }

    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks `Authorization: Bearer <token>`. Returns the presented token (for per-token rate limiting) when
    /// it is accepted; `None` when auth is off.
    pub fn check<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, Denied> {
        let Some(expected) = &self.token else {
            return Ok(None);
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or(Denied::Missing)?;
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
