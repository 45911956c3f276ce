//! Hostile input (issue 11). Malformed manifests — the invalid fixtures, Unicode look-alikes and zero-width
//! characters, oversized manifests — are rejected at admission by the real apiserver. Manifests that are
//! well-formed but semantically bad (a package that does not exist, a security placeholder, a credential sealed
//! for another scope, a tampered token, an unknown key, an app owned by another org, ...) each end `Stalled`
//! with their own reason, and the controller changes nothing on Fly.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fly_adapter::client::types::{CreateAppRequest, CreateMachineRequest, MachineConfig};
use fly_adapter::client::{FlyClient, FlyClientConfig};
use fly_emulator::{DEFAULT_ORG, DEFAULT_TOKEN};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use mcpfly::api::{MCPDeployment, reason};
use mcpfly::local_cluster::ControlPlane;
use mcpfly::local_cluster::stack::{Stack, StackOptions};
use mcpfly::packages::{RegistryResolver, ResolverConfig};
use mcpfly::sealing::{Binding, KeyRing, SecretValue, Target, keyring::generate_key, seal};
use support::registry::{self as fake, FakeRegistry};

fn manifests(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    paths
}

/// Server-side apply as kubectl does it (strict field validation); `Err(message)` when refused.
async fn apply(
    api: &Api<DynamicObject>,
    name: &str,
    value: &serde_json::Value,
) -> Result<(), String> {
    let params = PatchParams::apply("hostile").force().validation_strict();
    match api.patch(name, &params, &Patch::Apply(value)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} {}", e.code, e.message)),
        Err(e) => Err(e.to_string()),
    }
}

const BASE: &str = r#"
apiVersion: mcpfly.dev/v1alpha1
kind: MCPDeployment
metadata: {name: big}
spec:
  source: {npm: {package: "@modelcontextprotocol/server-everything", version: "2025.9.25"}}
  fly: {regions: [iad]}
"#;

