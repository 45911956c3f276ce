//! The sealing CLI end to end: key files, seal from every input, merge into manifests, rotation with
//! reseal, unseal --check, the seal endpoint over HTTP, and a canary proving no command prints plaintext.
//!
//! The commands run in process through the same clap structs and run functions `main.rs` dispatches to
//! (`src/cli_sealing.rs` is included below), and through the real binary once it dispatches them.

#[path = "../src/cli_sealing.rs"]
#[allow(dead_code)]
mod cli_sealing;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use cli_sealing::{KeygenArgs, ResealArgs, SealArgs, UnsealArgs};
use mcpfly::sealing::listener::{Caller, Gatekeeper, Limits};
use mcpfly::sealing::manifest::Manifest;
use mcpfly::sealing::{KeyRing, Target, unseal};

const CANARY: &str = "canary-PLAINTEXT-7f3e9a";

#[derive(Parser)]
#[command(name = "mcpfly")]
struct TestCli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Keygen(KeygenArgs),
    Seal(SealArgs),
    Reseal(ResealArgs),
    Unseal(UnsealArgs),
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs one command in process; an error is printed to stderr the way `main.rs` prints it.
async fn run(args: &[&str], stdin: &str) -> Out {
    let cli = TestCli::try_parse_from(std::iter::once("mcpfly").chain(args.iter().copied()));
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let result = match cli {
        Err(e) => Err(anyhow::anyhow!("{e}")),
        Ok(cli) => match cli.cmd {
            Cmd::Keygen(a) => cli_sealing::run_keygen_io(a, &mut stdout),
            Cmd::Seal(a) => {
                cli_sealing::run_seal_io(a, &mut stdin.as_bytes(), &mut stdout, &mut stderr).await
            }
            Cmd::Reseal(a) => cli_sealing::run_reseal_io(a, &mut stdout),
            Cmd::Unseal(a) => cli_sealing::run_unseal_io(a, &mut stdout),
        },
    };
    if let Err(e) = &result {
        stderr.extend_from_slice(format!("error: {e:#}\n").as_bytes());
    }
    Out {
        ok: result.is_ok(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn manifest(namespace: &str, name: &str, credentials_block: &str) -> String {
    format!(
        "# Managed by GitOps. Keep this comment.\n\
         apiVersion: mcpfly.dev/v1alpha1\n\
         kind: MCPDeployment\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{team: a}}   # inline comment\n\
         spec:\n  source:\n    npm: {{package: \"@modelcontextprotocol/server-github\", version: \"2025.4.8\"}}\n\
         {credentials_block}\
         \x20 fly:\n    regions: [iad, ams]   # two regions\n    machinesPerRegion: 1\n"
    )
}

/// Seals `NAME=value` pairs into a `credentials:` block indented for `spec`.
fn indent_block(yaml: &str) -> String {
    yaml.lines().map(|l| format!("  {l}\n")).collect()
}

#[tokio::test]
async fn keygen_prints_one_new_key_and_append_makes_it_primary() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["keygen"], "").await;
    assert!(out.ok, "{}", out.all());
    let key = out.stdout.trim();
    assert_eq!(key.len(), 44);
    KeyRing::parse(key, "stdout").unwrap();
    assert_ne!(
        run(&["keygen"], "").await.stdout,
        out.stdout,
        "keys are random"
    );

    let file = dir.path().join("keys");
    let first = run(&["keygen", "--append", p(&file)], "").await;
    assert!(first.ok, "{}", first.all());
    let ring1 = KeyRing::from_file(&file).unwrap();
    let second = run(&["keygen", "--append", p(&file)], "").await;
    let ring2 = KeyRing::from_file(&file).unwrap();
    assert_eq!(ring2.key_ids().len(), 2);
    assert_eq!(ring2.key_ids()[1], *ring1.primary_id());
    assert!(second.stdout.contains(ring2.primary_id().as_str()));
    // With --append the key itself is not printed.
    let file_text = std::fs::read_to_string(&file).unwrap();
    for key in file_text.lines() {
        assert!(!second.all().contains(key) && !first.all().contains(key));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test]
async fn seal_from_stdin_literal_and_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    run(&["keygen", "--append", p(&keys)], "").await;
    let ring = KeyRing::from_file(&keys).unwrap();
    let target = |name: &str| Target::new("team-a", "github", name);
    let base = [
        "seal",
        "-n",
        "team-a",
        "--name",
        "github",
        "--key-file",
        p(&keys),
    ];

    let out = run(
        &[&base[..], &["--credential", "TOKEN"]].concat(),
        "from-stdin\n",
    )
    .await;
    assert!(out.ok, "{}", out.all());
    let v: serde_yaml::Value = serde_yaml::from_str(&out.stdout).unwrap();
    let sealed = v["credentials"][0]["sealed"].as_str().unwrap();
    assert_eq!(v["credentials"][0]["name"].as_str(), Some("TOKEN"));
    assert_eq!(
        unseal(&ring, sealed, &target("TOKEN"))
            .unwrap()
            .value
            .expose(),
        "from-stdin"
    );

    let out = run(
        &[
            &base[..],
            &["--from-literal", "A=x=y", "--from-literal", "B="],
        ]
        .concat(),
        "",
    )
    .await;
    assert!(out.ok, "{}", out.all());
    let v: serde_yaml::Value = serde_yaml::from_str(&out.stdout).unwrap();
    assert_eq!(
        unseal(
            &ring,
            v["credentials"][0]["sealed"].as_str().unwrap(),
            &target("A")
        )
        .unwrap()
        .value
        .expose(),
        "x=y"
    );
    assert_eq!(
        unseal(
            &ring,
            v["credentials"][1]["sealed"].as_str().unwrap(),
            &target("B")
        )
        .unwrap()
        .value
        .expose(),
        ""
    );

    let env = dir.path().join(".env");
    std::fs::write(
        &env,
        "# comment\r\nexport C=\"quoted value\"\r\nD='single'\r\n",
    )
    .unwrap();
    let out = run(
        &[
            &base[..],
            &["--from-env-file", p(&env), "--scope", "namespace"],
        ]
        .concat(),
        "",
    )
    .await;
    assert!(out.ok, "{}", out.all());
    let v: serde_yaml::Value = serde_yaml::from_str(&out.stdout).unwrap();
    let c = v["credentials"][0]["sealed"].as_str().unwrap();
    // Namespace scope: any resource and name in team-a.
    assert_eq!(
        unseal(&ring, c, &Target::new("team-a", "other", "X"))
            .unwrap()
            .value
            .expose(),
        "quoted value"
    );
    assert!(unseal(&ring, c, &Target::new("team-b", "other", "X")).is_err());

    let none = run(&base, "").await;
    assert!(
        !none.ok && none.stderr.contains("nothing to seal"),
        "{}",
        none.all()
    );
    let bad_name = run(&[&base[..], &["--credential", "1BAD"]].concat(), "v").await;
    assert!(!bad_name.ok);
}

#[tokio::test]
async fn merge_into_keeps_the_manifest_and_rotation_with_reseal() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    run(&["keygen", "--append", p(&keys)], "").await;
    let k1 = KeyRing::from_file(&keys).unwrap().primary_id().clone();
    let file = dir.path().join("github.yaml");
    let other_doc = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep, namespace: team-a}\ndata: {a: b}\n";
    let original = format!("{}{other_doc}", manifest("team-a", "github", ""));
    std::fs::write(&file, &original).unwrap();
    let seal = |name: &'static str| {
        let (keys, file) = (keys.clone(), file.clone());
        async move {
            run(
                &[
                    "seal",
                    "-n",
                    "team-a",
                    "--name",
                    "github",
                    "--key-file",
                    p(&keys),
                    "--credential",
                    name,
                    "--merge-into",
                    p(&file),
                ],
                "value-of-it",
            )
            .await
        }
    };
    let out = seal("TOKEN").await;
    assert!(out.ok, "{}", out.all());
    assert!(out.stdout.is_empty());
    let out = seal("OTHER").await;
    assert!(out.ok, "{}", out.all());
    let text = std::fs::read_to_string(&file).unwrap();
    // Everything else is byte for byte as it was: the only difference is the inserted credentials.
    let creds = Manifest::parse(&text).unwrap().credentials();
    assert_eq!(
        creds.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["TOKEN", "OTHER"]
    );
    // `spec` had no credentials key: it is added at the end of `spec`.
    let expected = format!(
        "{}  credentials:\n    - name: TOKEN\n      sealed: {}\n    - name: OTHER\n      sealed: {}\n{other_doc}",
        manifest("team-a", "github", ""),
        creds[0].sealed.as_ref().unwrap(),
        creds[1].sealed.as_ref().unwrap()
    );
    assert_eq!(text, expected);

    // Re-sealing an existing credential replaces its value in place.
    let before = creds[0].sealed.clone().unwrap();
    assert!(seal("TOKEN").await.ok);
    let text2 = std::fs::read_to_string(&file).unwrap();
    let after = Manifest::parse(&text2).unwrap().credentials()[0]
        .sealed
        .clone()
        .unwrap();
    assert_ne!(before, after);
    assert_eq!(text2, text.replace(&before, &after));

    // Rotation: k2 becomes primary; k1 values still unseal; reseal moves them; then k1 can go.
    let check_args = ["unseal", "--check", "--key-file", p(&keys), p(&file)];
    run(&["keygen", "--append", p(&keys)], "").await;
    let ring = KeyRing::from_file(&keys).unwrap();
    let k2 = ring.primary_id().clone();
    let out = run(&check_args, "").await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout.contains("2 on non-primary keys") && out.stdout.contains(k1.as_str()),
        "{}",
        out.stdout
    );
    let out = run(&["reseal", "--key-file", p(&keys), p(&file)], "").await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout.contains(&format!(
            "resealed 2 value(s) with primary key {k2}: 2 from {k1}"
        )),
        "{}",
        out.stdout
    );
    let resealed = std::fs::read_to_string(&file).unwrap();
    assert!(
        resealed.contains("# Managed by GitOps. Keep this comment.")
            && resealed.contains("# two regions")
    );
    assert!(resealed.ends_with(other_doc));
    let again = run(&["reseal", "--key-file", p(&keys), p(&file)], "").await;
    assert!(
        again.stdout.contains("resealed 0 value(s)")
            && again.stdout.contains("2 already on the primary key")
    );
    let k2_line = std::fs::read_to_string(&keys)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(&keys, format!("{k2_line}\n")).unwrap();
    let out = run(&check_args, "").await;
    assert!(
        out.ok && out.stdout.contains("2 ok, 0 failed, 0 on non-primary keys"),
        "{}",
        out.all()
    );
}

