//! The machine's half of pinning: before the server runs, fetch the one top-level artifact the controller pinned
//! (the npm tarball, the PyPI release file) from the registry the controller checked it against, verify it against
//! the pinned integrity, and run that local file, so what runs is what was verified (no second download by
//! `npx`/`uvx`). Dependencies below it are not pinned: `npx`/`uv` resolve them within the package's own ranges.
//!
//! The pin reaches the machine as [`INTEGRITY_ENV`], set by the controller ([`machine_pin`]); the registries come
//! from the same variables `npx` and `uvx` read (`npm_config_registry`, `UV_DEFAULT_INDEX`). No registry credential
//! is used here: the controller passes none to machines.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use sha2::Digest;

use super::http::{self, Auth, Fetched, Registry};
use super::registry::{NPM_ACCEPT, PYPI_SIMPLE_ACCEPT};
use super::{Resolved, ResolvedKind, npm, pypi};

/// The machine env holding the pinned integrity (npm SRI such as `sha512-...`; PyPI `sha256:<hex>`).
pub const INTEGRITY_ENV: &str = "MCPFLY_ARTIFACT_INTEGRITY";

/// What the controller sets in [`INTEGRITY_ENV`]: the resolved integrity when the runtime can verify it. npm's
/// sha1 `shasum` (old packages without `dist.integrity`) is too weak to pin; such packages run unverified.
pub fn machine_pin(resolved: &Resolved) -> Option<String> {
    let integrity = resolved.integrity.as_deref()?;
    let verifiable = match &resolved.kind {
        ResolvedKind::Npm { .. } => matches!(Pin::parse(integrity), Some(Pin::Sri(_))),
        ResolvedKind::Pypi { .. } => matches!(Pin::parse(integrity), Some(Pin::Sha256Hex(_))),
        ResolvedKind::Image { .. } => false,
    };
    verifiable.then(|| integrity.to_string())
}

/// A parsed integrity.
#[derive(Debug, PartialEq, Eq)]
enum Pin {
    /// ssri: one or more `alg-base64` tokens; the strongest algorithm present decides.
    Sri(Vec<(Alg, String)>),
    /// PyPI's `sha256:<hex>`.
    Sha256Hex(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Alg {
    Sha256,
    Sha384,
    Sha512,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Sha256 => "sha256",
            Alg::Sha384 => "sha384",
            Alg::Sha512 => "sha512",
        }
    }

    fn digest(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Alg::Sha256 => sha2::Sha256::digest(bytes).to_vec(),
            Alg::Sha384 => sha2::Sha384::digest(bytes).to_vec(),
            Alg::Sha512 => sha2::Sha512::digest(bytes).to_vec(),
        }
    }
}

impl Pin {
    fn parse(text: &str) -> Option<Pin> {
        if let Some(hex) = text.strip_prefix("sha256:") {
            return (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| Pin::Sha256Hex(hex.to_ascii_lowercase()));
        }
        let tokens: Vec<(Alg, String)> = text
            .split_whitespace()
            .filter_map(|token| {
                let (alg, rest) = token.split_once('-')?;
                let alg = match alg {
                    "sha256" => Alg::Sha256,
                    "sha384" => Alg::Sha384,
                    "sha512" => Alg::Sha512,
                    _ => return None,
                };
                // SRI options follow `?`; they carry no digest.
                let value = rest.split('?').next().unwrap_or_default();
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .ok()?;
                (raw.len() == alg.digest(b"").len()).then(|| (alg, value.to_string()))
            })
            .collect();
        (!tokens.is_empty()).then_some(Pin::Sri(tokens))
    }

    /// `Ok` when `bytes` match; otherwise the digest they have, in the pin's own form.
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Pin::Sha256Hex(want) => {
                let got = hex::encode(sha2::Sha256::digest(bytes));
                if &got == want {
                    Ok(())
                } else {
                    Err(format!("sha256:{got}"))
                }
            }
            Pin::Sri(tokens) => {
                let strongest = tokens.iter().map(|(alg, _)| *alg).max().expect("non-empty");
                let got = base64::engine::general_purpose::STANDARD.encode(strongest.digest(bytes));
                if tokens.iter().any(|(alg, v)| *alg == strongest && *v == got) {
                    Ok(())
                } else {
                    Err(format!("{}-{got}", strongest.name()))
                }
            }
        }
    }
}

/// The package a server command fetches, read back from the argv [`super::server_argv`] builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// `npx -y <package>@<version> <args...>`
    Npm {
        program: String,
        package: String,
        version: String,
        args: Vec<String>,
    },
    /// `uvx --from <package>==<version> <command> <args...>`
    Pypi {
        program: String,
        package: String,
        version: String,
        command: String,
        args: Vec<String>,
    },
}

