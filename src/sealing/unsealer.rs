//! The controller side: unseal a resource's credentials for the Fly secrets call.
//!
//! The reconciler maps its API type (`spec.credentials`) onto [`CredentialRef`] and calls
//! [`Unsealer::unseal_credentials`]. Sealed values are checked against the resource's scope; `secretKeyRef`
//! values are read from the resource's own namespace only (never another's). The result says, per
//! credential, which key unsealed it and its digest for status; [`KeyUsageGauge`] turns those results into
//! the "credentials by key" / "credentials on non-primary keys" metrics.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use zeroize::Zeroize;

use super::envelope::Target;
use super::error::SealError;
use super::keyring::{KeyId, KeyRing};
use super::secret_value::SecretValue;
use super::{credential_digest, unseal};
use crate::api::reason;

/// Where a credential's value comes from (the reconciler maps `spec.credentials[]` onto this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// A sealed value text made by `mcpfly seal`.
    Sealed(String),
    /// A key of a Kubernetes Secret in the resource's namespace.
    SecretKeyRef { name: String, key: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRef {
    pub name: String,
    pub source: CredentialSource,
}

/// Where an unsealed value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnsealedFrom {
    Sealed { key_id: KeyId, primary: bool },
    SecretRef { secret: String, key: String },
}

/// One credential ready for the Fly secrets call.
#[derive(Debug)]
pub struct UnsealedCredential {
    pub name: String,
    pub value: SecretValue,
    pub source: UnsealedFrom,
    /// [`credential_digest`] of name and value, for status.
    pub digest: String,
}

/// All credentials of one resource, in spec order.
#[derive(Debug, Default)]
pub struct UnsealedCredentials {
    pub credentials: Vec<UnsealedCredential>,
}

impl UnsealedCredentials {
    /// How many were unsealed with a key other than the primary (they should be resealed).
    pub fn non_primary(&self) -> usize {
        self.credentials
            .iter()
            .filter(|c| matches!(c.source, UnsealedFrom::Sealed { primary: false, .. }))
            .count()
    }

    /// Count of sealed credentials per key id.
    pub fn by_key(&self) -> BTreeMap<KeyId, usize> {
        let mut m = BTreeMap::new();
        for c in &self.credentials {
            if let UnsealedFrom::Sealed { key_id, .. } = &c.source {
                *m.entry(key_id.clone()).or_default() += 1;
            }
        }
        m
    }
}

/// Why one credential could not be provided. For a `Stalled` condition: `reason` maps onto a
/// machine-readable condition reason, and `Display` is a message without secret material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("credential {credential}: {reason}")]
pub struct CredentialError {
    pub credential: String,
    pub reason: CredentialErrorReason,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CredentialErrorReason {
    #[error("{0}")]
    Seal(SealError),
    #[error(
        "the controller has no key ring to unseal it; configure --keyring-secret or --keyring-file"
    )]
    NoKeyRing,
    #[error("Secret {secret} not found in the resource's namespace")]
    SecretNotFound { secret: String },
    #[error(
        "Secret {secret} does not opt in to being referenced: label it {label}=true (whoever may create \
         MCPDeployments in this namespace can then deliver its values to a server they run)",
        label = crate::api::ALLOW_REFERENCE_LABEL
    )]
    NotOptedIn { secret: String },
    #[error("Secret {secret} has no key {key}")]
    KeyNotFound { secret: String, key: String },
    #[error("Secret {secret} key {key} is not UTF-8 text")]
    NotUtf8 { secret: String, key: String },
    #[error("reading Secret {secret}: {message}")]
    ReadFailed { secret: String, message: String },
}