#[tokio::test]
async fn unseal_check_reports_scope_mismatch_unknown_key_and_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    run(&["keygen", "--append", p(&keys)], "").await;
    let sealed_yaml = run(
        &[
            "seal",
            "-n",
            "team-a",
            "--name",
            "github",
            "--key-file",
            p(&keys),
            "--from-literal",
            &format!("TOKEN={CANARY}"),
        ],
        "",
    )
    .await
    .stdout;
    let block = indent_block(&sealed_yaml);
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, manifest("team-a", "github", &block)).unwrap();
    let check = |f: &Path| {
        let (keys, f) = (keys.clone(), f.to_owned());
        async move { run(&["unseal", "--check", "--key-file", p(&keys), p(&f)], "").await }
    };
    assert!(check(&good).await.ok);

    let cases = [
        (
            "other-namespace",
            manifest("team-b", "github", &block),
            "sealed for team-a/github credential TOKEN",
        ),
        (
            "other-resource",
            manifest("team-a", "gitlab", &block),
            "but used as team-a/gitlab credential TOKEN",
        ),
        (
            "other-name",
            manifest("team-a", "github", &block.replace("TOKEN", "RENAMED")),
            "credential RENAMED",
        ),
        (
            "no-namespace",
            manifest("team-a", "github", &block).replace("  namespace: team-a\n", ""),
            "metadata.namespace",
        ),
    ];
    for (what, text, expect) in cases {
        let f = dir.path().join(format!("{what}.yaml"));
        std::fs::write(&f, text).unwrap();
        let out = check(&f).await;
        assert!(!out.ok, "{what}");
        assert!(out.stdout.contains(expect), "{what}: {}", out.all());
        assert!(!out.all().contains(CANARY));
    }

    let token = Manifest::parse(&std::fs::read_to_string(&good).unwrap())
        .unwrap()
        .credentials()[0]
        .sealed
        .clone()
        .unwrap();
    let (prefix, body) = (&token[..8], &token[9..]);
    let mut chars: Vec<char> = body.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    let tampered = format!("{prefix}-{}", chars.iter().collect::<String>());
    let truncated = format!("{prefix}-{}", &body[..body.len() - 20]);
    let foreign_ring = KeyRing::parse(&mcpfly::sealing::generate_key(), "t").unwrap();
    let foreign = mcpfly::sealing::seal(
        &foreign_ring,
        Target::new("team-a", "github", "TOKEN").binding(mcpfly::sealing::Scope::Strict),
        CANARY.into(),
    )
    .unwrap();
    for (what, bad, expect) in [
        ("tampered", tampered, "modified or corrupted"),
        ("truncated", truncated, "truncated"),
        (
            "not-base64",
            format!("{prefix}-!!!notbase64"),
            "not url-safe base64",
        ),
        ("foreign", foreign, "which is not in the key ring"),
    ] {
        let f = dir.path().join(format!("{what}.yaml"));
        std::fs::write(
            &f,
            manifest("team-a", "github", &block.replace(&token, &bad)),
        )
        .unwrap();
        let out = check(&f).await;
        assert!(
            !out.ok && out.stdout.contains(expect),
            "{what}: {}",
            out.all()
        );
        assert!(!out.all().contains(CANARY));
    }
}

