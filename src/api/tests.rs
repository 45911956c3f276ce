//! The generated CRD matches `crds/`, carries the rules admission depends on, and the examples parse.

use super::*;

const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/mcpdeployments.mcpfly.dev.yaml"
);

#[test]
fn crd_file_is_up_to_date() {
    let generated = crd_yaml();
    if std::env::var_os("MCPFLY_UPDATE_CRDS").is_some() {
        std::fs::write(CRD_FILE, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(CRD_FILE).unwrap_or_default();
    assert!(
        on_disk == generated,
        "crds/mcpdeployments.mcpfly.dev.yaml differs from the CRD the code generates; run \
         `cargo run -- crd > crds/mcpdeployments.mcpfly.dev.yaml`"
    );
}

fn crd_json() -> serde_json::Value {
    serde_json::to_value(MCPDeployment::crd()).unwrap()
}

fn spec_schema() -> serde_json::Value {
    crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// Every `(path, rule)` in the schema, depth first.
fn rules(schema: &serde_json::Value, path: &str, out: &mut Vec<(String, serde_json::Value)>) {
    if let Some(list) = schema
        .get("x-kubernetes-validations")
        .and_then(|v| v.as_array())
    {
        for rule in list {
            out.push((path.to_owned(), rule.clone()));
        }
    }
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, sub) in props {
            rules(sub, &format!("{path}.{name}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = schema.get(key).filter(|s| s.is_object()) {
            rules(sub, &format!("{path}[]"), out);
        }
    }
}

#[test]
fn crd_names_and_subresources() {
    let crd = MCPDeployment::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, KIND);
    assert_eq!(crd.spec.names.short_names, Some(vec!["mcpd".to_owned()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, VERSION);
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Ready", "Phase", "URL", "Machines", "Age"]);
}

#[test]
fn schema_carries_the_cel_rules_admission_relies_on() {
    let mut all = Vec::new();
    rules(&spec_schema(), "spec", &mut all);
    let has = |path: &str, fragment: &str| {
        all.iter()
            .any(|(p, r)| p == path && r["rule"].as_str().unwrap().contains(fragment))
    };
    assert!(has("spec.source", "has(self.npm)"), "{all:#?}");
    assert!(has(
        "spec.credentials[]",
        "has(self.sealed) != has(self.secretKeyRef)"
    ));
    assert!(has("spec.env", "k.matches('^[A-Za-z_][A-Za-z0-9_]*$')"));
    assert!(has("spec.fly.guest", "self.cpus in [1, 2, 4, 6, 8]"));
    assert!(has("spec.fly.guest", "self.cpus in [1, 2, 4, 8, 16]"));
    assert!(has("spec.fly.guest", "self.memoryMb % 1024 == 0"));
    assert!(has("spec.fly", "oldSelf.app"));
    assert!(has("spec", "c.name in self.env"));
    // Every rule tells the user what to do.
    for (path, rule) in &all {
        let message = rule
            .get("message")
            .or_else(|| rule.get("messageExpression"))
            .and_then(|m| m.as_str())
            .unwrap_or_default();
        assert!(
            message.len() > 20,
            "rule at {path} has no useful message: {rule}"
        );
    }
    // Uniqueness comes from list types, which the apiserver enforces without CEL cost.
    let spec = spec_schema();
    let props = &spec["properties"];
    assert_eq!(props["credentials"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        props["credentials"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert_eq!(
        props["fly"]["properties"]["regions"]["x-kubernetes-list-type"],
        "set"
    );
}

/// Every string, list and map in the spec is bounded: the apiserver needs bounds to accept CEL rules, and an
/// unbounded field is a way to make objects huge.
#[test]
fn every_spec_field_is_bounded() {
    fn walk(schema: &serde_json::Value, path: &str) {
        match schema["type"].as_str() {
            Some("string") => assert!(
                schema.get("maxLength").is_some() || schema.get("enum").is_some(),
                "{path} has no maxLength"
            ),
            Some("array") => {
                assert!(schema.get("maxItems").is_some(), "{path} has no maxItems");
                walk(&schema["items"], &format!("{path}[]"));
            }
            Some("object") => {
                if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                    for (name, sub) in props {
                        walk(sub, &format!("{path}.{name}"));
                    }
                }
                if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                    assert!(
                        schema.get("maxProperties").is_some(),
                        "{path} has no maxProperties"
                    );
                    walk(values, &format!("{path}{{}}"));
                }
            }
            Some("integer") => assert!(
                schema.get("minimum").is_some() && schema.get("maximum").is_some(),
                "{path} has no range"
            ),
            _ => {}
        }
    }
    walk(&spec_schema(), "spec");
}

/// The patterns in the schema are the ones in `validation` and compile as Rust regexes too.
#[test]
fn schema_patterns_are_the_shared_constants() {
    fn collect(schema: &serde_json::Value, out: &mut Vec<String>) {
        match schema {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "pattern" {
                        out.push(v.as_str().unwrap().to_owned());
                    } else {
                        collect(v, out);
                    }
                }
            }
            serde_json::Value::Array(list) => list.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut patterns = Vec::new();
    collect(&spec_schema(), &mut patterns);
    let known = [
        validation::ENV_NAME_PATTERN,
        validation::NPM_PACKAGE_PATTERN,
        validation::NPM_VERSION_PATTERN,
        validation::PYPI_PACKAGE_PATTERN,
        validation::PYPI_VERSION_PATTERN,
        validation::CONSOLE_SCRIPT_PATTERN,
        validation::IMAGE_REF_PATTERN,
        validation::HTTP_PATH_PATTERN,
        validation::REGION_PATTERN,
        validation::FLY_NAME_PATTERN,
        validation::K8S_NAME_PATTERN,
        validation::SECRET_KEY_PATTERN,
        validation::SEALED_PATTERN,
        validation::NO_NUL_PATTERN,
        validation::TOOL_NAME_PATTERN,
        validation::TOOL_GLOB_PATTERN,
        validation::TOOLS_DIGEST_PATTERN,
        validation::ISSUER_URL_PATTERN,
        validation::AUDIENCE_PATTERN,
        validation::SCOPE_PATTERN,
    ];
    assert!(patterns.len() >= known.len());
    for p in &patterns {
        assert!(
            known.contains(&p.as_str()),
            "pattern {p} is not a shared constant"
        );
        regex::Regex::new(p).unwrap();
    }
}

/// Parse every MCPDeployment in `examples/`.
fn examples() -> Vec<(String, MCPDeployment)> {
    deployments_in(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

/// Parse every MCPDeployment in the YAML files of `dir`.
fn deployments_in(dir: &str) -> Vec<(String, MCPDeployment)> {
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value["kind"].as_str() != Some(KIND) {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let parsed: MCPDeployment = serde_yaml::from_value(value)
                .unwrap_or_else(|e| panic!("{name} does not parse as an MCPDeployment: {e}"));
            out.push((name, parsed));
        }
    }
    out
}

use serde::Deserialize;

#[test]
fn examples_parse_round_trip_and_pass_the_rust_checks() {
    let all = examples();
    let names: Vec<_> = all.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "offline.yaml",
        "npm-everything.yaml",
        "pypi-fetch.yaml",
        "multi-region.yaml",
    ] {
        assert!(
            names.contains(&required),
            "examples/{required} is missing: {names:?}"
        );
    }
    for (name, d) in &all {
        assert_eq!(
            d.metadata.namespace.as_deref(),
            Some("mcpfly-demo"),
            "{name}"
        );
        let json = serde_json::to_value(d).unwrap();
        let back: MCPDeployment = serde_json::from_value(json).unwrap();
        assert_eq!(&back, d, "{name} does not round-trip");
        assert!(d.spec.source.kind().is_some(), "{name}: exactly one source");
        assert_eq!(validation::guest_error(&d.spec.fly.guest), None, "{name}");
        assert!(
            d.spec.fly.regions.iter().all(|r| validation::is_region(r)),
            "{name}"
        );
        assert!(
            d.spec.env.keys().all(|k| validation::is_env_name(k)),
            "{name}"
        );
        match d.spec.source.kind().unwrap() {
            SourceKind::Npm(p) => assert!(validation::is_npm_package(&p.package), "{name}"),
            SourceKind::Pypi(p) => assert!(validation::is_pypi_package(&p.package), "{name}"),
            SourceKind::Image(i) => assert!(validation::is_image_ref(&i.reference), "{name}"),
        }
    }
}

/// The manifests the apiserver test expects to be accepted also pass the Rust-side checks: the two agree.
#[test]
fn valid_fixtures_pass_the_rust_checks() {
    let all = deployments_in(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/manifests/valid"
    ));
    assert!(all.len() >= 4);
    for (name, d) in &all {
        assert!(d.spec.source.kind().is_some(), "{name}");
        assert_eq!(validation::guest_error(&d.spec.fly.guest), None, "{name}");
        assert!(
            d.spec.env.keys().all(|k| validation::is_env_name(k)),
            "{name}"
        );
        for app in [&d.spec.fly.app, &d.spec.fly.org, &d.spec.fly.network]
            .into_iter()
            .flatten()
        {
            assert!(
                app.is_empty() || validation::is_fly_name(app),
                "{name}: {app}"
            );
        }
        match d.spec.source.kind().unwrap() {
            SourceKind::Npm(p) => {
                assert!(validation::is_npm_package(&p.package), "{name}");
                assert!(
                    p.version.iter().all(|v| validation::is_npm_version(v)),
                    "{name}"
                );
            }
            SourceKind::Pypi(p) => {
                assert!(validation::is_pypi_package(&p.package), "{name}");
                assert!(
                    p.version.iter().all(|v| validation::is_pypi_version(v)),
                    "{name}"
                );
            }
            SourceKind::Image(i) => assert!(validation::is_image_ref(&i.reference), "{name}"),
        }
    }
}

#[test]
fn omitted_fields_take_the_documented_defaults() {
    let (_, offline) = examples()
        .into_iter()
        .find(|(n, _)| n == "offline.yaml")
        .unwrap();
    let spec = &offline.spec;
    assert_eq!(spec.fly.machines_per_region, 1);
    assert_eq!(spec.fly.auto_stop, AutoStop::Suspend);
    assert_eq!(spec.fly.guest, GuestSpec::default());
    assert_eq!(spec.fly.min_machines_running, 0);
    assert_eq!(spec.rollout, RolloutSpec::default());
    assert_eq!(spec.deletion_policy, DeletionPolicy::Delete);
    assert!(!spec.suspend);
    assert_eq!(spec.access.auth, Auth::Bearer);
    assert_eq!(offline.connection_secret_name(), "offline-mcp-connection");

    // The schema's defaults are the same values, so `kubectl get -o yaml` shows what the controller assumes.
    let fly = &spec_schema()["properties"]["fly"]["properties"];
    assert_eq!(fly["machinesPerRegion"]["default"], 1);
    assert_eq!(fly["autoStop"]["default"], "suspend");
    assert_eq!(
        fly["guest"]["default"],
        serde_json::to_value(GuestSpec::default()).unwrap()
    );
    let props = &spec_schema()["properties"];
    assert_eq!(
        props["rollout"]["default"],
        serde_json::to_value(RolloutSpec::default()).unwrap()
    );
    assert_eq!(props["deletionPolicy"]["default"], "Delete");
    assert_eq!(props["access"]["default"]["auth"], "bearer");
}

/// Each fixture in tests/manifests/invalid/ states what the apiserver must say about it.
#[test]
fn invalid_fixtures_are_well_formed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/manifests/invalid");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text.lines().find_map(|l| l.strip_prefix("# expect: "));
        assert!(
            expect.is_some_and(|e| !e.trim().is_empty()),
            "{path:?} has no `# expect: ` line"
        );
        let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(value["kind"].as_str(), Some(KIND), "{path:?}");
        count += 1;
    }
    assert!(count >= 20, "only {count} invalid fixtures");
}

#[test]
fn credential_name_rules_spell_out_the_reserved_names() {
    let rules = spec_schema()["properties"]["credentials"]["items"]["properties"]["name"]
        ["x-kubernetes-validations"]
        .to_string();
    for prefix in validation::RESERVED_ENV_PREFIXES {
        assert!(
            rules.contains(&format!("!self.startsWith('{prefix}')")),
            "{prefix}: {rules}"
        );
    }
    for name in validation::RESERVED_ENV_NAMES {
        assert!(
            rules.contains(&format!("self != '{name}'")),
            "{name}: {rules}"
        );
    }
}
