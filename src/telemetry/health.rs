//! Liveness and readiness.
//!
//! `/healthz` answers as long as the process serves HTTP. `/readyz` answers 200 only when every check passed:
//! the CRD is installed (MCPDeployments can be listed), the Fly token and org were accepted, and the key ring is
//! loaded (when one is configured). A follower in leader election is ready too: it can take over at once, and
//! it serves the seal endpoint. The body names each failing check and what to do about it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::sealing::KeyRing;

/// Where the controller keeps the current key ring (replaced when the key-ring Secret changes).
pub type KeyringSlot = Arc<RwLock<Option<Arc<KeyRing>>>>;

/// What `/readyz` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    Crd,
    Fly,
    Keyring,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Crd => "crd",
            Check::Fly => "fly",
            Check::Keyring => "keyring",
        }
    }
}

/// Shared between the start-up code (which records results) and the HTTP server (which reports them).
#[derive(Default)]
pub struct Health {
    /// A check absent from the map has not run yet, which counts as failing.
    results: Mutex<BTreeMap<Check, Result<(), String>>>,
    /// Set once the key ring is configured: the key-ring check then reads it, so a ring that arrives later
    /// (the Secret created after the controller) makes the controller ready without a restart.
    keyring: Mutex<Option<(KeyringSlot, String)>>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn pass(&self, check: Check) {
        self.results.lock().unwrap().insert(check, Ok(()));
    }

    /// `why` says what to fix.
    pub fn fail(&self, check: Check, why: impl Into<String>) {
        self.results.lock().unwrap().insert(check, Err(why.into()));
    }

    /// The key ring is required and lives in `slot`; `missing` is the message while the slot is empty.
    pub fn track_keyring(&self, slot: KeyringSlot, missing: impl Into<String>) {
        *self.keyring.lock().unwrap() = Some((slot, missing.into()));
    }

    /// No key ring is configured: sealed credentials stall, but the controller is otherwise usable.
    pub fn keyring_not_required(&self) {
        self.pass(Check::Keyring);
    }

    /// The current key ring, for the seal endpoint.
    pub fn keyring(&self) -> Option<Arc<KeyRing>> {
        let tracked = self.keyring.lock().unwrap();
        tracked
            .as_ref()
            .and_then(|(slot, _)| slot.read().unwrap().clone())
    }

    /// `Ok` when ready, else one line per failing check.
    pub fn readiness(&self) -> Result<(), String> {
        let mut results = self.results.lock().unwrap().clone();
        if let Some((slot, missing)) = self.keyring.lock().unwrap().as_ref() {
            let loaded = slot.read().unwrap().is_some();
            results.insert(
                Check::Keyring,
                if loaded { Ok(()) } else { Err(missing.clone()) },
            );
        }
        let mut problems = Vec::new();
        for check in [Check::Crd, Check::Fly, Check::Keyring] {
            match results.get(&check) {
                Some(Ok(())) => {}
                Some(Err(why)) => problems.push(format!("{}: {why}", check.name())),
                None => problems.push(format!("{}: not checked yet", check.name())),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passed_and_the_ring_is_loaded() {
        let health = Health::new();
        let err = health.readiness().unwrap_err();
        assert_eq!(err.lines().count(), 3, "{err}");

        health.pass(Check::Crd);
        health.fail(Check::Fly, "token refused");
        let slot: KeyringSlot = Arc::default();
        health.track_keyring(slot.clone(), "Secret ns/keys not found");
        let err = health.readiness().unwrap_err();
        assert!(err.contains("fly: token refused"), "{err}");
        assert!(err.contains("keyring: Secret ns/keys not found"), "{err}");

        health.pass(Check::Fly);
        assert!(health.readiness().is_err());
        let key = crate::sealing::generate_key();
        *slot.write().unwrap() = Some(Arc::new(KeyRing::parse(&key, "test").unwrap()));
        assert_eq!(health.readiness(), Ok(()));
        assert!(health.keyring().is_some());
    }

    #[test]
    fn a_controller_without_a_key_ring_can_be_ready() {
        let health = Health::new();
        health.pass(Check::Crd);
        health.pass(Check::Fly);
        health.keyring_not_required();
        assert_eq!(health.readiness(), Ok(()));
        assert!(health.keyring().is_none());
    }
}
