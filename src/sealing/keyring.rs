//! The Fernet key ring: several keys, the first is primary and seals, every key unseals.
//!
//! Text form (a file, an environment variable, a Kubernetes Secret's value): keys separated by newlines or
//! commas; blank entries are skipped and `#` starts a comment (it is not in the url-safe base64 alphabet, so
//! it can never be part of a key). The first key is primary.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use fernet::Fernet;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::{KeyRingError, SealError};

/// The environment variable the CLI and the controller read keys from when no key file is given.
pub const DEFAULT_KEYS_ENV: &str = "MCPFLY_SEALING_KEYS";

/// The public name of a key: the first 8 hex digits of sha256 over the key's 32 raw bytes. Safe to log, to
/// put in status and in metrics labels, and it prefixes every sealed value so anyone can see, without
/// holding a key, which key sealed what.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    fn of(raw_key: &[u8]) -> Self {
        let digest = Sha256::digest(raw_key);
        KeyId(hex::encode(&digest[..4]))
    }

    /// Accepts exactly 8 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| KeyId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

struct Key {
    id: KeyId,
    /// Wipes its key bytes on drop (the `fernet` crate derives `Zeroize` with drop).
    fernet: Fernet,
}

/// Fernet keys, primary first. `Debug` shows key ids only.
pub struct KeyRing {
    keys: Vec<Key>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// A freshly generated Fernet key in its text form (url-safe base64 with padding, 44 characters).
pub fn generate_key() -> Zeroizing<String> {
    Zeroizing::new(Fernet::generate_key())
}

/// The id of a key in text form, or the reason it is not a key (the reason never quotes the key).
pub fn key_id_of(key_text: &str) -> Result<KeyId, String> {
    decode_key(key_text.trim()).map(|raw| KeyId::of(&raw))
}

fn decode_key(entry: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let raw = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(entry.trim_end_matches('='))
            .map_err(|_| {
                "not url-safe base64 (a Fernet key is 44 characters of A-Z a-z 0-9 - _ ending in =)"
                    .to_owned()
            })?,
    );
    if raw.len() != 32 {
        return Err(format!(
            "decodes to {} bytes; a Fernet key is 32 bytes",
            raw.len()
        ));
    }
    Ok(raw)
}

