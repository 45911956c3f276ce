//! Turning a spec's `source` into exactly what a machine runs.
//!
//! The reconciler depends only on [`SourceResolver`]; registry look-ups, supply-chain checks and policy live behind
//! it. [`server_argv`] builds the command as an argument vector — never a shell string — so a package name or
//! argument can never be interpreted by a shell.

use async_trait::async_trait;

use crate::api::{Source, SourceKind};

/// A source pinned to one exact thing to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub kind: ResolvedKind,
    /// Registry integrity data (npm `dist.integrity`; PyPI sha256 of the release files), when known.
    pub integrity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedKind {
    Npm {
        package: String,
        version: String,
        args: Vec<String>,
    },
    Pypi {
        package: String,
        version: String,
        args: Vec<String>,
    },
    /// An image that serves MCP over HTTP itself; it runs as is.
    Image { reference: String },
}

impl Resolved {
    /// What status shows, e.g. `@modelcontextprotocol/server-github@2025.4.8`.
    pub fn display(&self) -> String {
        match &self.kind {
            ResolvedKind::Npm {
                package, version, ..
            } => format!("{package}@{version}"),
            ResolvedKind::Pypi {
                package, version, ..
            } => format!("{package}=={version}"),
            ResolvedKind::Image { reference } => reference.clone(),
        }
    }
}

/// Why a source cannot be resolved. `reason` becomes the `Stalled` condition's reason; `message` tells the user
/// what to do. Transient failures (registry down) are retried instead of stalling.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ResolveError {
    pub reason: &'static str,
    pub message: String,
    pub transient: bool,
}

#[async_trait]
pub trait SourceResolver: Send + Sync {
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError>;
}

/// A resolver that consults no registry: exact versions and images pass through; anything else stalls with a
/// message asking for an exact version. Used where registries are out of reach and in planner tests.
pub struct PinnedOnlyResolver;

#[async_trait]
impl SourceResolver for PinnedOnlyResolver {
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError> {
        let unpinned = |package: &str| ResolveError {
            reason: "VersionNotPinned",
            message: format!(
                "{package}: this controller resolves no registry versions; set an exact version in spec.source"
            ),
            transient: false,
        };
        let kind = match source.kind() {
            Some(SourceKind::Npm(npm)) => match &npm.version {
                Some(v) if is_exact_version(v) => ResolvedKind::Npm {
                    package: npm.package.clone(),
                    version: v.clone(),
                    args: npm.args.clone(),
                },
                _ => return Err(unpinned(&npm.package)),
            },
            Some(SourceKind::Pypi(pypi)) => match &pypi.version {
                Some(v) if is_exact_version(v) => ResolvedKind::Pypi {
                    package: pypi.package.clone(),
                    version: v.clone(),
                    args: pypi.args.clone(),
                },
                _ => return Err(unpinned(&pypi.package)),
            },
            Some(SourceKind::Image(image)) => ResolvedKind::Image {
                reference: image.reference.clone(),
            },
            None => {
                return Err(ResolveError {
                    reason: "InvalidSource",
                    message: "set exactly one of source.npm, source.pypi or source.image".into(),
                    transient: false,
                });
            }
        };
        Ok(Resolved {
            kind,
            integrity: None,
        })
    }
}

fn is_exact_version(v: &str) -> bool {
    v.chars().next().is_some_and(|c| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
}

/// The stdio server command the bridge starts, as an argument vector. `None` for images, which run their own
/// entrypoint.
pub fn server_argv(resolved: &Resolved) -> Option<Vec<String>> {
    match &resolved.kind {
        ResolvedKind::Npm {
            package,
            version,
            args,
        } => {
            let mut argv = vec![
                "npx".to_string(),
                "-y".to_string(),
                format!("{package}@{version}"),
            ];
            argv.extend(args.iter().cloned());
            Some(argv)
        }
        ResolvedKind::Pypi {
            package,
            version,
            args,
        } => {
            let mut argv = vec!["uvx".to_string(), format!("{package}=={version}")];
            argv.extend(args.iter().cloned());
            Some(argv)
        }
        ResolvedKind::Image { .. } => None,
    }
}