impl CredentialErrorReason {
    /// A CamelCase reason for conditions and events.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            Self::Seal(SealError::ScopeMismatch { .. }) => reason::CREDENTIAL_SCOPE_MISMATCH,
            Self::Seal(SealError::InvalidToken { .. }) => reason::CREDENTIAL_INVALID_TOKEN,
            Self::Seal(SealError::UnknownKey { .. }) => reason::CREDENTIAL_UNKNOWN_KEY,
            Self::Seal(SealError::UnsupportedVersion { .. }) => {
                reason::CREDENTIAL_UNSUPPORTED_VERSION
            }
            Self::Seal(SealError::InvalidName { .. }) => reason::CREDENTIAL_INVALID_NAME,
            Self::NoKeyRing => reason::KEY_RING_MISSING,
            Self::SecretNotFound { .. } => reason::CREDENTIAL_SECRET_NOT_FOUND,
            Self::NotOptedIn { .. } => reason::CREDENTIAL_SECRET_NOT_OPTED_IN,
            Self::KeyNotFound { .. } => reason::CREDENTIAL_SECRET_KEY_NOT_FOUND,
            Self::NotUtf8 { .. } => reason::CREDENTIAL_SECRET_NOT_UTF8,
            Self::ReadFailed { .. } => reason::CREDENTIAL_SECRET_READ_FAILED,
        }
    }

    /// Whether retrying later can help (an API error) or a user has to change something.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::ReadFailed { .. })
    }
}

/// What reading a Secret key can fail with.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretReadError {
    #[error("Secret not found")]
    SecretNotFound,
    /// It exists but lacks the opt-in label: its data was not read.
    #[error("Secret does not opt in to being referenced")]
    NotOptedIn,
    #[error("the key's value is not UTF-8 text")]
    NotUtf8,
    #[error("{0}")]
    Api(String),
}

/// Reads one key of one Secret. `Ok(None)`: the Secret exists without that key.
pub trait SecretReader: Send + Sync {
    fn read_secret_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<SecretValue>, SecretReadError>> + Send;
}

impl SecretReader for kube::Client {
    async fn read_secret_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretValue>, SecretReadError> {
        let api: kube::Api<Secret> = kube::Api::namespaced(self.clone(), namespace);
        // Selected by the apiserver: a Secret without the opt-in label never reaches this process's memory.
        let opted_in = kube::api::ListParams::default()
            .labels(&format!("{}=true", crate::api::ALLOW_REFERENCE_LABEL))
            .fields(&format!("metadata.name={name}"));
        let secret = api
            .list(&opted_in)
            .await
            .map_err(|e| SecretReadError::Api(e.to_string()))?
            .items
            .into_iter()
            .next();
        let Some(secret) = secret else {
            // Why it was not returned, from its metadata alone.
            return match api.get_metadata_opt(name).await {
                Ok(Some(_)) => Err(SecretReadError::NotOptedIn),
                Ok(None) => Err(SecretReadError::SecretNotFound),
                Err(e) => Err(SecretReadError::Api(e.to_string())),
            };
        };
        let Some(mut data) = secret.data else {
            return Ok(None);
        };
        let wanted = data.remove(key);
        // Wipe the other keys' decoded bytes too: they are someone's secrets.
        for (_, mut v) in data {
            v.0.zeroize();
        }
        match wanted {
            None => Ok(None),
            Some(bytes) => SecretValue::from_utf8(bytes.0)
                .map(Some)
                .ok_or(SecretReadError::NotUtf8),
        }
    }
}

/// An in-memory [`SecretReader`] for tests: `(namespace, name) → {key → value}`.
#[derive(Debug, Clone, Default)]
pub struct InMemorySecrets(Arc<Mutex<SecretMap>>);

/// `(namespace, name) → {key → value}`.
type SecretMap = HashMap<(String, String), HashMap<String, SecretValue>>;

impl InMemorySecrets {
    pub fn insert(&self, namespace: &str, name: &str, key: &str, value: &str) {
        self.0
            .lock()
            .unwrap()
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .insert(key.to_owned(), value.into());
    }
}

impl SecretReader for InMemorySecrets {
    async fn read_secret_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<SecretValue>, SecretReadError> {
        let map = self.0.lock().unwrap();
        let secret = map
            .get(&(namespace.to_owned(), name.to_owned()))
            .ok_or(SecretReadError::SecretNotFound)?;
        Ok(secret.get(key).cloned())
    }
}