#[tokio::test]
async fn malformed_lookalike_and_oversized_manifests_are_rejected_at_admission()
-> anyhow::Result<()> {
    const NS: &str = "survival-admission";
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    let client = cp.client().await?;
    let ar = ApiResource::erase::<MCPDeployment>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);

    let mut rejected = BTreeSet::new();
    let mut failures = Vec::new();
    let files: Vec<PathBuf> = manifests("tests/manifests/invalid")
        .into_iter()
        .chain(manifests("tests/manifests/hostile"))
        .collect();
    // Each file through `kubectl apply --server-side` as a user would (kubectl's YAML 1.1 reading matters:
    // an unquoted `off` is a boolean to it), all at once.
    let results = futures::future::join_all(files.iter().map(|file| async move {
        let mut cmd = tokio::process::Command::from(cp.kubectl());
        cmd.args([
            "apply",
            "--server-side",
            "--field-manager=hostile",
            "-n",
            NS,
            "-f",
        ])
        .arg(file);
        (file, cmd.output().await)
    }))
    .await;
    for (file, out) in results {
        let out = out?;
        let text = std::fs::read_to_string(file)?;
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{file:?} has no `# expect:` line"));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let label = file.file_name().unwrap().to_string_lossy().into_owned();
        if out.status.success() {
            failures.push(format!("{label}: accepted"));
        } else if !said.contains(expect) {
            failures.push(format!("{label}: rejected without {expect:?}: {said}"));
        } else {
            rejected.insert(label);
        }
    }

    // Oversized: an annotation over the 256 KiB limit, and a body over the apiserver's 3 MiB request limit.
    let base: serde_json::Value = serde_yaml::from_str(BASE)?;
    let mut big_annotation = base.clone();
    big_annotation["metadata"]["namespace"] = NS.into();
    big_annotation["metadata"]["annotations"] = serde_json::json!({"note": "x".repeat(300 * 1024)});
    match apply(&api, "big", &big_annotation).await {
        Ok(()) => failures.push("annotation of 300 KiB: accepted".into()),
        Err(said) if said.contains("Too long") => {
            rejected.insert("oversized-annotation".into());
        }
        Err(said) => failures.push(format!("annotation of 300 KiB: {said}")),
    }
    let mut huge = base.clone();
    huge["metadata"]["namespace"] = NS.into();
    huge["spec"]["env"] = (0..4000)
        .map(|i| (format!("V{i}"), serde_json::Value::from("y".repeat(1000))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    match apply(&api, "big", &huge).await {
        Ok(()) => failures.push("4 MB manifest: accepted".into()),
        Err(said) if said.contains("413") || said.to_lowercase().contains("too large") => {
            rejected.insert("oversized-body".into());
        }
        Err(said) => failures.push(format!("4 MB manifest: {}", &said[..said.len().min(300)])),
    }
    // Under the request limit but over the schema's: many env entries with long values.
    let mut wide = base.clone();
    wide["metadata"]["namespace"] = NS.into();
    wide["spec"]["env"] = (0..300)
        .map(|i| (format!("V{i}"), serde_json::Value::from("z".repeat(4000))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    match apply(&api, "big", &wide).await {
        Ok(()) => failures.push("1.2 MB env: accepted".into()),
        Err(_) => {
            rejected.insert("oversized-env".into());
        }
    }

    eprintln!(
        "admission: {} malformed manifests rejected ({} files + 3 oversized); failures: {failures:#?}",
        rejected.len(),
        files.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(rejected.len() >= 30);
    // Nothing was stored.
    let stored: Api<MCPDeployment> = Api::namespaced(client, NS);
    assert!(stored.list(&Default::default()).await?.items.is_empty());
    Ok(())
}

/// A deployment: `source` and `extra` are YAML lines under `spec:`.
fn manifest(name: &str, source: &str, extra: &str) -> String {
    format!(
        "apiVersion: mcpfly.dev/v1alpha1\nkind: MCPDeployment\nmetadata: {{name: {name}}}\nspec:\n  source: {source}\n  \
         fly: {{regions: [iad]}}\n{extra}"
    )
}

const IMAGE: &str = r#"{image: {ref: "ghcr.io/acme/mcp:1.0", port: 8080, path: /mcp}}"#;

#[tokio::test]
async fn semantically_bad_manifests_stall_with_their_own_reason_and_touch_nothing_on_fly()
-> anyhow::Result<()> {
    const NS: &str = "survival-semantic";
    let registry = FakeRegistry::start().await;
    registry.serve("/crossenv", fake::security_placeholder("crossenv"));
    registry.serve(
        "/@acme%2Fserver-things",
        fake::packument(
            "@acme/server-things",
            "1.4.0",
            &[
                ("1.2.5", Some("1.2.x leaks tokens in logs; upgrade to 1.4")),
                ("1.4.0", None),
            ],
            &[],
        ),
    );
    registry.serve(
        "/@acme%2Fserver-evil",
        fake::packument("@acme/server-evil", "1.0.0", &[("1.0.0", None)], &[]),
    );
    registry.serve(
        "/simple/mcp-server-fetch/",
        fake::simple("mcp-server-fetch", None),
    );
    registry.serve(
        "/pypi/mcp-server-fetch/json",
        fake::pypi_project(
            "mcp-server-fetch",
            "2025.4.7",
            &[
                ("2025.1.17", Some("broken entry point")),
                ("2025.4.7", None),
            ],
        ),
    );
    registry.serve(
        "/simple/evil-mcp/",
        fake::simple("evil-mcp", Some(("quarantined", "malware reported"))),
    );
    registry.serve(
        "/simple/old-mcp/",
        fake::simple("old-mcp", Some(("archived", "no longer maintained"))),
    );
    registry.serve(
        "/pypi/old-mcp/json",
        fake::pypi_project("old-mcp", "1.0", &[("1.0", None)]),
    );
    let resolver = RegistryResolver::new(&ResolverConfig {
        npm_registry: registry.url.clone(),
        pypi_index: format!("{}/", registry.url),
        registry_timeout_seconds: 2.0,
        registry_retries: 0,
        block_deprecated: true,
        package_deny: vec!["@acme/server-evil".into()],
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let key = generate_key();
    let ring = KeyRing::parse(&key, "test")?;
    let other_ring = KeyRing::parse(&generate_key(), "other")?;
    let stack = Stack::start(
        NS,
        StackOptions {
            keyring: Some(key.to_string()),
            resolver: Arc::new(resolver),
            ..Default::default()
        },
    )
    .await?;
    let client = stack.cp.client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let opted_in = serde_json::json!({mcpfly::api::ALLOW_REFERENCE_LABEL: "true"});
    for (name, data, labels) in [
        (
            "no-token-key",
            serde_json::json!({"other": "dmFsdWU="}),
            &opted_in,
        ),
        ("binary", serde_json::json!({"token": "/w=="}), &opted_in),
        // A Secret that never opted in: another workload's, which a manifest tries to read into its server.
        (
            "not-opted-in",
            serde_json::json!({"token": "aG9zdGlsZS1jYW5hcnk="}),
            &serde_json::json!({}),
        ),
    ] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": NS, "labels": labels}, "data": data}))?;
        secrets.create(&Default::default(), &secret).await?;
    }

    // Fly: an app of another org, and an app of ours that already runs a machine of another resource.
    stack.emulator.add_foreign_app("their-app", "someone-else");
    let fly = FlyClient::new(FlyClientConfig::new(
        stack.emulator.base_url(),
        DEFAULT_TOKEN,
    ))?;
    fly.create_app(&CreateAppRequest {
        name: "shared-app".into(),
        org_slug: DEFAULT_ORG.into(),
        network: None,
        enable_subdomains: None,
    })
    .await?;
    let mut config = MachineConfig {
        image: "ghcr.io/acme/mcp:1.0".into(),
        ..Default::default()
    };
    config
        .metadata
        .insert("mcpfly_owner_uid".into(), "another-resource-uid".into());
    config
        .metadata
        .insert("mcpfly_resource".into(), "team-x/other".into());
    fly.create_machine(
        "shared-app",
        &CreateMachineRequest {
            name: Some("iad-0".into()),
            region: Some("iad".into()),
            config,
            ..Default::default()
        },
    )
    .await?;
    stack.emulator.reset_counters();

    let sealed_for = |target: Target, ring: &KeyRing| {
        seal(
            ring,
            Binding::Strict(target),
            SecretValue::new("hostile-canary".into()),
        )
        .unwrap()
    };
    let scoped_elsewhere = sealed_for(Target::new("team-b", "scope", "TOKEN"), &ring);
    let other_name = sealed_for(Target::new(NS, "renamed", "OTHER_NAME"), &ring);
    let unknown_key = sealed_for(Target::new(NS, "unknown-key", "TOKEN"), &other_ring);
    let mut tampered = sealed_for(Target::new(NS, "tampered", "TOKEN"), &ring).into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered)?;
    let cred = |sealed: &str| format!("  credentials: [{{name: TOKEN, sealed: \"{sealed}\"}}]\n");
    let cred_named = |name: &str, sealed: &str| {
        format!("  credentials: [{{name: {name}, sealed: \"{sealed}\"}}]\n")
    };
    let secret_ref = |secret: &str, key: &str| {
        format!("  credentials: [{{name: TOKEN, secretKeyRef: {{name: {secret}, key: {key}}}}}]\n")
    };

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "package-missing",
            manifest(
                "package-missing",
                r#"{npm: {package: "@acme/missing", version: "1.0.0"}}"#,
                "",
            ),
            reason::PACKAGE_NOT_FOUND,
        ),
        (
            "placeholder",
            manifest("placeholder", r#"{npm: {package: crossenv}}"#, ""),
            reason::SECURITY_PLACEHOLDER,
        ),
        (
            "version-missing",
            manifest(
                "version-missing",
                r#"{npm: {package: "@acme/server-things", version: "9.9.9"}}"#,
                "",
            ),
            reason::VERSION_NOT_FOUND,
        ),
        (
            "deprecated",
            manifest(
                "deprecated",
                r#"{npm: {package: "@acme/server-things", version: "1.2.5"}}"#,
                "",
            ),
            reason::PACKAGE_DEPRECATED,
        ),
        (
            "denied",
            manifest(
                "denied",
                r#"{npm: {package: "@acme/server-evil", version: "1.0.0"}}"#,
                "",
            ),
            reason::PACKAGE_DENIED,
        ),
        (
            "yanked",
            manifest(
                "yanked",
                r#"{pypi: {package: mcp-server-fetch, version: "2025.1.17"}}"#,
                "",
            ),
            reason::RELEASE_YANKED,
        ),
        (
            "quarantined",
            manifest("quarantined", r#"{pypi: {package: evil-mcp}}"#, ""),
            reason::PROJECT_QUARANTINED,
        ),
        (
            "archived",
            manifest("archived", r#"{pypi: {package: old-mcp}}"#, ""),
            reason::PROJECT_ARCHIVED,
        ),
        (
            "scope",
            manifest("scope", IMAGE, &cred(&scoped_elsewhere)),
            reason::CREDENTIAL_SCOPE_MISMATCH,
        ),
        (
            "renamed",
            manifest("renamed", IMAGE, &cred_named("TOKEN", &other_name)),
            reason::CREDENTIAL_SCOPE_MISMATCH,
        ),
        (
            "tampered",
            manifest("tampered", IMAGE, &cred(&tampered)),
            reason::CREDENTIAL_INVALID_TOKEN,
        ),
        (
            "unknown-key",
            manifest("unknown-key", IMAGE, &cred(&unknown_key)),
            reason::CREDENTIAL_UNKNOWN_KEY,
        ),
        (
            "secret-missing",
            manifest("secret-missing", IMAGE, &secret_ref("nowhere", "token")),
            reason::CREDENTIAL_SECRET_NOT_FOUND,
        ),
        (
            "secret-key-missing",
            manifest(
                "secret-key-missing",
                IMAGE,
                &secret_ref("no-token-key", "token"),
            ),
            reason::CREDENTIAL_SECRET_KEY_NOT_FOUND,
        ),
        (
            "secret-binary",
            manifest("secret-binary", IMAGE, &secret_ref("binary", "token")),
            reason::CREDENTIAL_SECRET_NOT_UTF8,
        ),
        (
            "secret-not-opted-in",
            manifest(
                "secret-not-opted-in",
                IMAGE,
                &secret_ref("not-opted-in", "token"),
            ),
            reason::CREDENTIAL_SECRET_NOT_OPTED_IN,
        ),
        (
            "app-other-org",
            manifest(
                "app-other-org",
                IMAGE,
                "  fly: {app: their-app, regions: [iad]}\n",
            )
            .replace("  fly: {regions: [iad]}\n", ""),
            reason::APP_NAME_TAKEN,
        ),
        (
            "app-not-ours",
            manifest(
                "app-not-ours",
                IMAGE,
                "  fly: {app: shared-app, regions: [iad]}\n",
            )
            .replace("  fly: {regions: [iad]}\n", ""),
            reason::APP_NOT_OWNED,
        ),
    ];
    for (_, yaml, _) in &cases {
        stack.apply(yaml).await?;
    }
    let mut got: BTreeMap<&str, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, _, want) in &cases {
        match stack.wait_stalled(name, Duration::from_secs(30)).await {
            Ok(c) if c.reason == *want => {
                got.insert(name, c.reason);
            }
            Ok(c) => failures.push(format!(
                "{name}: Stalled {} ({}), want {want}",
                c.reason, c.message
            )),
            Err(e) => failures.push(format!("{name}: {e:#}")),
        }
    }
    // Give any write a moment to show, then check Fly saw nothing but reads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mutations: Vec<_> = stack
        .emulator
        .event_log()
        .into_iter()
        .filter(|e| e.method != "GET")
        .collect();
    let reasons: BTreeSet<&String> = got.values().collect();
    eprintln!(
        "semantic: {} of {} stalled as expected with {} distinct reasons {reasons:?}; {} Fly mutations",
        got.len(),
        cases.len(),
        reasons.len(),
        mutations.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(reasons.len() >= 10);
    assert!(mutations.is_empty(), "{mutations:#?}");
    // Status and events say why, never the value.
    let all = serde_json::to_string(&stack.deployments().await?.list(&Default::default()).await?)?;
    assert!(!all.contains("hostile-canary"));
    Ok(())
}
