//! Turning a spec's `source` into exactly what a machine runs.
//!
//! The reconciler depends only on [`SourceResolver`] and [`resolve_pinned`]; registry look-ups, supply-chain checks
//! and policy live behind them ([`RegistryResolver`]). [`server_argv`] builds the command as an argument vector —
//! never a shell string — so a package name or argument can never be interpreted by a shell.
//!
//! Pinning: a spec's version (exact, range, dist-tag or none) is resolved once to one exact version and recorded in
//! status together with what was asked for (`status.sourceRequested`). [`resolve_pinned`] reuses that record, with no
//! registry call, for as long as the spec asks for the same thing and no force-reconcile is requested, so a reboot,
//! a controller restart or a new `latest` upstream never changes what runs.

pub mod artifact;
mod cache;
mod config;
mod http;
mod npm;
mod policy;
mod pypi;
mod registry;

use async_trait::async_trait;

use crate::api::{MCPDeploymentStatus, ResolvedSource, Source, SourceKind};

pub use config::{RegistrySecret, ResolverConfig};
pub use npm::is_security_placeholder;
pub use policy::{Policy, glob_match};
pub use pypi::normalize as normalize_pypi_name;
pub use registry::{ConfigError, RegistryResolver};

/// Stable `reason` strings of [`ResolveError`] and [`Warning`]; they become condition reasons.
/// The reasons this module reports, from the one list in [`crate::api::reason`].
pub mod reason {
    pub use crate::api::reason::{
        INVALID_PACKAGE_NAME, INVALID_SOURCE, INVALID_VERSION, PACKAGE_DENIED, PACKAGE_DEPRECATED,
        PACKAGE_NOT_ALLOWED, PACKAGE_NOT_FOUND, PROJECT_ARCHIVED, PROJECT_QUARANTINED,
        REGISTRY_UNAVAILABLE, RELEASE_YANKED, SECURITY_PLACEHOLDER, VERSION_NOT_FOUND,
        VERSION_NOT_PINNED, VERSION_REQUIRED,
    };
}

/// A source pinned to one exact thing to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub kind: ResolvedKind,
    /// Registry integrity data (npm `dist.integrity`; PyPI `sha256:` of the release file), when known.
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
        /// The console script to run (`spec.source.pypi.command`, else the package name).
        command: String,
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

    /// The status record of this resolution.
    pub fn to_status(&self) -> ResolvedSource {
        ResolvedSource {
            resolved: self.display(),
            integrity: self.integrity.clone(),
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

impl ResolveError {
    /// A failure only a change of the spec (or of the controller's policy) fixes.
    pub fn stall(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            transient: false,
        }
    }

    /// A failure worth retrying with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            reason: reason::REGISTRY_UNAVAILABLE,
            message: message.into(),
            transient: true,
        }
    }
}

/// Something the user should know that does not stop the deployment (e.g. a deprecated npm version when policy
/// allows it). The reconciler surfaces it as a condition and an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub reason: &'static str,
    pub message: String,
}

/// A resolution with its warnings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub resolved: Resolved,
    pub warnings: Vec<Warning>,
}

#[async_trait]
pub trait SourceResolver: Send + Sync {
    /// Resolve to one exact thing, asking registries as needed.
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError>;

    /// [`Self::resolve`] plus warnings. Resolvers with nothing to warn about keep the default.
    async fn resolve_checked(&self, source: &Source) -> Result<Resolution, ResolveError> {
        Ok(Resolution {
            resolved: self.resolve(source).await?,
            warnings: Vec::new(),
        })
    }

    /// The checks that need no registry (name grammar, allow/deny lists, required versions). They run even when a
    /// recorded resolution is reused, so a policy change applies to deployments whose spec did not change.
    fn precheck(&self, _source: &Source) -> Result<(), ResolveError> {
        Ok(())
    }
}

/// What [`resolve_pinned`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Pinned {
    /// What the machines run.
    pub resolved: Resolved,
    /// For `status.source`.
    pub source: ResolvedSource,
    /// For `status.sourceRequested`: the spec's source identity this was resolved from (see [`requested`]).
    pub requested: String,
    /// `None` when the recorded resolution was reused without asking the registry: keep whatever warning the
    /// previous resolution reported. `Some` (possibly empty) after a fresh resolution.
    pub warnings: Option<Vec<Warning>>,
    /// True when nothing was asked of a registry.
    pub reused: bool,
}

impl Pinned {
    /// Write `status.source` and `status.sourceRequested` together, so they never disagree.
    pub fn record(&self, status: &mut MCPDeploymentStatus) {
        status.source = Some(self.source.clone());
        status.source_requested = Some(self.requested.clone());
    }
}

/// What identifies a resolution request: kind, package and version as written in the spec, e.g.
/// `npm:@scope/pkg@^1.2`, `npm:left-pad` (no version: latest), `pypi:mcp-server-fetch==2025.4.7`, `image:ref`.
/// Arguments and the PyPI console script are not part of it: they change what runs without a new look-up.
pub fn requested(source: &Source) -> Option<String> {
    Some(match source.kind()? {
        SourceKind::Npm(npm) => match &npm.version {
            Some(v) => format!("npm:{}@{v}", npm.package),
            None => format!("npm:{}", npm.package),
        },
        SourceKind::Pypi(pypi) => match &pypi.version {
            Some(v) => format!("pypi:{}=={v}", pypi.package),
            None => format!("pypi:{}", pypi.package),
        },
        SourceKind::Image(image) => format!("image:{}", image.reference),
    })
}

