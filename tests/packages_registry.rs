//! Resolution against a local registry serving npm packuments and PyPI JSON documents shaped like the real ones:
//! every supply-chain check, ranges and dist-tags, scoped names, PEP 503 names, the cache, retries and timeouts.
//! One opt-in test (`MCPFLY_TEST_PUBLIC_REGISTRIES=1`) asks the public registries.

#[path = "support/bridge_env.rs"]
mod bridge_env;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use mcpfly::api::{MCPDeploymentStatus, PackageSource, PypiSource, Source};
use mcpfly::packages::{
    RegistryResolver, RegistrySecret, ResolveError, ResolvedKind, ResolverConfig, SourceResolver,
    reason, resolve_pinned, server_argv,
};
use serde_json::json;
use support::registry::{self as fake, FakeRegistry};

fn npm(package: &str, version: Option<&str>) -> Source {
    Source {
        npm: Some(PackageSource {
            package: package.into(),
            version: version.map(Into::into),
            args: vec!["--stdio".into()],
        }),
        ..Default::default()
    }
}

fn pypi(package: &str, version: Option<&str>) -> Source {
    Source {
        pypi: Some(PypiSource {
            package: package.into(),
            version: version.map(Into::into),
            command: None,
            args: vec![],
        }),
        ..Default::default()
    }
}

fn config(registry: &FakeRegistry) -> ResolverConfig {
    ResolverConfig {
        npm_registry: registry.url.clone(),
        pypi_index: format!("{}/", registry.url),
        registry_timeout_seconds: 2.0,
        registry_retries: 0,
        ..Default::default()
    }
}

fn resolver(config: &ResolverConfig) -> RegistryResolver {
    RegistryResolver::new(config).expect("resolver")
}

async fn err(resolver: &RegistryResolver, source: &Source) -> ResolveError {
    resolver
        .resolve_checked(source)
        .await
        .expect_err("expected a resolution error")
}

const SCOPED: &str = "@acme/server-things";
const SCOPED_PATH: &str = "/@acme%2Fserver-things";

fn serve_scoped(registry: &FakeRegistry) {
    registry.serve(
        SCOPED_PATH,
        fake::packument(
            SCOPED,
            "1.4.0",
            &[
                ("1.2.0", None),
                ("1.2.5", Some("1.2.x leaks tokens in logs; upgrade to 1.4")),
                ("1.3.0", None),
                ("1.4.0", None),
                ("2.0.0-beta.1", None),
            ],
            &[("next", "2.0.0-beta.1")],
        ),
    );
}

#[tokio::test]
async fn npm_versions_ranges_and_tags_on_a_scoped_name() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    let resolver = resolver(&config(&registry));
    let cases = [
        (None, "1.4.0"),
        (Some("latest"), "1.4.0"),
        (Some("next"), "2.0.0-beta.1"),
        (Some("1.3.0"), "1.3.0"),
        (Some("^1.2"), "1.4.0"),
        (Some("~1.2.0"), "1.2.0"),
        (Some(">=1 <1.4"), "1.3.0"),
        (Some("1.x"), "1.4.0"),
        (Some("*"), "1.4.0"),
    ];
    for (spec, want) in cases {
        let resolution = resolver.resolve_checked(&npm(SCOPED, spec)).await.unwrap();
        assert_eq!(
            resolution.resolved.kind,
            ResolvedKind::Npm {
                package: SCOPED.into(),
                version: want.into(),
                args: vec!["--stdio".into()],
            },
            "{spec:?}"
        );
        assert_eq!(
            resolution.resolved.integrity.as_deref(),
            Some(fake::integrity(SCOPED, want).as_str()),
            "{spec:?}"
        );
        assert!(resolution.warnings.is_empty(), "{spec:?}");
    }
    let resolved = resolver.resolve(&npm(SCOPED, Some("^1.2"))).await.unwrap();
    assert_eq!(
        server_argv(&resolved).unwrap(),
        ["npx", "-y", "@acme/server-things@1.4.0", "--stdio"]
    );
    // The scoped name went out with `/` as %2F, asking for the abbreviated document; one fetch served all.
    assert_eq!(registry.hits(SCOPED_PATH), 1);
    let (path, auth, accept) = &registry.headers()[0];
    assert_eq!(path, SCOPED_PATH);
    assert_eq!(auth, &None);
    assert!(
        accept
            .as_deref()
            .unwrap()
            .starts_with("application/vnd.npm.install-v1+json")
    );
}

