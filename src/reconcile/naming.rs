//! Deterministic names, known before anything exists on Fly, so a crash between "create" and "record" can never
//! produce a second app or a duplicate machine.

use sha2::{Digest, Sha256};

/// Fly app names: one global namespace, at most 63 characters of lowercase letters, digits and dashes.
const FLY_APP_NAME_MAX: usize = 63;

/// `{prefix}-{namespace}-{name}` shortened to fit, plus `-{8 hex of sha256(cluster/namespace/name)}`. The hash
/// keeps names unique across clusters and after shortening; the readable part helps people find the app.
pub fn app_name(prefix: &str, cluster: &str, namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{cluster}/{namespace}/{name}").as_bytes());
    let suffix = &hex::encode(digest)[..8];
    let readable: String = format!("{prefix}-{namespace}-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let budget = FLY_APP_NAME_MAX - suffix.len() - 1;
    let mut readable: String = readable.chars().take(budget).collect();
    while readable.ends_with('-') {
        readable.pop();
    }
    format!("{readable}-{suffix}")
}

/// Machine names are `{region}-{index}`: stable across restarts, so a machine is found by name after an
/// ambiguous create instead of being created twice.
pub fn machine_name(region: &str, index: u32) -> String {
    format!("{region}-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_name_is_deterministic_and_distinct_per_cluster() {
        let a = app_name("mcpfly", "prod", "team-a", "github");
        assert_eq!(a, app_name("mcpfly", "prod", "team-a", "github"));
        assert!(a.starts_with("mcpfly-team-a-github-"), "{a}");
        assert_eq!(a.len(), "mcpfly-team-a-github-".len() + 8);
        assert_ne!(a, app_name("mcpfly", "staging", "team-a", "github"));
        assert_ne!(a, app_name("mcpfly", "prod", "team-b", "github"));
    }

    #[test]
    fn long_and_dotted_names_fit_fly_rules() {
        let name = app_name(
            "mcpfly",
            "c",
            &"n".repeat(63),
            &format!("{}.v2", "x".repeat(200)),
        );
        assert!(name.len() <= 63, "{} chars", name.len());
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name}"
        );
        assert!(
            !name.contains("--"),
            "no empty segment before the hash: {name}"
        );
        let dotted = app_name("mcpfly", "c", "ns", "my.server");
        assert!(dotted.starts_with("mcpfly-ns-my-server-"), "{dotted}");
    }

    #[test]
    fn machine_names_are_region_and_index() {
        assert_eq!(machine_name("iad", 0), "iad-0");
        assert_eq!(machine_name("ams", 2), "ams-2");
    }
}
