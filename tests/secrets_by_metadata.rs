//! Secrets reach the controller by metadata only (issue 15, point 5), shown on the real apiserver: every byte
//! the apiserver sends the controller passes through a recording layer in the controller's own Kubernetes
//! client. Unrelated Secrets' values never appear in it, every list and watch of Secrets asks for
//! `PartialObjectMetadata` (and gets it), and the one Secret a resource references is read by a targeted GET
//! whose value does appear (the positive control, in the same window).

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use futures::StreamExt as _;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::client::{Body, ClientBuilder, DynBody};
use mcpfly::api::Phase;
use mcpfly::local_cluster::ControlPlane;
use mcpfly::local_cluster::stack::{Stack, StackOptions};

mod controller_support;
mod ops_support;
use controller_support::{READY, manifest};

const NAMESPACE: &str = "secrets-meta";
const UNRELATED: usize = 50;

/// A request for Secrets as it left the controller (method, path with query, Accept) and the body of the
/// apiserver's answer (which says what it holds: `"kind":"PartialObjectMetadataList"` or `"kind":"SecretList"`;
/// the Content-Type is plain `application/json` either way).
#[derive(Clone)]
struct SecretRequest {
    method: String,
    uri: String,
    accept: String,
    body: BodyBuffer,
}

impl std::fmt::Debug for SecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} (Accept: {})", self.method, self.uri, self.accept)
    }
}

impl SecretRequest {
    fn answered(&self, text: &str) -> bool {
        let body = self.body.lock().unwrap();
        body.windows(text.len()).any(|w| w == text.as_bytes())
    }
}

/// One response body as it arrived.
type BodyBuffer = Arc<Mutex<Vec<u8>>>;

#[derive(Default, Clone)]
struct Recording {
    secret_requests: Arc<Mutex<Vec<SecretRequest>>>,
    /// Every response body, one buffer each (a needle split across frames of one body is still found).
    bodies: Arc<Mutex<Vec<BodyBuffer>>>,
}

impl Recording {
    fn received(&self, value: &str) -> bool {
        // Secret data travels base64-encoded in JSON.
        let needle = base64::engine::general_purpose::STANDARD.encode(value);
        self.bodies.lock().unwrap().iter().any(|body| {
            body.lock()
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        })
    }

    fn secret_requests(&self) -> Vec<SecretRequest> {
        self.secret_requests.lock().unwrap().clone()
    }
}

/// Outermost in the client: it sees each request as kube built it (Accept included) and each response body
/// as the controller's code reads it.
struct Recorder<S> {
    inner: S,
    recording: Recording,
}

impl<S> tower::Service<Request<Body>> for Recorder<S>
where
    S: tower::Service<Request<Body>, Response = Response<Box<DynBody>>, Error = tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let resource_is_secrets = request.uri().path().starts_with("/api/v1/")
            && request
                .uri()
                .path()
                .split('/')
                .any(|segment| segment == "secrets");
        let about_secrets = resource_is_secrets.then(|| SecretRequest {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            accept: header(request.headers(), http::header::ACCEPT),
            body: Arc::default(),
        });
        let recording = self.recording.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let buffer = Arc::new(Mutex::new(Vec::new()));
            recording.bodies.lock().unwrap().push(buffer.clone());
            if let Some(mut entry) = about_secrets {
                entry.body = buffer.clone();
                recording.secret_requests.lock().unwrap().push(entry);
            }
            Ok(response.map(|body| {
                Box::new(body.map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        buffer.lock().unwrap().extend_from_slice(data);
                    }
                    frame
                })) as Box<DynBody>
            }))
        })
    }
}

fn header(headers: &http::HeaderMap, name: http::header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn recording_client(cp: &ControlPlane, recording: Recording) -> anyhow::Result<kube::Client> {
    let layer = tower::layer::layer_fn(move |inner| Recorder {
        inner,
        recording: recording.clone(),
    });
    Ok(ClientBuilder::try_from(cp.config().await?)?
        .with_layer(&layer)
        .build())
}

/// A Secret; the referenced one (`gh`) opts in to being read through `secretKeyRef`, the others do not.
fn secret(name: &str, value: &str) -> anyhow::Result<Secret> {
    let labels = if name == "gh" {
        serde_json::json!({mcpfly::api::ALLOW_REFERENCE_LABEL: "true"})
    } else {
        serde_json::json!({})
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "stringData": {"token": value},
    }))?)
}

