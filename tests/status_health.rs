//! What status says, and when, as GitOps tools judge it with their own libraries.
//!
//! A watch records every version of the resources the apiserver serves while the controller works, and each
//! version goes through `testing/health-checker` (built by `hack/health-checker.sh`): kstatus `Compute` from
//! `sigs.k8s.io/cli-utils`, Flux's fork of it with the rule fluxcd/pkg/ssa waits by, and `docs/argocd-health.lua`
//! run by gopher-lua the way Argo CD runs health scripts. Then: no version reads healthy before `Ready=True` for
//! its generation; each settled state reads as docs/health.md says; a Fly incident backs off and writes status
//! rarely.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fly_emulator::{Fault, ScriptedFault};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use mcpfly::api::{ConditionType, MCPDeployment, Phase};
use mcpfly::local_cluster::stack::{Stack, StackOptions};
use serde_json::Value;

mod controller_support;
use controller_support::{READY, app_of, manifest};

/// What each tool says about one object version.
#[derive(Debug, Clone, serde::Deserialize)]
struct Verdicts {
    kstatus: Verdict,
    flux: Verdict,
    argocd: Verdict,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Verdict {
    status: String,
    message: String,
    #[serde(default)]
    error: Option<String>,
}

impl Verdicts {
    fn healthy(&self) -> bool {
        self.kstatus.status == "Current"
            || self.flux.status == "Ready"
            || self.argocd.status == "Healthy"
    }

    fn triple(&self) -> (&str, &str, &str) {
        (&self.kstatus.status, &self.flux.status, &self.argocd.status)
    }
}

/// One long-running checker process: a JSON object per line in, a verdict per line out.
struct Checker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Checker {
    fn start() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let binary = match std::env::var_os("MCPFLY_HEALTH_CHECKER") {
            Some(path) => PathBuf::from(path),
            None => {
                let out = Command::new("bash")
                    .arg(root.join("hack/health-checker.sh"))
                    .stderr(Stdio::inherit())
                    .output()?;
                if !out.status.success() {
                    bail!("hack/health-checker.sh failed ({})", out.status);
                }
                PathBuf::from(String::from_utf8(out.stdout)?.trim())
            }
        };
        let mut child = Command::new(&binary)
            .arg(root.join("docs/argocd-health.lua"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn judge(&mut self, object: &Value) -> anyhow::Result<Verdicts> {
        writeln!(self.stdin, "{}", serde_json::to_string(object)?)?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let verdicts: Verdicts =
            serde_json::from_str(&line).with_context(|| format!("checker said {line:?}"))?;
        for (tool, v) in [("kstatus", &verdicts.kstatus), ("argocd", &verdicts.argocd)] {
            if let Some(error) = &v.error {
                bail!("{tool} could not judge {object}: {error}");
            }
        }
        Ok(verdicts)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every version of every MCPDeployment in a namespace, as a watch delivers them, in order.
struct Recording {
    versions: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recording {
    async fn start(stack: &Stack) -> anyhow::Result<Self> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            stack.cp.client().await?,
            &stack.namespace,
            &ApiResource::erase::<MCPDeployment>(&()),
        );
        let mut version = api
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let versions = Arc::new(Mutex::new(Vec::new()));
        let sink = versions.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(stream) = api
                    .watch(&WatchParams::default().timeout(60), &version)
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut stream = stream.boxed();
                while let Ok(Some(event)) = stream.try_next().await {
                    match event {
                        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                            version = o.metadata.resource_version.clone().unwrap_or_default();
                            sink.lock().unwrap().push(serde_json::to_value(&o).unwrap());
                        }
                        WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                        WatchEvent::Error(e) => panic!("watch failed: {e:?}"),
                    }
                }
            }
        });
        Ok(Self { versions, task })
    }

    fn all(&self) -> Vec<Value> {
        self.versions.lock().unwrap().clone()
    }