/// Unseals credentials with a key ring and reads `secretKeyRef`s through a [`SecretReader`].
pub struct Unsealer<R> {
    /// `None` when the controller has no key ring: `secretKeyRef` credentials still work, sealed ones fail
    /// with [`CredentialErrorReason::NoKeyRing`].
    ring: Option<Arc<KeyRing>>,
    secrets: R,
}

impl<R: SecretReader> Unsealer<R> {
    pub fn new(ring: Option<Arc<KeyRing>>, secrets: R) -> Self {
        Self { ring, secrets }
    }

    pub fn key_ring(&self) -> Option<&KeyRing> {
        self.ring.as_deref()
    }

    /// Unseals every credential of the resource `namespace/resource_name`, in order; stops at the first
    /// that fails (the reconciler stalls the resource and changes nothing on Fly).
    pub async fn unseal_credentials(
        &self,
        namespace: &str,
        resource_name: &str,
        credentials: &[CredentialRef],
    ) -> Result<UnsealedCredentials, CredentialError> {
        let mut out = UnsealedCredentials::default();
        for c in credentials {
            let fail = |reason| CredentialError {
                credential: c.name.clone(),
                reason,
            };
            let (value, source) = match &c.source {
                CredentialSource::Sealed(sealed) => {
                    let ring = self
                        .ring
                        .as_deref()
                        .ok_or_else(|| fail(CredentialErrorReason::NoKeyRing))?;
                    let target = Target::new(namespace, resource_name, &c.name);
                    let u = unseal(ring, sealed, &target)
                        .map_err(|e| fail(CredentialErrorReason::Seal(e)))?;
                    let primary = &u.key_id == ring.primary_id();
                    (
                        u.value,
                        UnsealedFrom::Sealed {
                            key_id: u.key_id,
                            primary,
                        },
                    )
                }
                CredentialSource::SecretKeyRef { name, key } => {
                    let value = match self.secrets.read_secret_key(namespace, name, key).await {
                        Ok(Some(v)) => v,
                        Ok(None) => {
                            return Err(fail(CredentialErrorReason::KeyNotFound {
                                secret: name.clone(),
                                key: key.clone(),
                            }));
                        }
                        Err(SecretReadError::SecretNotFound) => {
                            return Err(fail(CredentialErrorReason::SecretNotFound {
                                secret: name.clone(),
                            }));
                        }
                        Err(SecretReadError::NotOptedIn) => {
                            return Err(fail(CredentialErrorReason::NotOptedIn {
                                secret: name.clone(),
                            }));
                        }
                        Err(SecretReadError::NotUtf8) => {
                            return Err(fail(CredentialErrorReason::NotUtf8 {
                                secret: name.clone(),
                                key: key.clone(),
                            }));
                        }
                        Err(SecretReadError::Api(message)) => {
                            return Err(fail(CredentialErrorReason::ReadFailed {
                                secret: name.clone(),
                                message,
                            }));
                        }
                    };
                    (
                        value,
                        UnsealedFrom::SecretRef {
                            secret: name.clone(),
                            key: key.clone(),
                        },
                    )
                }
            };
            let digest = credential_digest(&c.name, &value);
            out.credentials.push(UnsealedCredential {
                name: c.name.clone(),
                value,
                source,
                digest,
            });
        }
        Ok(out)
    }
}

/// Fleet-wide counts of sealed credentials by key, kept per resource so a resource that changes or goes
/// away updates the totals exactly. Feed it after each successful unseal; remove on deletion.
#[derive(Debug, Default)]
pub struct KeyUsageGauge {
    per_resource: Mutex<HashMap<String, BTreeMap<KeyId, usize>>>,
}

impl KeyUsageGauge {
    pub fn record(&self, namespace: &str, name: &str, unsealed: &UnsealedCredentials) {
        self.per_resource
            .lock()
            .unwrap()
            .insert(format!("{namespace}/{name}"), unsealed.by_key());
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.per_resource
            .lock()
            .unwrap()
            .remove(&format!("{namespace}/{name}"));
    }

