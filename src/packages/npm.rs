//! npm: the packument, version selection as npm does it, and the checks on the chosen version.
//!
//! The controller asks for the abbreviated packument (`application/vnd.npm.install-v1+json`), which carries
//! `dist-tags`, and per version `dist.integrity`/`dist.shasum` and `deprecated` — everything checked here — at a
//! fraction of the full document's size. Registries that only serve the full document work too (same fields, and
//! `description`/`repository`, which improve placeholder detection).

use std::collections::BTreeMap;

use base64::Engine;
use node_semver::{Range, Version};
use serde::Deserialize;

use super::{ResolveError, Warning, reason};

/// The fields of a packument this module reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Packument {
    #[serde(default, rename = "dist-tags")]
    pub dist_tags: BTreeMap<String, String>,
    #[serde(default)]
    pub versions: BTreeMap<String, Manifest>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub dist: Dist,
    /// npm sets a message on deprecated versions; `false` or `""` means not deprecated.
    #[serde(default)]
    pub deprecated: Option<serde_json::Value>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub repository: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Dist {
    #[serde(default)]
    pub integrity: Option<String>,
    #[serde(default)]
    pub shasum: Option<String>,
    /// Where the version's tarball is; the runtime fetches and verifies it (see `artifact`).
    #[serde(default)]
    pub tarball: Option<String>,
}

impl Manifest {
    fn deprecation(&self) -> Option<String> {
        match &self.deprecated {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(serde_json::Value::Bool(true)) => Some("deprecated".into()),
            _ => None,
        }
    }

    /// ssri integrity: `dist.integrity`, or for old packages the sha1 `dist.shasum` in the same form.
    fn integrity(&self) -> Option<String> {
        self.dist.integrity.clone().or_else(|| {
            let raw = hex::decode(self.dist.shasum.as_deref()?).ok()?;
            Some(format!(
                "sha1-{}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ))
        })
    }
}

/// How the spec's version reads, in npm's order (npm-package-arg): an exact version, else a range, else a dist-tag.
#[derive(Debug)]
pub enum Wanted {
    Exact(Version),
    Range(Range),
    Tag(String),
}

pub fn parse_wanted(spec: Option<&str>) -> Wanted {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty());
    let Some(spec) = spec else {
        return Wanted::Tag("latest".into());
    };
    let bare = spec.strip_prefix('=').unwrap_or(spec);
    if let Ok(v) = Version::parse(bare)
        && !bare.contains(' ')
    {
        return Wanted::Exact(v);
    }
    match Range::parse(spec) {
        Ok(range) => Wanted::Range(range),
        Err(_) => Wanted::Tag(spec.to_string()),
    }
}

/// npm's security holding packages: when npm removes a malicious package it publishes `0.0.N-security` with the
/// description "security holding package" from `npm/security-holder`.
pub fn is_security_placeholder(
    version: &str,
    manifest_description: Option<&str>,
    repository: Option<&str>,
) -> bool {
    let placeholder_version = version
        .strip_prefix("0.0.")
        .and_then(|rest| rest.strip_suffix("-security"))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    placeholder_version
        || manifest_description
            .is_some_and(|d| d.trim().eq_ignore_ascii_case("security holding package"))
        || repository.is_some_and(|r| r.trim_end_matches(".git").ends_with("npm/security-holder"))
}

fn repository_text(value: &Option<serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => {
            o.get("url").and_then(|u| u.as_str()).map(str::to_string)
        }
        _ => None,
    }
}

/// The chosen version and what the registry says about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    pub version: String,
    pub integrity: Option<String>,
    pub warnings: Vec<Warning>,
}