/// Every command, with a canary plaintext in every input path, and the canary in no output.
#[tokio::test]
async fn canary_no_command_prints_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let mut outputs = vec![run(&["keygen", "--append", p(&keys)], "").await];
    let env = dir.path().join(".env");
    std::fs::write(&env, format!("E1={CANARY}\nE2=\"{CANARY}\"\n")).unwrap();
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, manifest("team-a", "github", "")).unwrap();
    let seal = [
        "seal",
        "-n",
        "team-a",
        "--name",
        "github",
        "--key-file",
        p(&keys),
    ];
    let lit = format!("L={CANARY}");
    let runs: Vec<(Vec<&str>, &str)> = vec![
        ([&seal[..], &["--credential", "S"]].concat(), CANARY),
        ([&seal[..], &["--from-literal", &lit]].concat(), ""),
        ([&seal[..], &["--from-env-file", p(&env)]].concat(), ""),
        (
            [&seal[..], &["--credential", "S", "--merge-into", p(&file)]].concat(),
            CANARY,
        ),
        (
            [
                &seal[..],
                &["--from-env-file", p(&env), "--merge-into", p(&file)],
            ]
            .concat(),
            "",
        ),
        // Failures must not echo values either.
        ([&seal[..], &["--from-literal", CANARY]].concat(), ""),
        (
            [&seal[..], &["--from-literal", &lit, "--from-literal", &lit]].concat(),
            "",
        ),
        (
            [&seal[..], &["--credential", "S", "--from-literal", &lit]].concat(),
            CANARY,
        ),
        (
            vec![
                "seal",
                "-n",
                "Bad_NS",
                "--name",
                "github",
                "--key-file",
                p(&keys),
                "--credential",
                "S",
            ],
            CANARY,
        ),
        (vec!["unseal", "--key-file", p(&keys), p(&file)], ""),
        (
            vec!["unseal", "--check", "--key-file", p(&keys), p(&file)],
            "",
        ),
    ];
    for (args, stdin) in &runs {
        outputs.push(run(args, stdin).await);
    }
    run(&["keygen", "--append", p(&keys)], "").await;
    outputs.push(run(&["reseal", "--key-file", p(&keys), p(&file)], "").await);
    outputs.push(run(&["unseal", "--check", "--key-file", p(&keys), p(&file)], "").await);
    // A manifest with a value sealed for elsewhere: the failure names scopes, not the value.
    std::fs::write(
        dir.path().join("moved.yaml"),
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("team-a", "team-b"),
    )
    .unwrap();
    outputs.push(
        run(
            &[
                "unseal",
                "--check",
                "--key-file",
                p(&keys),
                p(&dir.path().join("moved.yaml")),
            ],
            "",
        )
        .await,
    );

    assert!(outputs.len() > 10);
    for o in &outputs {
        assert!(!o.all().contains(CANARY), "canary printed:\n{}", o.all());
    }
    // The manifest really holds the canary, sealed (so the canary check is not vacuous).
    let ring = KeyRing::from_file(&keys).unwrap();
    let creds = Manifest::parse(&std::fs::read_to_string(&file).unwrap())
        .unwrap()
        .credentials();
    assert_eq!(creds.len(), 3);
    for c in &creds {
        let v = unseal(
            &ring,
            c.sealed.as_deref().unwrap(),
            &Target::new("team-a", "github", &c.name),
        )
        .unwrap();
        assert_eq!(v.value.expose(), CANARY);
    }
}

