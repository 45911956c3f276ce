//! [`SecretValue`]: the only type that holds unsealed plaintext.

use std::fmt;

use zeroize::Zeroizing;

/// A plaintext credential value.
///
/// The bytes are wiped when the value is dropped, and `Debug`/`Display` print `[redacted]`, so a value that
/// ends up in a log line, an error or a status field by mistake shows nothing. There is deliberately no
/// `Serialize`: the only way out is [`SecretValue::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a string; the string's buffer moves into the wrapper (no copy is left behind).
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// Takes UTF-8 bytes without copying; on invalid UTF-8 the bytes are wiped and `None` is returned.
    pub fn from_utf8(bytes: Vec<u8>) -> Option<Self> {
        match String::from_utf8(bytes) {
            Ok(s) => Some(Self::new(s)),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                None
            }
        }
    }

    /// The plaintext. Callers must not log, store or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretValue {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for SecretValue {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Deserialising (the seal endpoint's request body) moves the decoded string straight into the wrapper.
impl<'de> serde::Deserialize<'de> for SecretValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let v = SecretValue::from("hunter2");
        assert_eq!(format!("{v:?}"), "[redacted]");
        assert_eq!(format!("{v}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(v.clone())), "Some([redacted])");
        assert_eq!(v.expose(), "hunter2");
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert!(SecretValue::from_utf8(vec![0xff, 0xfe]).is_none());
        assert_eq!(
            SecretValue::from_utf8(b"ok".to_vec()).unwrap().expose(),
            "ok"
        );
    }
}