impl KeyRing {
    /// Parses the text form. `source_name` says where the text came from, for error messages.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, KeyRingError> {
        let mut keys: Vec<(usize, Key)> = Vec::new();
        for (line_idx, line) in text.split('\n').enumerate() {
            let line_no = line_idx + 1;
            let content = line.split('#').next().unwrap_or_default();
            let entries: Vec<&str> = content.split(',').collect();
            let several = entries.len() > 1;
            for (entry_idx, entry) in entries.iter().enumerate() {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let malformed = |reason: String| KeyRingError::Malformed {
                    source_name: source_name.to_owned(),
                    line: line_no,
                    entry: several.then_some(entry_idx + 1),
                    reason,
                };
                let raw = decode_key(entry).map_err(malformed)?;
                let id = KeyId::of(&raw);
                if let Some((first_line, _)) = keys.iter().find(|(_, k)| k.id == id) {
                    return Err(malformed(format!(
                        "key {id} is already on line {first_line}"
                    )));
                }
                let canonical = Zeroizing::new(URL_SAFE.encode(&raw[..]));
                let fernet = Fernet::new(&canonical)
                    .ok_or_else(|| malformed("rejected by the Fernet implementation".to_owned()))?;
                keys.push((line_no, Key { id, fernet }));
            }
        }
        if keys.is_empty() {
            return Err(KeyRingError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        Ok(KeyRing {
            keys: keys.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// Reads a key file (for example a mounted Kubernetes Secret).
    pub fn from_file(path: &Path) -> Result<Self, KeyRingError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyRingError::Io {
            path: path.to_owned(),
            source,
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyRingError::Malformed {
            source_name: path.display().to_string(),
            line: 1,
            entry: None,
            reason: "the file is not UTF-8 text".to_owned(),
        })?;
        Self::parse(text, &path.display().to_string())
    }

    /// Reads keys from an environment variable.
    pub fn from_env(var: &str) -> Result<Self, KeyRingError> {
        let text = Zeroizing::new(std::env::var(var).map_err(|_| KeyRingError::EnvMissing {
            var: var.to_owned(),
        })?);
        Self::parse(&text, &format!("${var}"))
    }

    /// The key that seals.
    pub fn primary_id(&self) -> &KeyId {
        &self.keys[0].id
    }

    /// All key ids, primary first.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    pub fn contains(&self, id: &KeyId) -> bool {
        self.keys.iter().any(|k| &k.id == id)
    }

    /// Encrypts `plaintext` with the primary key; returns the sealed value text `{key id}-{fernet token}`.
    pub fn encrypt(&self, plaintext: &[u8]) -> String {
        let primary = &self.keys[0];
        format!("{}-{}", primary.id, primary.fernet.encrypt(plaintext))
    }

    /// Decrypts a sealed value text; returns the key that decrypted it and the plaintext.
    ///
    /// The key id prefix is what lets a modified token (`InvalidToken`) be told apart from one sealed with a
    /// key that is not in the ring (`UnknownKey`): Fernet alone cannot tell the two apart. A bare Fernet
    /// token without the prefix is accepted too; every key is tried, and a failure is `UnknownKey`.
    pub fn decrypt(&self, sealed: &str) -> Result<(KeyId, Zeroizing<Vec<u8>>), SealError> {
        let sealed = sealed.trim();
        let (hint, token) = split_key_id(sealed);
        check_token_structure(token)?;
        match hint {
            Some(id) => {
                let key =
                    self.keys
                        .iter()
                        .find(|k| k.id == id)
                        .ok_or_else(|| SealError::UnknownKey {
                            sealed_with: Some(id.clone()),
                            tried: self.key_ids(),
                        })?;
                let plain = key.fernet.decrypt(token).map_err(|_| SealError::InvalidToken {
                    reason: "authentication failed with the key it names: the value was modified or corrupted",
                })?;
                Ok((id, Zeroizing::new(plain)))
            }
            None => self
                .keys
                .iter()
                .find_map(|k| {
                    k.fernet
                        .decrypt(token)
                        .ok()
                        .map(|p| (k.id.clone(), Zeroizing::new(p)))
                })
                .ok_or_else(|| SealError::UnknownKey {
                    sealed_with: None,
                    tried: self.key_ids(),
                }),
        }
    }
}

/// Splits `{key id}-{token}`. A bare Fernet token starts with `g` (its version byte 0x80), which is not a
/// hex digit, so the two forms cannot be confused; `-` keeps the whole text in the url-safe base64
/// alphabet (the CRD's pattern for `sealed`).
pub fn split_key_id(sealed: &str) -> (Option<KeyId>, &str) {
    if sealed.as_bytes().get(8) == Some(&b'-')
        && let Some(id) = KeyId::parse(&sealed[..8])
    {
        return (Some(id), &sealed[9..]);
    }
    (None, sealed)
}

/// Checks the Fernet token layout (version 0x80, timestamp, IV, whole AES blocks, HMAC) without a key, so
/// truncated and non-base64 values get a precise `InvalidToken` instead of a misleading `UnknownKey`.
fn check_token_structure(token: &str) -> Result<(), SealError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| SealError::InvalidToken {
            reason: "not url-safe base64",
        })?;
    const HEADER: usize = 1 + 8 + 16;
    const MAC: usize = 32;
    if bytes.first() != Some(&0x80) {
        return Err(SealError::InvalidToken {
            reason: "not a Fernet token (wrong version byte)",
        });
    }
    if bytes.len() < HEADER + 16 + MAC || !(bytes.len() - HEADER - MAC).is_multiple_of(16) {
        return Err(SealError::InvalidToken {
            reason: "truncated (the token length is not a Fernet token's)",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> KeyRing {
        KeyRing::parse(&keys.join("\n"), "test").unwrap()
    }

    #[test]
    fn newline_and_comma_separated_with_comments() {
        let (a, b, c) = (generate_key(), generate_key(), generate_key());
        let text = format!("# primary\n{}\r\n\n{} , {}  # old\n", *a, *b, *c);
        let r = KeyRing::parse(&text, "test").unwrap();
        assert_eq!(r.key_ids().len(), 3);
        assert_eq!(r.primary_id(), &key_id_of(&a).unwrap());
    }

    #[test]
    fn malformed_key_names_line_and_reason_but_not_the_key() {
        let good = generate_key();
        let bad = "c2hvcnQta2V5LW5vdC0zMi1ieXRlcw==";
        let other = generate_key();
        let err = KeyRing::parse(&format!("{}\n\n{},{bad}\n", *good, *other), "keys.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("entry 2"), "{err}");
        assert!(err.contains("bytes"), "{err}");
        assert!(
            !err.contains(bad) && !err.contains(good.as_str()) && !err.contains(other.as_str()),
            "{err}"
        );

        let err = KeyRing::parse("not!base64+at/all", "k")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("base64") && !err.contains("not!base64"),
            "{err}"
        );
        let err = KeyRing::parse(&format!("{}\n{}", *good, *good), "k")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("already on line 1"),
            "{err}"
        );
        assert!(matches!(
            KeyRing::parse(" \n# only a comment\n", "k"),
            Err(KeyRingError::Empty { .. })
        ));
    }

    #[test]
    fn key_id_is_sha256_prefix_of_raw_key() {
        let raw = [7u8; 32];
        let text = URL_SAFE.encode(raw);
        let expected = hex::encode(&Sha256::digest(raw)[..4]);
        assert_eq!(key_id_of(&text).unwrap().as_str(), expected);
        assert_eq!(ring(&[&text]).primary_id().as_str(), expected);
        // Padding does not change the id.
        assert_eq!(
            key_id_of(text.trim_end_matches('=')).unwrap().as_str(),
            expected
        );
    }

    #[test]
    fn encrypt_with_primary_decrypt_with_any() {
        let (k1, k2) = (generate_key(), generate_key());
        let old = ring(&[&k1]);
        let sealed = old.encrypt(b"x");
        let rotated = ring(&[&k2, &k1]);
        let (id, plain) = rotated.decrypt(&sealed).unwrap();
        assert_eq!(&id, old.primary_id());
        assert_eq!(&plain[..], b"x");
        assert!(
            rotated
                .encrypt(b"y")
                .starts_with(rotated.primary_id().as_str())
        );
        // A bare Fernet token (no key id prefix) still decrypts.
        let bare = split_key_id(&sealed).1;
        assert_eq!(rotated.decrypt(bare).unwrap().0, id);
    }

    #[test]
    fn sealed_text_matches_the_crd_pattern() {
        // The CRD's `sealed` pattern is ^[A-Za-z0-9_-]+={0,2}$.
        let r = ring(&[&generate_key()]);
        for len in [0, 1, 15, 16, 100] {
            let s = r.encrypt(&vec![b'x'; len]);
            let body = s.trim_end_matches('=');
            assert!(s.len() - body.len() <= 2);
            assert!(
                body.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{s}"
            );
            assert_eq!(split_key_id(&s).0.as_ref(), Some(r.primary_id()));
        }
    }

    #[test]
    fn structural_errors() {
        let r = ring(&[&generate_key()]);
        let sealed = r.encrypt(b"hello");
        let (prefix, token) = sealed.split_at(8);
        let token = &token[1..];
        let cut = format!("{prefix}-{}", &token[..token.len() - 10]);
        assert!(matches!(
            r.decrypt(&cut),
            Err(SealError::InvalidToken { .. })
        ));
        assert!(matches!(
            r.decrypt("zzzzzzzz.abc"),
            Err(SealError::InvalidToken { .. })
        ));
        assert!(matches!(
            r.decrypt(&format!("{prefix}-***")),
            Err(SealError::InvalidToken { .. })
        ));
        let foreign = ring(&[&generate_key()]).encrypt(b"hello");
        match r.decrypt(&foreign) {
            Err(SealError::UnknownKey {
                sealed_with: Some(_),
                tried,
            }) => assert_eq!(tried, r.key_ids()),
            other => panic!("{other:?}"),
        }
        let bare_foreign = split_key_id(&foreign).1;
        assert!(matches!(
            r.decrypt(bare_foreign),
            Err(SealError::UnknownKey {
                sealed_with: None,
                ..
            })
        ));
    }

    #[test]
    fn debug_shows_ids_only() {
        let k = generate_key();
        let dbg = format!("{:?}", ring(&[&k]));
        assert!(!dbg.contains(k.as_str()) && dbg.contains(key_id_of(&k).unwrap().as_str()));
    }

    proptest::proptest! {
        /// Any string given as a sealed value yields a result, never a panic; near-valid ones too.
        #[test]
        fn decrypt_is_total(s in ".{0,200}", cut in 0usize..200, flip in 0usize..200) {
            let r = KeyRing::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "t").unwrap();
            let _ = r.decrypt(&s);
            let sealed = r.encrypt(s.as_bytes());
            let _ = r.decrypt(&sealed[..cut.min(sealed.len())]);
            let mut bytes = sealed.into_bytes();
            let i = flip % bytes.len();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            proptest::prop_assert!(r.decrypt(&String::from_utf8(bytes).unwrap()).is_err());
        }
    }
}