    /// Waits until the watch has delivered the version `object` is, and returns it as the watch saw it.
    async fn seen(&self, object: &MCPDeployment) -> Value {
        let wanted = object.metadata.resource_version.clone().unwrap();
        for _ in 0..100 {
            if let Some(v) = self
                .all()
                .into_iter()
                .find(|v| v["metadata"]["resourceVersion"] == wanted.as_str())
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the watch never delivered resourceVersion {wanted}");
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// `Ready=True` describing this very generation: the only state any tool may call healthy.
fn ready_for_its_generation(object: &Value) -> bool {
    let generation = &object["metadata"]["generation"];
    let ready = condition(object, "Ready");
    object["status"]["observedGeneration"] == *generation
        && ready.is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == *generation)
        && object["metadata"]["deletionTimestamp"].is_null()
}

fn describe(object: &Value) -> String {
    format!(
        "{} generation {} resourceVersion {} status {}",
        object["metadata"]["name"],
        object["metadata"]["generation"],
        object["metadata"]["resourceVersion"],
        object["status"]
    )
}

/// The rules every version must follow, whatever state it is in.
fn check_every_version(checker: &mut Checker, versions: &[Value]) -> anyhow::Result<usize> {
    let mut judged = 0;
    for object in versions {
        let v = checker.judge(object)?;
        judged += 1;
        // Flux's fork computes what kstatus computes.
        let flux_as_kstatus = match v.kstatus.status.as_str() {
            "Current" => "Ready",
            "Failed" => "Failed",
            _ => "Waiting",
        };
        assert_eq!(v.flux.status, flux_as_kstatus, "{}", describe(object));
        if v.healthy() {
            assert!(
                ready_for_its_generation(object),
                "{:?} before Ready=True for the current generation: {}",
                v.triple(),
                describe(object)
            );
            assert_eq!(
                v.triple(),
                ("Current", "Ready", "Healthy"),
                "the tools disagree: {}",
                describe(object)
            );
        }
        let deleting = !object["metadata"]["deletionTimestamp"].is_null();
        if let Some(stalled) =
            condition(object, "Stalled").filter(|c| c["status"] == "True" && !deleting)
        {
            let message = stalled["message"].as_str().unwrap();
            assert_eq!(v.kstatus.status, "Failed", "{}", describe(object));
            // Flux stops waiting at once; its error names the object, and kstatus's message is the condition's.
            assert_eq!(v.flux.status, "Failed");
            assert_eq!(v.flux.message, message);
            assert!(
                v.flux
                    .error
                    .as_deref()
                    .unwrap()
                    .contains("status: 'Failed'")
            );
            assert_eq!(v.argocd.status, "Degraded");
            assert!(v.argocd.message.contains(message), "{:?}", v.argocd);
        }
    }
    Ok(judged)
}

async fn judged_settled(
    checker: &mut Checker,
    recording: &Recording,
    object: &MCPDeployment,
) -> anyhow::Result<(Value, Verdicts)> {
    let seen = recording.seen(object).await;
    let verdicts = checker.judge(&seen)?;
    Ok((seen, verdicts))
}

#[tokio::test]
async fn every_version_reads_right_to_kstatus_flux_and_argocd() -> anyhow::Result<()> {
    let mut checker = Checker::start()?;
    let stack = Stack::start("status-health", StackOptions::default()).await?;
    let recording = Recording::start(&stack).await?;
    let api = stack.deployments().await?;

    // Create: healthy only once Ready for generation 1.
    stack.apply(&manifest("web", "")).await?;
    let ready = stack.wait_ready("web", READY).await?;
    let (_, v) = judged_settled(&mut checker, &recording, &ready).await?;
    assert_eq!(v.triple(), ("Current", "Ready", "Healthy"));

    // Update.
    stack
        .apply(&manifest("web", "  env: {LOG_LEVEL: debug}\n"))
        .await?;
    let ready = stack.wait_ready("web", READY).await?;
    assert_eq!(ready.metadata.generation, Some(2));
    let (_, v) = judged_settled(&mut checker, &recording, &ready).await?;
    assert_eq!(v.triple(), ("Current", "Ready", "Healthy"));

    // Suspend, then change the spec while suspended: the controller acknowledges each generation.
    let suspended = |d: &MCPDeployment| {
        d.status.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Suspended) && s.observed_generation == d.metadata.generation
        })
    };
    for env in ["debug", "trace"] {
        stack
            .apply(&manifest(
                "web",
                &format!("  env: {{LOG_LEVEL: {env}}}\n  suspend: true\n"),
            ))
            .await?;
        let now = stack
            .wait_for("web", READY, "Suspended for its generation", suspended)
            .await?;
        let (seen, v) = judged_settled(&mut checker, &recording, &now).await?;
        assert_eq!(
            v.triple(),
            ("InProgress", "Waiting", "Suspended"),
            "{}",
            describe(&seen)
        );
        assert!(v.kstatus.message.contains("spec.suspend"), "{v:?}");
        let ready = condition(&seen, "Ready").unwrap();
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&"False".into(), &"Suspended".into())
        );
    }

    // Resume: converges on the spec changed while suspended.
    stack
        .apply(&manifest("web", "  env: {LOG_LEVEL: trace}\n"))
        .await?;
    let ready = stack.wait_ready("web", READY).await?;
    let (_, v) = judged_settled(&mut checker, &recording, &ready).await?;
    assert_eq!(v.triple(), ("Current", "Ready", "Healthy"));

    // A stall (a sealed credential and no key ring): Failed at once, with its message.
    stack
        .apply(&manifest(
            "locked",
            "  credentials: [{name: TOKEN, sealed: gAAAAABnotarealtoken}]\n",
        ))
        .await?;
    stack.wait_stalled("locked", READY).await?;
    let locked = api.get("locked").await?;
    let (_, v) = judged_settled(&mut checker, &recording, &locked).await?;
    assert_eq!(v.triple(), ("Failed", "Failed", "Degraded"));

    // Deletion: never healthy on the way out.
    stack.delete("web").await?;
    stack.delete("locked").await?;
    stack.wait_gone("web", READY).await?;
    stack.wait_gone("locked", READY).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let versions = recording.all();
    let judged = check_every_version(&mut checker, &versions)?;
    // The first version of each resource carries no status the controller wrote: the CRD's default stands.
    let first_web = versions
        .iter()
        .find(|v| v["metadata"]["name"] == "web")
        .unwrap();
    assert_eq!(first_web["status"]["observedGeneration"], -1, "{first_web}");
    assert_eq!(checker.judge(first_web)?.kstatus.status, "InProgress");
    // Deletion versions were seen and read as terminating.
    let deleting = versions
        .iter()
        .filter(|v| !v["metadata"]["deletionTimestamp"].is_null())
        .count();
    assert!(
        deleting >= 2,
        "{deleting} versions with a deletionTimestamp"
    );
    eprintln!("{judged} object versions judged");
    assert!(judged >= 15, "only {judged} versions recorded");
    Ok(())
}

