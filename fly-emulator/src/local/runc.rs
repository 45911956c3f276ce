//! Machines from the real runtime image under `runc` (opt-in: [`RuncImage::prepare`] into
//! [`LocalDriverConfig::runc`](super::LocalDriverConfig::runc); tests and the demo take the OCI layout from
//! [`RUNC_IMAGE_ENV`]).
//!
//! Each machine is a container the way a Fly machine runs one: the image's ENTRYPOINT and CMD, replaced by the
//! config's `init.exec` / `init.entrypoint` / `init.cmd` as Fly does; the image's env overlaid with the machine's
//! env and the app's secrets; a read-only root filesystem (shared by every machine of the driver) with tmpfs
//! `/home/node` and `/tmp`; its own network namespace with a veth pair to the host and NAT out (packages are
//! downloaded at start, as on Fly). The proxy reaches it through a forwarder on the loopback port the local
//! driver picked, to the service's `internal_port` on the machine's address, so the rest of the driver does
//! not care how a machine runs.
//!
//! Stop ends the container and everything it wrote (Fly resets the root filesystem on start); suspend is
//! `runc pause` (the freezer: memory kept), resume `runc resume`; destroy is a stop. A package cache that
//! survives a stop exists only when [`RuncImage::with_package_cache`] asks for one: it models a Fly volume
//! mounted over the caches (`npx` and `uvx`), one folder per machine.
//!
//! Needs root, `runc`, `umoci` (to unpack the image once), `ip` and `iptables` (hack/image-tools.sh installs
//! them). Where outbound TLS is intercepted, the host's CA bundle is mounted read-only at run time.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{LocalProcess, ProcessSpawner};

/// Names the OCI image layout (`DIR` or `DIR:TAG`) the local driver runs machines from under runc.
pub const RUNC_IMAGE_ENV: &str = "MCPFLY_EMULATOR_RUNC_IMAGE";

/// Machine addresses: one /30 per machine in 10.215.0.0/16 (host side .1, machine .2).
const SUBNETS: u32 = 1 << 14;
/// The image's unprivileged user's home (`runtime/Dockerfile`), where the package caches live.
const HOME: &str = "/home/node";
/// Where the host's CA bundle appears in a machine.
const HOST_CA: &str = "/run/host-ca.crt";

/// The runtime image, unpacked once; every machine's read-only root.
#[derive(Debug)]
pub struct RuncImage {
    dir: PathBuf,
    /// umoci's runtime spec for the image (user, env, working dir, namespaces, default mounts).
    template: Value,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    host_ca: Option<PathBuf>,
    package_cache: Option<PathBuf>,
}

