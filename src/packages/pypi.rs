//! PyPI: the JSON API document, PEP 503 names, PEP 440 selection, yanked releases (PEP 592) and project status
//! markers (PEP 792).
//!
//! Releases come from `GET {index}/pypi/{name}/json` (`info.version` is PyPI's latest; `releases` lists every
//! version's files with `yanked` and `digests.sha256`). Project status comes from the Simple API's JSON form
//! (`GET {index}/simple/{name}/`, `Accept: application/vnd.pypi.simple.v1+json`, key `project-status`), where
//! PEP 792 puts it; a `project-status` key in the JSON API document is honoured as well. An index that serves no
//! status reports none, which reads as `active`.

use std::collections::BTreeMap;
use std::str::FromStr;

use pep440_rs::{Version, VersionSpecifiers};
use serde::Deserialize;

use super::{ResolveError, Warning, reason};

/// PEP 503 normal form: lowercase, runs of `-`, `_` and `.` become one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !in_sep {
                out.push('-');
            }
            in_sep = true;
        } else {
            out.extend(c.to_lowercase());
            in_sep = false;
        }
    }
    out
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ProjectDoc {
    #[serde(default)]
    pub info: Info,
    #[serde(default)]
    pub releases: BTreeMap<String, Vec<File>>,
    /// The files of `info.version` (the per-version document has only these).
    #[serde(default)]
    pub urls: Vec<File>,
    #[serde(default, rename = "project-status")]
    pub project_status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Info {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub project_status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct File {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
    #[serde(default)]
    pub yanked: bool,
    #[serde(default)]
    pub yanked_reason: Option<String>,
}

/// The Simple API JSON document; only the status is read.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SimpleDoc {
    #[serde(default, rename = "project-status")]
    pub project_status: Option<serde_json::Value>,
}

/// A PEP 792 status and its reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub status: String,
    pub reason: Option<String>,
}

pub fn parse_status(value: &Option<serde_json::Value>) -> Option<Status> {
    match value.as_ref()? {
        serde_json::Value::String(s) => Some(Status {
            status: s.to_ascii_lowercase(),
            reason: None,
        }),
        serde_json::Value::Object(o) => Some(Status {
            status: o.get("status")?.as_str()?.to_ascii_lowercase(),
            reason: o.get("reason").and_then(|r| r.as_str()).map(str::to_string),
        }),
        _ => None,
    }
}

/// Stall on `quarantined` and `archived`; warn on `deprecated`.
pub fn check_status(package: &str, status: Option<&Status>) -> Result<Vec<Warning>, ResolveError> {
    let Some(status) = status else {
        return Ok(Vec::new());
    };
    let why = status
        .reason
        .as_deref()
        .filter(|r| !r.trim().is_empty())
        .map(|r| format!(" (index says: {})", r.chars().take(300).collect::<String>()))
        .unwrap_or_default();
    match status.status.as_str() {
        "quarantined" => Err(ResolveError::stall(
            reason::PROJECT_QUARANTINED,
            format!(
                "PyPI project {package} is quarantined{why}: the index considers it unsafe (e.g. malware) and serves none of its files. Do not run it; remove this deployment or choose another package"
            ),
        )),
        "archived" => Err(ResolveError::stall(
            reason::PROJECT_ARCHIVED,
            format!(
                "PyPI project {package} is archived{why}: its maintainers expect no further releases, security fixes included; choose a maintained package"
            ),
        )),
        "deprecated" => Ok(vec![Warning {
            reason: reason::PACKAGE_DEPRECATED,
            message: format!(
                "PyPI project {package} is deprecated{why}; plan a move to its successor"
            ),
        }]),
        _ => Ok(Vec::new()),
    }
}

/// How the spec's version reads: none (latest), one exact version, or PEP 440 specifiers.
#[derive(Debug)]
pub enum Wanted {
    Latest,
    Exact(Version),
    Specifiers(VersionSpecifiers),
}

pub fn parse_wanted(package: &str, spec: Option<&str>) -> Result<Wanted, ResolveError> {
    let Some(spec) = spec
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "latest")
    else {
        return Ok(Wanted::Latest);
    };
    if let Ok(v) = Version::from_str(spec) {
        return Ok(Wanted::Exact(v));
    }
    VersionSpecifiers::from_str(spec)
        .map(Wanted::Specifiers)
        .map_err(|_| {
            ResolveError::stall(
                reason::INVALID_VERSION,
                format!(
                    "`{spec}` is not a PEP 440 version for PyPI package {package}; set spec.source.pypi.version to a version such as 1.2.3"
                ),
            )
        })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    pub version: String,
    pub integrity: Option<String>,
}

