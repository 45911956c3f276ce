//! Tests of the interface: pinning, reuse from status, argv.

use std::sync::Mutex;

use super::*;
use crate::api::{ImageSource, PackageSource, PypiSource};

fn npm(package: &str, version: Option<&str>, args: &[&str]) -> Source {
    Source {
        npm: Some(PackageSource {
            package: package.into(),
            version: version.map(Into::into),
            args: args.iter().map(|a| a.to_string()).collect(),
        }),
        ..Default::default()
    }
}

fn pypi(package: &str, version: Option<&str>, command: Option<&str>) -> Source {
    Source {
        pypi: Some(PypiSource {
            package: package.into(),
            version: version.map(Into::into),
            command: command.map(Into::into),
            args: vec!["--flag".into()],
        }),
        ..Default::default()
    }
}

/// Counts calls and answers with a fixed version.
struct Counting {
    calls: Mutex<u32>,
    version: &'static str,
    deny: bool,
}

#[async_trait]
impl SourceResolver for Counting {
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError> {
        *self.calls.lock().unwrap() += 1;
        let kind = match source.kind().unwrap() {
            SourceKind::Npm(n) => ResolvedKind::Npm {
                package: n.package.clone(),
                version: self.version.into(),
                args: n.args.clone(),
            },
            SourceKind::Pypi(p) => ResolvedKind::Pypi {
                package: p.package.clone(),
                version: self.version.into(),
                command: pypi_command(p),
                args: p.args.clone(),
            },
            SourceKind::Image(i) => ResolvedKind::Image {
                reference: i.reference.clone(),
            },
        };
        Ok(Resolved {
            kind,
            integrity: Some("sha512-x".into()),
        })
    }

    fn precheck(&self, _: &Source) -> Result<(), ResolveError> {
        if self.deny {
            return Err(ResolveError::stall(reason::PACKAGE_DENIED, "denied"));
        }
        Ok(())
    }
}

fn counting(version: &'static str) -> Counting {
    Counting {
        calls: Mutex::new(0),
        version,
        deny: false,
    }
}

#[tokio::test]
async fn reuses_status_until_the_spec_changes_or_a_force() {
    let resolver = counting("1.4.0");
    let mut status = MCPDeploymentStatus::default();
    let source = npm("@acme/server", Some("^1.2"), &["--a"]);

    let first = resolve_pinned(&resolver, &source, &status, false)
        .await
        .unwrap();
    assert!(!first.reused);
    assert_eq!(first.requested, "npm:@acme/server@^1.2");
    assert_eq!(first.source.resolved, "@acme/server@1.4.0");
    assert_eq!(first.warnings, Some(vec![]));
    first.record(&mut status);
    assert_eq!(*resolver.calls.lock().unwrap(), 1);

    // Same spec, even with new args: no registry call, the pinned version, the new args.
    let later = counting("1.9.9");
    let source2 = npm("@acme/server", Some("^1.2"), &["--b"]);
    let again = resolve_pinned(&later, &source2, &status, false)
        .await
        .unwrap();
    assert!(again.reused);
    assert_eq!(*later.calls.lock().unwrap(), 0);
    assert_eq!(again.warnings, None);
    assert_eq!(
        server_argv(&again.resolved).unwrap(),
        ["npx", "-y", "@acme/server@1.4.0", "--b"]
    );
    assert_eq!(again.source, first.source);

    // A force resolves anew.
    let forced = resolve_pinned(&later, &source2, &status, true)
        .await
        .unwrap();
    assert!(!forced.reused);
    assert_eq!(forced.source.resolved, "@acme/server@1.9.9");

    // So does a changed version.
    let changed = resolve_pinned(
        &later,
        &npm("@acme/server", Some("^1.3"), &[]),
        &status,
        false,
    )
    .await
    .unwrap();
    assert!(!changed.reused);
    assert_eq!(*later.calls.lock().unwrap(), 2);

    // Policy checks still apply to a reused resolution.
    let denied = Counting {
        deny: true,
        ..counting("1.4.0")
    };
    let err = resolve_pinned(&denied, &source, &status, false)
        .await
        .unwrap_err();
    assert_eq!(err.reason, reason::PACKAGE_DENIED);
}

