//! The logic behind `mcpfly keygen | seal | reseal | unseal --check`, with explicit input and output
//! streams so tests drive it in process. The clap layer (`src/cli_sealing.rs`) only maps flags onto these.
//!
//! Output discipline: no function here writes a plaintext value; only [`keygen`] writes key material, and
//! only the key it just generated (and not even that with `--append`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail, ensure};
use zeroize::Zeroizing;

use super::endpoint::SealResponse;
use super::envelope::{Scope, Target, validate_credential_name};
use super::keyring::{KeyId, KeyRing, generate_key, key_id_of};
use super::manifest::{EditKind, Manifest};
use super::secret_value::SecretValue;
use super::{dotenv, seal, unseal};

/// Where the CLI reads the key ring from: a file, else an environment variable.
#[derive(Debug, Clone)]
pub struct KeySource {
    pub key_file: Option<PathBuf>,
    pub key_env: String,
}

impl KeySource {
    pub fn load(&self) -> anyhow::Result<KeyRing> {
        Ok(match &self.key_file {
            Some(path) => KeyRing::from_file(path)?,
            None => KeyRing::from_env(&self.key_env).with_context(|| {
                format!("no --key-file given, and reading ${} failed", self.key_env)
            })?,
        })
    }
}

/// `mcpfly keygen`: prints a new key, or with `append` makes it the primary of a key file (created with
/// mode 0600 if missing) and prints only its id.
pub fn keygen(append: Option<&Path>, out: &mut dyn Write) -> anyhow::Result<()> {
    let key = generate_key();
    let id = key_id_of(&key).map_err(|e| anyhow!(e))?;
    let Some(path) = append else {
        writeln!(out, "{}", *key)?;
        return Ok(());
    };
    let old = match std::fs::read(path) {
        Ok(bytes) => Zeroizing::new(
            String::from_utf8(bytes)
                .map_err(|_| anyhow!("{} is not UTF-8 text", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Zeroizing::new(String::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let count = if old.trim().is_empty() {
        0
    } else {
        KeyRing::parse(&old, &path.display().to_string())?
            .key_ids()
            .len()
    };
    let mut text = Zeroizing::new(format!("{}\n", *key));
    text.push_str(&old);
    write_atomically(path, text.as_bytes(), 0o600)?;
    writeln!(
        out,
        "added key {id} as the primary key of {} ({} keys). Reseal manifests with `mcpfly reseal`, roll the file \
         out to the controller, and remove old keys once `mcpfly unseal --check` passes without them.",
        path.display(),
        count + 1
    )?;
    Ok(())
}

/// The values `mcpfly seal` was given, in order.
pub struct SealInput<'a> {
    /// With neither literals nor an env file: the credential name for the value read from stdin.
    pub stdin_name: Option<&'a str>,
    /// Raw `NAME=VALUE` texts (kept as [`SecretValue`] from the moment clap parsed them).
    pub literals: Vec<SecretValue>,
    pub env_file: Option<&'a Path>,
}

/// Collects the values to seal. Stdin: one value, with one trailing newline removed (`echo` adds it).
pub fn collect_values(
    input: SealInput<'_>,
    stdin: &mut dyn Read,
) -> anyhow::Result<Vec<(String, SecretValue)>> {
    let mut values: Vec<(String, SecretValue)> = Vec::new();
    for (i, lit) in input.literals.iter().enumerate() {
        let (name, value) = lit
            .expose()
            .split_once('=')
            .ok_or_else(|| anyhow!("--from-literal number {} is not NAME=VALUE", i + 1))?;
        validate_credential_name(name)?;
        values.push((name.to_owned(), value.into()));
    }
    if let Some(path) = input.env_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        );
        values.extend(dotenv::parse(&text).with_context(|| path.display().to_string())?);
    }
    match (input.stdin_name, values.is_empty()) {
        (Some(_), false) => bail!(
            "--credential is for a value on stdin; not with --from-literal or --from-env-file"
        ),
        (None, true) => bail!(
            "nothing to seal: give --credential NAME (value on stdin), --from-literal or --from-env-file"
        ),
        (Some(name), true) => {
            validate_credential_name(name)?;
            let mut buf = Zeroizing::new(Vec::new());
            stdin
                .read_to_end(&mut buf)
                .context("reading the value from stdin")?;
            if buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
            let value = SecretValue::from_utf8(std::mem::take(&mut *buf))
                .ok_or_else(|| anyhow!("stdin is not UTF-8 text"))?;
            values.push((name.to_owned(), value));
        }
        (None, false) => {}
    }
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &values {
        ensure!(
            seen.insert(name.as_str()),
            "credential {name} is given twice"
        );
    }
    Ok(values)
}

/// Seals values locally with the ring's primary key; returns (name, sealed) in input order.
pub fn seal_values(
    ring: &KeyRing,
    namespace: &str,
    resource: &str,
    scope: Scope,
    values: Vec<(String, SecretValue)>,
) -> anyhow::Result<Vec<(String, String)>> {
    values
        .into_iter()
        .map(|(name, value)| {
            let binding = Target::new(namespace, resource, &name).binding(scope);
            Ok((name, seal(ring, binding, value)?))
        })
        .collect()
}

/// Where the controller's seal endpoint is, for `seal --via-cluster`.
#[derive(Debug, Clone)]
pub struct ControllerService {
    pub namespace: String,
    pub service: String,
    /// The Service port's name (or number).
    pub port: String,
}

impl ControllerService {
    /// The API server's service-proxy path to the seal endpoint.
    pub fn seal_path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/services/{}:{}/proxy/seal",
            self.namespace, self.service, self.port
        )
    }
}

