//! Child processes that can never outlive the test process that started them.
//!
//! Each child is spawned from a dedicated supervisor thread with `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills
//! the child when that thread exits, which happens when the handle is dropped *and* when the whole test process
//! dies (panic with abort, SIGKILL, a failing test harness). `Drop` alone would miss the last two.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How a supervised child should be stopped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// SIGTERM, then SIGKILL after a grace period: lets etcd and the apiserver shut down cleanly (for restarts).
    Graceful,
    /// SIGKILL at once (teardown, crash simulation).
    Kill,
}

pub struct Supervised {
    name: String,
    pid: u32,
    log_path: PathBuf,
    stop_tx: Option<mpsc::Sender<Stop>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervised {
    /// Starts `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> std::io::Result<Self> {
        let log = File::options().create(true).append(true).open(log_path)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor may have died between fork and prctl: then nobody will ever kill us.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (started_tx, started_rx) = mpsc::channel::<std::io::Result<u32>>();
        let (stop_tx, stop_rx) = mpsc::channel::<Stop>();
        let thread_name = format!("supervise-{name}");
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(child.id()));
                // Block until asked to stop (or until the handle is gone); the child may exit earlier on its own,
                // which callers notice through health checks and the log.
                let how = stop_rx.recv().unwrap_or(Stop::Kill);
                if let Stop::Graceful = how {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    for _ in 0..100 {
                        if let Ok(Some(_)) = child.try_wait() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
            })?;
        let pid = started_rx
            .recv()
            .map_err(|_| std::io::Error::other("supervisor thread died before spawning"))??;
        Ok(Self {
            name: name.to_string(),
            pid,
            log_path: log_path.to_path_buf(),
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last `max_bytes` of the child's output, for error messages when it fails to become healthy.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let start = text.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// Whether the child is still running (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        process_is_running(self.pid)
    }

    /// Stops the child and waits until it is gone.
    pub fn stop(mut self, how: Stop) {
        self.stop_inner(how);
    }

    fn stop_inner(&mut self, how: Stop) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(how);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop_inner(Stop::Kill);
    }
}

/// True when `pid` exists and is not a zombie.
pub fn process_is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