#[tokio::test]
async fn a_failed_handshake_reads_as_reconciling_with_its_message() -> anyhow::Result<()> {
    let mut checker = Checker::start()?;
    // An endpoint that answers every request 503, counting them.
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = endpoint.local_addr()?.port();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = endpoint.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    let options = StackOptions {
        verify: true,
        url_template: format!("http://127.0.0.1:{port}/{{app}}/mcp"),
        ..Default::default()
    };
    let stack = Stack::start("status-handshake", options).await?;
    let recording = Recording::start(&stack).await?;
    stack.apply(&manifest("mute", "")).await?;
    let failed = stack
        .wait_for("mute", READY, "HandshakeFailed", |d| {
            d.status
                .as_ref()
                .and_then(|s| s.condition(ConditionType::Reconciling))
                .is_some_and(|c| c.reason == "HandshakeFailed")
        })
        .await?;
    let status = failed.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(Phase::Degraded));
    let reconciling = status.condition(ConditionType::Reconciling).unwrap();
    assert!(
        reconciling.message.contains("does not answer MCP"),
        "{reconciling:?}"
    );
    let (_, v) = judged_settled(&mut checker, &recording, &failed).await?;
    assert_eq!(v.triple(), ("InProgress", "Waiting", "Progressing"));
    assert_eq!(v.kstatus.message, reconciling.message);
    assert!(v.argocd.message.contains("HandshakeFailed"), "{v:?}");

    // Retried with backoff, and the retries leave status alone (the message does not change per attempt).
    let versions = recording.all().len();
    let attempts = requests.load(std::sync::atomic::Ordering::SeqCst);
    let retried = || requests.load(std::sync::atomic::Ordering::SeqCst) >= attempts + 2;
    for _ in 0..150 {
        if retried() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(retried(), "the handshake was not retried");
    assert_eq!(
        recording.all().len(),
        versions,
        "status rewritten while retrying"
    );

    stack.delete("mute").await?;
    stack.wait_gone("mute", READY).await?;
    check_every_version(&mut checker, &recording.all())?;
    server.abort();
    Ok(())
}

