//! The chart's RBAC is what the controller needs, and no more: with the rendered rules the controller (running
//! as the chart's ServiceAccount, through impersonation, so RBAC decides exactly as for the pod) takes a
//! deployment to Ready and back through deletion, and answers a seal request (TokenReview and
//! SubjectAccessReview), without a single 403; with any one of its rules removed it hits a 403 (in its log, or
//! the deployment never gets there within a bound). Roles the chart binds to people rather than to the
//! controller (sealing, the seal proxy) are not the controller's and are left as rendered.
//!
//! Each variant is its own release (own ServiceAccount, roles and Lease) and reconciles only the deployments
//! labelled for it, so the variants run side by side.

mod ops_support;

use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use ops_support::{
    ControllerProcess, SYSTEM_NS, apply_deployment, deployment, eventually, helm_template, is_ready,
};
use serde_json::Value;

const KEYRING: &str = "mcpfly-keys";
/// How long a variant gets for each step (the seal answer; Ready or its 403; deleted or its 403). The variants'
/// debug controllers all start at once on what may be a loaded 2-core machine, so a variant with a missing rule
/// gets the all-rules variant's patience: it stops waiting at its first 403, so the bound only costs time when
/// a rule looks unneeded.
const VARIANT_BOUND: Duration = Duration::from_secs(60);

/// Which rule a variant leaves out: `(kind, name without the release prefix, index)` in the rendered roles, or
/// none.
type Removed = Option<(&'static str, String, usize)>;

/// The controller's roles among `docs` of `release`: `(kind, name without the release prefix)` of each role a
/// binding grants to a ServiceAccount.
fn controller_roles(docs: &[Value], release: &str) -> Vec<(&'static str, String)> {
    docs.iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            ) && d["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["kind"] == "ServiceAccount"))
        })
        .map(|binding| {
            let kind = match binding["roleRef"]["kind"].as_str() {
                Some("ClusterRole") => "ClusterRole",
                _ => "Role",
            };
            let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            (kind, name.trim_start_matches(release).to_string())
        })
        .collect()
}

fn role_suffix(doc: &Value, release: &str) -> String {
    doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches(release)
        .to_string()
}

async fn apply_object(client: &kube::Client, value: &Value) -> anyhow::Result<()> {
    let gvk = kube::api::GroupVersionKind::try_from(&kube::api::TypeMeta {
        api_version: value["apiVersion"].as_str().unwrap().into(),
        kind: value["kind"].as_str().unwrap().into(),
    })?;
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let name = value["metadata"]["name"].as_str().unwrap();
    let api: Api<kube::api::DynamicObject> = match value["metadata"]["namespace"].as_str() {
        Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(value),
    )
    .await?;
    Ok(())
}

/// What one variant saw.
struct Outcome {
    forbidden_in_log: bool,
    ready: bool,
    deleted: bool,
    elapsed: Duration,
    log: String,
}

