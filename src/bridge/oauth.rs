//! OAuth 2.1 resource server (MCP authorization spec): the endpoint accepts JWT access tokens issued by an
//! external authorization server for this endpoint, and publishes RFC 9728 Protected Resource Metadata so a
//! client (Claude.ai, ChatGPT, the SDKs) can find that server on its own.
//!
//! A token is accepted only when: it came in the `Authorization` header; its algorithm is an asymmetric one we
//! allow (never `none`, never HMAC, which a public JWK would turn into a forgeable secret); its `iss` is one of the
//! configured issuers (checked before any key is fetched, so foreign tokens cannot make us call out); its
//! signature verifies against that issuer's JWKS (found through RFC 8414, then OpenID discovery; cached, refetched
//! on an unknown `kid` at most every [`REFRESH_MIN_INTERVAL`]); its `aud` holds our audience; it has not expired
//! (with [`LEEWAY_SECS`] of clock skew); and it carries the required scopes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 60;
/// An unknown `kid` refetches the issuer's keys at most this often (a stream of made-up kids must not turn the
/// bridge into a load generator against the authorization server).
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Keys older than this are refetched on the next request, so a key the issuer withdrew stops being trusted.
const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
/// Longer tokens are refused unread.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What the endpoint accepts, from the bridge's `--oauth-*` arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthConfig {
    /// Issuers whose tokens are accepted; also the `authorization_servers` advertised.
    pub issuers: Vec<String>,
    /// The endpoint's canonical URL (`https://app.fly.dev/mcp`): the `resource` advertised.
    pub resource: String,
    /// The `aud` a token must carry (normally the resource).
    pub audience: String,
    /// Scopes every request needs.
    pub required_scopes: Vec<String>,
    /// Extra scopes a `tools/call` of a given tool needs.
    pub tool_scopes: Vec<(String, String)>,
}

impl OAuthConfig {
    /// Checks what the arguments say before anything is served: every URL parses, the resource is absolute
    /// and carries no fragment, tool scopes are `tool=scope`.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.issuers.is_empty(),
            "at least one --oauth-issuer is required"
        );
        for issuer in &self.issuers {
            let url = Url::parse(issuer)
                .map_err(|e| anyhow::anyhow!("--oauth-issuer {issuer} is not a URL: {e}"))?;
            anyhow::ensure!(
                matches!(url.scheme(), "https" | "http") && url.query().is_none(),
                "--oauth-issuer {issuer} must be an http(s) URL without a query"
            );
        }
        let resource = Url::parse(&self.resource)
            .map_err(|e| anyhow::anyhow!("--oauth-resource {} is not a URL: {e}", self.resource))?;
        anyhow::ensure!(
            matches!(resource.scheme(), "https" | "http") && resource.fragment().is_none(),
            "--oauth-resource must be an http(s) URL without a fragment"
        );
        anyhow::ensure!(!self.audience.is_empty(), "--oauth-audience is empty");
        Ok(())
    }

    /// Where the Protected Resource Metadata of this resource lives (RFC 9728 §3.1: the well-known path inserted
    /// between the origin and the resource's path).
    pub fn metadata_url(&self) -> String {
        let Ok(url) = Url::parse(&self.resource) else {
            return String::new();
        };
        let path = url.path().trim_end_matches('/');
        format!(
            "{}/.well-known/oauth-protected-resource{path}",
            url.origin().ascii_serialization()
        )
    }

    /// Every scope the endpoint may ask for.
    pub fn scopes_supported(&self) -> Vec<String> {
        let mut scopes = self.required_scopes.clone();
        for (_, scope) in &self.tool_scopes {
            if !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
        scopes
    }

    /// The RFC 9728 document.
    pub fn metadata(&self) -> Value {
        json!({
            "resource": self.resource,
            "authorization_servers": self.issuers,
            "scopes_supported": self.scopes_supported(),
            "bearer_methods_supported": ["header"],
        })
    }

    /// Scopes a `tools/call` of `tool` needs beyond the required ones.
    pub fn scopes_for_tool<'a>(&'a self, tool: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tool_scopes
            .iter()
            .filter(move |(t, _)| t == tool)
            .map(|(_, s)| s.as_str())
    }
}