/// The JSON body for the seal endpoint, built in a zeroizing buffer (values are JSON-escaped in place).
pub fn seal_request_body(
    namespace: &str,
    resource: &str,
    scope: Scope,
    values: &[(String, SecretValue)],
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut body = Zeroizing::new(Vec::new());
    write!(
        &mut *body,
        "{{\"namespace\":{},\"name\":{},\"scope\":\"{scope}\",\"values\":{{",
        serde_json::to_string(namespace)?,
        serde_json::to_string(resource)?
    )?;
    for (i, (name, value)) in values.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut *body, name)?;
        body.push(b':');
        serde_json::to_writer(&mut *body, value.expose())?;
    }
    body.extend_from_slice(b"}}");
    Ok(body)
}

/// The bearer token the kubeconfig authenticates with (a token, a token file, an exec plugin or OIDC),
/// exactly as the Kubernetes client would send it. The seal endpoint needs it because the API server's service
/// proxy does not pass the caller's identity on.
pub async fn kubeconfig_bearer_token(config: &kube::Config) -> anyhow::Result<Zeroizing<String>> {
    use kube::client::ConfigExt as _;
    use tower::{Layer as _, ServiceExt as _};
    let missing = || {
        anyhow!(
            "the seal endpoint authenticates you by a bearer token (TokenReview), and this kubeconfig has none              (a client certificate cannot be passed through the API server's proxy): use a kubeconfig with a              token, e.g. one from `kubectl create token <serviceaccount>`"
        )
    };
    let auth = config.auth_layer()?.ok_or_else(missing)?;
    // Let the client's own auth layer decorate a request, and read what it set.
    let capture = tower::service_fn(|request: http::Request<kube::client::Body>| async move {
        Ok::<_, tower::BoxError>(http::Response::new(
            request.headers().get(http::header::AUTHORIZATION).cloned(),
        ))
    });
    let header = auth
        .layer(capture)
        .oneshot(http::Request::new(kube::client::Body::empty()))
        .await
        .map_err(|e| anyhow!("getting a token from the kubeconfig: {e}"))?
        .into_body()
        .ok_or_else(missing)?;
    let value = Zeroizing::new(header.to_str().map_err(|_| missing())?.to_owned());
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Zeroizing::new(token.to_owned()))
        }
        _ => Err(missing()),
    }
}

