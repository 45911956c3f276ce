//! Helpers shared by the controller scenario tests (tests/controller.rs, tests/controller_faults.rs).
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use fly_adapter::client::{FlyClient, FlyClientConfig};
use fly_emulator::{DEFAULT_TOKEN, EventRecord};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::stack::Stack;

/// How long a scenario waits for a state it expects.
pub const READY: Duration = Duration::from_secs(30);

pub fn manifest(name: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mcpfly.dev/v1alpha1
kind: MCPDeployment
metadata: {{name: {name}}}
spec:
  source: {{npm: {{package: "@acme/server", version: "1.2.3"}}}}
  fly: {{regions: [iad, ams], machinesPerRegion: 1}}
{extra}"#
    )
}

pub fn fly_client(stack: &Stack) -> FlyClient {
    FlyClient::new(FlyClientConfig::new(
        stack.emulator.base_url(),
        DEFAULT_TOKEN,
    ))
    .unwrap()
}

/// Mutating calls in the emulator's event log (everything but reads and lease bookkeeping).
pub fn mutations(events: &[EventRecord]) -> Vec<&EventRecord> {
    events
        .iter()
        .filter(|e| {
            e.method != "GET" && !e.label.starts_with("leases.") && e.label != "machines.wait"
        })
        .collect()
}

pub fn app_of(d: &MCPDeployment) -> String {
    d.status
        .as_ref()
        .and_then(|s| s.app.clone())
        .expect("status.app")
}
