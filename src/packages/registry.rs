//! [`RegistryResolver`]: npm and PyPI resolution with policy, checks and a shared cache.

use std::sync::Arc;

use async_trait::async_trait;

use super::cache::TtlCache;
use super::config::ResolverConfig;
use super::http::{self, Auth, Fetched, Registry};
use super::policy::Policy;
use super::{
    Resolution, ResolveError, Resolved, ResolvedKind, SourceResolver, npm, pypi, pypi_command,
    reason,
};
use crate::api::validation::{is_npm_package, is_pypi_package};
use crate::api::{PackageSource, PypiSource, Source, SourceKind};

pub(super) const NPM_ACCEPT: &str =
    "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*";
const PYPI_JSON_ACCEPT: &str = "application/json";
pub(super) const PYPI_SIMPLE_ACCEPT: &str = "application/vnd.pypi.simple.v1+json";

/// Why a [`RegistryResolver`] cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not an http(s) URL: {url}")]
    BadUrl { name: &'static str, url: String },
    #[error("building the registry HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Resolves npm and PyPI sources against their registries; images pass through.
pub struct RegistryResolver {
    npm: Registry,
    pypi: Registry,
    policy: Policy,
    packuments: TtlCache<Arc<npm::Packument>>,
    projects: TtlCache<Arc<pypi::ProjectDoc>>,
    statuses: TtlCache<Option<pypi::Status>>,
}

impl RegistryResolver {
    pub fn new(config: &ResolverConfig) -> Result<Self, ConfigError> {
        for (name, url) in [
            ("npm registry", &config.npm_registry),
            ("PyPI index", &config.pypi_index),
        ] {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(ConfigError::BadUrl {
                        name,
                        url: url.clone(),
                    });
                }
            }
        }
        let client = http::client(config.timeout())?;
        let npm_auth = match &config.npm_token {
            Some(token) => Auth::Bearer(token.clone()),
            None => Auth::None,
        };
        let pypi_auth = match &config.pypi_username {
            Some(user) => Auth::Basic(user.clone(), config.pypi_password.clone()),
            None => Auth::None,
        };
        Ok(Self {
            npm: Registry::new(
                &config.npm_registry,
                npm_auth,
                client.clone(),
                config.registry_retries,
            ),
            pypi: Registry::new(
                &config.pypi_index,
                pypi_auth,
                client,
                config.registry_retries,
            ),
            policy: Policy {
                allow: config.package_allow.clone(),
                deny: config.package_deny.clone(),
                require_version: config.require_version,
                block_deprecated: config.block_deprecated,
            },
            packuments: TtlCache::new(config.cache_ttl()),
            projects: TtlCache::new(config.cache_ttl()),
            statuses: TtlCache::new(config.cache_ttl()),
        })
    }

    fn precheck_npm(&self, source: &PackageSource) -> Result<(), ResolveError> {
        let name = &source.package;
        if !is_npm_package(name) {
            return Err(ResolveError::stall(
                reason::INVALID_PACKAGE_NAME,
                format!(
                    "`{name}` is not a valid npm package name (lowercase letters, digits, `-._~`, optional @scope/, at most 214 characters); fix spec.source.npm.package"
                ),
            ));
        }
        self.policy.check_name("npm", name)?;
        let exact = matches!(
            npm::parse_wanted(source.version.as_deref()),
            npm::Wanted::Exact(_)
        );
        self.policy
            .check_version("npm", name, exact, source.version.as_deref())
    }

    fn precheck_pypi(&self, source: &PypiSource) -> Result<pypi::Wanted, ResolveError> {
        let name = &source.package;
        if !is_pypi_package(name) {
            return Err(ResolveError::stall(
                reason::INVALID_PACKAGE_NAME,
                format!(
                    "`{name}` is not a valid PyPI project name (letters, digits, `.`, `_`, `-`, starting and ending with a letter or digit); fix spec.source.pypi.package"
                ),
            ));
        }
        self.policy.check_name("pypi", &pypi::normalize(name))?;
        let wanted = pypi::parse_wanted(name, source.version.as_deref())?;
        let exact = matches!(wanted, pypi::Wanted::Exact(_));
        self.policy
            .check_version("pypi", name, exact, source.version.as_deref())?;
        Ok(wanted)
    }

    async fn packument(&self, package: &str) -> Result<Arc<npm::Packument>, ResolveError> {
        let registry = &self.npm;
        self.packuments
            .get_or_fetch(package, || async move {
                match registry.get(&npm::packument_path(package), NPM_ACCEPT).await? {
                    Fetched::Found(body) => serde_json::from_slice(&body).map(Arc::new).map_err(|e| {
                        ResolveError::transient(format!(
                            "{} sent an unreadable packument for {package}: {e}",
                            registry.base
                        ))
                    }),
                    Fetched::NotFound => Err(ResolveError::stall(
                        reason::PACKAGE_NOT_FOUND,
                        format!(
                            "npm package {package} does not exist on {}; check spec.source.npm.package for typos (a private package needs the controller's npm registry and token)",
                            registry.base
                        ),
                    )),
                    Fetched::Refused(code) => Err(ResolveError::transient(format!(
                        "{} answered HTTP {code} for {package}",
                        registry.base
                    ))),
                }
            })
            .await
    }

    async fn project(
        &self,
        normalized: &str,
        path: String,
    ) -> Result<Arc<pypi::ProjectDoc>, ResolveError> {
        let registry = &self.pypi;
        self.projects
            .get_or_fetch(&path.clone(), || async move {
                match registry.get(&path, PYPI_JSON_ACCEPT).await? {
                    Fetched::Found(body) => serde_json::from_slice(&body).map(Arc::new).map_err(|e| {
                        ResolveError::transient(format!(
                            "{} sent an unreadable JSON document for {normalized}: {e}",
                            registry.base
                        ))
                    }),
                    Fetched::NotFound => Err(ResolveError::stall(
                        reason::PACKAGE_NOT_FOUND,
                        format!(
                            "PyPI project {normalized} does not exist on {}; check spec.source.pypi.package for typos (a private project needs the controller's PyPI index and credentials)",
                            registry.base
                        ),
                    )),
                    Fetched::Refused(code) => Err(ResolveError::transient(format!(
                        "{} answered HTTP {code} for {normalized}",
                        registry.base
                    ))),
                }
            })
            .await
    }

    /// The PEP 792 status from the Simple API; an index without the JSON Simple API reports none.
    async fn project_status(&self, normalized: &str) -> Result<Option<pypi::Status>, ResolveError> {
        let registry = &self.pypi;
        let path = format!("/simple/{normalized}/");
        self.statuses
            .get_or_fetch(&path.clone(), || async move {
                Ok(match registry.get(&path, PYPI_SIMPLE_ACCEPT).await? {
                    Fetched::Found(body) => serde_json::from_slice::<pypi::SimpleDoc>(&body)
                        .ok()
                        .and_then(|doc| pypi::parse_status(&doc.project_status)),
                    Fetched::NotFound | Fetched::Refused(_) => None,
                })
            })
            .await
    }

    async fn resolve_npm(&self, source: &PackageSource) -> Result<Resolution, ResolveError> {
        self.precheck_npm(source)?;
        let doc = self.packument(&source.package).await?;
        let chosen = npm::choose(
            &source.package,
            source.version.as_deref(),
            &doc,
            self.policy.block_deprecated,
        )?;
        Ok(Resolution {
            resolved: Resolved {
                kind: ResolvedKind::Npm {
                    package: source.package.clone(),
                    version: chosen.version,
                    args: source.args.clone(),
                },
                integrity: chosen.integrity,
            },
            warnings: chosen.warnings,
        })
    }

    async fn resolve_pypi(&self, source: &PypiSource) -> Result<Resolution, ResolveError> {
        let wanted = self.precheck_pypi(source)?;
        let name = pypi::normalize(&source.package);
        let (status, doc) = tokio::join!(
            self.project_status(&name),
            self.project(&name, format!("/pypi/{name}/json"))
        );
        // The status first: a quarantined project's documents may be gone, and that is the better message.
        let status = status?;
        let warnings = pypi::check_status(&source.package, status.as_ref())?;
        if let Some(from_doc) = doc.as_ref().ok().and_then(|d| {
            pypi::parse_status(&d.project_status)
                .or_else(|| pypi::parse_status(&d.info.project_status))
        }) {
            pypi::check_status(&source.package, Some(&from_doc))?;
        }
        let mut doc = doc?;
        // An index whose project document lists no `releases` carries only the latest's files: ask for the
        // version's own document.
        if doc.releases.is_empty()
            && let pypi::Wanted::Exact(v) = &wanted
            && pep440_rs::Version::from_str_opt(&doc.info.version).as_ref() != Some(v)
        {
            doc = self.project(&name, format!("/pypi/{name}/{v}/json")).await.map_err(|e| {
                if e.reason == reason::PACKAGE_NOT_FOUND {
                    ResolveError::stall(
                        reason::VERSION_NOT_FOUND,
                        format!("PyPI project {name} has no release {v}; set spec.source.pypi.version to a published release"),
                    )
                } else {
                    e
                }
            })?;
        }
        let chosen = pypi::choose(&source.package, &wanted, &doc)?;
        Ok(Resolution {
            resolved: Resolved {
                kind: ResolvedKind::Pypi {
                    package: source.package.clone(),
                    version: chosen.version,
                    command: pypi_command(source),
                    args: source.args.clone(),
                },
                integrity: chosen.integrity,
            },
            warnings,
        })
    }
}