impl Artifact {
    pub fn from_argv(argv: &[String]) -> Option<Artifact> {
        let program = argv.first()?;
        let name = Path::new(program).file_name()?.to_str()?;
        match (name, argv.get(1).map(String::as_str)) {
            ("npx", Some("-y")) => {
                let (package, version) = argv.get(2)?.rsplit_once('@')?;
                (!package.is_empty() && !version.is_empty()).then(|| Artifact::Npm {
                    program: program.clone(),
                    package: package.to_string(),
                    version: version.to_string(),
                    args: argv[3..].to_vec(),
                })
            }
            ("uvx", Some("--from")) => {
                let (package, version) = argv.get(2)?.split_once("==")?;
                let command = argv.get(3)?;
                (!package.is_empty() && !version.is_empty()).then(|| Artifact::Pypi {
                    program: program.clone(),
                    package: package.to_string(),
                    version: version.to_string(),
                    command: command.clone(),
                    args: argv[4..].to_vec(),
                })
            }
            _ => None,
        }
    }

    /// `@scope/name@1.2.3` or `name==1.2.3`, for messages.
    pub fn display(&self) -> String {
        match self {
            Artifact::Npm {
                package, version, ..
            } => format!("npm package {package}@{version}"),
            Artifact::Pypi {
                package, version, ..
            } => format!("PyPI package {package}=={version}"),
        }
    }

    /// The same command, running the verified local `file` instead of fetching the package again.
    fn argv_for(&self, file: &Path) -> Vec<String> {
        let file = file.to_string_lossy().into_owned();
        match self {
            // A bare path would be taken for a command; `file:` makes npm read it as a package (bin inferred from
            // its manifest, as for a registry package).
            Artifact::Npm { program, args, .. } => {
                let mut argv = vec![program.clone(), "-y".into(), format!("file:{file}")];
                argv.extend(args.iter().cloned());
                argv
            }
            Artifact::Pypi {
                program,
                command,
                args,
                ..
            } => {
                let mut argv = vec![program.clone(), "--from".into(), file, command.clone()];
                argv.extend(args.iter().cloned());
                argv
            }
        }
    }
}

/// Where the artifact is fetched from and kept.
#[derive(Clone, Debug)]
pub struct Sources {
    /// npm registry base (what `npx` uses: `npm_config_registry`).
    pub npm_registry: String,
    /// PyPI Simple API base (what `uvx` uses: `UV_DEFAULT_INDEX`).
    pub pypi_simple: String,
    /// Folder the verified file is written to.
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The registry served other bytes than were pinned: never run them, never retry.
    #[error(
        "refusing to run {artifact}: its file {file} does not match the integrity the controller pinned \
         (expected {expected}, got {got})"
    )]
    Mismatch {
        artifact: String,
        file: String,
        expected: String,
        got: String,
    },
    /// The pin or the command cannot be verified at all (a controller/runtime mismatch): refuse as well.
    #[error("refusing to run the server: {0}")]
    Unverifiable(String),
    /// The registry did not answer as needed; starting again may work.
    #[error("cannot fetch {artifact} to verify it: {message}")]
    Unavailable { artifact: String, message: String },
}

impl ArtifactError {
    /// Whether the server must never start with this pin (as opposed to a registry that may answer later).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ArtifactError::Unavailable { .. })
    }
}

/// Largest time one registry request may take (a tarball of tens of MB on a slow link).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
const FETCH_RETRIES: u32 = 3;