fn usable(files: &[File]) -> bool {
    files.iter().any(|f| !f.yanked)
}

/// Pick the release for `wanted` and check it.
pub fn choose(package: &str, wanted: &Wanted, doc: &ProjectDoc) -> Result<Chosen, ResolveError> {
    // Releases by parsed version; a document without `releases` (the per-version form) has `info.version` + `urls`.
    let mut releases: Vec<(Version, &String, &[File])> = doc
        .releases
        .iter()
        .filter_map(|(k, files)| Version::from_str(k).ok().map(|v| (v, k, files.as_slice())))
        .collect();
    if releases.is_empty()
        && let Ok(v) = Version::from_str(&doc.info.version)
    {
        releases.push((v, &doc.info.version, doc.urls.as_slice()));
    }
    releases.sort_by(|a, b| a.0.cmp(&b.0));
    let (asked, found) = match wanted {
        Wanted::Exact(want) => {
            let found = releases.iter().find(|(v, _, _)| v == want);
            if let Some((_, key, files)) = found {
                if files.is_empty() {
                    return Err(ResolveError::stall(
                        reason::VERSION_NOT_FOUND,
                        format!(
                            "PyPI release {package}=={key} has no files to install; choose another version"
                        ),
                    ));
                }
                if !usable(files) {
                    let why = files
                        .iter()
                        .find_map(|f| f.yanked_reason.clone())
                        .filter(|r| !r.trim().is_empty())
                        .map(|r| format!(" (reason: {})", r.chars().take(300).collect::<String>()))
                        .unwrap_or_default();
                    return Err(ResolveError::stall(
                        reason::RELEASE_YANKED,
                        format!(
                            "PyPI release {package}=={key} was yanked{why}; set spec.source.pypi.version to a release that was not"
                        ),
                    ));
                }
            }
            (want.to_string(), found)
        }
        Wanted::Latest => {
            // PyPI's own `info.version` when installable, else the highest final release that is.
            let latest = releases
                .iter()
                .find(|(_, k, files)| **k == doc.info.version && usable(files));
            let found = latest.or_else(|| {
                releases
                    .iter()
                    .rev()
                    .find(|(v, _, files)| !v.any_prerelease() && usable(files))
            });
            ("the latest release".to_string(), found)
        }
        Wanted::Specifiers(specs) => {
            let pre = specs.iter().any(|s| s.any_prerelease());
            let found = releases.iter().rev().find(|(v, _, files)| {
                specs.contains(v) && (pre || !v.any_prerelease()) && usable(files)
            });
            (specs.to_string(), found)
        }
    };
    let Some((_, key, files)) = found else {
        let recent: Vec<&str> = releases
            .iter()
            .rev()
            .take(5)
            .map(|(_, k, _)| k.as_str())
            .collect();
        return Err(ResolveError::stall(
            reason::VERSION_NOT_FOUND,
            format!(
                "PyPI project {package} has no installable release matching {asked} (latest: {}; recent: {}); set spec.source.pypi.version to a published release",
                if doc.info.version.is_empty() {
                    "none"
                } else {
                    &doc.info.version
                },
                recent.join(", ")
            ),
        ));
    };
    Ok(Chosen {
        version: key.to_string(),
        integrity: integrity(files),
    })
}

/// `sha256:<hex>` of the release file that is pinned (see [`preferred_file`]).
fn integrity(files: &[File]) -> Option<String> {
    let files: Vec<&File> = files.iter().filter(|f| !f.yanked).collect();
    let pick = preferred_file(&files, |f| &f.filename)?;
    pick.digests.get("sha256").map(|h| format!("sha256:{h}"))
}

/// The one file of a release that is pinned and, on the machine, verified and installed: a pure-Python wheel when
/// there is one, else the source distribution, else the first file. The controller (pinning) and the runtime
/// (verifying) both choose with this, so they agree on the file.
pub fn preferred_file<T>(files: &[T], filename: impl Fn(&T) -> &str) -> Option<&T> {
    files
        .iter()
        .find(|f| filename(f).ends_with("-none-any.whl"))
        .or_else(|| files.iter().find(|f| is_sdist(filename(f))))
        .or_else(|| files.first())
}

/// Source distributions by name (PEP 625: `.tar.gz`; older ones `.zip`), as the Simple API lists no file type.
pub fn is_sdist(filename: &str) -> bool {
    filename.ends_with(".tar.gz") || filename.ends_with(".zip")
}

