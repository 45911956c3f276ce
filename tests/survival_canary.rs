//! Secret canaries (issue 11): credentials with canary values — one sealed, one from a Kubernetes Secret — go
//! through create, rotation of both, Fly failures on the secrets call, and the error paths (a canary sealed for
//! another scope, a tampered canary token). The controller runs as a process with debug logs. Afterwards the
//! canaries (and their base64 forms) appear nowhere: not in the controller's output, Events, statuses, any
//! Kubernetes object other than the referenced Secret itself, the metrics, the emulator's inventory (machine
//! configs included) or its request log. A machine driver on the emulator proves they did reach Fly's secrets.

mod ops_support;
mod survival_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use fly_emulator::{Emulator, EmulatorConfig, Fault, MachineChange, MachineDriver, ScriptedFault};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use mcpfly::sealing::{Binding, KeyRing, SecretValue, Target, keyring::generate_key, seal};
use ops_support::{ControllerProcess, eventually};
use survival_support::*;

const NS: &str = "survival-canary";

/// Records every environment value a machine would see (config env overlaid with the app's secrets).
#[derive(Default)]
struct SeenByMachines(Mutex<Vec<String>>);
impl MachineDriver for SeenByMachines {
    fn on_change(&self, change: &MachineChange) {
        self.0.lock().unwrap().extend(change.env.values().cloned());
    }
}

fn canary(label: &str) -> String {
    format!("canary-{label}-{:016x}", rand::random::<u64>())
}

/// The canary and the three base64 alignments of it that could appear inside a longer encoded value.
fn needles(value: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = vec![value.to_string()];
    for pad in 0..3 {
        let encoded = b64.encode(format!("{}{value}", "x".repeat(pad)));
        // Drop the characters that depend on the prefix and on what follows.
        let skip = if pad == 0 {
            0
        } else {
            (pad * 4).div_ceil(3) + 1
        };
        out.push(encoded[skip..encoded.len() - 4].to_string());
    }
    out
}

fn sealed(ring: &KeyRing, resource: &str, value: &str) -> String {
    seal(
        ring,
        Binding::Strict(Target::new(NS, resource, "SEALED_TOKEN")),
        SecretValue::new(value.into()),
    )
    .unwrap()
}

fn deployment(name: &str, sealed: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1",
        "kind": "MCPDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"image": {"ref": "ghcr.io/mcpfly/runtime:0.1.0", "port": 8080, "path": "/mcp"}},
            "fly": {"regions": ["iad"]},
            "credentials": [
                {"name": "SEALED_TOKEN", "sealed": sealed},
                {"name": "REF_TOKEN", "secretKeyRef": {"name": "creds", "key": "token"}},
            ],
        },
    })
}

async fn apply<K>(api: &Api<K>, name: &str, value: &serde_json::Value) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("canary").force(),
        &Patch::Apply(value),
    )
    .await?;
    Ok(())
}

