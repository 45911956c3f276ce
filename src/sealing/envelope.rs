//! The sealed plaintext: a versioned envelope that binds a value to where it may be used.
//!
//! Fernet has no associated data, so the scope travels inside the ciphertext. Version 1 is a small header
//! of `key: value` lines, an empty line, then the value's bytes exactly (no escaping, any length, newlines
//! allowed):
//!
//! ```text
//! mcpfly-envelope v1
//! scope: strict
//! namespace: team-a
//! resource: github
//! name: GITHUB_TOKEN
//!
//! <value>
//! ```
//!
//! Scopes (the sealed-secrets model): `strict` binds namespace, resource name and credential name;
//! `namespace` binds the namespace only (any resource, any credential name in it); `cluster` binds nothing.
//! Header fields are exactly those of the scope, each once, in any order; anything else is rejected, so a
//! future field needs a new version. The parser is total: any byte string gives `Ok` or an error, never a
//! panic (property-tested).

use std::fmt;

use zeroize::Zeroizing;

use super::error::SealError;
use super::secret_value::SecretValue;

const MAGIC: &str = "mcpfly-envelope v";
const VERSION: &str = "1";

/// How widely a sealed value may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    #[default]
    Strict,
    Namespace,
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Strict => "strict",
            Scope::Namespace => "namespace",
            Scope::Cluster => "cluster",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Scope::Strict),
            "namespace" | "namespace-wide" => Ok(Scope::Namespace),
            "cluster" | "cluster-wide" => Ok(Scope::Cluster),
            other => Err(format!(
                "unknown scope {other:?}: expected strict, namespace or cluster"
            )),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a credential is being used: the resource's namespace and name, and the credential's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub namespace: String,
    pub resource: String,
    pub name: String,
}

impl Target {
    pub fn new(
        namespace: impl Into<String>,
        resource: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            resource: resource.into(),
            name: name.into(),
        }
    }

    /// The binding of the given scope for this target.
    pub fn binding(&self, scope: Scope) -> Binding {
        match scope {
            Scope::Strict => Binding::Strict(self.clone()),
            Scope::Namespace => Binding::Namespace {
                namespace: self.namespace.clone(),
            },
            Scope::Cluster => Binding::Cluster,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} credential {}",
            self.namespace, self.resource, self.name
        )
    }
}

/// What a sealed value is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Binding {
    Strict(Target),
    Namespace { namespace: String },
    Cluster,
}

impl Binding {
    pub fn scope(&self) -> Scope {
        match self {
            Binding::Strict(_) => Scope::Strict,
            Binding::Namespace { .. } => Scope::Namespace,
            Binding::Cluster => Scope::Cluster,
        }
    }

    /// Whether a value with this binding may be used at `target`.
    pub fn permits(&self, target: &Target) -> bool {
        match self {
            Binding::Strict(t) => t == target,
            Binding::Namespace { namespace } => namespace == &target.namespace,
            Binding::Cluster => true,
        }
    }

    /// Checks names so that every binding can be written into (and read back from) a header.
    pub fn validate(&self) -> Result<(), SealError> {
        match self {
            Binding::Strict(t) => {
                validate_namespace(&t.namespace)?;
                validate_resource(&t.resource)?;
                validate_credential_name(&t.name)
            }
            Binding::Namespace { namespace } => validate_namespace(namespace),
            Binding::Cluster => Ok(()),
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Binding::Strict(t) => write!(f, "{t} (strict scope)"),
            Binding::Namespace { namespace } => {
                write!(f, "namespace {namespace} (namespace scope)")
            }
            Binding::Cluster => f.write_str("any namespace (cluster scope)"),
        }
    }
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> SealError {
    SealError::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    }
}

/// A Kubernetes namespace name: a DNS-1123 label.
pub fn validate_namespace(s: &str) -> Result<(), SealError> {
    if s.is_empty() || s.len() > 63 {
        return Err(invalid("namespace", s, "must be 1 to 63 characters"));
    }
    if !dns_label(s) {
        return Err(invalid(
            "namespace",
            s,
            "must be lowercase letters, digits and '-', starting and ending alphanumeric",
        ));
    }
    Ok(())
}

/// A custom resource name: a DNS-1123 subdomain.
pub fn validate_resource(s: &str) -> Result<(), SealError> {
    if s.is_empty() || s.len() > 253 {
        return Err(invalid("resource name", s, "must be 1 to 253 characters"));
    }
    if !s.split('.').all(dns_label) {
        return Err(invalid(
            "resource name",
            s,
            "must be a DNS subdomain (lowercase letters, digits, '-' and '.')",
        ));
    }
    Ok(())
}