impl RuncImage {
    /// Unpacks the image named by [`RUNC_IMAGE_ENV`] below `work_dir`: `None` when the variable is unset.
    pub fn from_env(work_dir: &Path) -> Option<io::Result<Self>> {
        let layout = std::env::var(RUNC_IMAGE_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        Some(Self::prepare(&layout, work_dir))
    }

    /// Unpacks `layout` (`DIR` or `DIR:TAG`; without a tag, the layout's only image) into `work_dir/runc-image`.
    /// Blocks for a few seconds (the image is ~400 MB unpacked).
    pub fn prepare(layout: &str, work_dir: &Path) -> io::Result<Self> {
        if !is_root() {
            return Err(io::Error::other(
                "running machines under runc needs root (network namespaces, veth pairs, runc)",
            ));
        }
        for tool in ["runc", "umoci", "ip", "iptables"] {
            if !on_path(tool) {
                return Err(io::Error::other(format!(
                    "running machines under runc needs `{tool}` on PATH (hack/image-tools.sh installs it)"
                )));
            }
        }
        let (dir, tag) = match layout.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') => (PathBuf::from(d), Some(t.to_string())),
            _ => (PathBuf::from(layout), None),
        };
        let (tag, image_config) = read_image_config(&dir, tag.as_deref())?;
        let unpacked = work_dir.join("runc-image");
        if unpacked.exists() {
            std::fs::remove_dir_all(&unpacked)?;
        }
        std::fs::create_dir_all(work_dir)?;
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", dir.display()))
            .arg(&unpacked))?;
        let template: Value = serde_json::from_slice(&std::fs::read(unpacked.join("config.json"))?)
            .map_err(io::Error::other)?;
        let strings = |key: &str| -> Vec<String> {
            image_config
                .pointer(&format!("/config/{key}"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let host_ca = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")))
            .filter(|p| p.is_file());
        Ok(Self {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            dir: unpacked,
            template,
            host_ca,
            package_cache: None,
        })
    }

    /// Keeps each machine's package caches (`~/.npm`, `~/.cache`) in `dir/APP/MACHINE` across stops, as a Fly
    /// volume mounted there would.
    pub fn with_package_cache(mut self, dir: PathBuf) -> Self {
        self.package_cache = Some(dir);
        self
    }

    /// What the machine runs: Fly's rules for `init` over the image's ENTRYPOINT and CMD.
    pub fn argv(&self, config: &Value) -> Vec<String> {
        let init = |key: &str| -> Option<Vec<String>> {
            let v: Vec<String> = config
                .pointer(&format!("/init/{key}"))
                .and_then(Value::as_array)?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            (!v.is_empty()).then_some(v)
        };
        if let Some(exec) = init("exec") {
            return exec;
        }
        let mut argv = init("entrypoint").unwrap_or_else(|| self.entrypoint.clone());
        argv.extend(init("cmd").unwrap_or_else(|| self.cmd.clone()));
        argv
    }

    /// Starts a machine; the proxy reaches its service on `127.0.0.1:port`. Call inside a Tokio runtime (the
    /// forwarder runs on it).
    pub(super) fn start(
        self: &Arc<Self>,
        spawner: &dyn ProcessSpawner,
        machine_dir: &Path,
        (app, id): (&str, &str),
        config: &Value,
        env: &std::collections::BTreeMap<String, String>,
        port: u16,
    ) -> io::Result<Box<dyn LocalProcess>> {
        let internal_port = config
            .pointer("/services/0/internal_port")
            .and_then(Value::as_u64)
            .unwrap_or(8080) as u16;
        let net = Netns::create()?;
        let container = format!("mcpfly-{app}-{id}");
        let bundle = machine_dir.join("bundle");
        let started = (|| {
            // Whatever a previous run of this machine left (a crash) goes first.
            let _ = runc(&["delete", "-f", &container]);
            if bundle.exists() {
                std::fs::remove_dir_all(&bundle)?;
            }
            std::fs::create_dir_all(&bundle)?;
            let spec = self.spec(&net, (app, id), config, env)?;
            std::fs::write(
                bundle.join("config.json"),
                serde_json::to_vec_pretty(&spec).map_err(io::Error::other)?,
            )?;
            let forwarder = forward(port, SocketAddr::from((net.machine_ip(), internal_port)))?;
            let mut command = Command::new("runc");
            command
                .arg("run")
                .arg("--bundle")
                .arg(&bundle)
                .arg(&container)
                .stdin(Stdio::null());
            let process = spawner.spawn(
                &format!("{app}-{id}"),
                command,
                &machine_dir.join("machine.log"),
            )?;
            Ok::<_, io::Error>((process, forwarder))
        })();
        match started {
            Ok((process, forwarder)) => Ok(Box::new(Container {
                process: Some(process),
                id: container,
                net: Some(net),
                forwarder,
                bundle,
            })),
            Err(e) => {
                net.remove();
                Err(e)
            }
        }
    }

    /// The runtime spec of one machine: umoci's spec for the image plus what a Fly machine adds at run time.
    fn spec(
        &self,
        net: &Netns,
        (app, id): (&str, &str),
        config: &Value,
        env: &std::collections::BTreeMap<String, String>,
    ) -> io::Result<Value> {
        let mut spec = self.template.clone();
        spec["root"] = json!({"path": self.dir.join("rootfs"), "readonly": true});
        spec["hostname"] = json!(id);
        let process = &mut spec["process"];
        process["terminal"] = json!(false);
        process["args"] = json!(self.argv(config));
        let mut vars: Vec<String> = process["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut set = |name: &str, value: &str| {
            vars.retain(|v| v.split_once('=').is_none_or(|(k, _)| k != name));
            vars.push(format!("{name}={value}"));
        };
        for (k, v) in env {
            set(k, v);
        }
        if self.host_ca.is_some() {
            set("NODE_EXTRA_CA_CERTS", HOST_CA);
            set("SSL_CERT_FILE", HOST_CA);
        }
        process["env"] = json!(vars);
        let namespaces = spec["linux"]["namespaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut namespaces: Vec<Value> = namespaces
            .into_iter()
            .filter(|n| n["type"] != "network")
            .collect();
        namespaces.push(json!({"type": "network", "path": net.path()}));
        spec["linux"]["namespaces"] = json!(namespaces);
        let mut mounts = spec["mounts"].as_array().cloned().unwrap_or_default();
        mounts.push(
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]}),
        );
        mounts.push(
            json!({"destination": HOME, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=0755", "uid=1000", "gid=1000"]}),
        );
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind",
                           "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}));
        if let Some(ca) = &self.host_ca {
            mounts.push(json!({"destination": HOST_CA, "type": "bind", "source": ca,
                               "options": ["rbind", "ro"]}));
        }
        if let Some(cache) = &self.package_cache {
            let uid = spec["process"]["user"]["uid"].as_u64().unwrap_or(1000) as u32;
            let gid = spec["process"]["user"]["gid"].as_u64().unwrap_or(1000) as u32;
            for (sub, destination) in [("npm", ".npm"), ("cache", ".cache")] {
                let source = cache.join(app).join(id).join(sub);
                std::fs::create_dir_all(&source)?;
                std::os::unix::fs::chown(&source, Some(uid), Some(gid))?;
                mounts.push(
                    json!({"destination": format!("{HOME}/{destination}"), "type": "bind",
                                   "source": source, "options": ["rbind", "rw"]}),
                );
            }
        }
        spec["mounts"] = json!(mounts);
        Ok(spec)
    }
}

/// The image config (`.config.Entrypoint`, `.Cmd`, ...) of `tag` in an OCI layout, and the tag.
fn read_image_config(dir: &Path, tag: Option<&str>) -> io::Result<(String, Value)> {
    let read = |path: PathBuf| -> io::Result<Value> {
        let bytes = std::fs::read(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    };
    let blob = |digest: &str| dir.join("blobs").join(digest.replacen(':', "/", 1));
    let index = read(dir.join("index.json"))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let name = |m: &Value| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let chosen = match tag {
        Some(t) => manifests.iter().find(|m| name(m) == t),
        None if manifests.len() == 1 => manifests.first(),
        None => None,
    }
    .ok_or_else(|| {
        io::Error::other(format!(
            "{}: no image {} in this OCI layout (tags: {:?})",
            dir.display(),
            tag.unwrap_or("(exactly one expected)"),
            manifests.iter().map(name).collect::<Vec<_>>()
        ))
    })?;
    let manifest = read(blob(chosen["digest"].as_str().unwrap_or_default()))?;
    let config = read(blob(
        manifest
            .pointer("/config/digest")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    ))?;
    Ok((name(chosen), config))
}

/// A machine's container: the foreground `runc run` (which forwards SIGTERM to the container), its network
/// namespace and its forwarder.
struct Container {
    process: Option<Box<dyn LocalProcess>>,
    id: String,
    net: Option<Netns>,
    forwarder: tokio::task::AbortHandle,
    bundle: PathBuf,
}

impl LocalProcess for Container {
    fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, |p| p.pid())
    }
    fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(|p| p.is_running())
    }
    fn pause(&self) {
        // runc gives up on the cgroup v1 freezer quickly ("unable to freeze") on a loaded host: try again.
        let mut last = None;
        for _ in 0..10 {
            match runc(&["pause", &self.id]) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if let Some(e) = last {
            tracing::warn!(container = %self.id, error = %e, "runc pause failed");
        }
    }
    fn resume(&self) {
        // Also called on containers that are not paused (before a stop): runc refuses, nothing to do.
        let _ = runc(&["resume", &self.id]);
    }
    fn terminate(mut self: Box<Self>) {
        if let Some(p) = self.process.take() {
            p.terminate();
        }
        self.cleanup();
    }
    fn log_tail(&self, max_bytes: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(max_bytes))
            .unwrap_or_default()
    }
}

