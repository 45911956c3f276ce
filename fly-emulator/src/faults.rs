//! Fault injection: by probability or by script, so tests can put the client and the controller
//! through the failures Fly produces (5xx, 408, a create that committed before the 408, resets).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer this status without doing anything.
    Status(u16),
    /// Do the work, then answer this status (the ambiguous "failed after commit").
    CommitThenStatus(u16),
    /// Drop the connection without doing anything.
    Reset,
    /// Do the work, then drop the connection.
    CommitThenReset,
    /// §6: the host has no room for the change: Fly's 409 with a capacity message, nothing done.
    NoCapacity,
}

impl Fault {
    pub fn commits(&self) -> bool {
        matches!(self, Fault::CommitThenStatus(_) | Fault::CommitThenReset)
    }
}

/// One scripted fault: applied to the next request whose endpoint label matches (any, if `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptedFault {
    #[serde(default)]
    pub label: Option<String>,
    pub fault: Fault,
}

/// Random faults: each matching request fails with `probability`, picking one of `faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultConfig {
    #[serde(default)]
    pub probability: f64,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Endpoint labels affected; empty means all.
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    pub random: FaultConfig,
    pub script: VecDeque<ScriptedFault>,
}

impl FaultState {
    /// The fault for this request, if any (scripted ones first, consumed once).
    pub fn pick(&mut self, label: &str) -> Option<Fault> {
        if let Some(pos) = self
            .script
            .iter()
            .position(|s| s.label.as_deref().is_none_or(|l| l == label))
        {
            return self.script.remove(pos).map(|s| s.fault);
        }
        let r = &self.random;
        if r.probability <= 0.0
            || r.faults.is_empty()
            || !(r.labels.is_empty() || r.labels.iter().any(|l| l == label))
        {
            return None;
        }
        use rand::Rng;
        let mut rng = rand::rng();
        if rng.random_bool(r.probability.min(1.0)) {
            Some(r.faults[rng.random_range(0..r.faults.len())].clone())
        } else {
            None
        }
    }
}
