//! The Helm chart against the real helm and apiserver: it lints, its CRD is the generated one, what it renders
//! is accepted by the apiserver (server-side dry run), and its schema rejects bad values.

mod ops_support;

use std::path::Path;
use std::process::Command;

use mcpfly::local_cluster::ControlPlane;
use ops_support::{SYSTEM_NS, helm_template};

fn chart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mcpfly")
}

fn run(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = std::fs::read(root.join("crds/mcpdeployments.mcpfly.dev.yaml")).unwrap();
    let in_chart = std::fs::read(root.join("charts/mcpfly/crds/mcpdeployments.mcpfly.dev.yaml"))
        .expect("charts/mcpfly/crds/mcpdeployments.mcpfly.dev.yaml");
    assert!(
        generated == in_chart,
        "the chart's CRD differs from crds/: cp crds/mcpdeployments.mcpfly.dev.yaml charts/mcpfly/crds/"
    );
}

#[tokio::test]
async fn helm_lint_is_clean_for_every_mode() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    for args in [
        vec!["--set", "fly.org=personal"],
        vec![
            "--set",
            "fly.org=personal",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "replicas=1",
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "seal.proxyForAuthenticated=false",
            "--set-json",
            r#"networkPolicy.sealFrom=[{"ipBlock":{"cidr":"10.0.0.10/32"}}]"#,
        ],
    ] {
        let (ok, text) = run(cp
            .helm()?
            .args(["lint", "--strict"])
            .arg(chart())
            .args(&args))?;
        assert!(ok, "helm lint {args:?}:\n{text}");
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn values_schema_rejects_bad_values() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    for (bad, expect) in [
        ("replicas=0", "replicas"),
        ("unknownKey=1", "unknownKey"),
        ("leaderElection.enabled=maybe", "enabled"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
    ] {
        let (ok, text) = run(cp.helm()?.args(["template", "t"]).arg(chart()).args([
            "--set",
            "fly.org=personal",
            "--set",
            bad,
        ]))?;
        assert!(!ok, "{bad} was accepted");
        assert!(text.contains(expect), "{bad}: {text}");
    }
    // fly.org has no default: the render says what is missing.
    let (ok, text) = run(cp.helm()?.args(["template", "t"]).arg(chart()))?;
    assert!(!ok && text.contains("fly.org is required"), "{text}");
    Ok(())
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_apiserver() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    // The CRDs for real (the chart's are byte-identical, see above), the rest as a server-side dry run.
    cp.install_crds().await?;
    cp.create_namespace(SYSTEM_NS).await?;
    for (release, extra) in [
        ("all-ns", vec![]),
        (
            "some-ns",
            vec!["--set", "watchNamespaces={default,kube-public}"],
        ),
    ] {
        let mut args = vec!["--set", "fly.org=personal"];
        args.extend(extra);
        let docs = helm_template(cp, release, &args)?;
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Deployment",
            "ServiceAccount",
            "Service",
            "Role",
            "RoleBinding",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(&kind), "{release}: no {kind} in {kinds:?}");
        }
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"])
        );
        assert_eq!(
            container["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert!(container["resources"]["limits"]["memory"].is_string());
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        // /seal has a port of its own, in the pod, the Service and the NetworkPolicy, which admits nothing else.
        let ports = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    p["name"]
                        .as_str()
                        .or(p["port"].as_str())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(ports(&container["ports"]), ["http", "seal"]);
        let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        assert_eq!(ports(&service["spec"]["ports"]), ["http", "seal"]);
        let policy = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
        let admitted: Vec<String> = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| ports(&rule["ports"]))
            .collect();
        assert_eq!(admitted, ["seal", "http"]);
        assert_eq!(
            policy["spec"]["policyTypes"],
            serde_json::json!(["Ingress"])
        );
        // The controller may ask for token and access reviews; people get the seal proxy and a sealer role.
        let seal_reviews = docs
            .iter()
            .find(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["name"] == format!("{release}-mcpfly-seal-reviews")
            })
            .expect("the seal-reviews ClusterRole");
        assert_eq!(
            seal_reviews["rules"][0]["resources"],
            serde_json::json!(["tokenreviews"])
        );
        assert_eq!(
            seal_reviews["rules"][1]["resources"],
            serde_json::json!(["subjectaccessreviews"])
        );
        assert!(docs.iter().any(|d| d["kind"] == "Role"
            && d["rules"][0]["resourceNames"]
                == serde_json::json!([format!("{release}-mcpfly:seal")])));

        let file = cp.dir().join(format!("helm-{release}.yaml"));
        let yaml: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        std::fs::write(&file, yaml)?;
        let (ok, text) = run(cp
            .kubectl()
            .args(["apply", "--server-side", "--dry-run=server", "-f"])
            .arg(&file))?;
        assert!(ok, "{release}: kubectl apply --dry-run=server:\n{text}");
        assert!(text.contains("deployment.apps/"), "{text}");
        eprintln!("{release}: {text}");
    }
    Ok(())
}
