//! A local package registry for tests: serves npm packuments and PyPI JSON/Simple documents shaped like the real
//! ones on 127.0.0.1, counts every request by path, records headers, and injects delays and failures.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Clone)]
enum Content {
    Json(Value),
    /// A file (tarball, wheel) as `application/octet-stream`.
    Bytes(Vec<u8>),
}

#[derive(Clone)]
struct Route {
    status: StatusCode,
    body: Content,
    delay: Duration,
    /// Answer 503 this many times before the real answer.
    fail_first: u32,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    hits: HashMap<String, u32>,
    headers: Vec<(String, Option<String>, Option<String>)>,
}

/// A running registry; dropped with the test's runtime.
#[derive(Clone)]
pub struct FakeRegistry {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeRegistry {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let app = Router::new().fallback(move |req: Request<Body>| {
            let state = shared.clone();
            async move { answer(state, req).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Serve `body` at the raw (still percent-encoded) `path`.
    pub fn serve(&self, path: &str, body: Value) {
        self.route(path, StatusCode::OK, body, Duration::ZERO, 0);
    }

    pub fn route(
        &self,
        path: &str,
        status: StatusCode,
        body: Value,
        delay: Duration,
        fail_first: u32,
    ) {
        self.state.lock().unwrap().routes.insert(
            path.to_string(),
            Route {
                status,
                body: Content::Json(body),
                delay,
                fail_first,
            },
        );
    }

    /// Serve a file's `bytes` at `path`.
    pub fn serve_file(&self, path: &str, bytes: Vec<u8>) {
        self.state.lock().unwrap().routes.insert(
            path.to_string(),
            Route {
                status: StatusCode::OK,
                body: Content::Bytes(bytes),
                delay: Duration::ZERO,
                fail_first: 0,
            },
        );
    }

    /// Requests received for `path`.
    pub fn hits(&self, path: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_hits(&self) -> u32 {
        self.state.lock().unwrap().hits.values().sum()
    }

    /// `(path, Authorization, Accept)` of every request, in order.
    pub fn headers(&self) -> Vec<(String, Option<String>, Option<String>)> {
        self.state.lock().unwrap().headers.clone()
    }
}

async fn answer(state: Arc<Mutex<State>>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let record = {
        let header_of = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (
            path.clone(),
            header_of(header::AUTHORIZATION),
            header_of(header::ACCEPT),
        )
    };
    drop(req);
    let route = {
        let mut state = state.lock().unwrap();
        *state.hits.entry(path.clone()).or_default() += 1;
        state.headers.push(record);
        match state.routes.get_mut(&path) {
            Some(route) if route.fail_first > 0 => {
                route.fail_first -= 1;
                None
            }
            Some(route) => Some(Ok(route.clone())),
            None => Some(Err(())),
        }
    };
    match route {
        None => (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response(),
        Some(Err(())) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "Not found"})),
        )
            .into_response(),
        Some(Ok(route)) => {
            tokio::time::sleep(route.delay).await;
            match route.body {
                Content::Json(body) => (route.status, axum::Json(body)).into_response(),
                Content::Bytes(bytes) => (
                    route.status,
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    bytes,
                )
                    .into_response(),
            }
        }
    }
}

/// An abbreviated npm packument (`application/vnd.npm.install-v1+json`) as registry.npmjs.org serves it.
/// `versions`: `(version, deprecated message)`.
pub fn packument(
    name: &str,
    latest: &str,
    versions: &[(&str, Option<&str>)],
    extra_tags: &[(&str, &str)],
) -> Value {
    let mut tags = serde_json::Map::new();
    tags.insert("latest".into(), json!(latest));
    for (tag, v) in extra_tags {
        tags.insert(tag.to_string(), json!(v));
    }
    let mut vs = serde_json::Map::new();
    for (v, deprecated) in versions {
        let mut manifest = json!({
            "name": name,
            "version": v,
            "dependencies": {"@modelcontextprotocol/sdk": "^1.0.0"},
            "bin": {name.rsplit('/').next().unwrap(): "dist/index.js"},
            "engines": {"node": ">=18"},
            "dist": {
                "integrity": integrity(name, v),
                "shasum": "d73c918731cb5a87da047e207234146f664d12b3",
                "tarball": format!("https://registry.example/{name}/-/{}-{v}.tgz", name.rsplit('/').next().unwrap()),
                "fileCount": 12,
                "unpackedSize": 40321,
                "signatures": [{"keyid": "SHA256:jl3bwswu80PjjokCgh0o2w5c2U4LhQAE57gj9cz1kzA", "sig": "MEUCIQ..."}],
            },
        });
        if let Some(message) = deprecated {
            manifest["deprecated"] = json!(message);
        }
        vs.insert(v.to_string(), manifest);
    }
    json!({
        "name": name,
        "dist-tags": tags,
        "modified": "2025-04-08T12:00:00.000Z",
        "versions": vs,
    })
}

/// A deterministic fake `sha512-` integrity per name and version.
pub fn integrity(name: &str, version: &str) -> String {
    format!(
        "sha512-{}{}==",
        name.replace(['@', '/', '-'], ""),
        version.replace('.', "")
    )
}

/// The security holding package npm publishes after removing a malicious one (full-document form).
pub fn security_placeholder(name: &str) -> Value {
    json!({
        "_id": name,
        "name": name,
        "dist-tags": {"latest": "0.0.1-security"},
        "versions": {"0.0.1-security": {
            "name": name, "version": "0.0.1-security",
            "description": "security holding package",
            "repository": "npm/security-holder",
            "dist": {"integrity": "sha512-placeholder==", "shasum": "ffd6ae6a6e9035d811f6dde88f8393c63b71ad6e",
                     "tarball": format!("https://registry.example/{name}/-/{name}-0.0.1-security.tgz")},
        }},
        "time": {"0.0.1-security": "2024-12-09T00:15:25.297Z"},
    })
}

/// A PyPI file entry as the JSON API lists it.
pub fn pypi_file(filename: &str, sha256: &str, yanked: Option<&str>) -> Value {
    json!({
        "comment_text": null,
        "digests": {"blake2b_256": "38478a05", "md5": "261e5a7c", "sha256": sha256},
        "filename": filename,
        "has_sig": false,
        "md5_digest": "261e5a7c",
        "packagetype": if filename.ends_with(".whl") { "bdist_wheel" } else { "sdist" },
        "python_version": if filename.ends_with(".whl") { "py3" } else { "source" },
        "requires_python": ">=3.10",
        "size": 15534,
        "upload_time": "2025-04-07T12:00:00",
        "upload_time_iso_8601": "2025-04-07T12:00:00.000000Z",
        "url": format!("https://files.example/packages/{filename}"),
        "yanked": yanked.is_some(),
        "yanked_reason": yanked,
    })
}

/// `GET /pypi/<name>/json` for a project; `releases`: `(version, yanked reason)`, each with a wheel and an sdist.
/// Hashes are `sha256("<version>-whl")`-like placeholders: `<version>w` and `<version>s` padded.
pub fn pypi_project(name: &str, latest: &str, releases: &[(&str, Option<&str>)]) -> Value {
    let module = name.replace('-', "_");
    let files = |v: &str, yanked: Option<&str>| {
        json!([
            pypi_file(
                &format!("{module}-{v}-py3-none-any.whl"),
                &wheel_sha(v),
                yanked
            ),
            pypi_file(&format!("{module}-{v}.tar.gz"), &sdist_sha(v), yanked),
        ])
    };
    let mut rel = serde_json::Map::new();
    for (v, yanked) in releases {
        rel.insert(v.to_string(), files(v, *yanked));
    }
    json!({
        "info": {
            "author": null, "author_email": "Anthropic <support@anthropic.com>",
            "classifiers": ["Programming Language :: Python :: 3.10"],
            "description": "# server", "description_content_type": "text/markdown",
            "home_page": null, "license": "MIT", "name": name,
            "package_url": format!("https://pypi.example/project/{name}/"),
            "project_urls": null, "requires_dist": ["mcp>=1.1.3"], "requires_python": ">=3.10",
            "summary": "A Model Context Protocol server", "version": latest,
            "yanked": false, "yanked_reason": null,
        },
        "last_serial": 28000000,
        "releases": rel,
        "urls": files(latest, None),
        "vulnerabilities": [],
    })
}

pub fn wheel_sha(version: &str) -> String {
    format!("{:a<64}", format!("{}w", version.replace('.', "")))
}

pub fn sdist_sha(version: &str) -> String {
    format!("{:b<64}", format!("{}s", version.replace('.', "")))
}

/// `GET /simple/<name>/` in its JSON form (PEP 691, with a PEP 792 status when given).
pub fn simple(name: &str, status: Option<(&str, &str)>) -> Value {
    let mut doc = json!({
        "meta": {"api-version": "1.4", "_last-serial": 28000000},
        "name": name,
        "versions": [],
        "files": [],
    });
    if let Some((status, reason)) = status {
        doc["project-status"] = json!({"status": status, "reason": reason});
    }
    doc
}
