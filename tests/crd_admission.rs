//! The CRD on a real kube-apiserver: it installs, the examples apply, and every invalid manifest in
//! `tests/manifests/invalid/` is rejected at admission with the message its `# expect:` line names.

use std::path::{Path, PathBuf};
use std::process::Output;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use mcpfly::api::{self, MCPDeployment, MCPDeploymentStatus};
use mcpfly::local_cluster::ControlPlane;

fn manifests(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // examples/kustomization.yaml lists the manifests for GitOps tools; it is not an object to apply.
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    paths.sort();
    paths
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn setup(namespace: &str) -> anyhow::Result<&'static ControlPlane> {
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(namespace).await?;
    Ok(cp)
}

fn apply(cp: &ControlPlane, namespace: &str, file: &Path) -> Output {
    cp.kubectl()
        .args([
            "apply",
            "--server-side",
            "--field-manager=crd-test",
            "-n",
            namespace,
            "-f",
        ])
        .arg(file)
        .output()
        .expect("kubectl runs")
}

#[tokio::test]
async fn crd_is_established_and_explained() -> anyhow::Result<()> {
    let cp = setup("mcpfly-crd-explain").await?;
    let version = cp.apiserver_version().await?;
    eprintln!("kube-apiserver {version}");

    let crds: Api<CustomResourceDefinition> = Api::all(cp.client().await?);
    let crd = crds.get(api::CRD_NAME).await?;
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    for wanted in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == wanted && c.status == "True"),
            "{wanted} is not True: {conditions:?}"
        );
    }
    // The apiserver kept every CEL rule: none was dropped for cost or syntax.
    let served = serde_json::to_string(&crd.spec.versions[0].schema)?;
    assert!(served.contains("set exactly one of source.npm, source.pypi or source.image"));
    assert!(served.contains("self.cpus in [1, 2, 4, 6, 8]"));

    // Doc comments became descriptions that `kubectl explain` shows. The apiserver publishes a new CRD's
    // OpenAPI a moment after Established, so wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let explained = loop {
        let out = cp
            .kubectl()
            .args(["explain", "mcpdeployment.spec.fly.guest"])
            .output()?;
        if out.status.success() {
            break text(&out);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kubectl explain: {}",
            text(&out)
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(
        explained.contains("Fly accepts shared CPUs in {1,2,4,6,8}"),
        "{explained}"
    );
    let out = cp.kubectl().args(["explain", "mcpd.spec"]).output()?;
    let explained = text(&out);
    assert!(
        explained.contains("exactly one of `npm`, `pypi` or `image`"),
        "{explained}"
    );
    Ok(())
}