#[tokio::test]
async fn status_from_another_package_or_an_old_controller_is_not_reused() {
    let resolver = counting("2.0.0");
    let mut status = MCPDeploymentStatus {
        source: Some(ResolvedSource {
            resolved: "@acme/server@1.0.0".into(),
            integrity: None,
        }),
        ..Default::default()
    };
    // No sourceRequested (written before it existed): resolve.
    let p = resolve_pinned(&resolver, &npm("@acme/server", None, &[]), &status, false)
        .await
        .unwrap();
    assert!(!p.reused);
    // A record that does not fit the spec (hand-edited status): resolve.
    status.source_requested = Some("npm:@acme/other".into());
    status.source = Some(ResolvedSource {
        resolved: "@acme/server@1.0.0".into(),
        integrity: None,
    });
    let p = resolve_pinned(&resolver, &npm("@acme/other", None, &[]), &status, false)
        .await
        .unwrap();
    assert!(!p.reused);
    assert_eq!(*resolver.calls.lock().unwrap(), 2);
}

#[tokio::test]
async fn pypi_reuse_keeps_the_command_from_the_spec() {
    let resolver = counting("2025.4.7");
    let mut status = MCPDeploymentStatus::default();
    let p = resolve_pinned(
        &resolver,
        &pypi("mcp-server-fetch", None, None),
        &status,
        false,
    )
    .await
    .unwrap();
    p.record(&mut status);
    assert_eq!(
        status.source_requested.as_deref(),
        Some("pypi:mcp-server-fetch")
    );
    let p = resolve_pinned(
        &resolver,
        &pypi("mcp-server-fetch", None, Some("fetch-server")),
        &status,
        false,
    )
    .await
    .unwrap();
    assert!(p.reused);
    assert_eq!(
        server_argv(&p.resolved).unwrap(),
        [
            "uvx",
            "--from",
            "mcp-server-fetch==2025.4.7",
            "fetch-server",
            "--flag"
        ]
    );
}

#[tokio::test]
async fn images_pin_to_their_reference() {
    let resolver = counting("-");
    let mut status = MCPDeploymentStatus::default();
    let source = Source {
        image: Some(ImageSource {
            reference: "ghcr.io/acme/mcp:1".into(),
            port: 8080,
            path: "/mcp".into(),
        }),
        ..Default::default()
    };
    let p = resolve_pinned(&resolver, &source, &status, false)
        .await
        .unwrap();
    assert_eq!(p.requested, "image:ghcr.io/acme/mcp:1");
    p.record(&mut status);
    let p = resolve_pinned(&resolver, &source, &status, false)
        .await
        .unwrap();
    assert!(p.reused);
    assert_eq!(server_argv(&p.resolved), None);
    let err = resolve_pinned(&resolver, &Source::default(), &status, false)
        .await
        .unwrap_err();
    assert_eq!(err.reason, reason::INVALID_SOURCE);
}

#[test]
fn argv_for_both_uvx_shapes() {
    // Console script named like the package, and one named otherwise: the same `--from` form serves both.
    let r = |command: &str| Resolved {
        kind: ResolvedKind::Pypi {
            package: "mcp-server-fetch".into(),
            version: "2025.4.7".into(),
            command: command.into(),
            args: vec!["--user-agent".into(), "x; rm -rf /".into()],
        },
        integrity: None,
    };
    assert_eq!(
        server_argv(&r("mcp-server-fetch")).unwrap(),
        [
            "uvx",
            "--from",
            "mcp-server-fetch==2025.4.7",
            "mcp-server-fetch",
            "--user-agent",
            "x; rm -rf /"
        ]
    );
    assert_eq!(server_argv(&r("fetch")).unwrap()[3], "fetch");
}

#[test]
fn force_is_an_annotation_not_yet_handled() {
    assert!(!force_requested(None, None));
    assert!(!force_requested(None, Some("a")));
    assert!(force_requested(Some("a"), None));
    assert!(!force_requested(Some("a"), Some("a")));
    assert!(force_requested(Some("b"), Some("a")));
}