/// Fetches the artifact `argv` names, verifies it against `pin` and returns the command that runs the verified
/// file.
pub async fn fetch_verified(
    argv: &[String],
    pin: &str,
    sources: &Sources,
) -> Result<Vec<String>, ArtifactError> {
    let artifact = Artifact::from_argv(argv).ok_or_else(|| {
        ArtifactError::Unverifiable(format!(
            "{INTEGRITY_ENV} is set but the command `{}` is not `npx -y PACKAGE@VERSION ...` or `uvx --from \
             PACKAGE==VERSION COMMAND ...`, so there is nothing to verify it against",
            argv.first().map(String::as_str).unwrap_or("")
        ))
    })?;
    let parsed = Pin::parse(pin).ok_or_else(|| {
        ArtifactError::Unverifiable(format!(
            "{INTEGRITY_ENV} `{pin}` is not an integrity this runtime verifies (sha256/384/512 SRI, or sha256:<hex>)"
        ))
    })?;
    let unavailable = |message: String| ArtifactError::Unavailable {
        artifact: artifact.display(),
        message,
    };
    let client = http::client(FETCH_TIMEOUT).map_err(|e| unavailable(e.to_string()))?;
    let (url, filename) = match &artifact {
        Artifact::Npm {
            package, version, ..
        } => {
            let registry = Registry::new(
                &sources.npm_registry,
                Auth::None,
                client.clone(),
                FETCH_RETRIES,
            );
            let body = found(
                registry
                    .get(&npm::packument_path(package), NPM_ACCEPT)
                    .await,
                &registry.base,
            )
            .map_err(unavailable)?;
            let doc: npm::Packument = serde_json::from_slice(&body)
                .map_err(|e| unavailable(format!("unreadable packument: {e}")))?;
            let url = doc
                .versions
                .get(version)
                .and_then(|m| m.dist.tarball.clone())
                .ok_or_else(|| {
                    unavailable(format!(
                        "{} lists no tarball for {version}",
                        without_userinfo(&registry.base)
                    ))
                })?;
            let basename = package.rsplit('/').next().unwrap_or(package);
            (url, format!("{basename}-{version}.tgz"))
        }
        Artifact::Pypi {
            package, version, ..
        } => {
            let index = Registry::new(
                &sources.pypi_simple,
                Auth::None,
                client.clone(),
                FETCH_RETRIES,
            );
            let page = format!("/{}/", pypi::normalize(package));
            let body = found(index.get(&page, PYPI_SIMPLE_ACCEPT).await, &index.base)
                .map_err(unavailable)?;
            let doc: SimpleFiles = serde_json::from_slice(&body).map_err(|e| {
                unavailable(format!(
                    "{}{page} is not a PEP 691 JSON project page ({e}); the index must serve \
                     application/vnd.pypi.simple.v1+json",
                    without_userinfo(&index.base)
                ))
            })?;
            let want = pep440_rs::Version::from_str(version)
                .map_err(|e| unavailable(format!("version {version}: {e}")))?;
            let files: Vec<&SimpleFile> = doc
                .files
                .iter()
                .filter(|f| {
                    !f.is_yanked() && pypi::file_version(&f.filename).as_ref() == Some(&want)
                })
                .collect();
            let file = pypi::preferred_file(&files, |f| &f.filename).ok_or_else(|| {
                unavailable(format!(
                    "{}{page} lists no file of {version}",
                    without_userinfo(&index.base)
                ))
            })?;
            // The name reaches the file system; uv reads name, version and tags from it.
            if file.filename.contains(['/', '\\']) || file.filename.starts_with('.') {
                return Err(unavailable(format!(
                    "unusable file name `{}`",
                    file.filename
                )));
            }
            let url = reqwest::Url::parse(&format!("{}{page}", index.base))
                .and_then(|base| base.join(&file.url))
                .map_err(|e| unavailable(format!("file URL `{}`: {e}", file.url)))?;
            (url.to_string(), file.filename.clone())
        }
    };
    let path = sources.dir.join(&filename);
    // A file verified on an earlier start (same folder, same pin) is not fetched again.
    if let Ok(bytes) = tokio::fs::read(&path).await
        && parsed.check(&bytes).is_ok()
    {
        return Ok(artifact.argv_for(&path));
    }
    let source = Registry::new(&url, Auth::None, client, FETCH_RETRIES);
    let bytes = found(source.get("", "*/*").await, &url).map_err(unavailable)?;
    if let Err(got) = parsed.check(&bytes) {
        return Err(ArtifactError::Mismatch {
            artifact: artifact.display(),
            file: without_userinfo(&url),
            expected: pin.to_string(),
            got,
        });
    }
    write_atomically(&path, &bytes)
        .await
        .map_err(|e| unavailable(format!("writing {}: {e}", path.display())))?;
    Ok(artifact.argv_for(&path))
}

fn found(fetched: Result<Fetched, super::ResolveError>, base: &str) -> Result<Vec<u8>, String> {
    let shown = without_userinfo(base);
    match fetched {
        Ok(Fetched::Found(body)) => Ok(body),
        Ok(Fetched::NotFound) => Err(format!("{shown}: not found")),
        Ok(Fetched::Refused(status)) => Err(format!("{shown}: HTTP {status}")),
        // Worded for the controller by the registry module; here the machine retries by restarting.
        Err(e) => Err(e
            .message
            .replace(base, &shown)
            .replace("; the controller retries with backoff", "")),
    }
}

/// A URL fit for a log line: a registry URL may carry credentials as `user:password@`.
fn without_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable URL)".to_string(),
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    // Per process: bridges sharing a folder (local machines on one host) must not write into each other's file.
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    tokio::fs::write(&partial, bytes).await?;
    tokio::fs::rename(&partial, path).await
}

/// The file list of a PEP 691 project page.
#[derive(serde::Deserialize)]
struct SimpleFiles {
    #[serde(default)]
    files: Vec<SimpleFile>,
}