#[tokio::test]
async fn npm_checks_stall_with_their_own_reasons() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    registry.serve("/crossenv", fake::security_placeholder("crossenv"));
    let resolver = resolver(&config(&registry));

    let e = err(&resolver, &npm("@acme/does-not-exist", None)).await;
    assert_eq!(e.reason, reason::PACKAGE_NOT_FOUND);
    assert!(!e.transient);
    assert!(
        e.message.contains("check spec.source.npm.package"),
        "{}",
        e.message
    );

    let e = err(&resolver, &npm(SCOPED, Some("^3"))).await;
    assert_eq!(e.reason, reason::VERSION_NOT_FOUND);
    assert!(e.message.contains("latest: 1.4.0"), "{}", e.message);
    let e = err(&resolver, &npm(SCOPED, Some("canary"))).await;
    assert_eq!(e.reason, reason::VERSION_NOT_FOUND);
    assert!(e.message.contains("dist-tag `canary`"), "{}", e.message);

    let e = err(&resolver, &npm("crossenv", None)).await;
    assert_eq!(e.reason, reason::SECURITY_PLACEHOLDER);
    assert!(e.message.contains("Do not run it"), "{}", e.message);

    // Deprecated: a warning by default ...
    let r = resolver
        .resolve_checked(&npm(SCOPED, Some("1.2.5")))
        .await
        .unwrap();
    assert_eq!(r.warnings.len(), 1);
    assert_eq!(r.warnings[0].reason, reason::PACKAGE_DEPRECATED);
    assert!(r.warnings[0].message.contains("leaks tokens"));
    // ... and a range avoids deprecated versions when it can.
    let r = resolver
        .resolve_checked(&npm(SCOPED, Some(">=1.2 <1.3")))
        .await
        .unwrap();
    assert_eq!(r.resolved.display(), "@acme/server-things@1.2.0");
    // ... blocking under policy.
    let blocking = RegistryResolver::new(&ResolverConfig {
        block_deprecated: true,
        ..config(&registry)
    })
    .unwrap();
    let e = err(&blocking, &npm(SCOPED, Some("1.2.5"))).await;
    assert_eq!(e.reason, reason::PACKAGE_DEPRECATED);

    // Grammar violations never reach the registry.
    let before = registry.total_hits();
    for bad in ["Bad-Name", "foo; rm -rf /", "@a/b/c", "$(id)"] {
        let e = err(&resolver, &npm(bad, None)).await;
        assert_eq!(e.reason, reason::INVALID_PACKAGE_NAME, "{bad}");
    }
    assert_eq!(registry.total_hits(), before);
}

#[tokio::test]
async fn policy_allow_deny_and_required_versions() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    registry.serve(
        "/left-pad",
        fake::packument("left-pad", "1.3.0", &[("1.3.0", None)], &[]),
    );
    let resolver = resolver(&ResolverConfig {
        package_allow: vec!["@acme/*".into(), "pypi:mcp-server-*".into()],
        package_deny: vec!["@acme/server-evil".into()],
        require_version: true,
        ..config(&registry)
    });
    assert_eq!(
        err(&resolver, &npm("@acme/server-evil", Some("1.0.0")))
            .await
            .reason,
        reason::PACKAGE_DENIED
    );
    let e = err(&resolver, &npm("left-pad", Some("1.3.0"))).await;
    assert_eq!(e.reason, reason::PACKAGE_NOT_ALLOWED);
    assert!(e.message.contains("@acme/*"), "{}", e.message);
    for spec in [None, Some("^1.2"), Some("latest")] {
        assert_eq!(
            err(&resolver, &npm(SCOPED, spec)).await.reason,
            reason::VERSION_REQUIRED,
            "{spec:?}"
        );
    }
    assert!(resolver.resolve(&npm(SCOPED, Some("1.3.0"))).await.is_ok());
    // PyPI names are matched in PEP 503 form.
    assert_eq!(
        err(&resolver, &pypi("Other_Project", Some("1.0")))
            .await
            .reason,
        reason::PACKAGE_NOT_ALLOWED
    );
    assert_eq!(registry.hits("/left-pad"), 0);
}

