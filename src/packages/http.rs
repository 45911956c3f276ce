//! Registry HTTP: timeouts, retries with backoff, auth, and the mapping of answers to [`ResolveError`]s.

use std::time::Duration;

use reqwest::{Client, StatusCode, header};

use super::ResolveError;
use super::config::RegistrySecret;

#[derive(Clone)]
pub enum Auth {
    None,
    Bearer(RegistrySecret),
    Basic(String, Option<RegistrySecret>),
}

/// One registry: a base URL, its credentials and the shared client.
#[derive(Clone)]
pub struct Registry {
    pub base: String,
    auth: Auth,
    client: Client,
    retries: u32,
}

/// What a GET found.
pub enum Fetched {
    Found(Vec<u8>),
    NotFound,
    /// Another 4xx (e.g. 406 from an index without the JSON Simple API).
    Refused(u16),
}

/// Largest registry document read (large npm packuments run to tens of MB in full form; abbreviated ones are
/// smaller). Bigger answers are refused rather than held in memory.
const MAX_BODY: usize = 64 << 20;

impl Registry {
    pub fn new(base: &str, auth: Auth, client: Client, retries: u32) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            auth,
            client,
            retries,
        }
    }

    /// GET `{base}{path}` with `accept`, retrying timeouts, connection failures, 429 and 5xx.
    pub async fn get(&self, path: &str, accept: &str) -> Result<Fetched, ResolveError> {
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        loop {
            let outcome = self.get_once(&url, accept).await;
            match outcome {
                Err(Retry(message)) if attempt < self.retries => {
                    tracing::debug!(%url, attempt, %message, "registry request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
                Err(Retry(message)) => {
                    return Err(ResolveError::transient(format!(
                        "{} after {} attempt(s): {message}; the controller retries with backoff",
                        self.base,
                        attempt + 1
                    )));
                }
                Ok(result) => return result,
            }
        }
    }

    async fn get_once(
        &self,
        url: &str,
        accept: &str,
    ) -> Result<Result<Fetched, ResolveError>, Retry> {
        let mut request = self.client.get(url).header(header::ACCEPT, accept);
        request = match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token.expose()),
            Auth::Basic(user, password) => {
                request.basic_auth(user, password.as_ref().map(|p| p.expose()))
            }
        };
        let response = request.send().await.map_err(|e| Retry(describe(e)))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Ok(Ok(Fetched::NotFound));
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Retry(format!("HTTP {status}")));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Ok(Err(ResolveError::transient(format!(
                "{} refused the controller's credentials (HTTP {status}); check the registry token or user/password in the controller's configuration",
                self.base
            ))));
        }
        if status.is_client_error() {
            return Ok(Ok(Fetched::Refused(status.as_u16())));
        }
        if !status.is_success() {
            return Ok(Err(ResolveError::transient(format!(
                "{} answered HTTP {status}",
                self.base
            ))));
        }
        if response
            .content_length()
            .is_some_and(|len| len as usize > MAX_BODY)
        {
            return Ok(Err(ResolveError::transient(format!(
                "{url}: document larger than {MAX_BODY} bytes"
            ))));
        }
        let body = response.bytes().await.map_err(|e| Retry(describe(e)))?;
        if body.len() > MAX_BODY {
            return Ok(Err(ResolveError::transient(format!(
                "{url}: document larger than {MAX_BODY} bytes"
            ))));
        }
        Ok(Ok(Fetched::Found(body.to_vec())))
    }
}

struct Retry(String);

fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        // Without the URL: it is in the message already and may carry credentials in userinfo.
        e.without_url().to_string()
    }
}

/// The shared client; the TLS provider must be installed before the first one is built.
pub fn client(timeout: Duration) -> Result<Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("mcpfly/", env!("CARGO_PKG_VERSION")))
        .build()
}
