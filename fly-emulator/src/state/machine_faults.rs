//! Machine faults (reference §10.1, §10.3, §3, §9.8), driven by test hooks: launches that fail (`starting` →
//! `launch_failed` → `failed`), crash loops (`exit` events with `restarting: true` and a growing
//! `restart_count`, as Fly's CLI reads them), a host that is not `ok` (no `config`, `incomplete_config`
//! instead), and an optional 404 window right after create.
//!
//! Everything runs on the emulator clock through the same timers as the state machine.

use super::{ApiErr, MachineRec, State, Timer, push_event};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// How long a crash-looping process runs before it exits again (each exit is followed by a restart).
pub const CRASH_LOOP_PERIOD: Duration = Duration::from_millis(200);

/// What happens to a launch (create without `skip_launch`, start, or an update that boots the machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchFault {
    /// `starting` → `launch_failed` → `failed` (the process never comes up).
    Fail,
    /// The machine reaches `started`, then its process exits with this code every [`CRASH_LOOP_PERIOD`] and is
    /// restarted per its restart policy, until the crash loop is cleared or the machine is updated.
    CrashLoop { exit_code: i32 },
}

/// Launch faults armed for the next `count` launches of an app's machines (or of one machine, by id or name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchFaultRule {
    pub app: String,
    /// A machine id or name; any machine of the app when `None`.
    #[serde(default)]
    pub machine: Option<String>,
    #[serde(default = "one")]
    pub count: u32,
    pub fault: LaunchFault,
}

fn one() -> u32 {
    1
}

/// A machine's crash loop in progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CrashLoop {
    pub exit_code: i32,
    /// Tells the loop's current timer from stale ones (a restart or update schedules a new one).
    pub seq: u64,
}

/// The Fly host states a test may set.
pub fn host_status_str(s: &str) -> Option<&'static str> {
    match s {
        "ok" => Some("ok"),
        "unknown" => Some("unknown"),
        "unreachable" => Some("unreachable"),
        _ => None,
    }
}

impl State {
    /// A machine by id, else the newest not destroyed one with that name.
    pub(crate) fn find_machine_id(&self, app: &str, machine: &str) -> Option<String> {
        let a = self.apps.get(app)?;
        if a.machines.contains_key(machine) {
            return Some(machine.to_string());
        }
        a.machines
            .values()
            .filter(|m| m.name == machine && m.state != "destroyed" && !m.gone)
            .max_by_key(|m| m.created_ms)
            .map(|m| m.id.clone())
    }

    pub fn add_launch_faults(&mut self, rule: LaunchFaultRule) {
        if rule.count > 0 {
            self.launch_faults.push(rule);
        }
    }

    /// Consumes the first armed launch fault matching this machine.
    pub(super) fn take_launch_fault(&mut self, app: &str, id: &str) -> Option<LaunchFault> {
        let name = self.apps.get(app)?.machines.get(id)?.name.clone();
        let pos = self.launch_faults.iter().position(|r| {
            r.app == app
                && r.machine
                    .as_deref()
                    .is_none_or(|m| m == id || m == name.as_str())
        })?;
        let rule = &mut self.launch_faults[pos];
        rule.count -= 1;
        let fault = rule.fault;
        if rule.count == 0 {
            self.launch_faults.remove(pos);
        }
        Some(fault)
    }

    /// Starts (`Some(exit code)`) or ends (`None`) a machine's crash loop; a loop starts when the machine is
    /// `started` (at once if it is). False when there is no such machine.
    pub fn set_crash_loop(
        &mut self,
        now: Duration,
        app: &str,
        machine: &str,
        exit_code: Option<i32>,
    ) -> bool {
        let Some(id) = self.find_machine_id(app, machine) else {
            return false;
        };
        let seq = self.next_seq();
        let m = self
            .apps
            .get_mut(app)
            .and_then(|a| a.machines.get_mut(&id))
            .expect("found above");
        m.crash = exit_code.map(|exit_code| CrashLoop { exit_code, seq });
        if m.crash.is_some() && m.state == "started" {
            self.schedule_crash(app, &id, now);
        }
        m_notify(self, app, &id);
        self.touch(app, &id, now);
        true
    }

    /// Sets `host_status`; anything but `ok` hides `config` (reference §9.8). False when there is no such machine.
    pub fn set_host_status(
        &mut self,
        now: Duration,
        app: &str,
        machine: &str,
        status: &'static str,
    ) -> bool {
        let Some(id) = self.find_machine_id(app, machine) else {
            return false;
        };
        if let Some(m) = self.apps.get_mut(app).and_then(|a| a.machines.get_mut(&id)) {
            m.host_status = status;
        }
        m_notify(self, app, &id);
        // A new updated_at, so org-wide change detection sees it.
        self.touch(app, &id, now);
        true
    }

