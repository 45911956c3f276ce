//! Sealed credentials: Fernet with a key ring and scope-binding envelopes (DESIGN.md §4).
//!
//! - [`KeyRing`]: keys from a file or an environment variable; the first seals, all unseal.
//! - A **sealed value** is `{key id}-{Fernet token}` (all url-safe base64 characters). The key id (8 hex of sha256 of the key) is public: it
//!   lets anyone see which key sealed a value without holding a key, and lets a modified token be told apart
//!   from one sealed with a key the ring does not hold.
//! - The Fernet plaintext is an [`Envelope`] binding the value to a [`Scope`] (see [`envelope`]).
//! - [`Unsealer`] is what the reconciler calls; [`endpoint`] seals a request and [`listener`] serves it, authenticated and
//!   authorised by the API server;
//!   [`cli`] is the logic behind `mcpfly keygen | seal | reseal | unseal --check`; [`manifest`] edits
//!   sealed values inside YAML manifests without disturbing anything else.
//!
//! Plaintext lives only in [`SecretValue`] (zeroizing, redacting `Debug`/`Display`); errors carry names,
//! scopes and key ids, never values or keys.

pub mod cli;
pub mod dotenv;
pub mod endpoint;
pub mod envelope;
pub mod error;
pub mod keyring;
pub mod listener;
pub mod manifest;
pub mod secret_value;
pub mod unsealer;

use sha2::{Digest, Sha256};

pub use envelope::{Binding, Envelope, Scope, Target};
pub use error::{KeyRingError, SealError};
pub use keyring::{DEFAULT_KEYS_ENV, KeyId, KeyRing, generate_key};
pub use secret_value::SecretValue;
pub use unsealer::{
    CredentialError, CredentialErrorReason, CredentialRef, CredentialSource, KeyUsageGauge,
    SecretReader, UnsealedCredential, UnsealedCredentials, UnsealedFrom, Unsealer,
};

/// Seals `value` for `binding` with the ring's primary key; returns the sealed value text.
pub fn seal(ring: &KeyRing, binding: Binding, value: SecretValue) -> Result<String, SealError> {
    let plaintext = Envelope { binding, value }.encode()?;
    Ok(ring.encrypt(&plaintext))
}

/// The result of [`unseal`]: the value, the key that unsealed it, and how it was bound.
#[derive(Debug)]
pub struct Unsealed {
    pub value: SecretValue,
    pub key_id: KeyId,
    pub binding: Binding,
}

/// Unseals a sealed value for use at `target`, checking the envelope's scope.
pub fn unseal(ring: &KeyRing, sealed: &str, target: &Target) -> Result<Unsealed, SealError> {
    let (key_id, plaintext) = ring.decrypt(sealed)?;
    let envelope = Envelope::parse(&plaintext)?;
    envelope.check(target)?;
    Ok(Unsealed {
        value: envelope.value,
        key_id,
        binding: envelope.binding,
    })
}

/// The digest of a credential recorded in status, to detect change without reading values back:
/// `sha256:` + hex(sha256(name || 0x00 || value)).
///
/// It does not reveal the value, but it is an unkeyed hash: a low-entropy value (a short PIN, a dictionary
/// word) could be found by brute force from it. The name salts it only against precomputed tables. It
/// appears only in the resource's status, which is readable by the same namespace users who can already
/// read the sealed value in the spec; credentials worth sealing are high-entropy tokens.
pub fn credential_digest(name: &str, value: &SecretValue) -> String {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0u8]);
    h.update(value.expose().as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> KeyRing {
        KeyRing::parse(&keys.join(","), "test").unwrap()
    }

    #[test]
    fn round_trip_and_scope_binding() {
        let r = ring(&[&generate_key()]);
        let t = Target::new("team-a", "github", "TOKEN");
        let sealed = seal(&r, t.binding(Scope::Strict), "ghp_canary".into()).unwrap();
        assert!(!sealed.contains("ghp_canary"));
        let u = unseal(&r, &sealed, &t).unwrap();
        assert_eq!(u.value.expose(), "ghp_canary");
        assert_eq!(&u.key_id, r.primary_id());
        for other in [
            Target::new("team-b", "github", "TOKEN"),
            Target::new("team-a", "gitlab", "TOKEN"),
            Target::new("team-a", "github", "OTHER"),
        ] {
            match unseal(&r, &sealed, &other) {
                Err(e @ SealError::ScopeMismatch { .. }) => {
                    assert!(!e.to_string().contains("ghp_canary"))
                }
                other => panic!("{other:?}"),
            }
        }
        let ns_wide = seal(&r, t.binding(Scope::Namespace), "v".into()).unwrap();
        assert!(unseal(&r, &ns_wide, &Target::new("team-a", "other", "X")).is_ok());
        assert!(matches!(
            unseal(&r, &ns_wide, &Target::new("team-b", "github", "TOKEN")),
            Err(SealError::ScopeMismatch { .. })
        ));
        let cluster = seal(&r, Binding::Cluster, "v".into()).unwrap();
        assert!(unseal(&r, &cluster, &Target::new("any", "where", "X")).is_ok());
    }

    #[test]
    fn rotation() {
        let (k1, k2) = (generate_key(), generate_key());
        let t = Target::new("ns", "res", "N");
        let old = seal(&ring(&[&k1]), t.binding(Scope::Strict), "v".into()).unwrap();
        let rotated = ring(&[&k2, &k1]);
        let u = unseal(&rotated, &old, &t).unwrap();
        assert_ne!(&u.key_id, rotated.primary_id());
        let resealed = seal(&rotated, u.binding, u.value).unwrap();
        let only_k2 = ring(&[&k2]);
        assert_eq!(
            &unseal(&only_k2, &resealed, &t).unwrap().key_id,
            only_k2.primary_id()
        );
        assert!(matches!(
            unseal(&only_k2, &old, &t),
            Err(SealError::UnknownKey { .. })
        ));
    }

    #[test]
    fn tampered_token_is_invalid() {
        let r = ring(&[&generate_key()]);
        let t = Target::new("ns", "res", "N");
        let sealed = seal(&r, t.binding(Scope::Strict), "value".into()).unwrap();
        // Flip one character in the middle of the ciphertext to another base64url character.
        let mut chars: Vec<char> = sealed.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(matches!(
            unseal(&r, &tampered, &t),
            Err(SealError::InvalidToken { .. })
        ));
    }

    #[test]
    fn digest_is_stable_and_name_salted() {
        let v = SecretValue::from("value");
        let d = credential_digest("A", &v);
        assert!(d.starts_with("sha256:") && d.len() == 7 + 64);
        assert_eq!(d, credential_digest("A", &v));
        assert_ne!(d, credential_digest("B", &v));
        assert!(!d.contains("value"));
    }
}