/// Parses `tool=scope` pairs.
pub fn parse_tool_scopes(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((tool, scope)) if !tool.is_empty() && !scope.is_empty() => {
                Ok((tool.to_string(), scope.to_string()))
            }
            _ => anyhow::bail!("--oauth-tool-scope {pair} is not TOOL=SCOPE"),
        })
        .collect()
}

/// Who a valid token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub issuer: String,
    pub subject: String,
    pub scopes: Vec<String>,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a usable token: malformed, wrong algorithm, issuer, audience, signature, expired.
    Invalid(&'static str),
    /// Valid, but without these scopes.
    InsufficientScope(Vec<String>),
    /// The issuer's keys could not be fetched (the token may well be good).
    KeysUnavailable,
}

#[derive(Default)]
struct IssuerKeys {
    jwks_uri: Option<String>,
    keys: HashMap<String, Jwk>,
    fetched: Option<Instant>,
}

/// Validates tokens for one endpoint; holds the issuers' keys.
pub struct ResourceServer {
    pub config: OAuthConfig,
    keys: Mutex<HashMap<String, IssuerKeys>>,
    http: reqwest::Client,
    refresh_min_interval: Duration,
}

impl std::fmt::Debug for ResourceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceServer")
            .field("config", &self.config)
            .finish()
    }
}