/// The binary: the same canary, once `main.rs` dispatches the sealing subcommands.
#[test]
fn binary_canary() {
    let bin = env!("CARGO_BIN_EXE_mcpfly");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, manifest("team-a", "github", "")).unwrap();
    let run_bin = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(bin)
            .args(args)
            .env_remove("MCPFLY_KEY_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let lit = format!("L={CANARY}");
    let seal = [
        "seal",
        "-n",
        "team-a",
        "--name",
        "github",
        "--key-file",
        p(&keys),
    ];
    let steps: Vec<(Vec<&str>, &str, bool)> = vec![
        (vec!["keygen", "--append", p(&keys)], "", true),
        ([&seal[..], &["--credential", "S"]].concat(), CANARY, true),
        (
            [
                &seal[..],
                &["--from-literal", &lit, "--merge-into", p(&file)],
            ]
            .concat(),
            "",
            true,
        ),
        ([&seal[..], &["--from-literal", CANARY]].concat(), "", false),
        (vec!["keygen", "--append", p(&keys)], "", true),
        (vec!["reseal", "--key-file", p(&keys), p(&file)], "", true),
        (
            vec!["unseal", "--check", "--key-file", p(&keys), p(&file)],
            "",
            true,
        ),
        (vec!["unseal", "--key-file", p(&keys), p(&file)], "", false),
    ];
    for (args, stdin, expect_ok) in steps {
        let (ok, out) = run_bin(&args, stdin);
        assert_eq!(ok, expect_ok, "{args:?}: {out}");
        assert!(!out.contains(CANARY), "{args:?} printed the canary: {out}");
    }
}