/// Seals through the controller's seal listener via the Kubernetes API service proxy, so the caller needs no
/// key. The proxy needs `create` on `services/proxy` for the Service's `seal` port; the listener then checks the
/// caller's token (TokenReview) and asks whether the caller may `create` `mcpdeployments/seal` for this
/// resource (SubjectAccessReview).
pub async fn seal_via_cluster(
    config: kube::Config,
    controller: &ControllerService,
    namespace: &str,
    resource: &str,
    scope: Scope,
    values: Vec<(String, SecretValue)>,
) -> anyhow::Result<(KeyId, Vec<(String, String)>)> {
    use http_body_util::BodyExt as _;
    let token = kubeconfig_bearer_token(&config).await?;
    let client = kube::Client::try_from(config)?;
    let mut body = seal_request_body(namespace, resource, scope, &values)?;
    // The HTTP stack takes ownership of the body and does not wipe it; the plaintext was going over the
    // wire (TLS to the API server) anyway.
    let request = http::Request::post(controller.seal_path())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            super::listener::TOKEN_HEADER,
            format!("Bearer {}", token.as_str()),
        )
        .body(kube::client::Body::from(std::mem::take(&mut *body)))?;
    let where_ = || {
        format!(
            "the controller's seal endpoint (service {}/{}, port {})",
            controller.namespace, controller.service, controller.port
        )
    };
    let response = client
        .send(request)
        .await
        .with_context(|| format!("asking {}", where_()))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer of {}", where_()))?
        .to_bytes();
    if !status.is_success() {
        // The listener answers {"error": …}; the API server (e.g. refusing services/proxy) a Status.
        let text: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let why = text["error"]
            .as_str()
            .or(text["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{} refused ({status}): {why}", where_());
    }
    let response: SealResponse = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} answered something other than sealed values", where_()))?;
    let key_id = KeyId::parse(&response.key_id)
        .ok_or_else(|| anyhow!("the seal endpoint returned a malformed key id"))?;
    let mut by_name: BTreeMap<String, String> = response
        .credentials
        .into_iter()
        .map(|c| (c.name, c.sealed))
        .collect();
    let out = values
        .iter()
        .map(|(name, _)| {
            by_name
                .remove(name)
                .map(|s| (name.clone(), s))
                .ok_or_else(|| anyhow!("the seal endpoint did not seal {name}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((key_id, out))
}

/// The `credentials:` block to paste into `spec`.
pub fn credentials_yaml(sealed: &[(String, String)]) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Item<'a> {
        name: &'a str,
        sealed: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Block<'a> {
        credentials: Vec<Item<'a>>,
    }
    let block = Block {
        credentials: sealed
            .iter()
            .map(|(name, sealed)| Item { name, sealed })
            .collect(),
    };
    Ok(serde_yaml::to_string(&block)?)
}

/// `seal --merge-into`: sets each credential in the manifest file, keeping its other content.
pub fn merge_into(
    path: &Path,
    namespace: &str,
    resource: &str,
    sealed: &[(String, String)],
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut manifest = Manifest::parse(&text).with_context(|| path.display().to_string())?;
    let mut reserialised = false;
    for (name, value) in sealed {
        let kind = manifest
            .upsert_credential(namespace, resource, name, value)
            .with_context(|| path.display().to_string())?;
        reserialised |= kind == EditKind::Reserialised;
    }
    write_atomically(path, manifest.text().as_bytes(), 0o644)?;
    writeln!(
        out,
        "updated {} credential(s) of {namespace}/{resource} in {}",
        sealed.len(),
        path.display()
    )?;
    if reserialised {
        writeln!(
            out,
            "note: spec.credentials was not in a layout that can be edited as text, so that document was rewritten; \
             comments inside it are gone"
        )?;
    }
    Ok(())
}

/// One sealed value found in the given files, with where it is used.
struct FoundValue {
    file: PathBuf,
    doc: usize,
    target: Result<Target, String>,
    sealed: String,
}

fn sealed_values(files: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, Manifest, Vec<FoundValue>)>> {
    ensure!(!files.is_empty(), "no manifest files given");
    let mut out = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let manifest = Manifest::parse(&text).with_context(|| file.display().to_string())?;
        let found = manifest
            .credentials()
            .into_iter()
            .filter_map(|c| {
                let sealed = c.sealed?;
                let target = match c.namespace {
                    Some(ns) => Ok(Target::new(ns, c.resource, c.name)),
                    None => Err(format!(
                        "{} credential {}: metadata.namespace is not set; set it in the manifest so the scope can be checked",
                        c.resource, c.name
                    )),
                };
                Some(FoundValue { file: file.clone(), doc: c.doc, target, sealed })
            })
            .collect();
        out.push((file.clone(), manifest, found));
    }
    Ok(out)
}

/// Outcome of [`reseal`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Values moved to the primary key, by the key that sealed them before.
    pub moved: BTreeMap<KeyId, usize>,
    pub already_primary: usize,
    pub failed: usize,
    pub files_changed: usize,
}