impl ResourceServer {
    pub fn new(config: OAuthConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            config,
            keys: Mutex::new(HashMap::new()),
            http,
            refresh_min_interval: REFRESH_MIN_INTERVAL,
        })
    }

    /// Validates `token` and returns whom it speaks for, checking the required scopes.
    pub async fn validate(&self, token: &str) -> Result<Principal, Refused> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::Invalid("token too long"));
        }
        // `none` and unknown algorithms fail here: jsonwebtoken has no such variant.
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Refused::Invalid("malformed token"))?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(Refused::Invalid("algorithm not allowed"));
        }
        let issuer = unverified_issuer(token).ok_or(Refused::Invalid("no issuer"))?;
        let Some(issuer) = self
            .config
            .issuers
            .iter()
            .find(|i| same_issuer(i, &issuer))
            .cloned()
        else {
            return Err(Refused::Invalid("untrusted issuer"));
        };
        let kid = header.kid.clone().unwrap_or_default();
        let jwk = self.key(&issuer, &kid).await?;
        if let Some(alg) = jwk.common.key_algorithm
            && format!("{alg:?}") != format!("{:?}", header.alg)
        {
            return Err(Refused::Invalid("key is for another algorithm"));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| Refused::Invalid("unusable key"))?;
        let mut validation = Validation::new(header.alg);
        // The token's own `iss` string (which matched ours up to a trailing slash) is what is checked.
        validation.set_issuer(&[issuer.as_str(), issuer.trim_end_matches('/')]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            Refused::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not yet valid",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidIssuer => "untrusted issuer",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::MissingRequiredClaim(_) => "missing claim",
                _ => "invalid token",
            })
        })?;
        let claims = data.claims;
        let principal = Principal {
            issuer,
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            scopes: scopes_of(&claims),
        };
        self.require(
            &principal,
            self.config.required_scopes.iter().map(String::as_str),
        )?;
        Ok(principal)
    }

    /// `Ok` when `principal` holds every scope in `needed`; otherwise the scopes to ask for (the required ones
    /// and these), as RFC 6750's `insufficient_scope` challenge should name them.
    pub fn require<'a>(
        &self,
        principal: &Principal,
        needed: impl Iterator<Item = &'a str>,
    ) -> Result<(), Refused> {
        let needed: Vec<&str> = needed.collect();
        if needed
            .iter()
            .all(|s| principal.scopes.iter().any(|held| held == s))
        {
            return Ok(());
        }
        let mut ask = self.config.required_scopes.clone();
        for s in needed {
            if !ask.iter().any(|a| a == s) {
                ask.push(s.to_string());
            }
        }
        Err(Refused::InsufficientScope(ask))
    }

    /// The issuer's key `kid`, fetching the issuer's keys when none are held, they are old, or `kid` is unknown
    /// (the last at most every [`REFRESH_MIN_INTERVAL`]).
    async fn key(&self, issuer: &str, kid: &str) -> Result<Jwk, Refused> {
        let mut all = self.keys.lock().await;
        let entry = all.entry(issuer.to_string()).or_default();
        let age = entry.fetched.map(|t| t.elapsed());
        let must_fetch = match age {
            None => true,
            Some(age) if age > KEYS_MAX_AGE => true,
            Some(age) => !entry.keys.contains_key(kid) && age >= self.refresh_min_interval,
        };
        if must_fetch {
            match self.fetch_keys(issuer, entry.jwks_uri.clone()).await {
                Ok((jwks_uri, keys)) => {
                    entry.jwks_uri = Some(jwks_uri);
                    entry.keys = keys;
                    entry.fetched = Some(Instant::now());
                }
                Err(error) => {
                    tracing::warn!(issuer, %error, "cannot fetch the authorization server's keys");
                    if entry.fetched.is_none() {
                        return Err(Refused::KeysUnavailable);
                    }
                }
            }
        }
        entry
            .keys
            .get(kid)
            .cloned()
            .ok_or(Refused::Invalid("unknown key"))
    }

    async fn fetch_keys(
        &self,
        issuer: &str,
        known_jwks_uri: Option<String>,
    ) -> anyhow::Result<(String, HashMap<String, Jwk>)> {
        let jwks_uri = match known_jwks_uri {
            Some(uri) => uri,
            None => self.discover_jwks_uri(issuer).await?,
        };
        let set: Value = self
            .http
            .get(&jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = HashMap::new();
        // Key by key: one key of a kind we cannot read (an encryption key, a new algorithm) must not hide the
        // others.
        for raw in set
            .get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if raw
                .get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            if let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) {
                keys.insert(jwk.common.key_id.clone().unwrap_or_default(), jwk);
            }
        }
        Ok((jwks_uri, keys))
    }

    /// RFC 8414 first, then OpenID Connect discovery (both the issuer-appended and the inserted form); the
    /// document must name the same issuer (RFC 8414 §3.3), or a server could speak for another.
    async fn discover_jwks_uri(&self, issuer: &str) -> anyhow::Result<String> {
        let mut last_error = anyhow::anyhow!("no discovery document");
        for url in discovery_urls(issuer) {
            let document = match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await,
                Ok(r) => {
                    last_error = anyhow::anyhow!("{url}: HTTP {}", r.status());
                    continue;
                }
                Err(e) => {
                    last_error = anyhow::anyhow!("{url}: {e}");
                    continue;
                }
            };
            let document = match document {
                Ok(d) => d,
                Err(e) => {
                    last_error = anyhow::anyhow!("{url}: {e}");
                    continue;
                }
            };
            let named = document.get("issuer").and_then(Value::as_str).unwrap_or("");
            anyhow::ensure!(
                same_issuer(named, issuer),
                "{url} names issuer {named:?}, not {issuer}"
            );
            return document
                .get("jwks_uri")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{url} has no jwks_uri"));
        }
        Err(last_error)
    }
}

fn discovery_urls(issuer: &str) -> Vec<String> {
    let Ok(url) = Url::parse(issuer) else {
        return Vec::new();
    };
    let origin = url.origin().ascii_serialization();
    let path = url.path().trim_end_matches('/');
    let mut urls = vec![
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
        format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ),
    ];
    if !path.is_empty() {
        urls.push(format!("{origin}/.well-known/openid-configuration{path}"));
    }
    urls
}

/// Issuer identifiers compare as strings, except that a bare origin may be written with or without its `/`.
fn same_issuer(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The `iss` of a token, read without verifying it: used only to refuse foreign tokens early and to pick whose
/// keys to check the signature with.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_string)
}