fn serve_fetch(registry: &FakeRegistry) {
    registry.serve(
        "/pypi/mcp-server-fetch/json",
        fake::pypi_project(
            "mcp-server-fetch",
            "2025.4.7",
            &[
                ("0.6.2", None),
                ("2025.1.17", Some("broken entry point")),
                ("2025.4.7", None),
                ("2026.1.0rc1", None),
            ],
        ),
    );
    registry.serve(
        "/simple/mcp-server-fetch/",
        fake::simple("mcp-server-fetch", Some(("active", ""))),
    );
}

#[tokio::test]
async fn pypi_versions_names_and_integrity() {
    let registry = FakeRegistry::start().await;
    serve_fetch(&registry);
    let resolver = resolver(&config(&registry));
    // PEP 503: any spelling reaches the normalised document.
    for name in ["mcp-server-fetch", "MCP_Server.Fetch", "mcp__server--fetch"] {
        let r = resolver.resolve_checked(&pypi(name, None)).await.unwrap();
        assert_eq!(r.resolved.display(), format!("{name}==2025.4.7"));
        assert_eq!(
            r.resolved.integrity,
            Some(format!("sha256:{}", fake::wheel_sha("2025.4.7")))
        );
    }
    let r = resolver
        .resolve(&pypi("mcp-server-fetch", Some("0.6.2")))
        .await
        .unwrap();
    assert_eq!(
        server_argv(&r).unwrap(),
        [
            "uvx",
            "--from",
            "mcp-server-fetch==0.6.2",
            "mcp-server-fetch"
        ]
    );
    let e = err(&resolver, &pypi("mcp-server-fetch", Some("2025.1.17"))).await;
    assert_eq!(e.reason, reason::RELEASE_YANKED);
    assert!(e.message.contains("broken entry point"), "{}", e.message);
    assert_eq!(
        err(&resolver, &pypi("mcp-server-fetch", Some("9.9.9")))
            .await
            .reason,
        reason::VERSION_NOT_FOUND
    );
    assert_eq!(
        err(&resolver, &pypi("no-such-project", None)).await.reason,
        reason::PACKAGE_NOT_FOUND
    );
    assert_eq!(
        err(&resolver, &pypi("-bad-", None)).await.reason,
        reason::INVALID_PACKAGE_NAME
    );
    // One document and one status look-up served every spelling.
    assert_eq!(registry.hits("/pypi/mcp-server-fetch/json"), 1);
    assert_eq!(registry.hits("/simple/mcp-server-fetch/"), 1);
    let simple = registry
        .headers()
        .into_iter()
        .find(|(p, _, _)| p.starts_with("/simple/"))
        .unwrap();
    assert_eq!(
        simple.2.as_deref(),
        Some("application/vnd.pypi.simple.v1+json")
    );
}

#[tokio::test]
async fn pypi_console_script_differs_from_the_package() {
    let registry = FakeRegistry::start().await;
    serve_fetch(&registry);
    let resolver = resolver(&config(&registry));
    let mut source = pypi("mcp-server-fetch", Some("2025.4.7"));
    source.pypi.as_mut().unwrap().command = Some("fetch-server".into());
    source.pypi.as_mut().unwrap().args = vec!["--ignore-robots-txt".into()];
    let r = resolver.resolve(&source).await.unwrap();
    assert_eq!(
        server_argv(&r).unwrap(),
        [
            "uvx",
            "--from",
            "mcp-server-fetch==2025.4.7",
            "fetch-server",
            "--ignore-robots-txt"
        ]
    );
}