#[tokio::test]
async fn the_controller_receives_no_secret_data_it_does_not_need() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    cp.create_namespace(NAMESPACE).await?;
    let admin: Api<Secret> = Api::namespaced(cp.client().await?, NAMESPACE);
    // Unrelated Secrets exist before the controller starts (its initial list) ...
    let unrelated = |i: usize| format!("unrelated-value-{i:03}-7f3c");
    for i in 0..UNRELATED {
        admin
            .create(
                &PostParams::default(),
                &secret(&format!("other-{i:03}"), &unrelated(i))?,
            )
            .await?;
    }
    let referenced = "referenced-value-1c9d";
    let apply = PatchParams::apply("test").force();
    admin
        .patch("gh", &apply, &Patch::Apply(&secret("gh", referenced)?))
        .await?;

    let recording = Recording::default();
    let stack = Stack::start(
        NAMESPACE,
        StackOptions {
            client: Some(recording_client(cp, recording.clone()).await?),
            ..Default::default()
        },
    )
    .await?;
    let extra = "  credentials: [{name: GITHUB_TOKEN, secretKeyRef: {name: gh, key: token}}]\n";
    stack.apply(&manifest("creds", extra)).await?;
    stack.wait_ready("creds", READY).await?;

    // ... and one changes while it watches; then the referenced Secret changes. The controller sees the second
    // change on the same watch stream, so the first one reached it too.
    let changed_unrelated = "unrelated-changed-value-52aa";
    admin
        .patch(
            "other-000",
            &apply,
            &Patch::Apply(&secret("other-000", changed_unrelated)?),
        )
        .await?;
    let referenced_changed = "referenced-changed-value-8e01";
    admin
        .patch(
            "gh",
            &apply,
            &Patch::Apply(&secret("gh", referenced_changed)?),
        )
        .await?;
    stack
        .wait_for("creds", READY, "Ready on the changed credential", |d| {
            let status = d.status.as_ref().unwrap();
            status.secrets_version == Some(2) && status.phase == Some(Phase::Ready)
        })
        .await?;

    // Positive controls: the referenced values did arrive, by targeted GETs of that one Secret.
    assert!(recording.received(referenced) && recording.received(referenced_changed));
    let requests = recording.secret_requests();
    let collection = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
    let reads: Vec<&SecretRequest> = requests.iter().filter(|r| r.method == "GET").collect();
    // A list narrowed to one name by a field selector (how a `secretKeyRef` is read, so that the label selector
    // can refuse a Secret that did not opt in) reads that one Secret, like a GET of it.
    let target = |r: &SecretRequest| -> String {
        let (path, query) = r.uri.split_once('?').unwrap_or((r.uri.as_str(), ""));
        let named = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("fieldSelector=metadata.name%3D"));
        match named {
            Some(name) if path == collection => format!("{collection}/{name}"),
            _ => path.to_string(),
        }
    };
    let (collection_reads, named_reads): (Vec<&SecretRequest>, Vec<&SecretRequest>) =
        reads.iter().partition(|r| target(r) == collection);
    assert!(
        collection_reads
            .iter()
            .any(|r| r.uri.contains("watch=true"))
            && collection_reads
                .iter()
                .any(|r| !r.uri.contains("watch=true")),
        "the controller lists and watches Secrets: {requests:#?}"
    );
    for read in &collection_reads {
        assert!(
            read.accept.contains("as=PartialObjectMetadata") && !read.answered(r#""kind":"Secret"#),
            "a list or watch of Secrets that is not metadata-only: {read:?}"
        );
    }
    // The apiserver did answer with metadata: the list, and the watch events of the two changes.
    assert!(
        collection_reads
            .iter()
            .any(|r| r.answered(r#""kind":"PartialObjectMetadataList""#)),
        "no metadata list"
    );
    assert!(
        collection_reads.iter().any(|r| r.uri.contains("watch=true")
            && r.answered(r#""kind":"PartialObjectMetadata""#)
            && r.answered(r#""name":"other-000""#)),
        "no metadata watch event for the changed unrelated Secret"
    );

    // Targeted reads only: the referenced Secret and the connection Secret the controller writes.
    let deployment = stack.deployments().await?.get("creds").await?;
    let needed = [
        format!("{collection}/gh"),
        format!("{collection}/{}", deployment.connection_secret_name()),
    ];
    assert!(
        named_reads.iter().any(|r| target(r) == needed[0]),
        "no targeted read of the referenced Secret: {requests:#?}"
    );
    for read in &named_reads {
        let path = target(read);
        assert!(
            needed.contains(&path),
            "a Secret read that no resource needs: {read:#?}"
        );
    }

    // No unrelated value ever reached the controller.
    for value in (0..UNRELATED)
        .map(unrelated)
        .chain([changed_unrelated.to_string()])
    {
        assert!(
            !recording.received(&value),
            "{value} reached the controller"
        );
    }
    Ok(())
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("no {name}"))?;
        let kib: f64 = line.split_whitespace().nth(1).unwrap_or_default().parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The controller's memory with many large Secrets it does not need (BENCHMARKS.md, "Secrets by metadata"):
/// RSS of a controller watching every namespace, idle; then while `MCPFLY_BENCH_SECRETS` Secrets of
/// `MCPFLY_BENCH_SECRET_KIB` KiB each (default 2,000 × 500 KiB) are created under its watch; then of a fresh
/// controller that lists them all at start. `MCPFLY_TEST_CONTROLLER_BIN` runs another build of the controller.
#[tokio::test]
#[ignore = "benchmark: writes about 1 GB of Secrets; run by hand (BENCHMARKS.md)"]
async fn bench_controller_memory_with_large_unrelated_secrets() -> anyhow::Result<()> {
    use ops_support::{ControllerProcess, SYSTEM_NS, apply_deployment, deployment, is_ready};
    let number = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (count, kib) = (
        number("MCPFLY_BENCH_SECRETS", 2000),
        number("MCPFLY_BENCH_SECRET_KIB", 500),
    );
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(SYSTEM_NS).await?;
    cp.create_namespace("bench-secrets").await?;
    cp.create_namespace("bench-apps").await?;
    let client = cp.client().await?;
    let emulator = fly_emulator::Emulator::start(fly_emulator::EmulatorConfig {
        rate_limits: fly_adapter::token_bucket::RateLimits::disabled(),
        ..Default::default()
    })
    .await?;
    let env = [("MCPFLY_LEADER_ELECTION", "false")];
    let ready_deployment = |name: &'static str| {
        let client = client.clone();
        async move {
            apply_deployment(
                &client,
                &deployment("bench-apps", name, serde_json::json!({})),
            )
            .await?;
            let api: Api<mcpfly::api::MCPDeployment> = Api::namespaced(client, "bench-apps");
            let ready = ops_support::eventually(std::time::Duration::from_secs(60), || async {
                api.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|d| is_ready(&d))
            })
            .await;
            anyhow::ensure!(ready, "{name} never became Ready");
            anyhow::Ok(())
        }
    };
    let settle = std::time::Duration::from_secs(10);

    let mut watching = ControllerProcess::spawn(
        cp,
        "bench-watch",
        cp.kubeconfig_path(),
        &emulator.base_url(),
        &env,
    )?;
    watching
        .wait_ready(std::time::Duration::from_secs(60))
        .await?;
    ready_deployment("before").await?;
    tokio::time::sleep(settle).await;
    let idle = rss_mib(watching.pid())?;

    // Large and incompressible, like Helm release Secrets.
    let started = std::time::Instant::now();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "bench-secrets");
    futures::stream::iter(0..count)
        .map(|i| {
            let secrets = secrets.clone();
            async move {
                let data: Vec<u8> = (0..kib * 1024).map(|_| rand::random::<u8>()).collect();
                let secret: Secret = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("large-{i:05}")},
                    "data": {"release": base64::engine::general_purpose::STANDARD.encode(&data)},
                }))?;
                secrets.create(&PostParams::default(), &secret).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let wrote = started.elapsed();
    ready_deployment("during").await?;
    tokio::time::sleep(settle).await;
    let after_watch = rss_mib(watching.pid())?;
    watching.kill();

    let mut listing = ControllerProcess::spawn(
        cp,
        "bench-list",
        cp.kubeconfig_path(),
        &emulator.base_url(),
        &env,
    )?;
    listing
        .wait_ready(std::time::Duration::from_secs(120))
        .await?;
    ready_deployment("after").await?;
    tokio::time::sleep(settle).await;
    let after_list = rss_mib(listing.pid())?;
    listing.kill();

    println!(
        "secrets: {count} x {kib} KiB written in {:.1} s\n\
         controller A, idle before:            RSS {:.1} MiB (peak {:.1})\n\
         controller A, after watching writes:  RSS {:.1} MiB (peak {:.1})\n\
         controller B, started after (lists):  RSS {:.1} MiB (peak {:.1})",
        wrote.as_secs_f64(),
        idle.0,
        idle.1,
        after_watch.0,
        after_watch.1,
        after_list.0,
        after_list.1
    );
    Ok(())
}