/// Pick the version npm would install for `wanted`, then run the checks on it.
pub fn choose(
    package: &str,
    spec_version: Option<&str>,
    doc: &Packument,
    block_deprecated: bool,
) -> Result<Chosen, ResolveError> {
    if doc.versions.is_empty() {
        return Err(ResolveError::stall(
            reason::PACKAGE_NOT_FOUND,
            format!(
                "npm package {package} has no published versions (it was unpublished); choose another package"
            ),
        ));
    }
    let parsed: Vec<(Version, &String, &Manifest)> = doc
        .versions
        .iter()
        .filter_map(|(v, m)| Version::parse(v).ok().map(|parsed| (parsed, v, m)))
        .collect();
    let asked = spec_version.unwrap_or("latest");
    let chosen: Option<&String> = match parse_wanted(spec_version) {
        Wanted::Exact(want) => parsed
            .iter()
            .find(|(v, _, _)| *v == want)
            .map(|(_, s, _)| *s),
        Wanted::Tag(tag) => match doc.dist_tags.get(&tag) {
            Some(v) => doc.versions.get_key_value(v).map(|(k, _)| k),
            None => {
                return Err(ResolveError::stall(
                    reason::VERSION_NOT_FOUND,
                    format!(
                        "npm package {package} has no dist-tag `{tag}` (tags: {}); set spec.source.npm.version to a version, range or one of those tags",
                        doc.dist_tags.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        },
        // npm-pick-manifest: the `latest` tag wins when it satisfies the range; otherwise the highest satisfying
        // version, preferring versions that are not deprecated.
        Wanted::Range(range) => {
            let latest = doc
                .dist_tags
                .get("latest")
                .and_then(|l| parsed.iter().find(|(_, s, _)| *s == l));
            match latest {
                Some((v, s, m)) if v.satisfies(&range) && m.deprecation().is_none() => Some(*s),
                _ => parsed
                    .iter()
                    .filter(|(v, _, _)| v.satisfies(&range))
                    .max_by(|a, b| {
                        (a.2.deprecation().is_none(), &a.0)
                            .cmp(&(b.2.deprecation().is_none(), &b.0))
                    })
                    .map(|(_, s, _)| *s),
            }
        }
    };
    let Some(version) = chosen else {
        let mut recent: Vec<&Version> = parsed.iter().map(|(v, _, _)| v).collect();
        recent.sort();
        let recent: Vec<String> = recent.iter().rev().take(5).map(|v| v.to_string()).collect();
        return Err(ResolveError::stall(
            reason::VERSION_NOT_FOUND,
            format!(
                "npm package {package} has no version matching `{asked}` (latest: {}; recent: {}); set spec.source.npm.version to a published version",
                doc.dist_tags
                    .get("latest")
                    .map(String::as_str)
                    .unwrap_or("none"),
                recent.join(", ")
            ),
        ));
    };
    let manifest = &doc.versions[version];
    if is_security_placeholder(
        version,
        manifest.description.as_deref(),
        repository_text(&manifest.repository).as_deref(),
    ) {
        return Err(ResolveError::stall(
            reason::SECURITY_PLACEHOLDER,
            format!(
                "npm package {package}@{version} is npm's security holding package: npm removed the original, usually for malicious code. Do not run it; remove this deployment or choose another package"
            ),
        ));
    }
    let mut warnings = Vec::new();
    if let Some(message) = manifest.deprecation() {
        let text = format!(
            "npm package {package}@{version} is deprecated: \"{}\"; choose a supported version or package",
            message.chars().take(300).collect::<String>()
        );
        if block_deprecated {
            return Err(ResolveError::stall(
                reason::PACKAGE_DEPRECATED,
                format!("{text} (the controller's policy blocks deprecated versions)"),
            ));
        }
        warnings.push(Warning {
            reason: reason::PACKAGE_DEPRECATED,
            message: text,
        });
    }
    Ok(Chosen {
        version: version.clone(),
        integrity: manifest.integrity(),
        warnings,
    })
}

/// The packument path of a name: scoped names keep `@` and encode `/` as `%2F`, as the npm CLI does.
pub fn packument_path(package: &str) -> String {
    format!("/{}", package.replace('/', "%2F"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(json: serde_json::Value) -> Packument {
        serde_json::from_value(json).unwrap()
    }

    fn sample() -> Packument {
        doc(serde_json::json!({
            "name": "@acme/server",
            "dist-tags": {"latest": "1.4.0", "next": "2.0.0-beta.1"},
            "versions": {
                "1.2.0": {"dist": {"integrity": "sha512-a"}},
                "1.2.5": {"dist": {"integrity": "sha512-b"}, "deprecated": "use 1.4"},
                "1.3.0": {"dist": {"shasum": "d73c918731cb5a87da047e207234146f664d12b3"}},
                "1.4.0": {"dist": {"integrity": "sha512-d"}},
                "1.5.0-rc.1": {"dist": {"integrity": "sha512-e"}},
                "2.0.0-beta.1": {"dist": {"integrity": "sha512-f"}},
            }
        }))
    }

    fn pick(spec: Option<&str>) -> Result<String, &'static str> {
        choose("@acme/server", spec, &sample(), false)
            .map(|c| c.version)
            .map_err(|e| e.reason)
    }

    #[test]
    fn selects_like_npm() {
        assert_eq!(pick(None).unwrap(), "1.4.0");
        assert_eq!(pick(Some("latest")).unwrap(), "1.4.0");
        assert_eq!(pick(Some("next")).unwrap(), "2.0.0-beta.1");
        assert_eq!(pick(Some("1.2.0")).unwrap(), "1.2.0");
        assert_eq!(pick(Some("=1.2.0")).unwrap(), "1.2.0");
        // latest satisfies: it wins.
        assert_eq!(pick(Some("^1.2")).unwrap(), "1.4.0");
        assert_eq!(pick(Some("1.x")).unwrap(), "1.4.0");
        assert_eq!(pick(Some("*")).unwrap(), "1.4.0");
        // latest outside the range: the highest inside, deprecated ones last.
        assert_eq!(pick(Some("~1.2.0")).unwrap(), "1.2.0");
        assert_eq!(pick(Some(">=1.2.1 <1.3")).unwrap(), "1.2.5");
        assert_eq!(pick(Some(">=1 <1.4")).unwrap(), "1.3.0");
        // Prereleases only when the range names one.
        assert_eq!(pick(Some(">=1.5.0-rc.0 <2")).unwrap(), "1.5.0-rc.1");
        assert_eq!(pick(Some("^2")).unwrap_err(), reason::VERSION_NOT_FOUND);
        assert_eq!(pick(Some("^1.2 || ^2.0.0-beta.0")).unwrap(), "1.4.0");
        assert_eq!(pick(Some("9.9.9")).unwrap_err(), reason::VERSION_NOT_FOUND);
        assert_eq!(pick(Some("canary")).unwrap_err(), reason::VERSION_NOT_FOUND);
    }

    #[test]
    fn integrity_and_deprecation() {
        let c = choose("@acme/server", Some("1.3.0"), &sample(), false).unwrap();
        assert_eq!(
            c.integrity.as_deref(),
            Some("sha1-1zyRhzHLWofaBH4gcjQUb2ZNErM=")
        );
        let c = choose("@acme/server", Some("1.2.5"), &sample(), false).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.warnings[0].reason, reason::PACKAGE_DEPRECATED);
        assert!(c.warnings[0].message.contains("use 1.4"));
        let e = choose("@acme/server", Some("1.2.5"), &sample(), true).unwrap_err();
        assert_eq!(e.reason, reason::PACKAGE_DEPRECATED);
    }

    #[test]
    fn placeholders() {
        assert!(is_security_placeholder("0.0.1-security", None, None));
        assert!(is_security_placeholder("0.0.2-security", None, None));
        assert!(is_security_placeholder(
            "1.0.0",
            Some("security holding package"),
            None
        ));
        assert!(is_security_placeholder(
            "1.0.0",
            None,
            Some("git+https://github.com/npm/security-holder.git")
        ));
        assert!(!is_security_placeholder("0.0.1", None, None));
        assert!(!is_security_placeholder("1.0.0-security", None, None));
    }

    #[test]
    fn paths() {
        assert_eq!(
            packument_path("@modelcontextprotocol/server-everything"),
            "/@modelcontextprotocol%2Fserver-everything"
        );
        assert_eq!(packument_path("left-pad"), "/left-pad");
    }
}
