//! The local driver's processes, supervised by the test harness's [`Supervised`]: the kernel kills each one
//! when the demo dies, however it dies (one implementation of that guarantee, in `local_cluster::process`).

use std::path::Path;

use fly_emulator::local::{LocalProcess, ProcessSpawner};

use crate::local_cluster::process::{Stop, Supervised};

pub struct SupervisedSpawner;

impl ProcessSpawner for SupervisedSpawner {
    fn spawn(
        &self,
        name: &str,
        command: std::process::Command,
        log: &Path,
    ) -> std::io::Result<Box<dyn LocalProcess>> {
        Ok(Box::new(Machine(Supervised::spawn(name, command, log)?)))
    }
}

struct Machine(Supervised);

impl Machine {
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own supervised child.
        unsafe { libc::kill(self.0.pid() as i32, signal) };
    }
}

impl LocalProcess for Machine {
    fn pid(&self) -> u32 {
        self.0.pid()
    }
    fn is_running(&self) -> bool {
        self.0.is_running()
    }
    fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }
    fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
    fn terminate(self: Box<Self>) {
        self.0.stop(Stop::Graceful);
    }
    fn log_tail(&self, max_bytes: usize) -> String {
        self.0.log_tail(max_bytes)
    }
}
