//! Where the control-plane binaries come from.
//!
//! In order: `MCPFLY_CONTROL_PLANE_BINS` (a folder with kube-apiserver, etcd, kubectl and helm, as printed by
//! `hack/control-plane-bins.sh`); `KUBEBUILDER_ASSETS` (the envtest convention: kube-apiserver, etcd, kubectl;
//! helm is then looked up beside them or on PATH); otherwise the build script is run, which builds them from
//! their published Go modules once and caches them by version.

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
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/control-plane-bins.sh");
        let output = Command::new("bash")
            .arg(&script)
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

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