/// A credential name: an environment variable name, as the CRD requires.
pub fn validate_credential_name(s: &str) -> Result<(), SealError> {
    let mut bytes = s.bytes();
    let ok = matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(invalid(
            "credential name",
            s,
            "must match ^[A-Za-z_][A-Za-z0-9_]*$",
        ));
    }
    Ok(())
}

fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A value and where it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub binding: Binding,
    pub value: SecretValue,
}

impl Envelope {
    /// The version-1 encoding. The caller encrypts it; the buffer wipes itself.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, SealError> {
        self.binding.validate()?;
        let mut header = format!("{MAGIC}{VERSION}\nscope: {}\n", self.binding.scope());
        match &self.binding {
            Binding::Strict(t) => {
                header.push_str(&format!(
                    "namespace: {}\nresource: {}\nname: {}\n",
                    t.namespace, t.resource, t.name
                ));
            }
            Binding::Namespace { namespace } => {
                header.push_str(&format!("namespace: {namespace}\n"))
            }
            Binding::Cluster => {}
        }
        header.push('\n');
        let mut out = Zeroizing::new(Vec::with_capacity(header.len() + self.value.len()));
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(self.value.expose().as_bytes());
        Ok(out)
    }

    /// Parses any byte string; total (never panics).
    pub fn parse(bytes: &[u8]) -> Result<Self, SealError> {
        let bad = |reason| SealError::InvalidToken { reason };
        let first_line_end = bytes
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(bytes.len());
        let first = &bytes[..first_line_end];
        let Some(version) = first.strip_prefix(MAGIC.as_bytes()) else {
            return Err(SealError::UnsupportedVersion {
                found: "none (not an mcpfly envelope)".to_owned(),
            });
        };
        if version != VERSION.as_bytes() {
            // The version text is authenticated but still shown sanitised and short.
            let found: String = version
                .iter()
                .take(16)
                .map(|&b| {
                    if b.is_ascii_alphanumeric() || b == b'.' {
                        b as char
                    } else {
                        '?'
                    }
                })
                .collect();
            return Err(SealError::UnsupportedVersion { found });
        }
        let rest = bytes
            .get(first_line_end + 1..)
            .ok_or(bad("envelope has no header end"))?;
        let header_end = find_blank_line(rest).ok_or(bad("envelope has no header end"))?;
        let header = std::str::from_utf8(&rest[..header_end])
            .map_err(|_| bad("envelope header is not UTF-8"))?;
        let value_bytes = &rest[header_end + 1..];

        let (mut scope, mut namespace, mut resource, mut name) = (None, None, None, None);
        for line in header.lines() {
            let (key, val) = line
                .split_once(": ")
                .ok_or(bad("envelope header line is not `key: value`"))?;
            let slot = match key {
                "scope" => &mut scope,
                "namespace" => &mut namespace,
                "resource" => &mut resource,
                "name" => &mut name,
                _ => return Err(bad("envelope header has an unknown field")),
            };
            if slot.replace(val.to_owned()).is_some() {
                return Err(bad("envelope header repeats a field"));
            }
        }
        let scope: Scope = scope
            .ok_or(bad("envelope header has no scope"))?
            .parse()
            .map_err(|_| bad("envelope header has an unknown scope"))?;
        let binding = match (scope, namespace, resource, name) {
            (Scope::Strict, Some(namespace), Some(resource), Some(name)) => {
                Binding::Strict(Target {
                    namespace,
                    resource,
                    name,
                })
            }
            (Scope::Namespace, Some(namespace), None, None) => Binding::Namespace { namespace },
            (Scope::Cluster, None, None, None) => Binding::Cluster,
            _ => return Err(bad("envelope header fields do not match its scope")),
        };
        binding
            .validate()
            .map_err(|_| bad("envelope header holds an invalid name"))?;
        let value =
            SecretValue::from_utf8(value_bytes.to_vec()).ok_or(bad("sealed value is not UTF-8"))?;
        Ok(Envelope { binding, value })
    }

    /// `Ok` when the value may be used at `target`, else `ScopeMismatch`.
    pub fn check(&self, target: &Target) -> Result<(), SealError> {
        if self.binding.permits(target) {
            Ok(())
        } else {
            Err(SealError::ScopeMismatch {
                sealed_for: Box::new(self.binding.clone()),
                used_as: Box::new(target.clone()),
            })
        }
    }
}