#[tokio::test]
async fn pypi_project_status_quarantined_archived_deprecated() {
    let registry = FakeRegistry::start().await;
    // Quarantined: PEP 792 says the index serves no files; the JSON API answers 404.
    registry.serve(
        "/simple/evil-mcp/",
        fake::simple("evil-mcp", Some(("quarantined", "malware reported"))),
    );
    registry.serve(
        "/simple/old-mcp/",
        fake::simple("old-mcp", Some(("archived", "no longer maintained"))),
    );
    registry.serve(
        "/pypi/old-mcp/json",
        fake::pypi_project("old-mcp", "1.0", &[("1.0", None)]),
    );
    registry.serve(
        "/simple/legacy-mcp/",
        fake::simple("legacy-mcp", Some(("deprecated", "use new-mcp"))),
    );
    registry.serve(
        "/pypi/legacy-mcp/json",
        fake::pypi_project("legacy-mcp", "1.0", &[("1.0", None)]),
    );
    // An index without the JSON Simple API (406) still resolves, reporting no status.
    registry.route(
        "/simple/plain-mcp/",
        StatusCode::NOT_ACCEPTABLE,
        json!({}),
        Duration::ZERO,
        0,
    );
    registry.serve(
        "/pypi/plain-mcp/json",
        fake::pypi_project("plain-mcp", "1.0", &[("1.0", None)]),
    );
    let resolver = resolver(&config(&registry));

    let e = err(&resolver, &pypi("evil-mcp", None)).await;
    assert_eq!(e.reason, reason::PROJECT_QUARANTINED);
    assert!(e.message.contains("malware reported"), "{}", e.message);
    let e = err(&resolver, &pypi("old-mcp", None)).await;
    assert_eq!(e.reason, reason::PROJECT_ARCHIVED);
    let r = resolver
        .resolve_checked(&pypi("legacy-mcp", None))
        .await
        .unwrap();
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].message.contains("use new-mcp"));
    assert!(resolver.resolve(&pypi("plain-mcp", None)).await.is_ok());
}

#[tokio::test]
async fn a_thousand_resolutions_cost_one_lookup() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    serve_fetch(&registry);
    // A slow registry, so the look-ups overlap and single flight matters, not just the cache.
    registry.route(
        SCOPED_PATH,
        StatusCode::OK,
        fake::packument(SCOPED, "1.4.0", &[("1.4.0", None)], &[]),
        Duration::from_millis(200),
        0,
    );
    let resolver = Arc::new(resolver(&config(&registry)));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let resolver = resolver.clone();
            tokio::spawn(async move {
                let source = if i % 2 == 0 {
                    npm(SCOPED, Some("^1"))
                } else {
                    pypi("mcp-server-fetch", None)
                };
                resolver.resolve(&source).await.map(|r| r.display())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(registry.hits(SCOPED_PATH), 1);
    assert_eq!(registry.hits("/pypi/mcp-server-fetch/json"), 1);
    assert_eq!(registry.hits("/simple/mcp-server-fetch/"), 1);
}

#[tokio::test]
async fn the_cache_expires_after_its_ttl() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    // The TTL counts from before the first fetch, so the first look-up's HTTP round trip and the second look-up
    // must both fit in it: 3 s leaves that room on a loaded machine (1 s did not, by much).
    let resolver = resolver(&ResolverConfig {
        package_cache_ttl_seconds: 3,
        ..config(&registry)
    });
    resolver.resolve(&npm(SCOPED, None)).await.unwrap();
    resolver.resolve(&npm(SCOPED, None)).await.unwrap();
    assert_eq!(registry.hits(SCOPED_PATH), 1);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    resolver.resolve(&npm(SCOPED, None)).await.unwrap();
    assert_eq!(registry.hits(SCOPED_PATH), 2);
}