#[derive(serde::Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    /// `false`, or `true` / a reason string when yanked (PEP 691).
    #[serde(default)]
    yanked: Option<serde_json::Value>,
}

impl SimpleFile {
    fn is_yanked(&self) -> bool {
        match &self.yanked {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(_)) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::server_argv;

    fn sri(alg: Alg, bytes: &[u8]) -> String {
        format!(
            "{}-{}",
            alg.name(),
            base64::engine::general_purpose::STANDARD.encode(alg.digest(bytes))
        )
    }

    #[test]
    fn pins_match_only_the_pinned_bytes() {
        let good = b"package contents";
        let sha512 = sri(Alg::Sha512, good);
        let pin = Pin::parse(&sha512).unwrap();
        assert_eq!(pin.check(good), Ok(()));
        assert_eq!(
            pin.check(b"tampered").unwrap_err(),
            sri(Alg::Sha512, b"tampered")
        );
        // Several tokens: the strongest algorithm decides; a weak token cannot vouch for other bytes.
        let mixed = format!("{} {}", sri(Alg::Sha256, b"tampered"), sha512);
        assert_eq!(Pin::parse(&mixed).unwrap().check(good), Ok(()));
        assert!(Pin::parse(&mixed).unwrap().check(b"tampered").is_err());

        let hex = format!("sha256:{}", hex::encode(sha2::Sha256::digest(good)));
        assert_eq!(Pin::parse(&hex).unwrap().check(good), Ok(()));
        assert!(
            Pin::parse(&hex)
                .unwrap()
                .check(b"x")
                .unwrap_err()
                .starts_with("sha256:")
        );

        for unverifiable in [
            "",
            "sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk=",
            "sha512-short",
            "sha256:abc",
            "md5-x",
        ] {
            assert_eq!(Pin::parse(unverifiable), None, "{unverifiable}");
        }
    }

    #[test]
    fn server_commands_read_back_and_run_the_local_file() {
        let npm = Resolved {
            kind: ResolvedKind::Npm {
                package: "@acme/srv".into(),
                version: "1.2.3".into(),
                args: vec!["--stdio".into()],
            },
            integrity: Some(sri(Alg::Sha512, b"x")),
        };
        let artifact = Artifact::from_argv(&server_argv(&npm).unwrap()).unwrap();
        assert_eq!(artifact.display(), "npm package @acme/srv@1.2.3");
        assert_eq!(
            artifact.argv_for(Path::new("/tmp/a/srv-1.2.3.tgz")),
            ["npx", "-y", "file:/tmp/a/srv-1.2.3.tgz", "--stdio"]
        );

        let pypi = Resolved {
            kind: ResolvedKind::Pypi {
                package: "mcp-server-time".into(),
                version: "1.0".into(),
                command: "time-server".into(),
                args: vec!["--tz".into(), "UTC".into()],
            },
            integrity: Some(format!("sha256:{}", "ab".repeat(32))),
        };
        let artifact = Artifact::from_argv(&server_argv(&pypi).unwrap()).unwrap();
        assert_eq!(
            artifact.argv_for(Path::new("/tmp/a/t-1.0-py3-none-any.whl")),
            [
                "uvx",
                "--from",
                "/tmp/a/t-1.0-py3-none-any.whl",
                "time-server",
                "--tz",
                "UTC"
            ]
        );

        assert_eq!(
            Artifact::from_argv(&["mcpfly".into(), "example-server".into()]),
            None
        );
        assert_eq!(
            Artifact::from_argv(&["npx".into(), "-y".into(), "@acme/srv".into()]),
            None
        );
    }

    #[test]
    fn logged_urls_carry_no_credentials() {
        assert_eq!(
            without_userinfo("https://bot:s3cret@npm.internal/p/-/p-1.0.0.tgz"),
            "https://npm.internal/p/-/p-1.0.0.tgz"
        );
    }

    #[test]
    fn machines_get_a_pin_only_they_can_verify() {
        let npm = |integrity: &str| Resolved {
            kind: ResolvedKind::Npm {
                package: "p".into(),
                version: "1.0.0".into(),
                args: vec![],
            },
            integrity: Some(integrity.into()),
        };
        let sha512 = sri(Alg::Sha512, b"x");
        assert_eq!(machine_pin(&npm(&sha512)), Some(sha512));
        assert_eq!(machine_pin(&npm("sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk=")), None);
        let image = Resolved {
            kind: ResolvedKind::Image {
                reference: "ghcr.io/a/b:1".into(),
            },
            integrity: Some(format!("sha256:{}", "ab".repeat(32))),
        };
        assert_eq!(machine_pin(&image), None);
    }
}