trait FromStrOpt: Sized {
    fn from_str_opt(s: &str) -> Option<Self>;
}

impl FromStrOpt for pep440_rs::Version {
    fn from_str_opt(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

#[async_trait]
impl SourceResolver for RegistryResolver {
    async fn resolve(&self, source: &Source) -> Result<Resolved, ResolveError> {
        Ok(self.resolve_checked(source).await?.resolved)
    }

    async fn resolve_checked(&self, source: &Source) -> Result<Resolution, ResolveError> {
        match source.kind() {
            Some(SourceKind::Npm(npm)) => self.resolve_npm(npm).await,
            Some(SourceKind::Pypi(pypi)) => self.resolve_pypi(pypi).await,
            Some(SourceKind::Image(image)) => Ok(Resolution {
                resolved: Resolved {
                    kind: ResolvedKind::Image {
                        reference: image.reference.clone(),
                    },
                    integrity: None,
                },
                warnings: Vec::new(),
            }),
            None => Err(ResolveError::stall(
                reason::INVALID_SOURCE,
                "set exactly one of source.npm, source.pypi or source.image",
            )),
        }
    }

    fn precheck(&self, source: &Source) -> Result<(), ResolveError> {
        match source.kind() {
            Some(SourceKind::Npm(npm)) => self.precheck_npm(npm),
            Some(SourceKind::Pypi(pypi)) => self.precheck_pypi(pypi).map(|_| ()),
            Some(SourceKind::Image(_)) => Ok(()),
            None => Err(ResolveError::stall(
                reason::INVALID_SOURCE,
                "set exactly one of source.npm, source.pypi or source.image",
            )),
        }
    }
}