#[tokio::test]
async fn timeouts_and_5xx_are_transient_and_retried() {
    let registry = FakeRegistry::start().await;
    registry.route(
        "/slow",
        StatusCode::OK,
        fake::packument("slow", "1.0.0", &[("1.0.0", None)], &[]),
        Duration::from_secs(5),
        0,
    );
    let resolver = resolver(&ResolverConfig {
        registry_timeout_seconds: 0.3,
        registry_retries: 1,
        ..config(&registry)
    });
    let started = Instant::now();
    let e = err(&resolver, &npm("slow", None)).await;
    assert_eq!(e.reason, reason::REGISTRY_UNAVAILABLE);
    assert!(e.transient);
    assert!(e.message.contains("timed out"), "{}", e.message);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(registry.hits("/slow"), 2, "one try and one retry");
    // A transient failure is not cached: the next look-up asks again.
    let _ = err(&resolver, &npm("slow", None)).await;
    assert_eq!(registry.hits("/slow"), 4);

    // 503 twice, then the document: retries get through.
    registry.route(
        "/flaky",
        StatusCode::OK,
        fake::packument("flaky", "2.0.0", &[("2.0.0", None)], &[]),
        Duration::ZERO,
        2,
    );
    let patient = RegistryResolver::new(&ResolverConfig {
        registry_retries: 2,
        ..config(&registry)
    })
    .unwrap();
    let r = patient.resolve(&npm("flaky", None)).await.unwrap();
    assert_eq!(r.display(), "flaky@2.0.0");
    assert_eq!(registry.hits("/flaky"), 3);

    // An unreachable registry is transient too.
    let closed = RegistryResolver::new(&ResolverConfig {
        npm_registry: "http://127.0.0.1:9".into(),
        ..config(&registry)
    })
    .unwrap();
    assert!(err(&closed, &npm("x", None)).await.transient);
}

#[tokio::test]
async fn registry_credentials_are_sent() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    serve_fetch(&registry);
    let resolver = resolver(&ResolverConfig {
        npm_token: Some(RegistrySecret::new("npm_tok3n")),
        pypi_username: Some("ci".into()),
        pypi_password: Some(RegistrySecret::new("s3cret")),
        ..config(&registry)
    });
    resolver.resolve(&npm(SCOPED, None)).await.unwrap();
    resolver
        .resolve(&pypi("mcp-server-fetch", None))
        .await
        .unwrap();
    for (path, auth, _) in registry.headers() {
        let want = if path.starts_with("/@") {
            "Bearer npm_tok3n".to_string()
        } else {
            // base64("ci:s3cret")
            "Basic Y2k6czNjcmV0".to_string()
        };
        assert_eq!(auth.as_deref(), Some(want.as_str()), "{path}");
    }
    // Refused credentials are an operator problem: transient, with a message naming the configuration.
    registry.route(
        "/private",
        StatusCode::UNAUTHORIZED,
        json!({}),
        Duration::ZERO,
        0,
    );
    let e = err(&resolver, &npm("private", None)).await;
    assert!(e.transient);
    assert!(e.message.contains("credentials"), "{}", e.message);
    // And the config's Debug never shows them.
    let shown = format!(
        "{:?}",
        ResolverConfig {
            npm_token: Some(RegistrySecret::new("npm_tok3n")),
            ..Default::default()
        }
    );
    assert!(!shown.contains("npm_tok3n"), "{shown}");
}