    /// Sealed credentials per key id across all resources.
    pub fn by_key(&self) -> BTreeMap<KeyId, usize> {
        let mut total = BTreeMap::new();
        for m in self.per_resource.lock().unwrap().values() {
            for (k, n) in m {
                *total.entry(k.clone()).or_default() += n;
            }
        }
        total
    }

    /// Sealed credentials still on a key other than `ring`'s primary.
    pub fn non_primary(&self, ring: &KeyRing) -> usize {
        self.by_key()
            .into_iter()
            .filter(|(k, _)| k != ring.primary_id())
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealing::{Scope, generate_key, seal};

    fn sealed(ring: &KeyRing, ns: &str, res: &str, name: &str, v: &str) -> CredentialSource {
        CredentialSource::Sealed(
            seal(
                ring,
                Target::new(ns, res, name).binding(Scope::Strict),
                v.into(),
            )
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn unseals_sealed_and_secret_refs_and_counts_old_keys() {
        let (k1, k2) = (generate_key(), generate_key());
        let old = KeyRing::parse(&k1, "t").unwrap();
        let ring = Arc::new(KeyRing::parse(&format!("{}\n{}", *k2, *k1), "t").unwrap());
        let secrets = InMemorySecrets::default();
        secrets.insert("team-a", "my-secret", "token", "from-secret");
        secrets.insert("team-b", "my-secret", "token", "other-namespace");
        let u = Unsealer::new(Some(ring.clone()), secrets);
        let creds = vec![
            CredentialRef {
                name: "A".into(),
                source: sealed(&ring, "team-a", "gh", "A", "va"),
            },
            CredentialRef {
                name: "B".into(),
                source: sealed(&old, "team-a", "gh", "B", "vb"),
            },
            CredentialRef {
                name: "C".into(),
                source: CredentialSource::SecretKeyRef {
                    name: "my-secret".into(),
                    key: "token".into(),
                },
            },
        ];
        let out = u.unseal_credentials("team-a", "gh", &creds).await.unwrap();
        let values: Vec<_> = out.credentials.iter().map(|c| c.value.expose()).collect();
        assert_eq!(values, ["va", "vb", "from-secret"]);
        assert_eq!(
            out.credentials[0].source,
            UnsealedFrom::Sealed {
                key_id: ring.primary_id().clone(),
                primary: true
            }
        );
        assert_eq!(
            out.credentials[1].source,
            UnsealedFrom::Sealed {
                key_id: old.primary_id().clone(),
                primary: false
            }
        );
        assert_eq!(
            out.credentials[2].digest,
            credential_digest("C", &"from-secret".into())
        );
        assert_eq!(out.non_primary(), 1);

        let gauge = KeyUsageGauge::default();
        gauge.record("team-a", "gh", &out);
        gauge.record("team-a", "gh", &out); // idempotent per resource
        assert_eq!(gauge.non_primary(&ring), 1);
        assert_eq!(gauge.by_key().values().sum::<usize>(), 2);
        gauge.remove("team-a", "gh");
        assert_eq!(gauge.non_primary(&ring), 0);
    }

    #[tokio::test]
    async fn errors_name_the_credential_and_reason() {
        let ring = Arc::new(KeyRing::parse(&generate_key(), "t").unwrap());
        let u = Unsealer::new(Some(ring.clone()), InMemorySecrets::default());
        let moved = vec![CredentialRef {
            name: "A".into(),
            source: sealed(&ring, "team-a", "gh", "A", "canary-value"),
        }];
        let err = u
            .unseal_credentials("team-b", "gh", &moved)
            .await
            .unwrap_err();
        assert_eq!(err.credential, "A");
        assert_eq!(err.reason.condition_reason(), "CredentialScopeMismatch");
        assert!(!err.to_string().contains("canary-value"));
        let missing = vec![CredentialRef {
            name: "S".into(),
            source: CredentialSource::SecretKeyRef {
                name: "nope".into(),
                key: "k".into(),
            },
        }];
        let err = u
            .unseal_credentials("team-a", "gh", &missing)
            .await
            .unwrap_err();
        assert_eq!(
            err.reason,
            CredentialErrorReason::SecretNotFound {
                secret: "nope".into()
            }
        );
    }
}