#[tokio::test]
async fn examples_apply_cleanly_and_get_defaults() -> anyhow::Result<()> {
    let cp = setup("mcpfly-demo").await?;
    let examples = manifests("examples");
    assert!(examples.len() >= 5, "{examples:?}");
    for file in &examples {
        let out = apply(cp, "mcpfly-demo", file);
        assert!(out.status.success(), "{file:?} was refused: {}", text(&out));
    }
    // Server-side apply again is a no-op, not a conflict.
    for file in &examples {
        let out = apply(cp, "mcpfly-demo", file);
        assert!(out.status.success(), "re-applying {file:?}: {}", text(&out));
    }

    // What the apiserver stored parses into the Rust type, with the schema defaults filled in.
    let deployments: Api<MCPDeployment> = Api::namespaced(cp.client().await?, "mcpfly-demo");
    let offline = deployments.get("offline").await?;
    assert_eq!(offline.spec.fly.auto_stop, api::AutoStop::Suspend);
    assert_eq!(offline.spec.fly.machines_per_region, 1);
    assert_eq!(offline.spec.fly.guest, api::GuestSpec::default());
    assert_eq!(offline.spec.deletion_policy, api::DeletionPolicy::Delete);
    let raw = cp
        .kubectl()
        .args(["get", "mcpd", "offline", "-n", "mcpfly-demo", "-o", "json"])
        .output()?;
    let raw: serde_json::Value = serde_json::from_slice(&raw.stdout)?;
    assert_eq!(raw["spec"]["fly"]["autoStop"], "suspend", "{raw}");
    assert_eq!(raw["spec"]["rollout"]["strategy"], "rolling", "{raw}");
    assert_eq!(raw["spec"]["access"]["auth"], "bearer", "{raw}");
    assert_eq!(raw["spec"]["fly"]["guest"]["memoryMb"], 256, "{raw}");

    let names: Vec<_> = deployments
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    for wanted in ["offline", "everything", "fetch", "global", "sealed"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing: {names:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn valid_edge_cases_are_accepted() -> anyhow::Result<()> {
    let cp = setup("mcpfly-crd-valid").await?;
    for file in manifests("tests/manifests/valid") {
        let out = apply(cp, "mcpfly-crd-valid", &file);
        assert!(out.status.success(), "{file:?} was refused: {}", text(&out));
    }
    Ok(())
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_their_message() -> anyhow::Result<()> {
    let ns = "mcpfly-crd-invalid";
    let cp = setup(ns).await?;
    let files = manifests("tests/manifests/invalid");
    assert!(files.len() >= 20, "only {} fixtures", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let manifest = std::fs::read_to_string(file)?;
        let expect = manifest
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name} has no `# expect:` line"))
            .trim()
            .to_owned();
        let out = apply(cp, ns, file);
        let said = text(&out);
        eprintln!("{name}: {}", said.trim());
        if out.status.success() {
            failures.push(format!(
                "{name}: accepted, expected a rejection with {expect:?}"
            ));
        } else if !said.contains(&expect) {
            failures.push(format!("{name}: rejected, but without {expect:?}: {said}"));
        }
        // Nothing was stored.
        let get = cp
            .kubectl()
            .args([
                "get",
                "mcpd",
                &name,
                "-n",
                ns,
                "--ignore-not-found",
                "-o",
                "name",
            ])
            .output()?;
        if !String::from_utf8_lossy(&get.stdout).trim().is_empty() {
            failures.push(format!("{name}: an object was stored"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn deployment(name: &str, fly: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1",
        "kind": "MCPDeployment",
        "metadata": {"name": name},
        "spec": {
            "source": {"npm": {"package": "left-pad", "version": "1.3.0"}},
            "fly": fly,
        }
    })
}

#[tokio::test]
async fn fly_app_org_and_network_are_immutable() -> anyhow::Result<()> {
    let ns = "mcpfly-crd-immutable";
    let cp = setup(ns).await?;
    let api: Api<MCPDeployment> = Api::namespaced(cp.client().await?, ns);
    let pp = PatchParams::apply("crd-test");

    let bound = deployment(
        "bound",
        serde_json::json!({"regions": ["iad"], "app": "my-app", "org": "acme"}),
    );
    api.patch("bound", &pp, &Patch::Apply(&bound)).await?;
    // Other fields still change freely.
    let more = deployment(
        "bound",
        serde_json::json!({"regions": ["iad", "ams"], "app": "my-app", "org": "acme", "machinesPerRegion": 2}),
    );
    api.patch("bound", &pp, &Patch::Apply(&more)).await?;

    let cases = [
        (
            serde_json::json!({"regions": ["iad"], "app": "other-app", "org": "acme"}),
            "fly.app cannot change",
        ),
        (
            serde_json::json!({"regions": ["iad"], "org": "acme"}),
            "fly.app cannot change",
        ),
        (
            serde_json::json!({"regions": ["iad"], "app": "my-app", "org": "other"}),
            "fly.org cannot change",
        ),
        (
            serde_json::json!({"regions": ["iad"], "app": "my-app", "org": "acme", "network": "shared"}),
            "fly.network cannot change",
        ),
    ];
    for (fly, expect) in cases {
        let err = api
            .patch(
                "bound",
                &pp,
                &Patch::Apply(&deployment("bound", fly.clone())),
            )
            .await
            .expect_err(&format!("{fly} was accepted"));
        eprintln!("{fly}: {err}");
        assert!(err.to_string().contains(expect), "{fly}: {err}");
    }

    // A derived app name (unset) cannot later be pinned to something else either.
    let derived = deployment("derived", serde_json::json!({"regions": ["iad"]}));
    api.patch("derived", &pp, &Patch::Apply(&derived)).await?;
    let pinned = deployment(
        "derived",
        serde_json::json!({"regions": ["iad"], "app": "pinned"}),
    );
    let err = api
        .patch("derived", &pp, &Patch::Apply(&pinned))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fly.app cannot change"), "{err}");
    Ok(())
}

#[tokio::test]
async fn status_subresource_and_printer_columns() -> anyhow::Result<()> {
    let ns = "mcpfly-crd-status";
    let cp = setup(ns).await?;
    let api: Api<MCPDeployment> = Api::namespaced(cp.client().await?, ns);
    let pp = PatchParams::apply("crd-test");
    let d = deployment("shown", serde_json::json!({"regions": ["iad", "ams"]}));
    api.patch("shown", &pp, &Patch::Apply(&d)).await?;

    // Status written through the main resource is ignored: status is a subresource.
    let with_status = serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1", "kind": "MCPDeployment",
        "metadata": {"name": "shown"},
        "spec": d["spec"],
        "status": {"phase": "Ready"},
    });
    api.patch("shown", &pp, &Patch::Apply(&with_status)).await?;
    // Only the CRD's default shows until the controller writes: kstatus reads -1 as "not observed yet".
    assert_eq!(
        api.get("shown").await?.status,
        Some(MCPDeploymentStatus {
            observed_generation: Some(-1),
            ..Default::default()
        })
    );

    let mut status = MCPDeploymentStatus {
        phase: Some(api::Phase::Ready),
        url: Some("https://mcpfly-x.fly.dev/mcp".into()),
        app: Some("mcpfly-x".into()),
        observed_generation: Some(1),
        ..Default::default()
    };
    status.set_machine_counts(2, 2);
    status.set_condition(api::Condition::new(
        api::ConditionType::Ready,
        api::ConditionStatus::True,
        api::reason::READY,
        "2/2 machines started and passing checks",
        Some(1),
    ));
    // The apiserver keeps timestamps to the second.
    status.conditions[0].last_transition_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000)?,
        ));
    let patch = serde_json::json!({
        "apiVersion": "mcpfly.dev/v1alpha1", "kind": "MCPDeployment", "status": status,
    });
    api.patch_status(
        "shown",
        &PatchParams::apply("mcpfly-controller").force(),
        &Patch::Apply(&patch),
    )
    .await?;
    let stored = api.get("shown").await?.status.unwrap();
    assert_eq!(stored, status);

    let out = cp.kubectl().args(["get", "mcpd", "-n", ns]).output()?;
    let table = text(&out);
    eprintln!("{table}");
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "PHASE", "URL", "MACHINES", "AGE"]);
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        [
            "shown",
            "True",
            "Ready",
            "https://mcpfly-x.fly.dev/mcp",
            "2/2"
        ]
    );
    Ok(())
}
