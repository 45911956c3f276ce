//! The images have two definitions: the Dockerfiles (for `docker build` where base images are reachable) and the
//! reproducible build (`hack/build-images.sh`, whose image config is `hack/images/*.config.json`). These tests
//! keep them in step: what each Dockerfile's final stage declares (USER, WORKDIR, ENV, EXPOSE, ENTRYPOINT, CMD,
//! LABEL) must be exactly what the built image's config says, and whatever else the config holds must be what the
//! Dockerfile inherits from its base image (listed here, with the reason).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// The final stage of a Dockerfile, as the instructions the image config carries.
#[derive(Debug, Default)]
struct FinalStage {
    user: Option<String>,
    workdir: Option<String>,
    env: BTreeMap<String, String>,
    exposed: Vec<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    labels: BTreeMap<String, String>,
}

fn parse_dockerfile(path: &Path) -> FinalStage {
    let text = std::fs::read_to_string(path).unwrap();
    // Join continuation lines, drop comments and blank lines.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = FinalStage::default();
    for instruction in instructions {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let rest = rest.trim();
        match keyword.to_ascii_uppercase().as_str() {
            "FROM" => stage = FinalStage::default(),
            "USER" => stage.user = Some(rest.to_string()),
            "WORKDIR" => stage.workdir = Some(rest.to_string()),
            "ENV" => stage.env.extend(key_values(rest)),
            "LABEL" => stage.labels.extend(key_values(rest)),
            "EXPOSE" => stage.exposed.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "ENTRYPOINT" => stage.entrypoint = Some(exec_form(rest, path)),
            "CMD" => stage.cmd = Some(exec_form(rest, path)),
            _ => {}
        }
    }
    stage
}

/// `KEY=value KEY2="quoted value"` pairs (the only ENV/LABEL form the Dockerfiles use).
fn key_values(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("expected KEY=value in {text:?}"));
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').expect("closing quote");
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(char::is_whitespace).unwrap_or((after, "")),
        };
        pairs.push((key.trim().to_string(), value.to_string()));
        rest = remaining.trim();
    }
    pairs
}

fn exec_form(text: &str, path: &Path) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| {
        panic!(
            "{}: ENTRYPOINT/CMD must use the exec (JSON) form, got {text:?}: {e}",
            path.display()
        )
    })
}