/// `mcpfly reseal`: re-encrypts every sealed value not on the primary key, in place, keeping each value's
/// scope. Values that fail to unseal are reported and left as they are.
pub fn reseal(
    ring: &KeyRing,
    files: &[PathBuf],
    out: &mut dyn Write,
) -> anyhow::Result<ResealReport> {
    let mut report = ResealReport::default();
    for (file, mut manifest, found) in sealed_values(files)? {
        let mut by_doc: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
        for v in found {
            let target = match v.target {
                Ok(t) => t,
                Err(e) => {
                    writeln!(out, "FAIL {}: {e}", v.file.display())?;
                    report.failed += 1;
                    continue;
                }
            };
            match unseal(ring, &v.sealed, &target) {
                Ok(u) if &u.key_id == ring.primary_id() => report.already_primary += 1,
                Ok(u) => {
                    let new = seal(ring, u.binding, u.value)?;
                    *report.moved.entry(u.key_id).or_default() += 1;
                    by_doc.entry(v.doc).or_default().push((v.sealed, new));
                }
                Err(e) => {
                    writeln!(out, "FAIL {} {target}: {e}", v.file.display())?;
                    report.failed += 1;
                }
            }
        }
        if by_doc.is_empty() {
            continue;
        }
        for (doc, mut replacements) in by_doc {
            replacements.sort();
            replacements.dedup_by(|a, b| a.0 == b.0);
            manifest
                .replace_tokens(doc, &replacements)
                .with_context(|| file.display().to_string())?;
        }
        write_atomically(&file, manifest.text().as_bytes(), 0o644)?;
        report.files_changed += 1;
    }
    let total: usize = report.moved.values().sum();
    let from = report
        .moved
        .iter()
        .map(|(k, n)| format!("{n} from {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        out,
        "resealed {total} value(s) with primary key {}{}{}; {} already on the primary key; {} file(s) changed",
        ring.primary_id(),
        if from.is_empty() { "" } else { ": " },
        from,
        report.already_primary,
        report.files_changed
    )?;
    if report.failed > 0 {
        bail!(
            "{} sealed value(s) could not be unsealed and were left unchanged",
            report.failed
        );
    }
    Ok(report)
}

/// Outcome of [`unseal_check`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub ok: usize,
    pub failed: usize,
    pub by_key: BTreeMap<KeyId, usize>,
}

/// `mcpfly unseal --check`: verifies that every sealed value unseals for the resource it is in. Prints
/// one line per value (file, resource, credential, key id or error) and never a value.
pub fn unseal_check(
    ring: &KeyRing,
    files: &[PathBuf],
    out: &mut dyn Write,
) -> anyhow::Result<CheckReport> {
    let mut report = CheckReport::default();
    for (_, _, found) in sealed_values(files)? {
        for v in found {
            let file = v.file.display();
            let target = match v.target {
                Ok(t) => t,
                Err(e) => {
                    writeln!(out, "FAIL {file} document {}: {e}", v.doc)?;
                    report.failed += 1;
                    continue;
                }
            };
            match unseal(ring, &v.sealed, &target) {
                Ok(u) => {
                    let primary = if &u.key_id == ring.primary_id() {
                        "primary"
                    } else {
                        "not primary: reseal"
                    };
                    writeln!(out, "ok   {file} {target}: key {} ({primary})", u.key_id)?;
                    *report.by_key.entry(u.key_id).or_default() += 1;
                    report.ok += 1;
                }
                Err(e) => {
                    writeln!(out, "FAIL {file} {target}: {e}")?;
                    report.failed += 1;
                }
            }
        }
    }
    let non_primary: usize = report
        .by_key
        .iter()
        .filter(|(k, _)| *k != ring.primary_id())
        .map(|(_, n)| n)
        .sum();
    writeln!(
        out,
        "checked {} sealed value(s): {} ok, {} failed, {} on non-primary keys",
        report.ok + report.failed,
        report.ok,
        report.failed,
        non_primary
    )?;
    if report.failed > 0 {
        bail!("{} sealed value(s) failed the check", report.failed);
    }
    Ok(report)
}

/// Writes through a temporary file in the same directory and a rename, so a crash never leaves a half
/// file; an existing file keeps its permissions, a new one gets `new_mode`.
fn write_atomically(path: &Path, bytes: &[u8], new_mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.mcpfly-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(new_mode);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