    /// Machine GET, wait and list answer 404 / omit a machine this long after its create (reference §10.3).
    pub fn set_create_visibility_lag(&mut self, lag: Duration) {
        self.create_lag = lag;
    }

    /// Within the window after create in which Fly may not know the machine yet.
    pub(super) fn not_yet_visible(&self, m: &MachineRec, now: Duration) -> bool {
        !self.create_lag.is_zero() && now < m.created + self.create_lag
    }

    /// Machine calls other than delete and cordon fail while the host is not reachable.
    pub(super) fn check_host(&self, app: &str, id: &str) -> Result<(), ApiErr> {
        match self.apps.get(app).and_then(|a| a.machines.get(id)) {
            Some(m) if m.host_status != "ok" => Err(ApiErr::new(
                503,
                format!(
                    "unavailable: host for machine {id} is {}; destroy and replace the machine",
                    m.host_status
                ),
            )
            .code("unavailable")),
            _ => Ok(()),
        }
    }

    /// The next exit of a crash-looping machine, one period from `now`.
    pub(super) fn schedule_crash(&mut self, app: &str, id: &str, now: Duration) {
        let seq = self.next_seq();
        let Some(m) = self.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) else {
            return;
        };
        let Some(crash) = m.crash.as_mut() else {
            return;
        };
        crash.seq = seq;
        self.timers.insert(
            (now + CRASH_LOOP_PERIOD, seq),
            Timer::Crash {
                app: app.into(),
                id: id.into(),
                seq,
            },
        );
    }

    /// The process exited: an `exit` event, then a restart (the state reads `started` again at once) unless the
    /// restart policy says no more, in which case the machine ends `stopped`.
    pub(super) fn fire_crash(&mut self, app: &str, id: &str, seq: u64, at: Duration) {
        let at_ms = self.wall(at);
        let Some(m) = self.apps.get_mut(app).and_then(|a| a.machines.get_mut(id)) else {
            return;
        };
        let Some(crash) = m.crash.filter(|c| c.seq == seq) else {
            return;
        };
        if m.state != "started" {
            return;
        }
        let restart = m.config.get("restart");
        let policy = restart
            .and_then(|r| r.get("policy"))
            .and_then(Value::as_str)
            .unwrap_or("on-failure");
        let max_retries = restart
            .and_then(|r| r.get("max_retries"))
            .and_then(Value::as_u64);
        let restarting = match policy {
            "no" => false,
            "on-failure" => crash.exit_code != 0 && max_retries.is_none_or(|n| m.restart_count < n),
            _ => max_retries.is_none_or(|n| m.restart_count < n),
        };
        if restarting {
            m.restart_count += 1;
        }
        m.events.insert(
            0,
            json!({"id": super::ulid(at_ms), "type": "exit", "status": "stopped", "source": "flyd", "timestamp": at_ms,
                   "request": {"exit_event": {"exit_code": crash.exit_code, "oom_killed": false,
                                              "requested_stop": false, "restarting": restarting,
                                              "exited_at": super::rfc3339(at_ms)},
                               "restart_count": m.restart_count}}),
        );
        if restarting {
            push_event(m, "start", "started", "flyd", at_ms);
            m.started_at = Some(at);
        } else {
            m.state = "stopped";
            m.crash = None;
            m.started_at = None;
        }
        m.events.truncate(50);
        m.notify.notify_waiters();
        if restarting {
            self.schedule_crash(app, id, at);
        }
        self.touch(app, id, at);
    }
}

fn m_notify(st: &State, app: &str, id: &str) {
    if let Some(m) = st.apps.get(app).and_then(|a| a.machines.get(id)) {
        m.notify.notify_waiters();
    }
}

/// `config` as Fly shows it for a machine whose host is not `ok`: absent, with what is known in
/// `incomplete_config`.
pub(super) fn hide_config(v: &mut Value, m: &MachineRec) {
    if m.host_status == "ok" {
        return;
    }
    if let Value::Object(o) = v {
        o.remove("config");
        o.insert(
            "incomplete_config".into(),
            json!({"image": m.config.get("image").cloned().unwrap_or(Value::Null)}),
        );
        o.insert("host_status".into(), json!(m.host_status));
    }
}
