//! Where the control-plane binaries come from.
//!
//! In order: `MCPFLY_CONTROL_PLANE_BINS` (a folder with kube-apiserver, etcd, kubectl and helm, as printed by
//! `hack/control-plane-bins.sh`); `KUBEBUILDER_ASSETS` (the envtest convention: kube-apiserver, etcd, kubectl;
//! helm is then looked up beside them or on PATH); the newest complete build in the script's cache
//! (`$MCPFLY_CACHE_DIR`, else `$XDG_CACHE_HOME/mcpfly`, else `~/.cache/mcpfly`); otherwise
//! `hack/control-plane-bins.sh` in the current directory (a checkout) is run, which builds them from their
//! published Go modules once and caches them by version.
//!
//! Nothing here names the folder the binary was built in: the release binary carries this module (the demo uses
//! it), and an embedded build path would make the image digest depend on the checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
    pub helm: Option<PathBuf>,
}

impl Binaries {
    pub fn locate() -> anyhow::Result<Self> {
        if let Some(dir) = std::env::var_os("MCPFLY_CONTROL_PLANE_BINS") {
            return Self::in_dir(Path::new(&dir));
        }
        if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
            return Self::in_dir(Path::new(&dir));
        }
        if let Some(dir) = cache_root().and_then(|root| newest_complete(&root.join("bin"))) {
            return Self::in_dir(&dir);
        }
        let script = Path::new(BUILD_SCRIPT);
        if !script.is_file() {
            bail!(
                "no control-plane binaries found: run {BUILD_SCRIPT} from a checkout of mcpfly (it caches them), \
                 or point MCPFLY_CONTROL_PLANE_BINS / KUBEBUILDER_ASSETS at a folder holding kube-apiserver, etcd \
                 and kubectl"
            );
        }
        let output = Command::new("bash")
            .arg(script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}); see its output above",
                script.display(),
                output.status
            );
        }
        let dir = String::from_utf8(output.stdout)?
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        Self::in_dir(Path::new(&dir))
    }

    fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let required = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found in {}: run hack/control-plane-bins.sh, or point MCPFLY_CONTROL_PLANE_BINS / \
                     KUBEBUILDER_ASSETS at a folder holding kube-apiserver, etcd and kubectl",
                    name,
                    dir.display()
                );
            }
            Ok(path)
        };
        let helm = Some(dir.join("helm"))
            .filter(|p| p.is_file())
            .or_else(|| which("helm"));
        Ok(Self {
            kube_apiserver: required("kube-apiserver")?,
            etcd: required("etcd")?,
            kubectl: required("kubectl")?,
            helm,
        })
    }
}

/// The build script, relative to a checkout's root (where `cargo run` and `cargo test` start).
const BUILD_SCRIPT: &str = "hack/control-plane-bins.sh";

/// Where `hack/control-plane-bins.sh` caches its builds (its `CACHE_ROOT`).
fn cache_root() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("MCPFLY_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("mcpfly")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/mcpfly")))
}

/// The newest `k8s-<version>-helm-<version>` folder the script finished (it writes `.complete` last).
fn newest_complete(bin_root: &Path) -> Option<PathBuf> {
    let mut complete: Vec<PathBuf> = std::fs::read_dir(bin_root)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|dir| {
            dir.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("k8s-"))
                && dir.join(".complete").is_file()
        })
        .collect();
    complete.sort();
    complete.pop()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