/// Index (in `rest`) of the `\n` that ends the header: the header is empty (`rest` starts with `\n`) or ends
/// with `\n\n`.
fn find_blank_line(rest: &[u8]) -> Option<usize> {
    if rest.first() == Some(&b'\n') {
        return Some(0);
    }
    rest.windows(2).position(|w| w == b"\n\n").map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target() -> Target {
        Target::new("team-a", "github", "TOKEN")
    }

    #[test]
    fn round_trip_every_scope() {
        for scope in [Scope::Strict, Scope::Namespace, Scope::Cluster] {
            for value in ["", "x", "multi\nline\n\nvalue\n", "ünïcode = \"quoted\""] {
                let env = Envelope {
                    binding: target().binding(scope),
                    value: value.into(),
                };
                let bytes = env.encode().unwrap();
                assert_eq!(Envelope::parse(&bytes).unwrap(), env, "{scope} {value:?}");
            }
        }
    }

    #[test]
    fn documented_layout() {
        let env = Envelope {
            binding: target().binding(Scope::Strict),
            value: "v".into(),
        };
        assert_eq!(
            &env.encode().unwrap()[..],
            b"mcpfly-envelope v1\nscope: strict\nnamespace: team-a\nresource: github\nname: TOKEN\n\nv"
        );
        let env = Envelope {
            binding: Binding::Cluster,
            value: "v".into(),
        };
        assert_eq!(
            &env.encode().unwrap()[..],
            b"mcpfly-envelope v1\nscope: cluster\n\nv"
        );
    }

    #[test]
    fn scope_checks() {
        let strict = target().binding(Scope::Strict);
        assert!(strict.permits(&target()));
        assert!(!strict.permits(&Target::new("team-b", "github", "TOKEN")));
        assert!(!strict.permits(&Target::new("team-a", "gitlab", "TOKEN")));
        assert!(!strict.permits(&Target::new("team-a", "github", "OTHER")));
        let ns = target().binding(Scope::Namespace);
        assert!(ns.permits(&Target::new("team-a", "other", "OTHER")));
        assert!(!ns.permits(&Target::new("team-b", "github", "TOKEN")));
        assert!(Binding::Cluster.permits(&Target::new("x", "y", "Z")));
    }

    #[test]
    fn rejects_bad_envelopes() {
        let cases: &[&[u8]] = &[
            b"",
            b"mcpfly-envelope v1",
            b"mcpfly-envelope v1\nscope: strict\n",
            b"mcpfly-envelope v1\nscope: strict\nnamespace: a\n\nv",
            b"mcpfly-envelope v1\nscope: cluster\nnamespace: a\n\nv",
            b"mcpfly-envelope v1\nscope: cluster\nscope: cluster\n\nv",
            b"mcpfly-envelope v1\nscope: galaxy\n\nv",
            b"mcpfly-envelope v1\nscope: namespace\nnamespace: Bad_NS\n\nv",
            b"mcpfly-envelope v1\nscope: cluster\nextra: 1\n\nv",
            b"mcpfly-envelope v1\nscope: cluster\n\n\xff",
        ];
        for c in cases {
            assert!(
                Envelope::parse(c).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
        assert_eq!(
            Envelope::parse(b"mcpfly-envelope v2\nscope: cluster\n\nv"),
            Err(SealError::UnsupportedVersion { found: "2".into() })
        );
        assert!(matches!(
            Envelope::parse(b"raw secret"),
            Err(SealError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn names_are_validated_when_sealing() {
        for t in [
            Target::new("Team", "r", "N"),
            Target::new("ns", "r", "1N"),
            Target::new("ns", "r\nscope", "N"),
        ] {
            let env = Envelope {
                binding: t.binding(Scope::Strict),
                value: "v".into(),
            };
            assert!(matches!(env.encode(), Err(SealError::InvalidName { .. })));
        }
    }

    #[test]
    fn mismatch_message_names_both_scopes_and_no_value() {
        let env = Envelope {
            binding: target().binding(Scope::Strict),
            value: "s3cr3t-canary".into(),
        };
        let err = env
            .check(&Target::new("team-b", "github", "TOKEN"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("team-a/github") && err.contains("team-b/github"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t-canary"));
    }

    proptest! {
        #[test]
        fn parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::parse(&bytes);
        }

        #[test]
        fn parser_is_total_on_near_valid_input(
            header in "(scope|namespace|resource|name|x)(: |:)(strict|namespace|cluster|team-a|gh|T|)",
            lines in 0usize..5,
            tail in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut bytes = b"mcpfly-envelope v1\n".to_vec();
            for _ in 0..lines {
                bytes.extend_from_slice(header.as_bytes());
                bytes.push(b'\n');
            }
            bytes.extend_from_slice(&tail);
            let _ = Envelope::parse(&bytes);
        }

        #[test]
        fn round_trip_any_value(value in ".*", ns in "[a-z][a-z0-9-]{0,10}[a-z0-9]", name in "[A-Za-z_][A-Za-z0-9_]{0,10}") {
            let env = Envelope { binding: Target::new(ns, "res", name).binding(Scope::Strict), value: value.into() };
            prop_assert_eq!(Envelope::parse(&env.encode().unwrap()).unwrap(), env);
        }
    }
}