fn image_config(name: &str) -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("hack/images/{name}.config.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Compares a Dockerfile with the built image's config. `inherited_env` and `inherited_workdir` are what the
/// Dockerfile's base image provides and the reproducible build must therefore set itself.
fn assert_in_step(
    dockerfile: &str,
    config_name: &str,
    inherited_env: &[&str],
    inherited_workdir: Option<&str>,
) {
    let stage = parse_dockerfile(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dockerfile));
    let config = image_config(config_name);
    let context = format!("{dockerfile} vs hack/images/{config_name}.config.json");

    assert_eq!(
        config["User"].as_str(),
        stage.user.as_deref(),
        "{context}: USER"
    );
    assert_eq!(
        config["WorkingDir"].as_str(),
        stage.workdir.as_deref().or(inherited_workdir),
        "{context}: WORKDIR"
    );
    assert_eq!(
        Some(strings(&config["Entrypoint"])),
        stage.entrypoint,
        "{context}: ENTRYPOINT"
    );
    assert_eq!(Some(strings(&config["Cmd"])), stage.cmd, "{context}: CMD");

    let mut expected_env: Vec<String> = inherited_env.iter().map(|e| e.to_string()).collect();
    expected_env.extend(stage.env.iter().map(|(k, v)| format!("{k}={v}")));
    expected_env.sort();
    let mut env = strings(&config["Env"]);
    env.sort();
    assert_eq!(env, expected_env, "{context}: ENV");

    let mut exposed: Vec<String> = config["ExposedPorts"]
        .as_object()
        .map(|ports| ports.keys().cloned().collect())
        .unwrap_or_default();
    exposed.sort();
    let mut expected_ports = stage.exposed.clone();
    expected_ports.sort();
    assert_eq!(exposed, expected_ports, "{context}: EXPOSE");

    let labels: BTreeMap<String, String> = config["Labels"]
        .as_object()
        .map(|l| {
            l.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(labels, stage.labels, "{context}: LABEL");
}

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[test]
fn runtime_dockerfile_and_reproducible_build_declare_the_same_image() {
    // node:22-bookworm-slim sets PATH (and NODE_VERSION/YARN_VERSION, which nothing here reads).
    assert_in_step("runtime/Dockerfile", "runtime", &[PATH], None);
}

#[test]
fn controller_dockerfile_and_reproducible_build_declare_the_same_image() {
    // distroless/cc:nonroot sets PATH and SSL_CERT_FILE and works in the nonroot user's home.
    assert_in_step(
        "Dockerfile",
        "controller",
        &[PATH, "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
        Some("/home/nonroot"),
    );
}

#[test]
fn dockerfile_parser_reads_continuations_and_the_final_stage_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Dockerfile");
    std::fs::write(
        &path,
        "FROM a AS build\nUSER builder\nENV A=1\nFROM b\n# a comment\nENV B=2 \\\n    C=\"x y\"\nUSER 1:1\n\
         EXPOSE 80 53/udp\nENTRYPOINT [\"/bin/t\", \"--\"]\nCMD [\"run\"]\n",
    )
    .unwrap();
    let stage = parse_dockerfile(&path);
    assert_eq!(stage.user.as_deref(), Some("1:1"));
    assert_eq!(
        stage.env.into_iter().collect::<Vec<_>>(),
        vec![("B".into(), "2".into()), ("C".into(), "x y".into())]
    );
    assert_eq!(stage.exposed, vec!["80/tcp", "53/udp"]);
    assert_eq!(stage.entrypoint, Some(vec!["/bin/t".into(), "--".into()]));
    assert_eq!(stage.cmd, Some(vec!["run".into()]));
}

/// The images carry the release binary; `env!("CARGO_MANIFEST_DIR")` in code it compiles would embed the build
/// folder (so the image digest would depend on the checkout, and test paths would ship). hack/release-binary.sh
/// checks the built binary; this catches it without a release build. Test-only files are exempt.
#[test]
fn code_compiled_into_the_release_binary_does_not_embed_the_build_folder() {
    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "fly-adapter/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let test_only = |p: &Path| {
        let name = p.file_name().unwrap().to_str().unwrap();
        name == "tests.rs" || name.ends_with("_tests.rs")
    };
    let embedding: Vec<String> = files
        .iter()
        .filter(|p| !test_only(p))
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains(concat!("env!(\"CARGO_", "MANIFEST_DIR\")"))
        })
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(files.len() > 20, "found only {} source files", files.len());
    assert!(
        embedding.is_empty(),
        "these files embed the build folder into the release binary: {embedding:?}"
    );
}

/// The images' binary is built without the `demo` feature (the demo, the Fly emulator, the local control plane), in
/// all three places that build it. hack/release-binary.sh also refuses a built binary that still carries the
/// harness (its strings, or a `mcpfly demo` that does not say it is left out); CI builds it in hack/image-check.sh.
#[test]
fn every_image_build_leaves_the_local_harness_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["Dockerfile", "runtime/Dockerfile", "hack/release-binary.sh"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let builds: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("cargo build") || l.contains("build_flags=("))
            .collect();
        assert!(!builds.is_empty(), "{file}: no cargo build found");
        for line in builds {
            assert!(
                line.contains("--no-default-features") || line.contains("\"${build_flags[@]}\""),
                "{file} builds the image's binary with the local harness: {line}"
            );
        }
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("fly-emulator = { workspace = true, optional = true }")
            && manifest.contains("demo = [\"dep:fly-emulator\"]"),
        "the emulator must stay behind the `demo` feature"
    );
}