impl Container {
    /// Removes the container's state, its network and its writable files (idempotent).
    fn cleanup(&mut self) {
        self.forwarder.abort();
        let _ = runc(&["delete", "-f", &self.id]);
        if let Some(net) = self.net.take() {
            net.remove();
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.resume();
            p.terminate();
        }
        self.cleanup();
    }
}

/// A machine's network namespace `mcpfly-mN`, its veth pair `mfhN` (host) / `eth0` (machine) on subnet N, and
/// the NAT rule that lets it reach package registries. N is the first index whose namespace does not exist:
/// creating the namespace claims it, also against other processes on the host.
struct Netns {
    index: u32,
}

impl Netns {
    fn create() -> io::Result<Self> {
        let index = (0..SUBNETS)
            .find(|n| {
                Command::new("ip")
                    .args(["netns", "add", &format!("mcpfly-m{n}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| io::Error::other("no free machine network (10.215.0.0/16 used up)"))?;
        let net = Self { index };
        if let Err(e) = net.wire() {
            net.remove();
            return Err(e);
        }
        Ok(net)
    }

    fn name(&self) -> String {
        format!("mcpfly-m{}", self.index)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name())
    }
    fn host_link(&self) -> String {
        format!("mfh{}", self.index)
    }
    fn ip(&self, host: u8) -> Ipv4Addr {
        let base = u32::from(Ipv4Addr::new(10, 215, 0, 0)) + self.index * 4;
        Ipv4Addr::from(base + u32::from(host))
    }
    fn machine_ip(&self) -> Ipv4Addr {
        self.ip(2)
    }
    fn subnet(&self) -> String {
        format!("{}/30", self.ip(0))
    }

    fn wire(&self) -> io::Result<()> {
        let (ns, link) = (self.name(), self.host_link());
        let host_ip = format!("{}/30", self.ip(1));
        let machine_ip = format!("{}/30", self.ip(2));
        let gateway = self.ip(1).to_string();
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["addr", "add", &host_ip, "dev", &link])?;
        ip(&["link", "set", &link, "up"])?;
        ip(&["-n", &ns, "addr", "add", &machine_ip, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &gateway])?;
        // Routing out of the namespaces; left on (other machines may still need it).
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        run(Command::new("iptables").args([
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            &self.subnet(),
            "-j",
            "MASQUERADE",
        ]))
    }

    /// Deleting the namespace also deletes the veth pair.
    fn remove(self) {
        let _ = run(Command::new("iptables").args([
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-s",
            &self.subnet(),
            "-j",
            "MASQUERADE",
        ]));
        let _ = ip(&["netns", "del", &self.name()]);
        let _ = ip(&["link", "del", &self.host_link()]);
    }
}

/// Accepts on `127.0.0.1:port` and relays each connection to `to`, until aborted.
fn forward(port: u16, to: SocketAddr) -> io::Result<tokio::task::AbortHandle> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // Refused while the machine's server is not listening yet: the client sees the connection close.
                if let Ok(mut machine) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut machine).await;
                }
            });
        }
    });
    Ok(task.abort_handle())
}