/// Decides in memory: token `t-alice` is alice, who may seal in `team-a` only. With `hold`, each
/// authentication first takes a permit from it (none: it waits), counting itself in `entered`.
#[derive(Default)]
struct Gate {
    hold: Option<Arc<tokio::sync::Semaphore>>,
    entered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gatekeeper for Gate {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Caller>, String>> + Send + 'a>> {
        Box::pin(async move {
            self.entered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(hold) = &self.hold {
                hold.acquire().await.unwrap().forget();
            }
            Ok((token == "t-alice").then(|| Caller {
                username: "alice".into(),
                uid: None,
                groups: vec![],
                extra: Default::default(),
            }))
        })
    }

    fn authorize<'a>(
        &'a self,
        caller: &'a Caller,
        namespace: &'a str,
        _name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>> {
        Box::pin(async move { Ok(caller.username == "alice" && namespace == "team-a") })
    }
}

async fn seal_listener(ring: Arc<KeyRing>, gate: Gate, limits: Limits) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = mcpfly::sealing::listener::router(
        Arc::new(move || Some(ring.clone())),
        Arc::new(gate),
        limits,
    );
    let (addr, _task) = mcpfly::sealing::listener::serve(
        "127.0.0.1:0".parse().unwrap(),
        app,
        std::future::pending(),
    )
    .await
    .unwrap();
    format!("http://{addr}/seal")
}

