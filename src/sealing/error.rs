//! Errors of the sealing module. No `Display` here ever contains plaintext or key material: they name
//! key ids, positions, scopes and credential names only.

use std::path::PathBuf;

use super::envelope::{Binding, Target};
use super::keyring::KeyId;

/// Why sealing or unsealing one value failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The value unsealed, but it was sealed for another place. Names both scopes; shows no secret.
    #[error("sealed for {sealed_for}, but used as {used_as}")]
    ScopeMismatch {
        sealed_for: Box<Binding>,
        used_as: Box<Target>,
    },
    /// The token is not a well-formed sealed value, or it was modified after sealing.
    #[error("invalid sealed value: {reason}")]
    InvalidToken { reason: &'static str },
    /// No key in the ring can unseal the value.
    #[error("{}", unknown_key_message(.sealed_with.as_ref(), .tried))]
    UnknownKey {
        sealed_with: Option<KeyId>,
        tried: Vec<KeyId>,
    },
    /// The value unsealed but its envelope has a version this build does not understand.
    #[error("unsupported envelope version {found:?} (this build reads version 1); upgrade mcpfly")]
    UnsupportedVersion { found: String },
    /// A namespace, resource or credential name that cannot be sealed for.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn unknown_key_message(sealed_with: Option<&KeyId>, tried: &[KeyId]) -> String {
    let tried = tried
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match sealed_with {
        Some(id) => format!("sealed with key {id}, which is not in the key ring (tried {tried})"),
        None => format!("no key in the key ring unseals this value (tried {tried})"),
    }
}

/// Why a key ring could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("key ring {source_name}, line {line}{}: {reason}", entry_suffix(*.entry))]
    Malformed {
        source_name: String,
        line: usize,
        entry: Option<usize>,
        reason: String,
    },
    #[error("key ring {source_name} holds no key")]
    Empty { source_name: String },
    #[error("cannot read key file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "environment variable {var} is not set (or not UTF-8); it should hold the sealing keys"
    )]
    EnvMissing { var: String },
}

fn entry_suffix(entry: Option<usize>) -> String {
    entry.map(|e| format!(", entry {e}")).unwrap_or_default()
}