fn ip(args: &[&str]) -> io::Result<()> {
    run(Command::new("ip").args(args))
}

fn runc(args: &[&str]) -> io::Result<()> {
    run(Command::new("runc").args(args))
}

/// Runs a short command; an error carries its stderr.
fn run(command: &mut Command) -> io::Result<()> {
    let out = command.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            command,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RuncImage {
        RuncImage {
            dir: PathBuf::from("/x"),
            template: json!({}),
            entrypoint: vec!["/usr/bin/tini".into(), "--".into()],
            cmd: vec!["mcpfly".into(), "example-server".into()],
            host_ca: None,
            package_cache: None,
        }
    }

    /// Fly's `init`: `cmd` replaces the image's CMD (ENTRYPOINT kept), `entrypoint` replaces ENTRYPOINT,
    /// `exec` replaces both.
    #[test]
    fn init_overrides_follow_fly() {
        let img = image();
        assert_eq!(
            img.argv(&json!({"init": {}})),
            ["/usr/bin/tini", "--", "mcpfly", "example-server"]
        );
        assert_eq!(
            img.argv(&json!({"init": {"cmd": ["npx", "-y", "x"]}})),
            ["/usr/bin/tini", "--", "npx", "-y", "x"]
        );
        assert_eq!(
            img.argv(&json!({"init": {"entrypoint": ["/bin/sh", "-c"]}})),
            ["/bin/sh", "-c", "mcpfly", "example-server"]
        );
        assert_eq!(
            img.argv(&json!({"init": {"exec": ["/bin/true"], "cmd": ["x"]}})),
            ["/bin/true"]
        );
    }
}