/// Scopes from `scope` (RFC 9068: space-separated) or `scp` (an array, as Hydra and Entra write it, or a string).
fn scopes_of(claims: &Value) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    for claim in ["scope", "scp"] {
        match claims.get(claim) {
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(items)) => {
                scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_string))
            }
            _ => {}
        }
    }
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An authorization server serving only RFC 8414 metadata and a JWKS it can rotate, counting key fetches.
    struct Issuer {
        url: String,
        jwks: Arc<std::sync::Mutex<Value>>,
        fetches: Arc<AtomicUsize>,
    }

    async fn issuer() -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(std::sync::Mutex::new(json!({"keys": []})));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc_url, served, counter) = (url.clone(), jwks.clone(), fetches.clone());
        let app = axum::Router::new()
            .route(
                "/.well-known/oauth-authorization-server",
                axum::routing::get(move || {
                    let doc_url = doc_url.clone();
                    async move {
                        axum::Json(
                            json!({"issuer": doc_url, "jwks_uri": format!("{doc_url}/jwks")}),
                        )
                    }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let keys = served.lock().unwrap().clone();
                    async move { axum::Json(keys) }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Issuer { url, jwks, fetches }
    }

    /// An Ed25519 key: its JWK (as published) and a signer.
    fn key(kid: &str) -> (Value, jsonwebtoken::EncodingKey) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let public = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        (
            json!({"kty": "OKP", "crv": "Ed25519", "x": public, "kid": kid, "use": "sig", "alg": "EdDSA"}),
            jsonwebtoken::EncodingKey::from_ed_der(&pair.serialize_der()),
        )
    }

    fn sign(kid: &str, signer: &jsonwebtoken::EncodingKey, iss: &str) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"iss": iss, "aud": "https://app.example/mcp", "sub": "alice",
            "exp": now + 300, "scope": "mcp"});
        jsonwebtoken::encode(&header, &claims, signer).unwrap()
    }

    fn server(issuer: &Issuer, refresh_min_interval: Duration) -> ResourceServer {
        let mut server = ResourceServer::new(OAuthConfig {
            issuers: vec![issuer.url.clone()],
            resource: "https://app.example/mcp".into(),
            audience: "https://app.example/mcp".into(),
            required_scopes: vec!["mcp".into()],
            tool_scopes: Vec::new(),
        })
        .unwrap();
        server.refresh_min_interval = refresh_min_interval;
        server
    }

    #[tokio::test]
    async fn keys_are_discovered_cached_and_refetched_on_an_unknown_kid_at_a_bounded_rate() {
        let issuer = issuer().await;
        let (jwk_a, signer_a) = key("a");
        let (jwk_b, signer_b) = key("b");
        *issuer.jwks.lock().unwrap() = json!({"keys": [jwk_a]});

        let eager = server(&issuer, Duration::ZERO);
        let principal = eager
            .validate(&sign("a", &signer_a, &issuer.url))
            .await
            .unwrap();
        assert_eq!(principal.subject, "alice");
        eager
            .validate(&sign("a", &signer_a, &issuer.url))
            .await
            .unwrap();
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1, "keys are cached");
        // The issuer rotates to b: an unknown kid refetches the keys.
        *issuer.jwks.lock().unwrap() = json!({"keys": [jwk_b]});
        eager
            .validate(&sign("b", &signer_b, &issuer.url))
            .await
            .unwrap();
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);

        // Within the minimum interval, unknown kids are refused without calling the issuer again.
        let (_, signer_c) = key("c");
        let calm = server(&issuer, Duration::from_secs(3600));
        calm.validate(&sign("b", &signer_b, &issuer.url))
            .await
            .unwrap();
        let fetched = issuer.fetches.load(Ordering::SeqCst);
        for _ in 0..5 {
            assert_eq!(
                calm.validate(&sign("c", &signer_c, &issuer.url)).await,
                Err(Refused::Invalid("unknown key"))
            );
        }
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), fetched);
        // A validly signed token naming another issuer is refused before any key is looked at.
        assert_eq!(
            calm.validate(&sign("b", &signer_b, "https://elsewhere.example"))
                .await,
            Err(Refused::Invalid("untrusted issuer"))
        );
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), fetched);
    }
}
