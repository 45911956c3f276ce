//! Which packages may run: allow and deny globs, required exact versions, deprecated versions.

use super::{ResolveError, reason};

/// The controller's package policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub require_version: bool,
    pub block_deprecated: bool,
}

impl Policy {
    /// Check a package name (`ecosystem` is `npm` or `pypi`; PyPI names arrive PEP 503-normalised). Globs may be
    /// prefixed with the ecosystem (`npm:@acme/*`, `pypi:mcp-server-*`) to apply to one registry only.
    pub fn check_name(&self, ecosystem: &str, name: &str) -> Result<(), ResolveError> {
        let matches = |pattern: &String| {
            let pattern = pattern.trim();
            match pattern.split_once(':') {
                Some((eco, rest)) if eco == "npm" || eco == "pypi" => {
                    eco == ecosystem && glob_match(rest, name)
                }
                _ => glob_match(pattern, name),
            }
        };
        if let Some(rule) = self.deny.iter().find(|p| matches(p)) {
            return Err(ResolveError::stall(
                reason::PACKAGE_DENIED,
                format!(
                    "{ecosystem} package {name} is denied by the controller's policy (rule `{}`); choose another package or ask the platform team",
                    rule.trim()
                ),
            ));
        }
        let allow: Vec<&String> = self.allow.iter().filter(|p| !p.trim().is_empty()).collect();
        if !allow.is_empty() && !allow.iter().any(|p| matches(p)) {
            return Err(ResolveError::stall(
                reason::PACKAGE_NOT_ALLOWED,
                format!(
                    "{ecosystem} package {name} is not on the controller's allow list ({}); choose an allowed package or ask the platform team to allow it",
                    allow
                        .iter()
                        .map(|p| p.trim())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// With `require_version`, only an exact version passes.
    pub fn check_version(
        &self,
        ecosystem: &str,
        name: &str,
        exact: bool,
        version: Option<&str>,
    ) -> Result<(), ResolveError> {
        if self.require_version && !exact {
            let what = match version {
                None => "no version".to_string(),
                Some(v) => format!("`{v}`, which is a range or tag,"),
            };
            return Err(ResolveError::stall(
                reason::VERSION_REQUIRED,
                format!(
                    "{ecosystem} package {name} has {what} but the controller's policy requires an exact version; set spec.source.{ecosystem}.version to one (e.g. the version status.source shows)"
                ),
            ));
        }
        Ok(())
    }
}

/// Shell-style glob over a whole name: `*` matches any run of characters (including `/`), `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "@modelcontextprotocol/*",
            "@modelcontextprotocol/server-everything"
        ));
        assert!(glob_match("mcp-server-*", "mcp-server-fetch"));
        assert!(glob_match("*", "anything/at/all"));
        assert!(glob_match("left-pa?", "left-pad"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("@acme/*", "@evil/acme"));
        assert!(!glob_match("mcp-*-git", "mcp-server-fetch"));
        assert!(glob_match("*-git", "mcp-server-git"));
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let policy = Policy {
            allow: vec!["@modelcontextprotocol/*".into(), "pypi:mcp-server-*".into()],
            deny: vec!["@modelcontextprotocol/server-puppeteer".into()],
            ..Default::default()
        };
        assert!(
            policy
                .check_name("npm", "@modelcontextprotocol/server-everything")
                .is_ok()
        );
        assert_eq!(
            policy
                .check_name("npm", "@modelcontextprotocol/server-puppeteer")
                .unwrap_err()
                .reason,
            reason::PACKAGE_DENIED
        );
        assert_eq!(
            policy.check_name("npm", "left-pad").unwrap_err().reason,
            reason::PACKAGE_NOT_ALLOWED
        );
        assert!(policy.check_name("pypi", "mcp-server-fetch").is_ok());
        // An ecosystem-prefixed rule applies to that registry only.
        assert_eq!(
            policy
                .check_name("npm", "mcp-server-fetch")
                .unwrap_err()
                .reason,
            reason::PACKAGE_NOT_ALLOWED
        );
    }

    #[test]
    fn required_version() {
        let policy = Policy {
            require_version: true,
            ..Default::default()
        };
        assert!(
            policy
                .check_version("npm", "x", true, Some("1.2.3"))
                .is_ok()
        );
        let err = policy
            .check_version("npm", "x", false, Some("^1"))
            .unwrap_err();
        assert_eq!(err.reason, reason::VERSION_REQUIRED);
        assert!(
            err.message.contains("spec.source.npm.version"),
            "{}",
            err.message
        );
        assert!(policy.check_version("pypi", "x", false, None).is_err());
        assert!(
            Policy::default()
                .check_version("npm", "x", false, None)
                .is_ok()
        );
    }
}