#[tokio::test]
async fn a_fly_incident_backs_off_writes_status_rarely_and_recovers() -> anyhow::Result<()> {
    let stack = Stack::start("status-incident", StackOptions::default()).await?;
    let recording = Recording::start(&stack).await?;
    stack.apply(&manifest("storm", "")).await?;
    let app = app_of(&stack.wait_ready("storm", READY).await?);

    // Fly's incident: the rolling update's machine updates answer 503, then 409, several times in a row. Seven
    // failures, because the backoff only outgrows the client's per-machine rate limit (one update a second) late:
    // with a 200 ms base the wait after the n-th failure is 200·2^(n-1) ms scaled by jitter into [½, 1], so the
    // wait after the sixth is at least 3.2 s whatever the jitter, more than twice the ~1 s the rate limit spaces
    // the early attempts. With six failures the last wait (≥ 1.6 s) beat twice the shortest only on lucky jitter.
    let faults = [503, 503, 503, 503, 409, 409, 409];
    stack
        .emulator
        .script_faults(faults.map(|status| ScriptedFault {
            label: Some("machines.update".into()),
            fault: Fault::Status(status),
        }));
    stack
        .apply(&manifest("storm", "  env: {LOG_LEVEL: debug}\n"))
        .await?;
    // The incident costs up to about fifteen seconds of waits on top of a normal rollout.
    let ready = stack.wait_ready("storm", 2 * READY).await?;
    assert_eq!(ready.status.unwrap().phase, Some(Phase::Ready));

    let attempts: Vec<i64> = stack
        .emulator
        .event_log()
        .into_iter()
        .filter(|e| e.label == "machines.update" && e.app.as_deref() == Some(app.as_str()))
        .filter(|e| e.status == 503 || e.status == 409)
        .map(|e| e.time_ms)
        .collect();
    assert_eq!(attempts.len(), faults.len(), "{attempts:?}");
    let gaps: Vec<i64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("waits between failed attempts (ms): {gaps:?}");
    // Exponential: the waits never shrink (up to scheduling noise; the client's own per-machine rate limit
    // spaces the first few) and the last is at least twice the shortest.
    for pair in gaps.windows(2) {
        assert!(pair[1] + 250 >= pair[0], "a wait shrank: {gaps:?}");
    }
    assert!(
        *gaps.last().unwrap() >= 2 * gaps.iter().min().unwrap(),
        "not backing off: {gaps:?}"
    );

    // Status changed when the failure changed (503, then 409), not on every attempt.
    let failing_writes = recording
        .all()
        .iter()
        .filter(|v| condition(v, "Reconciling").is_some_and(|c| c["reason"] == "FlyCallFailed"))
        .count();
    eprintln!("status versions with FlyCallFailed: {failing_writes}");
    assert!(
        (1..=3).contains(&failing_writes),
        "{failing_writes} status versions for {} failed attempts",
        faults.len()
    );
    Ok(())
}