fn secret(name: &str, key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": {mcpfly::api::ALLOW_REFERENCE_LABEL: "true"}},
        "stringData": {key: value}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_credentials_never_leave_the_secrets_call() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let client = cp.client().await?;
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let seen = Arc::new(SeenByMachines::default());
    let emulator = Emulator::start(EmulatorConfig {
        driver: seen.clone(),
        ..EmulatorConfig::default()
    })
    .await?;

    let key = generate_key();
    let ring = KeyRing::parse(&key, "test")?;
    apply(&secrets, "keyring", &secret("keyring", "keys", &key)).await?;
    let canaries = [
        canary("sealed"),
        canary("ref"),
        canary("sealed-rotated"),
        canary("ref-rotated"),
        canary("scope"),
        canary("tampered"),
    ];
    apply(&secrets, "creds", &secret("creds", "token", &canaries[1])).await?;

    let keyring_ref = format!("{NS}/keyring");
    let mut controller = ControllerProcess::spawn(
        cp,
        "canary",
        cp.kubeconfig_path(),
        &emulator.base_url(),
        &controller_env(
            NS,
            &[
                ("MCPFLY_KEYRING_SECRET", &keyring_ref),
                ("MCPFLY_LOG", "debug"),
            ],
        ),
    )?;
    controller.wait_ready(Duration::from_secs(30)).await?;

    // Create: both canaries delivered.
    apply(
        &api,
        "canary",
        &deployment("canary", &sealed(&ring, "canary", &canaries[0])),
    )
    .await?;
    wait_all_ready(&api, 1, Duration::from_secs(30))
        .await
        .map_err(|l| anyhow::anyhow!("{l:?}\n{}", controller.log()))?;
    let version = |d: &MCPDeployment| d.status.as_ref().and_then(|s| s.secrets_version);
    let v1 = version(&api.get("canary").await?);

    // Rotate both values while Fly fails the secrets call twice (once after committing it).
    emulator.script_faults([
        ScriptedFault {
            label: Some("secrets.set".into()),
            fault: Fault::Status(500),
        },
        ScriptedFault {
            label: Some("secrets.set".into()),
            fault: Fault::CommitThenStatus(408),
        },
    ]);
    apply(&secrets, "creds", &secret("creds", "token", &canaries[3])).await?;
    apply(
        &api,
        "canary",
        &deployment("canary", &sealed(&ring, "canary", &canaries[2])),
    )
    .await?;
    assert!(
        eventually(Duration::from_secs(30), || async {
            api.get("canary")
                .await
                .is_ok_and(|d| is_ready(&d) && version(&d) > v1.map(|v| v + 1))
        })
        .await,
        "rotation not applied: {:?}\n{}",
        api.get("canary").await?.status,
        controller.log()
    );
    let rotated = seen.0.lock().unwrap().clone();
    for c in &canaries[..4] {
        assert!(
            rotated.contains(c),
            "positive control: {c} never reached a machine's environment"
        );
    }

    // Error paths: a canary sealed for another resource, and a tampered canary token.
    let scope = seal(
        &ring,
        Binding::Strict(Target::new("elsewhere", "canary", "SEALED_TOKEN")),
        SecretValue::new(canaries[4].clone()),
    )?;
    apply(&api, "scope", &deployment("scope", &scope)).await?;
    let mut tampered = sealed(&ring, "tampered", &canaries[5]).into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    apply(
        &api,
        "tampered",
        &deployment("tampered", &String::from_utf8(tampered)?),
    )
    .await?;
    for name in ["scope", "tampered"] {
        assert!(
            eventually(Duration::from_secs(30), || async {
                api.get(name).await.is_ok_and(|d| {
                    d.status
                        .and_then(|s| s.condition(mcpfly::api::ConditionType::Stalled).cloned())
                        .is_some_and(|c| c.is_true())
                })
            })
            .await,
            "{name} did not stall"
        );
    }
    // A rotation of the endpoint token and a deletion, for good measure.
    api.patch(
        "canary",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {"mcpfly.dev/rotate-token": "1"}}}),
        ),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    api.delete("scope", &Default::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Search everything.
    let mut haystacks: Vec<(String, String)> = vec![
        ("controller output".into(), controller.log()),
        ("metrics".into(), controller.metrics().await.0),
        (
            "emulator inventory".into(),
            serde_json::to_string(&emulator.inventory())?,
        ),
        (
            "emulator request log".into(),
            serde_json::to_string(&emulator.event_log())?,
        ),
        ("events".into(), kubectl_json(cp, "events")?),
        ("MCPDeployments".into(), kubectl_json(cp, "mcpdeployments")?),
    ];
    // Every other kind of object the apiserver serves, minus the referenced Secret itself.
    let kinds = cp
        .kubectl()
        .args(["api-resources", "--verbs=list", "-o", "name"])
        .output()?;
    let kinds = String::from_utf8(kinds.stdout)?
        .lines()
        .collect::<Vec<_>>()
        .join(",");
    let mut all: serde_json::Value = serde_json::from_str(&kubectl_json(cp, &kinds)?)?;
    let items = all["items"].as_array_mut().unwrap();
    let before = items.len();
    // Positive control of the search: the referenced Secret holds the current value in base64.
    let creds = items
        .iter()
        .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == "creds")
        .map(|o| o.to_string())
        .unwrap_or_default();
    assert!(needles(&canaries[3]).iter().any(|n| creds.contains(n)));
    items.retain(|o| {
        !(o["kind"] == "Secret"
            && o["metadata"]["namespace"] == NS
            && o["metadata"]["name"] == "creds")
    });
    assert_eq!(items.len() + 1, before, "the referenced Secret was listed");
    haystacks.push((
        format!("{} Kubernetes objects", items.len()),
        all.to_string(),
    ));

    let mut leaks = Vec::new();
    for c in &canaries {
        for needle in needles(c) {
            for (place, text) in &haystacks {
                if text.contains(&needle) {
                    leaks.push(format!("{c} (as {needle:?}) in {place}"));
                }
            }
        }
    }
    eprintln!(
        "canaries: {} values x {} forms searched in {} ({} bytes); leaks: {leaks:?}",
        canaries.len(),
        needles(&canaries[0]).len(),
        haystacks
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        haystacks.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
    assert!(leaks.is_empty(), "{leaks:#?}");
    Ok(())
}
