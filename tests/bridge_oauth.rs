//! OAuth 2.1 mode against a real authorization server: Ory Hydra (built by hack/hydra.sh from its Go module),
//! with a login/consent app run here that accepts every login as one test user and grants the authorize
//! request's RFC 8707 `resource` as the token's audience (Hydra itself ignores `resource`).
//!
//! The bridge's child is wrapped in `tee`, so every message that reaches it is in a file: the positive controls
//! show calls arriving there, and each refused request must leave no trace in it.

#[path = "support/bridge_env.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use mcpfly::bridge::{Bridge, BridgeArgs, auth::Auth};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const SUBJECT: &str = "alice@example.test";

/// The Hydra binary: `MCPFLY_HYDRA` (set by hack/test.sh), else built or taken from the cache by hack/hydra.sh.
fn hydra_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MCPFLY_HYDRA") {
        return PathBuf::from(path);
    }
    let out = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/hydra.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running hack/hydra.sh");
    assert!(
        out.status.success(),
        "hack/hydra.sh failed: Go, a C compiler and the Go module proxy are needed to build Ory Hydra for the \
         OAuth tests"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Free ports for a process that binds them itself. Each stays held until all are picked, so no two are the same;
/// what the kernel hands out after the release cannot be helped for a process (Hydra) that cannot bind port 0
/// and say which.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().port())
}

struct Hydra {
    _process: tokio::process::Child,
    issuer: String,
    admin: String,
}

