//! The controller's registry and policy settings (flags and environment), flattened into the controller's config.

use std::time::Duration;

use zeroize::Zeroizing;

/// Where packages are looked up, how, and which ones may run.
#[derive(clap::Args, Clone)]
pub struct ResolverConfig {
    /// npm registry base URL (a private registry or mirror works: the packument is read from `<url>/<name>`).
    #[arg(
        long = "npm-registry",
        env = "MCPFLY_NPM_REGISTRY",
        default_value = "https://registry.npmjs.org"
    )]
    pub npm_registry: String,

    /// Bearer token for the npm registry.
    #[arg(
        long = "npm-token",
        env = "MCPFLY_NPM_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub npm_token: Option<RegistrySecret>,

    /// PyPI index base URL (the JSON API is read from `<url>/pypi/<name>/json`, project status from
    /// `<url>/simple/<name>/`).
    #[arg(
        long = "pypi-index",
        env = "MCPFLY_PYPI_INDEX",
        default_value = "https://pypi.org"
    )]
    pub pypi_index: String,

    /// Basic-auth user name for the PyPI index.
    #[arg(long = "pypi-username", env = "MCPFLY_PYPI_USERNAME")]
    pub pypi_username: Option<String>,

    /// Basic-auth password for the PyPI index.
    #[arg(
        long = "pypi-password",
        env = "MCPFLY_PYPI_PASSWORD",
        hide = true,
        hide_env_values = true
    )]
    pub pypi_password: Option<RegistrySecret>,

    /// Packages that may run, as globs (`@modelcontextprotocol/*`, `mcp-server-*`), comma-separated. Empty allows
    /// all. PyPI names are matched in their PEP 503 normal form.
    #[arg(
        long = "package-allow",
        env = "MCPFLY_PACKAGE_ALLOW",
        value_delimiter = ','
    )]
    pub package_allow: Vec<String>,

    /// Packages that may never run, as globs, comma-separated. Deny wins over allow.
    #[arg(
        long = "package-deny",
        env = "MCPFLY_PACKAGE_DENY",
        value_delimiter = ','
    )]
    pub package_deny: Vec<String>,

    /// Require every npm/PyPI source to name an exact version (no range, dist-tag or default).
    #[arg(long = "require-version", env = "MCPFLY_REQUIRE_VERSION")]
    pub require_version: bool,

    /// Refuse deprecated npm versions (otherwise they run with a warning).
    #[arg(long = "block-deprecated", env = "MCPFLY_BLOCK_DEPRECATED")]
    pub block_deprecated: bool,

    /// Timeout of one registry request, in seconds.
    #[arg(
        long = "registry-timeout-seconds",
        env = "MCPFLY_REGISTRY_TIMEOUT_SECONDS",
        default_value_t = 10.0
    )]
    pub registry_timeout_seconds: f64,

    /// Retries of a registry request that timed out or got 429/5xx, with exponential backoff.
    #[arg(
        long = "registry-retries",
        env = "MCPFLY_REGISTRY_RETRIES",
        default_value_t = 2
    )]
    pub registry_retries: u32,

    /// How long a registry answer is reused, in seconds, so many deployments of one package cost one look-up.
    #[arg(
        long = "package-cache-ttl-seconds",
        env = "MCPFLY_PACKAGE_CACHE_TTL_SECONDS",
        default_value_t = 300
    )]
    pub package_cache_ttl_seconds: u64,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            npm_registry: "https://registry.npmjs.org".into(),
            npm_token: None,
            pypi_index: "https://pypi.org".into(),
            pypi_username: None,
            pypi_password: None,
            package_allow: Vec::new(),
            package_deny: Vec::new(),
            require_version: false,
            block_deprecated: false,
            registry_timeout_seconds: 10.0,
            registry_retries: 2,
            package_cache_ttl_seconds: 300,
        }
    }
}

impl ResolverConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.registry_timeout_seconds.max(0.001))
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_secs(self.package_cache_ttl_seconds)
    }
}

impl std::fmt::Debug for ResolverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolverConfig")
            .field("npm_registry", &self.npm_registry)
            .field("npm_token", &self.npm_token)
            .field("pypi_index", &self.pypi_index)
            .field("pypi_username", &self.pypi_username)
            .field("pypi_password", &self.pypi_password)
            .field("package_allow", &self.package_allow)
            .field("package_deny", &self.package_deny)
            .field("require_version", &self.require_version)
            .field("block_deprecated", &self.block_deprecated)
            .field("registry_timeout_seconds", &self.registry_timeout_seconds)
            .field("registry_retries", &self.registry_retries)
            .field("package_cache_ttl_seconds", &self.package_cache_ttl_seconds)
            .finish()
    }
}

/// A registry credential: zeroized on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct RegistrySecret(Zeroizing<String>);

impl RegistrySecret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RegistrySecret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl std::fmt::Debug for RegistrySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistrySecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        resolver: ResolverConfig,
    }

    #[test]
    fn flags_parse_and_defaults_match() {
        let cli = Cli::try_parse_from([
            "mcpfly",
            "--npm-registry",
            "https://npm.internal/",
            "--npm-token",
            "tok",
            "--package-allow",
            "@acme/*,mcp-server-*",
            "--require-version",
            "--registry-timeout-seconds",
            "2.5",
        ])
        .unwrap();
        let c = cli.resolver;
        assert_eq!(c.npm_registry, "https://npm.internal/");
        assert_eq!(c.npm_token.as_ref().unwrap().expose(), "tok");
        assert_eq!(c.package_allow, ["@acme/*", "mcp-server-*"]);
        assert!(c.require_version && !c.block_deprecated);
        assert_eq!(c.timeout(), Duration::from_millis(2500));
        assert!(!format!("{c:?}").contains("tok\""));

        let d = Cli::try_parse_from(["mcpfly"]).unwrap().resolver;
        let default = ResolverConfig::default();
        assert_eq!(d.npm_registry, default.npm_registry);
        assert_eq!(d.pypi_index, default.pypi_index);
        assert_eq!(d.registry_retries, default.registry_retries);
        assert_eq!(
            d.package_cache_ttl_seconds,
            default.package_cache_ttl_seconds
        );
    }
}