#[tokio::test]
async fn seal_endpoint_seals_only() {
    let ring = Arc::new(KeyRing::parse(&mcpfly::sealing::generate_key(), "t").unwrap());
    let url = seal_listener(ring.clone(), Gate::default(), Limits::default()).await;
    let http = reqwest::Client::new();
    let addr = url.trim_end_matches("/seal").to_owned();
    let post = |url: &str| {
        http.post(url)
            .header("content-type", "application/json")
            .bearer_auth("t-alice")
    };

    // The body the CLI's --via-cluster sends, so client and server agree on the format.
    let values = vec![
        ("TOKEN".to_owned(), CANARY.into()),
        ("OTHER".to_owned(), "x\"y".into()),
    ];
    let body = mcpfly::sealing::cli::seal_request_body(
        "team-a",
        "github",
        mcpfly::sealing::Scope::Strict,
        &values,
    )
    .unwrap();
    let resp = post(&url).body(body.to_vec()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(CANARY));
    let r: mcpfly::sealing::endpoint::SealResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(r.key_id, ring.primary_id().as_str());
    let token = r.credentials.iter().find(|c| c.name == "TOKEN").unwrap();
    assert_eq!(
        unseal(
            &ring,
            &token.sealed,
            &Target::new("team-a", "github", "TOKEN")
        )
        .unwrap()
        .value
        .expose(),
        CANARY
    );
    let other = r.credentials.iter().find(|c| c.name == "OTHER").unwrap();
    assert_eq!(
        unseal(
            &ring,
            &other.sealed,
            &Target::new("team-a", "github", "OTHER")
        )
        .unwrap()
        .value
        .expose(),
        "x\"y"
    );

    // Bad requests are rejected without echoing values.
    for bad in [
        format!(r#"{{"namespace":"team-a","name":"github","values":{{"1BAD":"{CANARY}"}}}}"#),
        format!(r#"{{"namespace":"Team A","name":"github","values":{{"T":"{CANARY}"}}}}"#),
        format!(
            r#"{{"namespace":"team-a","name":"github","scope":"galaxy","values":{{"T":"{CANARY}"}}}}"#
        ),
        format!(r#"{{"namespace":"team-a","name":"github","values":{{"T":["{CANARY}"]}}}}"#),
        r#"{"namespace":"team-a","name":"github","values":{}}"#.to_owned(),
    ] {
        let resp = post(&url).body(bad).send().await.unwrap();
        assert!(resp.status().is_client_error());
        assert!(!resp.text().await.unwrap().contains(CANARY));
    }
    // There is nothing but sealing.
    for path in ["/unseal", "/keys", "/"] {
        let resp = post(&format!("{addr}{path}"))
            .body(token.sealed.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    assert_eq!(http.get(&url).send().await.unwrap().status(), 405);
}

/// Who may seal is decided before anything is sealed, and a request cannot be larger, slower or more
/// numerous than the listener allows.
#[tokio::test]
async fn seal_listener_authenticates_authorises_and_limits() {
    let ring = Arc::new(KeyRing::parse(&mcpfly::sealing::generate_key(), "t").unwrap());
    let url = seal_listener(ring.clone(), Gate::default(), Limits::default()).await;
    let http = reqwest::Client::new();
    let body = |namespace: &str| {
        format!(r#"{{"namespace":"{namespace}","name":"github","values":{{"T":"{CANARY}"}}}}"#)
    };
    let send = |token: Option<&'static str>, header: &'static str, body: String| {
        let mut request = http.post(&url).header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header(header, format!("Bearer {token}"));
        }
        async move {
            let resp = request.body(body).send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            assert!(!text.contains(CANARY), "a value echoed: {text}");
            (status, text)
        }
    };
    assert_eq!(send(None, "authorization", body("team-a")).await.0, 401);
    assert_eq!(
        send(Some("t-mallory"), "authorization", body("team-a"))
            .await
            .0,
        401
    );
    let (status, text) = send(Some("t-alice"), "authorization", body("team-b")).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("mcpdeployments/seal"), "{text}");
    assert_eq!(
        send(Some("t-alice"), "authorization", body("team-a"))
            .await
            .0,
        200
    );
    // Through the API server's proxy `Authorization` is dropped; the token travels in its own header.
    assert_eq!(
        send(Some("t-alice"), "x-mcpfly-authorization", body("team-a"))
            .await
            .0,
        200
    );
    let huge = format!(
        r#"{{"namespace":"team-a","name":"github","values":{{"T":"{}"}}}}"#,
        "x".repeat(mcpfly::sealing::endpoint::MAX_BODY)
    );
    assert_eq!(
        send(Some("t-alice"), "authorization", huge.clone()).await.0,
        413
    );
    // Unauthenticated, the body is never read: 401, not 413.
    assert_eq!(send(None, "authorization", huge).await.0, 401);

    // Full: the next request is refused at once (429), and the listener recovers when the others finish.
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Gate {
        hold: Some(hold.clone()),
        ..Default::default()
    };
    let entered = gate.entered.clone();
    let limits = Limits {
        in_flight: 2,
        deadline: std::time::Duration::from_secs(30),
    };
    let busy_url = seal_listener(ring.clone(), gate, limits).await;
    let request = || {
        http.post(&busy_url)
            .header("content-type", "application/json")
            .bearer_auth("t-alice")
            .body(body("team-a"))
            .send()
    };
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(request())).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while entered.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the held requests never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(request().await.unwrap().status(), 429);
    hold.add_permits(2);
    for request in held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    hold.add_permits(1);
    assert_eq!(
        request().await.unwrap().status(),
        200,
        "slots are given back"
    );

    // Slow: a request that outlives its deadline is cut off (408) and frees its slot.
    let slow_url = seal_listener(
        ring,
        Gate {
            hold: Some(Arc::new(tokio::sync::Semaphore::new(0))),
            ..Default::default()
        },
        Limits {
            in_flight: 1,
            deadline: std::time::Duration::from_millis(200),
        },
    )
    .await;
    for _ in 0..2 {
        let resp = http
            .post(&slow_url)
            .bearer_auth("t-alice")
            .body(body("team-a"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 408);
    }
}

#[test]
fn via_cluster_uses_the_service_proxy_path() {
    let svc = mcpfly::sealing::cli::ControllerService {
        namespace: "mcpfly-system".into(),
        service: "mcpfly".into(),
        port: "http".into(),
    };
    assert_eq!(
        svc.seal_path(),
        "/api/v1/namespaces/mcpfly-system/services/mcpfly:http/proxy/seal"
    );
    let args = TestCli::try_parse_from([
        "mcpfly",
        "seal",
        "-n",
        "a",
        "--name",
        "b",
        "--credential",
        "T",
        "--via-cluster",
    ])
    .unwrap();
    let Cmd::Seal(a) = args.cmd else { panic!() };
    assert!(a.via_cluster);
    assert_eq!(
        (
            a.controller_namespace.as_str(),
            a.controller_service.as_str()
        ),
        ("mcpfly-system", "mcpfly")
    );
}