async fn run_variant(
    cp: &'static ControlPlane,
    emulator: &EmulatorHandle,
    index: usize,
    removed: Removed,
    seal_token: &str,
) -> anyhow::Result<Outcome> {
    let release = format!("rbac{index}");
    let namespace = format!("rbac-test-{index}");
    cp.create_namespace(&namespace).await?;
    let admin = cp.client().await?;
    let docs = helm_template(cp, &release, &["--set", "fly.org=personal"])?;
    let mut sa = None;
    for mut doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "ClusterRole" | "Role" => {
                if let Some((removed_kind, suffix, i)) = &removed
                    && *removed_kind == kind
                    && *suffix == role_suffix(&doc, &release)
                {
                    let i = *i;
                    doc["rules"].as_array_mut().unwrap().remove(i);
                }
                apply_object(&admin, &doc).await?;
            }
            "ClusterRoleBinding" | "RoleBinding" => apply_object(&admin, &doc).await?,
            "ServiceAccount" => sa = doc["metadata"]["name"].as_str().map(str::to_string),
            _ => {}
        }
    }
    let sa = sa.expect("the chart renders a ServiceAccount");
    let user = format!("system:serviceaccount:{SYSTEM_NS}:{sa}");
    let kubeconfig = cp.write_kubeconfig_as(
        &user,
        &[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{SYSTEM_NS}"),
            "system:authenticated",
        ],
    )?;
    let selector = format!("test.mcpfly.dev/variant={release}");
    let mut controller = ControllerProcess::spawn(
        cp,
        &release,
        &kubeconfig,
        &emulator.base_url(),
        &[
            ("MCPFLY_KEYRING_SECRET", &format!("{SYSTEM_NS}/{KEYRING}")),
            ("MCPFLY_LABEL_SELECTOR", &selector),
            ("MCPFLY_LEASE_NAME", &format!("{release}-mcpfly-leader")),
            // The chart's default: the cluster identity is kube-system's UID, read through its own rule.
            ("MCPFLY_CLUSTER_NAME", ""),
        ],
    )?;

    // A seal request, from someone with no right to seal: with the TokenReview and SubjectAccessReview rules,
    // the controller answers 403 (who the caller is and what they may do were both asked); without either, its
    // review is forbidden (logged; the caller gets 503). A variant whose controller exits at start-up (its
    // rule was needed there) never answers.
    let mut seal_status = None;
    let asking = Instant::now();
    while seal_status.is_none() && controller.exited().is_none() && asking.elapsed() < VARIANT_BOUND
    {
        if let Some(seal) = controller.seal() {
            seal_status = reqwest::Client::new()
                .post(format!("{seal}/seal"))
                .bearer_auth(seal_token)
                .body(r#"{"namespace":"rbac-test","name":"guarded","values":{"T":"x"}}"#)
                .send()
                .await
                .ok()
                .map(|r| r.status().as_u16());
        }
        if seal_status.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if removed.is_none() {
        anyhow::ensure!(
            seal_status == Some(403),
            "with every rule, a seal request without the right to seal got {seal_status:?}, not 403:\n{}",
            controller.log()
        );
    }

    let started = Instant::now();
    // kube's API errors always carry the status reason; "403" alone could match a random request id.
    let forbidden = |log: &str| log.to_ascii_lowercase().contains("forbidden");
    let api: Api<MCPDeployment> = Api::namespaced(admin.clone(), &namespace);
    apply_deployment(
        &admin,
        &deployment(
            &namespace,
            "guarded",
            serde_json::json!({"test.mcpfly.dev/variant": release}),
        ),
    )
    .await?;
    let ready = eventually(VARIANT_BOUND, || async {
        forbidden(&controller.log())
            || api
                .get_opt("guarded")
                .await
                .ok()
                .flatten()
                .is_some_and(|d| is_ready(&d))
    })
    .await
        && !forbidden(&controller.log());
    let mut deleted = false;
    if ready {
        api.delete("guarded", &DeleteParams::default()).await?;
        deleted = eventually(VARIANT_BOUND, || async {
            forbidden(&controller.log()) || api.get_opt("guarded").await.ok().flatten().is_none()
        })
        .await
            && api.get_opt("guarded").await?.is_none();
    }
    let elapsed = started.elapsed();
    controller.kill();
    let log = controller.log();
    // Leave nothing behind for the other variants: drop the finalizer of a deployment we could not delete.
    if api.get_opt("guarded").await?.is_some() {
        let _ = api
            .patch(
                "guarded",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
        let _ = api.delete("guarded", &DeleteParams::default()).await;
    }
    Ok(Outcome {
        forbidden_in_log: forbidden(&log),
        ready,
        deleted,
        elapsed,
        log: log
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("forbidden") || l.contains("ERROR"))
            .chain(log.lines().rev().take(3))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

#[tokio::test]
async fn chart_rbac_is_enough_and_every_rule_is_needed() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(SYSTEM_NS).await?;
    let admin = cp.client().await?;
    let key = mcpfly::sealing::generate_key();
    let keyring: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": KEYRING, "namespace": SYSTEM_NS},
        "stringData": {"keys": *key},
    }))?;
    Api::<Secret>::namespaced(admin.clone(), SYSTEM_NS)
        .patch(
            KEYRING,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&keyring),
        )
        .await?;
    let seal_token = cp.service_account_token(SYSTEM_NS, "seal-probe").await?;
    // The variants share one Fly org: Fly's per-org limits would make them wait on each other.
    let emulator = Emulator::start(EmulatorConfig {
        rate_limits: fly_adapter::token_bucket::RateLimits::disabled(),
        ..EmulatorConfig::default()
    })
    .await?;

    // The variants: all rules, then each rule of each of the controller's rendered roles left out in turn.
    let docs = helm_template(cp, "count", &["--set", "fly.org=personal"])?;
    let mut variants: Vec<Removed> = vec![None];
    for (kind, suffix) in controller_roles(&docs, "count") {
        let doc = docs
            .iter()
            .find(|d| d["kind"] == kind && role_suffix(d, "count") == suffix)
            .expect("a bound role is rendered");
        let rules = doc["rules"].as_array().map_or(0, Vec::len);
        variants.extend((0..rules).map(|i| Some((kind, suffix.clone(), i))));
    }
    assert!(
        variants.len() >= 7,
        "expected at least 6 rules: {variants:?}"
    );

    let outcomes = futures::future::join_all(
        variants
            .iter()
            .enumerate()
            .map(|(i, removed)| run_variant(cp, &emulator, i, removed.clone(), &seal_token)),
    )
    .await;

    let mut failures = Vec::new();
    for (removed, outcome) in variants.iter().zip(outcomes) {
        let outcome = outcome?;
        let rule = removed.as_ref().map(|(kind, suffix, i)| {
            let doc = docs
                .iter()
                .find(|d| d["kind"] == *kind && role_suffix(d, "count") == *suffix)
                .unwrap();
            format!("{kind} {suffix} rule {i} {}", doc["rules"][*i])
        });
        eprintln!(
            "{}: ready={} deleted={} 403={} in {:.1}s",
            rule.as_deref().unwrap_or("all rules"),
            outcome.ready,
            outcome.deleted,
            outcome.forbidden_in_log,
            outcome.elapsed.as_secs_f64()
        );
        match rule {
            None if !(outcome.ready && outcome.deleted && !outcome.forbidden_in_log) => failures
                .push(format!(
                    "with every rule: ready={} deleted={} 403 in log={}\n{}",
                    outcome.ready, outcome.deleted, outcome.forbidden_in_log, outcome.log
                )),
            Some(rule) if !outcome.forbidden_in_log => failures.push(format!(
                "without {rule}: no 403 (ready={} deleted={}): the rule looks unneeded\n{}",
                outcome.ready, outcome.deleted, outcome.log
            )),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}