#[tokio::test]
async fn pinned_resolution_survives_a_new_latest_until_forced() {
    let registry = FakeRegistry::start().await;
    serve_scoped(&registry);
    let config = ResolverConfig {
        package_cache_ttl_seconds: 0,
        ..config(&registry)
    };
    let resolver = resolver(&config);
    let mut status = MCPDeploymentStatus::default();
    let source = npm(SCOPED, None);
    let first = resolve_pinned(&resolver, &source, &status, false)
        .await
        .unwrap();
    first.record(&mut status);
    assert_eq!(
        status.source.as_ref().unwrap().resolved,
        "@acme/server-things@1.4.0"
    );

    // Upstream publishes 1.5.0 as latest; a controller restart (a new resolver, empty cache) keeps 1.4.0.
    registry.serve(
        SCOPED_PATH,
        fake::packument(SCOPED, "1.5.0", &[("1.4.0", None), ("1.5.0", None)], &[]),
    );
    let restarted = RegistryResolver::new(&config).unwrap();
    let hits = registry.total_hits();
    let again = resolve_pinned(&restarted, &source, &status, false)
        .await
        .unwrap();
    assert!(again.reused);
    assert_eq!(again.resolved.display(), "@acme/server-things@1.4.0");
    assert_eq!(registry.total_hits(), hits, "no registry call");

    let forced = resolve_pinned(&restarted, &source, &status, true)
        .await
        .unwrap();
    assert_eq!(forced.resolved.display(), "@acme/server-things@1.5.0");
    assert_eq!(registry.total_hits(), hits + 1);
}

/// Opt-in: `MCPFLY_TEST_PUBLIC_REGISTRIES=1 cargo test --test packages_registry public -- --nocapture`.
#[tokio::test]
async fn public_registries() {
    if std::env::var("MCPFLY_TEST_PUBLIC_REGISTRIES").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set MCPFLY_TEST_PUBLIC_REGISTRIES=1 to resolve against registry.npmjs.org and pypi.org"
        );
        return;
    }
    let resolver = RegistryResolver::new(&ResolverConfig::default()).unwrap();
    let r = resolver
        .resolve_checked(&npm("@modelcontextprotocol/server-everything", None))
        .await
        .unwrap();
    eprintln!(
        "npm: {} integrity={:?} warnings={:?} argv={:?}",
        r.resolved.display(),
        r.resolved.integrity,
        r.warnings,
        server_argv(&r.resolved)
    );
    assert!(
        r.resolved
            .integrity
            .as_deref()
            .unwrap()
            .starts_with("sha512-")
    );
    let r = resolver
        .resolve_checked(&pypi("mcp-server-fetch", None))
        .await
        .unwrap();
    eprintln!(
        "pypi: {} integrity={:?} warnings={:?} argv={:?}",
        r.resolved.display(),
        r.resolved.integrity,
        r.warnings,
        server_argv(&r.resolved)
    );
    assert!(
        r.resolved
            .integrity
            .as_deref()
            .unwrap()
            .starts_with("sha256:")
    );
    let e = resolver
        .resolve_checked(&npm("crossenv", None))
        .await
        .unwrap_err();
    eprintln!("npm crossenv: {e}");
    assert_eq!(e.reason, reason::SECURITY_PLACEHOLDER);
}

/// A package whose entry point records that it ran (`marker` gets `label`), then becomes the stdio test server.
struct FakePackage {
    label: &'static str,
    marker: std::path::PathBuf,
}

impl FakePackage {
    fn node_bin(&self) -> String {
        format!(
            "#!/usr/bin/env node\nrequire('fs').writeFileSync({marker:?}, {label:?});\n\
             const r = require('child_process').spawnSync({server:?}, [], {{stdio: 'inherit'}});\n\
             process.exit(r.status === null ? 1 : r.status);\n",
            marker = self.marker.to_str().unwrap(),
            label = self.label,
            server = bridge_env::test_server().to_str().unwrap(),
        )
    }

    fn python_main(&self) -> String {
        format!(
            "import os\n\ndef main():\n    open({marker:?}, 'w').write({label:?})\n    os.execv({server:?}, [{server:?}])\n",
            marker = self.marker.to_str().unwrap(),
            label = self.label,
            server = bridge_env::test_server().to_str().unwrap(),
        )
    }
}