/// Whether the `mcpfly.dev/reconcile-requested-at` annotation asks for a fresh resolution: it is set and differs
/// from the value the controller last handled (`status.lastHandledReconcileAt` as stored before this reconcile).
pub fn force_requested(annotation: Option<&str>, last_handled: Option<&str>) -> bool {
    annotation.is_some() && annotation != last_handled
}

/// Resolve `source`, reusing what `status` recorded when the spec still asks for the same thing and `force` is
/// false: then no registry is called and the result is rebuilt from `status.source` with the spec's current
/// arguments and command. The registry-free checks ([`SourceResolver::precheck`]) run in both cases.
pub async fn resolve_pinned(
    resolver: &dyn SourceResolver,
    source: &Source,
    status: &MCPDeploymentStatus,
    force: bool,
) -> Result<Pinned, ResolveError> {
    let Some(requested) = requested(source) else {
        return Err(ResolveError::stall(
            reason::INVALID_SOURCE,
            "set exactly one of source.npm, source.pypi or source.image",
        ));
    };
    resolver.precheck(source)?;
    if !force
        && status.source_requested.as_deref() == Some(requested.as_str())
        && let Some(previous) = &status.source
        && let Some(resolved) = rebuild(source, previous)
    {
        return Ok(Pinned {
            source: previous.clone(),
            resolved,
            requested,
            warnings: None,
            reused: true,
        });
    }
    let Resolution { resolved, warnings } = resolver.resolve_checked(source).await?;
    Ok(Pinned {
        source: resolved.to_status(),
        resolved,
        requested,
        warnings: Some(warnings),
        reused: false,
    })
}

/// [`Resolved`] from a status record, or `None` when the record does not fit the spec (then resolve afresh).
fn rebuild(source: &Source, previous: &ResolvedSource) -> Option<Resolved> {
    let kind = match source.kind()? {
        SourceKind::Npm(npm) => {
            // `@scope/name@1.2.3`: the version follows the last `@`.
            let (package, version) = previous.resolved.rsplit_once('@')?;
            if package != npm.package || version.is_empty() {
                return None;
            }
            ResolvedKind::Npm {
                package: npm.package.clone(),
                version: version.to_string(),
                args: npm.args.clone(),
            }
        }
        SourceKind::Pypi(pypi) => {
            let (package, version) = previous.resolved.split_once("==")?;
            if package != pypi.package || version.is_empty() {
                return None;
            }
            ResolvedKind::Pypi {
                package: pypi.package.clone(),
                version: version.to_string(),
                command: pypi_command(pypi),
                args: pypi.args.clone(),
            }
        }
        SourceKind::Image(image) => {
            if previous.resolved != image.reference {
                return None;
            }
            ResolvedKind::Image {
                reference: image.reference.clone(),
            }
        }
    };
    Some(Resolved {
        kind,
        integrity: previous.integrity.clone(),
    })
}

/// The console script a PyPI source runs: `command` when set, else the package name (what `uvx <package>` runs).
pub fn pypi_command(pypi: &crate::api::PypiSource) -> String {
    pypi.command
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| pypi.package.clone())
}

/// A resolver that consults no registry: exact versions and images pass through; anything else stalls with a
/// message asking for an exact version. Used where registries are out of reach and in planner tests.
pub struct PinnedOnlyResolver;

#[async_trait]
impl SourceResolver for PinnedOnlyResolver {
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError> {
        let unpinned = |package: &str| ResolveError {
            reason: reason::VERSION_NOT_PINNED,
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
                    command: pypi_command(pypi),
                    args: pypi.args.clone(),
                },
                _ => return Err(unpinned(&pypi.package)),
            },
            Some(SourceKind::Image(image)) => ResolvedKind::Image {
                reference: image.reference.clone(),
            },
            None => {
                return Err(ResolveError::stall(
                    reason::INVALID_SOURCE,
                    "set exactly one of source.npm, source.pypi or source.image",
                ));
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
///
/// - npm: `npx -y <package>@<version> <args...>`.
/// - PyPI: `uvx --from <package>==<version> <command> <args...>`. `uvx NAME` installs the package called NAME and
///   runs the console script called NAME, which fails when they differ (package `mcp-server-fetch` may ship a script
///   of another name); `--from` names the package (pinned with `==`) and the next word is always the script, so one
///   form serves both cases. The script comes from `spec.source.pypi.command`, defaulting to the package name.
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
            command,
            args,
        } => {
            let mut argv = vec![
                "uvx".to_string(),
                "--from".to_string(),
                format!("{package}=={version}"),
                command.clone(),
            ];
            argv.extend(args.iter().cloned());
            Some(argv)
        }
        ResolvedKind::Image { .. } => None,
    }
}

#[cfg(test)]
mod tests;
