//! Flags of `mcpfly keygen | seal | reseal | unseal` and their run functions; the logic is in
//! `mcpfly::sealing::cli`. Included by `main.rs` (and by `tests/sealing_cli.rs`, so it is written against
//! the library's public API only).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use mcpfly::sealing::cli::{self as sealing_cli, ControllerService, KeySource, SealInput};
use mcpfly::sealing::{DEFAULT_KEYS_ENV, Scope, SecretValue};

/// Where the key ring comes from.
#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// Key file: Fernet keys separated by newlines or commas, primary first. Default: the environment
    /// variable named by --key-env.
    #[arg(long, value_name = "FILE", env = "MCPFLY_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the keys when no --key-file is given.
    #[arg(long, value_name = "VAR", default_value = DEFAULT_KEYS_ENV)]
    pub key_env: String,
}

impl KeyArgs {
    fn source(&self) -> KeySource {
        KeySource {
            key_file: self.key_file.clone(),
            key_env: self.key_env.clone(),
        }
    }
}

/// `mcpfly keygen`: print a new Fernet key.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Add the new key to this key file as the new primary (creating it, mode 0600) and print only its id.
    #[arg(long, value_name = "FILE")]
    pub append: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum ScopeArg {
    /// Only this namespace, resource and credential name.
    #[default]
    Strict,
    /// Any resource and credential name in this namespace.
    Namespace,
    /// Anywhere in the cluster.
    Cluster,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Scope {
        match s {
            ScopeArg::Strict => Scope::Strict,
            ScopeArg::Namespace => Scope::Namespace,
            ScopeArg::Cluster => Scope::Cluster,
        }
    }
}

/// `mcpfly seal`: seal credentials for an MCPDeployment.
#[derive(Args, Debug)]
pub struct SealArgs {
    /// Namespace of the MCPDeployment.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// Name of the MCPDeployment.
    #[arg(long)]
    pub name: String,
    /// Where the sealed values may be used.
    #[arg(long, value_enum, default_value_t = ScopeArg::Strict)]
    pub scope: ScopeArg,
    /// Credential name for one value read from stdin (one trailing newline is dropped).
    #[arg(long, value_name = "NAME")]
    pub credential: Option<String>,
    /// NAME=VALUE, repeatable. Prefer stdin or --from-env-file: command lines are visible to other users
    /// of the machine and land in shell history.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_secret)]
    pub from_literal: Vec<SecretValue>,
    /// A .env file of NAME=VALUE lines.
    #[arg(long, value_name = "FILE")]
    pub from_env_file: Option<PathBuf>,
    /// Update this manifest in place (other content, comments included, is kept) instead of printing YAML.
    #[arg(long, value_name = "FILE")]
    pub merge_into: Option<PathBuf>,
    /// Seal through the controller's seal endpoint (via the Kubernetes API service proxy, with the current
    /// kubeconfig, whose bearer token the endpoint checks) instead of with a local key.
    #[arg(long)]
    pub via_cluster: bool,
    #[arg(long, default_value = "mcpfly-system", requires = "via_cluster")]
    pub controller_namespace: String,
    #[arg(long, default_value = "mcpfly", requires = "via_cluster")]
    pub controller_service: String,
    /// The Service port of the controller's seal listener (name or number).
    #[arg(long, default_value = "seal", requires = "via_cluster")]
    pub controller_port: String,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// Infallible on purpose: clap quotes an invalid value in its error, and this one is a secret.
fn parse_secret(s: &str) -> Result<SecretValue, std::convert::Infallible> {
    Ok(SecretValue::from(s))
}

/// `mcpfly reseal`: re-encrypt every sealed value with the primary key, in place.
#[derive(Args, Debug)]
pub struct ResealArgs {
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Manifest files (multi-document YAML).
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
}

/// `mcpfly unseal --check`: verify sealed values in manifests, printing nothing secret.
#[derive(Args, Debug)]
pub struct UnsealArgs {
    /// Verify only (required: mcpfly never prints unsealed values).
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
}

pub async fn run_keygen(args: KeygenArgs) -> anyhow::Result<()> {
    run_keygen_io(args, &mut std::io::stdout().lock())
}

pub async fn run_seal(args: SealArgs) -> anyhow::Result<()> {
    run_seal_io(
        args,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    )
    .await
}

pub async fn run_reseal(args: ResealArgs) -> anyhow::Result<()> {
    run_reseal_io(args, &mut std::io::stdout().lock())
}

pub async fn run_unseal(args: UnsealArgs) -> anyhow::Result<()> {
    run_unseal_io(args, &mut std::io::stdout().lock())
}

// The `_io` variants take the streams explicitly so tests run the same code in process.

pub fn run_keygen_io(args: KeygenArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    sealing_cli::keygen(args.append.as_deref(), stdout)
}

pub async fn run_seal_io(
    args: SealArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<()> {
    let scope: Scope = args.scope.into();
    let input = SealInput {
        stdin_name: args.credential.as_deref(),
        literals: args.from_literal,
        env_file: args.from_env_file.as_deref(),
    };
    let values = sealing_cli::collect_values(input, stdin)?;
    let sealed = if args.via_cluster {
        let config = kube::Config::infer().await?;
        let controller = ControllerService {
            namespace: args.controller_namespace,
            service: args.controller_service,
            port: args.controller_port,
        };
        let (key_id, sealed) = sealing_cli::seal_via_cluster(
            config,
            &controller,
            &args.namespace,
            &args.name,
            scope,
            values,
        )
        .await?;
        writeln!(stderr, "sealed by the controller with key {key_id}")?;
        sealed
    } else {
        let ring = args.keys.source().load()?;
        sealing_cli::seal_values(&ring, &args.namespace, &args.name, scope, values)?
    };
    match args.merge_into {
        Some(path) => sealing_cli::merge_into(&path, &args.namespace, &args.name, &sealed, stderr),
        None => Ok(stdout.write_all(sealing_cli::credentials_yaml(&sealed)?.as_bytes())?),
    }
}

pub fn run_reseal_io(args: ResealArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    let ring = args.keys.source().load()?;
    sealing_cli::reseal(&ring, &args.files, stdout).map(|_| ())
}

pub fn run_unseal_io(args: UnsealArgs, stdout: &mut dyn Write) -> anyhow::Result<()> {
    if !args.check {
        bail!("`mcpfly unseal` only verifies: pass --check (unsealed values are never printed)");
    }
    let ring = args.keys.source().load()?;
    sealing_cli::unseal_check(&ring, &args.files, stdout).map(|_| ())
}