/// An npm tarball (`package/` prefix, as `npm pack` makes) of `@acme/pinned@1.0.0` with bin `pinned`.
fn npm_tarball(dir: &std::path::Path, package: &FakePackage) -> Vec<u8> {
    let root = dir.join(package.label);
    std::fs::create_dir_all(root.join("package")).unwrap();
    std::fs::write(
        root.join("package/package.json"),
        r#"{"name": "@acme/pinned", "version": "1.0.0", "bin": {"pinned": "index.js"}}"#,
    )
    .unwrap();
    std::fs::write(root.join("package/index.js"), package.node_bin()).unwrap();
    let status = std::process::Command::new("tar")
        .current_dir(&root)
        .args(["czf", "pinned.tgz", "package"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(root.join("pinned.tgz")).unwrap()
}

/// A pure-Python wheel of `pinned-srv==1.0.0` with console script `pinned-srv`.
fn wheel(dir: &std::path::Path, package: &FakePackage) -> Vec<u8> {
    let path = dir.join(format!("{}.whl", package.label));
    let script = r#"
import sys, zipfile
path, main = sys.argv[1], sys.argv[2]
info = "pinned_srv-1.0.0.dist-info"
files = {
    "pinned_srv/__init__.py": main,
    info + "/METADATA": "Metadata-Version: 2.1\nName: pinned-srv\nVersion: 1.0.0\n",
    info + "/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    info + "/entry_points.txt": "[console_scripts]\npinned-srv = pinned_srv:main\n",
}
with zipfile.ZipFile(path, "w") as z:
    for name, text in files.items():
        z.writestr(name, text)
    z.writestr(info + "/RECORD", "".join(name + ",,\n" for name in files) + info + "/RECORD,,\n")
"#;
    let status = std::process::Command::new(bridge_env::python())
        .args(["-c", script, path.to_str().unwrap(), &package.python_main()])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(path).unwrap()
}

fn sri_sha512(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(bytes))
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The registry serves `tarball` as `@acme/pinned@1.0.0`, its packument consistent with it (as a registry that was
/// tampered with, or a mirror serving other bytes, would).
fn serve_npm_package(registry: &FakeRegistry, tarball: Vec<u8>) {
    let url = format!("{}/@acme/pinned/-/pinned-1.0.0.tgz", registry.url);
    registry.serve(
        "/@acme%2Fpinned",
        json!({
            "name": "@acme/pinned",
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {
                "name": "@acme/pinned", "version": "1.0.0", "bin": {"pinned": "index.js"},
                "dist": {"integrity": sri_sha512(&tarball), "tarball": url},
            }},
        }),
    );
    registry.serve_file("/@acme/pinned/-/pinned-1.0.0.tgz", tarball);
}

/// The same for `pinned-srv==1.0.0` on the index: JSON API (the controller), Simple API (the machine), the file.
fn serve_pypi_package(registry: &FakeRegistry, wheel: Vec<u8>) {
    let filename = "pinned_srv-1.0.0-py3-none-any.whl";
    let sha = sha256_hex(&wheel);
    registry.serve(
        "/pypi/pinned-srv/json",
        json!({
            "info": {"name": "pinned-srv", "version": "1.0.0"},
            "releases": {"1.0.0": [{
                "filename": filename, "packagetype": "bdist_wheel", "digests": {"sha256": sha}, "yanked": false,
            }]},
            "urls": [],
        }),
    );
    registry.serve(
        "/simple/pinned-srv/",
        json!({
            "meta": {"api-version": "1.1"},
            "name": "pinned-srv",
            "files": [{"filename": filename, "url": format!("../../files/{filename}"), "hashes": {"sha256": sha}}],
        }),
    );
    registry.serve_file(&format!("/files/{filename}"), wheel);
}

/// A bridge as a machine runs it: the controller's pin, registry settings and server command.
async fn machine_bridge(
    registry: &FakeRegistry,
    pin: &str,
    artifacts: &std::path::Path,
    command: Vec<String>,
) -> mcpfly::bridge::Bridge {
    let mut args: Vec<String> = [
        "--path",
        "/mcp",
        "--artifact-integrity",
        pin,
        "--npm-registry",
        &registry.url,
        "--pypi-index",
        &format!("{}/simple", registry.url),
        "--artifact-dir",
        artifacts.to_str().unwrap(),
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(command);
    let args = mcpfly::bridge::BridgeArgs::parse_from(args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mcpfly::bridge::start(args, mcpfly::bridge::auth::Auth::disabled(), listener)
        .await
        .unwrap()
}

async fn readyz(bridge: &mcpfly::bridge::Bridge) -> (u16, String) {
    let r = reqwest::get(format!("http://{}/readyz", bridge.addr()))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn initialize(bridge: &mcpfly::bridge::Bridge) -> u16 {
    reqwest::Client::new()
        .post(bridge_env::url(bridge))
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Issue #18 item 4: a tampered artifact served after the controller pinned the package is refused with one log
/// line (package, expected, got) and a readiness check that never passes; the right one runs, from the verified file.
async fn only_the_pinned_artifact_runs(
    registry: &FakeRegistry,
    source: Source,
    program: Option<std::path::PathBuf>,
    dir: &std::path::Path,
    serve: impl Fn(&FakeRegistry, Vec<u8>),
    build: impl Fn(&std::path::Path, &FakePackage) -> Vec<u8>,
) {
    let logs = bridge_env::logs();
    let genuine = FakePackage {
        label: "genuine",
        marker: dir.join("genuine-ran"),
    };
    let tampered = FakePackage {
        label: "tampered",
        marker: dir.join("tampered-ran"),
    };
    let genuine_bytes = build(dir, &genuine);
    let tampered_bytes = build(dir, &tampered);
    serve(registry, genuine_bytes.clone());
    let resolved = resolver(&config(registry)).resolve(&source).await.unwrap();
    let pin = mcpfly::packages::artifact::machine_pin(&resolved).expect("a verifiable pin");
    let mut command = server_argv(&resolved).unwrap();
    // The test machine's `uvx` is the venv's, not on PATH.
    if let Some(program) = program {
        command[0] = program.to_string_lossy().into_owned();
    }

    // After the check, the registry serves other bytes.
    serve(registry, tampered_bytes);
    let refused = machine_bridge(registry, &pin, &dir.join("artifacts"), command.clone()).await;
    assert_eq!(readyz(&refused).await.0, 503);
    assert_eq!(initialize(&refused).await, 503);
    let line = logs
        .text()
        .lines()
        .find(|l| {
            l.contains("does not match the integrity the controller pinned") && l.contains(&pin)
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no refusal line naming {pin}:\n{}", logs.text()));
    assert!(line.contains("pinned") && line.contains("got "), "{line}");
    refused.shutdown().await.unwrap();

    // The genuine artifact, same pin: it runs, from the file that was verified.
    serve(registry, genuine_bytes);
    let running = machine_bridge(registry, &pin, &dir.join("artifacts"), command).await;
    bridge_env::wait_ready(&running).await;
    assert_eq!(initialize(&running).await, 200);
    assert_eq!(std::fs::read_to_string(&genuine.marker).unwrap(), "genuine");
    assert!(
        !tampered.marker.exists(),
        "the tampered package ran (the genuine one did, so running leaves its marker)"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_machine_runs_only_the_npm_tarball_the_controller_pinned() {
    let registry = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    only_the_pinned_artifact_runs(
        &registry,
        npm("@acme/pinned", Some("1.0.0")),
        None,
        dir.path(),
        serve_npm_package,
        npm_tarball,
    )
    .await;
}

#[tokio::test]
async fn a_machine_runs_only_the_pypi_wheel_the_controller_pinned() {
    let registry = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let uvx = bridge_env::python().parent().unwrap().join("uvx");
    let mut source = pypi("pinned-srv", Some("1.0.0"));
    source.pypi.as_mut().unwrap().command = Some("pinned-srv".into());
    only_the_pinned_artifact_runs(
        &registry,
        source,
        Some(uvx),
        dir.path(),
        serve_pypi_package,
        wheel,
    )
    .await;
}