/// The release version a distribution file name carries (`name-1.0-py3-none-any.whl`, `name-1.0.tar.gz`).
/// Wheel names escape `-` in the project name, so the version is the second field; sdist names end in it.
pub fn file_version(filename: &str) -> Option<Version> {
    let text = if let Some(stem) = filename.strip_suffix(".whl") {
        stem.split('-').nth(1)?
    } else {
        let stem = filename
            .strip_suffix(".tar.gz")
            .or_else(|| filename.strip_suffix(".zip"))?;
        stem.rsplit_once('-')?.1
    };
    Version::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pep503() {
        assert_eq!(normalize("Mcp_Server.Fetch"), "mcp-server-fetch");
        assert_eq!(normalize("a--_.b"), "a-b");
        assert_eq!(normalize("zope.interface"), "zope-interface");
        assert_eq!(normalize("X1"), "x1");
    }

    fn file(name: &str, sha: &str, yanked: bool) -> serde_json::Value {
        serde_json::json!({
            "filename": name, "packagetype": if name.ends_with(".whl") { "bdist_wheel" } else { "sdist" },
            "digests": {"sha256": sha, "md5": "x"}, "yanked": yanked,
            "yanked_reason": if yanked { serde_json::json!("broken") } else { serde_json::Value::Null },
        })
    }

    fn sample() -> ProjectDoc {
        serde_json::from_value(serde_json::json!({
            "info": {"name": "mcp-server-fetch", "version": "1.2.0"},
            "releases": {
                "1.0.0": [file("p-1.0.0.tar.gz", "aa", false), file("p-1.0.0-py3-none-any.whl", "ab", false)],
                "1.1.0": [file("p-1.1.0.tar.gz", "ba", true)],
                "1.2.0": [file("p-1.2.0.tar.gz", "ca", false)],
                "1.3.0rc1": [file("p-1.3.0rc1.tar.gz", "da", false)],
                "1.4.0": [],
            },
            "urls": [],
        }))
        .unwrap()
    }

    fn pick(spec: Option<&str>) -> Result<(String, Option<String>), &'static str> {
        let wanted = parse_wanted("p", spec).map_err(|e| e.reason)?;
        choose("p", &wanted, &sample())
            .map(|c| (c.version, c.integrity))
            .map_err(|e| e.reason)
    }

    #[test]
    fn selects() {
        assert_eq!(
            pick(None).unwrap(),
            ("1.2.0".into(), Some("sha256:ca".into()))
        );
        assert_eq!(
            pick(Some("1.0.0")).unwrap(),
            ("1.0.0".into(), Some("sha256:ab".into()))
        );
        // PEP 440 equality: 1.0 is 1.0.0.
        assert_eq!(pick(Some("1.0")).unwrap().0, "1.0.0");
        assert_eq!(pick(Some("1.1.0")).unwrap_err(), reason::RELEASE_YANKED);
        assert_eq!(pick(Some("1.4.0")).unwrap_err(), reason::VERSION_NOT_FOUND);
        assert_eq!(pick(Some("9.0")).unwrap_err(), reason::VERSION_NOT_FOUND);
        assert_eq!(pick(Some(">=1.0,<1.2")).unwrap().0, "1.0.0");
        assert_eq!(pick(Some("~=1.0")).unwrap().0, "1.2.0");
        assert_eq!(pick(Some(">=1.3.0rc1")).unwrap().0, "1.3.0rc1");
        assert_eq!(
            pick(Some("not a version")).unwrap_err(),
            reason::INVALID_VERSION
        );
    }

    #[test]
    fn statuses() {
        let s = |v| parse_status(&Some(v));
        let q = s(serde_json::json!({"status": "quarantined", "reason": "malware"}));
        assert_eq!(
            check_status("p", q.as_ref()).unwrap_err().reason,
            reason::PROJECT_QUARANTINED
        );
        let a = s(serde_json::json!("archived"));
        assert_eq!(
            check_status("p", a.as_ref()).unwrap_err().reason,
            reason::PROJECT_ARCHIVED
        );
        let d = s(serde_json::json!({"status": "deprecated"}));
        assert_eq!(check_status("p", d.as_ref()).unwrap().len(), 1);
        let active = s(serde_json::json!({"status": "active"}));
        assert!(check_status("p", active.as_ref()).unwrap().is_empty());
        assert!(check_status("p", None).unwrap().is_empty());
    }

    #[test]
    fn file_versions() {
        let v = |s| Version::from_str(s).unwrap();
        assert_eq!(
            file_version("mcp_server_time-1.0-py3-none-any.whl"),
            Some(v("1.0.0"))
        );
        assert_eq!(
            file_version("mcp-server-time-2.1rc1.tar.gz"),
            Some(v("2.1rc1"))
        );
        assert_eq!(file_version("old-1.0.zip"), Some(v("1.0")));
        assert_eq!(file_version("p-1.0.exe"), None);
    }
}