/// Hydra in memory, with DCR on, JWT access tokens, and login/consent delegated to [`consent_app`].
async fn start_hydra() -> Hydra {
    logs(); // installs the crypto provider reqwest needs
    // The consent app binds first, so Hydra's ports are never its.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let [public, admin] = free_ports();
    let app_url = format!("http://{}", app.local_addr().unwrap());
    let issuer = format!("http://127.0.0.1:{public}");
    let admin_url = format!("http://127.0.0.1:{admin}");
    tokio::spawn(consent_app(app, admin_url.clone()));
    let process = tokio::process::Command::new(hydra_binary())
        .args(["serve", "all", "--dev"])
        .env("DSN", "memory")
        .env(
            "SECRETS_SYSTEM",
            "mcpfly-oauth-test-system-secret-0123456789",
        )
        .env("URLS_SELF_ISSUER", &issuer)
        .env("URLS_LOGIN", format!("{app_url}/login"))
        .env("URLS_CONSENT", format!("{app_url}/consent"))
        .env("SERVE_PUBLIC_HOST", "127.0.0.1")
        .env("SERVE_PUBLIC_PORT", public.to_string())
        .env("SERVE_ADMIN_HOST", "127.0.0.1")
        .env("SERVE_ADMIN_PORT", admin.to_string())
        .env("OIDC_DYNAMIC_CLIENT_REGISTRATION_ENABLED", "true")
        // Hydra's discovery leaves registration_endpoint out unless told it.
        .env(
            "WEBFINGER_OIDC_DISCOVERY_CLIENT_REGISTRATION_URL",
            format!("{issuer}/oauth2/register"),
        )
        .env("STRATEGIES_ACCESS_TOKEN", "jwt")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting hydra");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client
            .get(format!("{issuer}/.well-known/openid-configuration"))
            .send()
            .await
            && r.status() == 200
        {
            return Hydra {
                _process: process,
                issuer,
                admin: admin_url,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("hydra did not serve discovery within 60 s");
}

/// The login and consent steps Hydra delegates: every login is [`SUBJECT`]; consent grants the requested scopes
/// and, as audience, the `resource` the client asked for.
async fn consent_app(listener: tokio::net::TcpListener, admin: String) {
    async fn login(
        State(admin): State<String>,
        Query(q): Query<std::collections::HashMap<String, String>>,
    ) -> Response {
        let accepted: Value = reqwest::Client::new()
            .put(format!(
                "{admin}/admin/oauth2/auth/requests/login/accept?login_challenge={}",
                q["login_challenge"]
            ))
            .json(&json!({"subject": SUBJECT}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Redirect::to(accepted["redirect_to"].as_str().unwrap()).into_response()
    }
    async fn consent(
        State(admin): State<String>,
        Query(q): Query<std::collections::HashMap<String, String>>,
    ) -> Response {
        let challenge = &q["consent_challenge"];
        let http = reqwest::Client::new();
        let request: Value = http
            .get(format!(
                "{admin}/admin/oauth2/auth/requests/consent?consent_challenge={challenge}"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let request_url = reqwest::Url::parse(&format!(
            "http://x{}",
            request["request_url"].as_str().unwrap_or("/")
        ))
        .or_else(|_| reqwest::Url::parse(request["request_url"].as_str().unwrap()))
        .unwrap();
        let resources: Vec<String> = request_url
            .query_pairs()
            .filter(|(k, _)| k == "resource")
            .map(|(_, v)| v.into_owned())
            .collect();
        let accepted: Value = http
            .put(format!(
                "{admin}/admin/oauth2/auth/requests/consent/accept?consent_challenge={challenge}"
            ))
            .json(&json!({
                "grant_scope": request["requested_scope"],
                "grant_access_token_audience": resources,
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Redirect::to(accepted["redirect_to"].as_str().unwrap()).into_response()
    }
    let app = axum::Router::new()
        .route("/login", axum::routing::get(login))
        .route("/consent", axum::routing::get(consent))
        .with_state(admin);
    axum::serve(listener, app).await.unwrap();
}

/// A bridge in OAuth mode trusting `issuer`; its child's stdin is copied to `received`.
async fn start_oauth_bridge(issuer: &str, received: &Path, extra: &[&str]) -> (Bridge, String) {
    logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resource = format!("http://{}/mcp", listener.local_addr().unwrap());
    let script = format!(
        "tee -a '{}' | exec '{}'",
        received.display(),
        test_server().display()
    );
    let mut args: Vec<String> = [
        "--path",
        "/mcp",
        "--oauth-issuer",
        issuer,
        "--oauth-resource",
        &resource,
        "--oauth-scope",
        "mcp",
        "--oauth-tool-scope",
        "add=math",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--", "/bin/sh", "-c", &script].map(String::from));
    let args = BridgeArgs::parse_from(args).unwrap();
    let auth = args.auth(None).unwrap();
    let bridge = mcpfly::bridge::start(args, auth, listener).await.unwrap();
    wait_ready(&bridge).await;
    (bridge, resource)
}

/// A `tools/call` in the 2026-07-28 envelope (one stateless POST), `token` as the bearer when given.
async fn call_tool(
    url: &str,
    token: Option<&str>,
    tool: &str,
    arguments: Value,
) -> reqwest::Response {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
    "name": tool, "arguments": arguments,
    "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }}});
    let mut request = reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// A client-credentials client on Hydra allowed `audiences`, and a token for `audience` with `scope`.
async fn hydra_client(hydra: &Hydra, audiences: &[&str]) -> (String, String) {
    let client: Value = reqwest::Client::new()
        .post(format!("{}/admin/clients", hydra.admin))
        .json(&json!({
            "grant_types": ["client_credentials"],
            "scope": "mcp math",
            "audience": audiences,
            "token_endpoint_auth_method": "client_secret_post",
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        client["client_id"].as_str().unwrap().to_string(),
        client["client_secret"].as_str().unwrap().to_string(),
    )
}

async fn hydra_token(
    hydra: &Hydra,
    client: &(String, String),
    audience: &str,
    scope: &str,
) -> String {
    // reqwest is built without its form feature; the URL serializer writes the same encoding.
    let mut form = reqwest::Url::parse("http://form.invalid/").unwrap();
    form.query_pairs_mut().extend_pairs([
        ("grant_type", "client_credentials"),
        ("client_id", client.0.as_str()),
        ("client_secret", client.1.as_str()),
        ("audience", audience),
        ("scope", scope),
    ]);
    let response: Value = reqwest::Client::new()
        .post(format!("{}/oauth2/token", hydra.issuer))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.query().unwrap().to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token from hydra: {response}"))
        .to_string()
}

fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

/// A JWT signed by a key of our own (EdDSA), listed in no JWKS the bridge trusts.
fn self_signed(claims: &Value) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ed_der(&key.serialize_der());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("not-hydras".into());
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

fn received(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_completes_the_oauth_flow_against_hydra_and_calls_tools() {
    let hydra = start_hydra().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received");
    let (bridge, resource) = start_oauth_bridge(&hydra.issuer, &log, &[]).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py_oauth_client.py");
    let output = tokio::process::Command::new(python())
        .arg(script)
        .args([resource.as_str(), "oauth-marker-7f3a"])
        .output()
        .await
        .expect("running the Python OAuth client");
    assert!(
        output.status.success(),
        "Python OAuth client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let token = out["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("the Python OAuth client got no token: {out}"))
        .to_string();
    let mut shown = out.clone();
    shown.as_object_mut().unwrap().remove("access_token");
    eprintln!("Python OAuth client: {shown}");
    let out = shown;
    assert_eq!(out["registered"], true, "DCR happened: {out}");
    assert_eq!(
        out["resource_requested"],
        json!([resource]),
        "RFC 8707 resource sent"
    );
    assert_eq!(out["protocol_version"], "2026-07-28");
    assert!(out["tools"].as_array().unwrap().iter().any(|t| t == "echo"));
    assert_eq!(out["echo"], "oauth-marker-7f3a");
    // `add` needs `math`: the 403 insufficient_scope made the SDK step up, asking for both scopes (plus the
    // `offline_access` it adds for a refresh token). Hydra refuses a scope a dynamically registered client did not
    // register (the first challenge named `mcp` only).
    assert_eq!(
        out["scopes_requested"],
        json!(["mcp offline_access", "mcp offline_access math"]),
        "{out}"
    );
    assert!(
        out["error"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_scope"),
        "{out}"
    );
    // The token is audience-bound to this endpoint, by Hydra, for the test user.
    let claims = claims_of(&token);
    assert_eq!(claims["aud"], json!([resource]));
    assert_eq!(claims["sub"], SUBJECT);

    // No token passthrough: the child saw the call, never the credential.
    let seen = received(&log);
    assert!(
        seen.contains("oauth-marker-7f3a"),
        "the call reached the child"
    );
    assert!(!seen.contains(&token) && !seen.to_ascii_lowercase().contains("bearer"));
    // The audit trail names the subject, never the token.
    let logs = logs();
    assert!(!logs.text().contains(&token), "token in the logs");
    assert!(
        logs.audit_lines()
            .iter()
            .any(|l| l["subject"] == SUBJECT && l["tool"] == "echo" && l["status"] == 200),
        "audit line with the subject"
    );
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_get_the_right_status_and_never_reach_the_child() {
    let hydra = start_hydra().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received");
    let (bridge, resource) = start_oauth_bridge(&hydra.issuer, &log, &[]).await;
    let url = resource.clone();
    let client = hydra_client(&hydra, &[&resource, "https://elsewhere.example/mcp"]).await;
    let good = hydra_token(&hydra, &client, &resource, "mcp math").await;
    let base = format!("http://{}", bridge.addr());

    // Discovery: RFC 9728 metadata at both well-known forms, and the 401 challenge pointing at it.
    for path in [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
    ] {
        let prm: Value = reqwest::get(format!("{base}{path}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(prm["resource"], resource);
        assert_eq!(prm["authorization_servers"], json!([hydra.issuer]));
        assert_eq!(prm["scopes_supported"], json!(["mcp", "math"]));
        assert_eq!(prm["bearer_methods_supported"], json!(["header"]));
    }

    // Positive control first: the same request shape with a good token reaches the child.
    let r = call_tool(&url, Some(&good), "echo", json!({"text": "control-1"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let expired_client = hydra_client(&hydra, &[&resource]).await;
    let lifespans = reqwest::Client::new()
        .put(format!(
            "{}/admin/clients/{}/lifespans",
            hydra.admin, expired_client.0
        ))
        .json(&json!({"client_credentials_grant_access_token_lifespan": "-1h"}))
        .send()
        .await
        .unwrap();
    assert!(
        lifespans.status().is_success(),
        "{:?}",
        lifespans.text().await
    );
    let expired = hydra_token(&hydra, &expired_client, &resource, "mcp").await;
    assert!(claims_of(&expired)["exp"].as_i64().unwrap() < chrono::Utc::now().timestamp() - 120);

    let wrong_audience =
        hydra_token(&hydra, &client, "https://elsewhere.example/mcp", "mcp math").await;
    let no_scope = hydra_token(&hydra, &client, &resource, "math").await;
    let tampered = {
        let (rest, signature) = good.rsplit_once('.').unwrap();
        let mut bytes = B64.decode(signature).unwrap();
        bytes[10] ^= 0x01;
        format!("{rest}.{}", B64.encode(bytes))
    };
    let alg_none = {
        let payload = good.split('.').nth(1).unwrap();
        format!(
            "{}.{payload}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#)
        )
    };
    let mut foreign_claims = claims_of(&good);
    foreign_claims["iss"] = json!("https://issuer.elsewhere.example");
    let wrong_issuer = self_signed(&foreign_claims);
    // HMAC with Hydra's kid: a verifier that took the public JWK as a shared secret could be fooled.
    let hmac = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = jsonwebtoken::decode_header(&good).unwrap().kid;
        jsonwebtoken::encode(
            &header,
            &claims_of(&good),
            &jsonwebtoken::EncodingKey::from_secret(b"any secret"),
        )
        .unwrap()
    };
    // Hydra's own issuer, signed with a key Hydra never published.
    let forged = self_signed(&claims_of(&good));

    let www = |r: &reqwest::Response| {
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let metadata =
        format!(r#"resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#);
    for (case, token, status, error) in [
        ("missing", None, 401, None),
        (
            "wrong audience",
            Some(&wrong_audience),
            401,
            Some("invalid_token"),
        ),
        (
            "wrong issuer",
            Some(&wrong_issuer),
            401,
            Some("invalid_token"),
        ),
        ("unknown key", Some(&forged), 401, Some("invalid_token")),
        ("expired", Some(&expired), 401, Some("invalid_token")),
        (
            "tampered signature",
            Some(&tampered),
            401,
            Some("invalid_token"),
        ),
        (
            "none algorithm",
            Some(&alg_none),
            401,
            Some("invalid_token"),
        ),
        ("hmac algorithm", Some(&hmac), 401, Some("invalid_token")),
        (
            "missing scope",
            Some(&no_scope),
            403,
            Some("insufficient_scope"),
        ),
    ] {
        let r = call_tool(
            &url,
            token.map(String::as_str),
            "echo",
            json!({"text": "refused-call"}),
        )
        .await;
        let challenge = www(&r);
        assert_eq!(r.status().as_u16(), status, "{case}: {challenge}");
        assert!(challenge.contains(&metadata), "{case}: {challenge}");
        match error {
            Some(error) => assert!(
                challenge.contains(&format!(r#"error="{error}""#)),
                "{case}: {challenge}"
            ),
            None => assert!(!challenge.contains("error="), "{case}: {challenge}"),
        }
        assert!(challenge.contains(r#"scope="mcp"#), "{case}: {challenge}");
    }
    // A per-tool scope: the token without `math` may call echo but not add (403 naming both scopes).
    let mcp_only = hydra_token(&hydra, &client, &resource, "mcp").await;
    let r = call_tool(
        &url,
        Some(&mcp_only),
        "add",
        json!({"a": 1, "b": 2, "text": "refused-call"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        www(&r).contains(r#"error="insufficient_scope", scope="mcp math""#),
        "{}",
        www(&r)
    );
    // The token in the query string instead of the header: 400, even when the token is good.
    let r = call_tool(
        &format!("{url}?access_token={good}"),
        None,
        "echo",
        json!({"text": "refused-call"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(www(&r).contains(r#"error="invalid_request""#));

    // Positive control after: the good tokens still get through, and only they reached the child.
    let r = call_tool(&url, Some(&mcp_only), "echo", json!({"text": "control-2"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r: Value = call_tool(&url, Some(&good), "add", json!({"a": 40, "b": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["result"]["content"][0]["text"], "42", "{r}");
    let seen = received(&log);
    assert!(
        seen.contains("control-1") && seen.contains("control-2"),
        "{seen}"
    );
    assert!(
        !seen.contains("refused-call"),
        "a refused request reached the child"
    );
    assert!(!seen.contains(&good) && !seen.to_ascii_lowercase().contains("bearer"));
    assert!(!logs().text().contains(&good), "token in the logs");
    bridge.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_mode_serves_no_oauth_discovery() {
    let bridge = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    let base = format!("http://{}", bridge.addr());
    for path in [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
    ] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let r = call_tool(&url(&bridge), None, "echo", json!({"text": "x"})).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], r#"Bearer realm="mcpfly""#);
    // Positive control: the same request with the token gets through.
    let r = call_tool(&url(&bridge), Some(TOKEN), "echo", json!({"text": "x"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    bridge.shutdown().await.unwrap();
}

/// The controller's check after Ready for `auth: oauth` (no token to handshake with): an OAuth endpoint passes,
/// and one that is open, bearer-protected, or advertises another issuer does not. No authorization server is
/// contacted by it, so none runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_oauth_check_tells_a_discoverable_endpoint_from_others() {
    let issuer = "http://127.0.0.1:9".to_string();
    let dir = tempfile::tempdir().unwrap();
    let (oauth, resource) = start_oauth_bridge(&issuer, &dir.path().join("received"), &[]).await;
    let found = mcpfly::bridge::verify_oauth(&resource, std::slice::from_ref(&issuer))
        .await
        .unwrap();
    assert_eq!(found.authorization_servers, vec![issuer.clone()]);
    assert!(
        found
            .metadata_url
            .ends_with("/.well-known/oauth-protected-resource/mcp")
    );
    let other = mcpfly::bridge::verify_oauth(&resource, &["https://other.example".to_string()])
        .await
        .unwrap_err();
    assert!(
        other.to_string().contains("names authorization servers"),
        "{other}"
    );
    oauth.shutdown().await.unwrap();

    let bearer = start_bridge(&[], Auth::bearer(TOKEN.into())).await;
    let refused = mcpfly::bridge::verify_oauth(&url(&bearer), std::slice::from_ref(&issuer))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("names no resource_metadata"),
        "{refused}"
    );
    bearer.shutdown().await.unwrap();

    let open = start_bridge(&[], Auth::disabled()).await;
    wait_ready(&open).await;
    let refused = mcpfly::bridge::verify_oauth(&url(&open), std::slice::from_ref(&issuer))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not 401"), "{refused}");
    open.shutdown().await.unwrap();
}
