//! One reconcile of one `MCPDeployment`: finalizer, suspend, source, credentials, observe → plan → act, the
//! connection Secret, status and events. Planning itself is pure and lives in [`crate::reconcile`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::settled::Next;
use super::status::{Stall, clear, condition, mark_progress, mark_stalled};
use super::{Context, Error};
use crate::api::{
    Auth, ConditionType, CredentialStatus, DeletionPolicy, FINALIZER, MCPDeployment,
    MCPDeploymentStatus, Phase, RECONCILE_ANNOTATION,
};
use crate::api::{ROTATE_TOKEN_ANNOTATION, reason};
use crate::packages::Resolved;
use crate::reconcile::act::{ActError, Actor};
use crate::reconcile::desired::{AUTH_TOKEN_SECRET, Inputs, app_name_for, desired};
use crate::reconcile::observe::observe;
use crate::reconcile::plan::{Action, ObservedApp, Progress, plan};
use crate::reconcile::timing::next_look;
use crate::sealing::unsealer::{CredentialRef, CredentialSource, Unsealer};

const FIELD_MANAGER: &str = "mcpfly";
/// After an ambiguous Fly answer, look again soon: the next observation tells what happened.
const AFTER_AMBIGUOUS: Duration = Duration::from_secs(2);
/// While an app is being deleted.
const DELETE_POLL: Duration = Duration::from_secs(2);

pub async fn reconcile(obj: Arc<MCPDeployment>, ctx: Arc<Context>) -> Result<Next, Error> {
    let obj = ctx.settled.freshest(obj);
    let namespace = obj.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<MCPDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = if obj.meta().deletion_timestamp.is_some() {
        cleanup(&obj, &api, &ctx).await
    } else {
        ensure_finalizer(&obj, &api).await?;
        apply(&obj, &namespace, &api, &ctx).await
    };
    ctx.record_outcome(&obj, result.is_ok());
    result
}

async fn ensure_finalizer(obj: &MCPDeployment, api: &Api<MCPDeployment>) -> Result<(), Error> {
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    patch_finalizers(obj, api, finalizers).await
}

async fn remove_finalizer(obj: &MCPDeployment, api: &Api<MCPDeployment>) -> Result<(), Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let finalizers = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    match patch_finalizers(obj, api, finalizers).await {
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
        other => other,
    }
}

/// A merge patch carrying the resourceVersion it was computed from: if anyone changed the finalizers in
/// between, the apiserver answers 409 and the next reconcile starts from fresh data.
async fn patch_finalizers(
    obj: &MCPDeployment,
    api: &Api<MCPDeployment>,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn cleanup(
    obj: &MCPDeployment,
    api: &Api<MCPDeployment>,
    ctx: &Context,
) -> Result<Next, Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Next::on_change());
    }
    let status = obj.status.clone().unwrap_or_default();
    if let Some(app) = status.app.as_deref() {
        ctx.in_flight.forget_app(app);
        ctx.fleet.forget(app);
        if obj.spec.deletion_policy == DeletionPolicy::Delete {
            match ctx.fly.get_app(app).await {
                Err(e) if e.is_not_found() => {}
                // Someone else's app (the name was never ours): nothing of ours to delete.
                Err(fly_adapter::client::FlyError::OwnedByOtherOrg { .. }) => {}
                Err(e) => return Err(Error::Fly(e)),
                Ok(_) => {
                    ctx.fly
                        .delete_app(app, true)
                        .await
                        .or_else(|e| if e.is_not_found() { Ok(()) } else { Err(e) })?;
                    ctx.publish(
                        obj,
                        EventType::Normal,
                        "AppDeleting",
                        &format!("deleting Fly app {app}"),
                    )
                    .await;
                    let mut deleting = status.clone();
                    deleting.phase = Some(Phase::Deleting);
                    write_status(ctx, api, obj, &status, &deleting).await?;
                    return Ok(Next::after(DELETE_POLL));
                }
            }
            ctx.publish(
                obj,
                EventType::Normal,
                "AppDeleted",
                &format!("Fly app {app} is gone"),
            )
            .await;
        } else {
            ctx.publish(
                obj,
                EventType::Normal,
                "Orphaned",
                &format!("left Fly app {app} in place (deletionPolicy: Orphan)"),
            )
            .await;
        }
    }
    remove_finalizer(obj, api).await?;
    ctx.forget(obj);
    Ok(Next::on_change())
}

async fn apply(
    obj: &MCPDeployment,
    namespace: &str,
    api: &Api<MCPDeployment>,
    ctx: &Context,
) -> Result<Next, Error> {
    let name = obj.name_any();
    let generation = obj.metadata.generation;
    let stored = obj.status.clone().unwrap_or_default();
    let mut status = stored.clone();
    status.last_handled_reconcile_at = obj
        .annotations()
        .get(RECONCILE_ANNOTATION)
        .cloned()
        .or(stored.last_handled_reconcile_at.clone());

    if obj.spec.suspend {
        status.phase = Some(Phase::Suspended);
        clear(&mut status, ConditionType::Reconciling);
        write_status(ctx, api, obj, &stored, &status).await?;
        return Ok(Next::on_change());
    }

    // The app name goes into status before the app exists: whatever happens next, we know what we may own.
    let app = stored
        .app
        .clone()
        .unwrap_or_else(|| app_name_for(&obj.spec, &ctx.settings, namespace, &name));
    if stored.app.as_deref() != Some(app.as_str()) {
        status.app = Some(app.clone());
        status.phase = Some(Phase::Pending);
        write_status(ctx, api, obj, &stored, &status).await?;
        return Ok(Next::after(Duration::ZERO));
    }

    // Source: pinned once and recorded in status; a registry is asked again only when the spec's source
    // changes or the force-reconcile annotation asks, so a reboot never changes what runs.
    let force = crate::packages::force_requested(
        obj.annotations()
            .get(RECONCILE_ANNOTATION)
            .map(String::as_str),
        stored.last_handled_reconcile_at.as_deref(),
    );
    let pinned =
        match crate::packages::resolve_pinned(&*ctx.resolver, &obj.spec.source, &stored, force)
            .await
        {
            Ok(pinned) => pinned,
            Err(e) if e.transient => return Err(Error::Resolve(e)),
            Err(e) => {
                let stall = Stall {
                    reason: e.reason.into(),
                    message: e.message.clone(),
                    condition: Some(ConditionType::SourceResolved),
                };
                return stalled(api, obj, &stored, status, stall, ctx).await;
            }
        };
    pinned.record(&mut status);
    let resolved: Resolved = pinned.resolved.clone();
    match pinned.warnings.as_deref() {
        // Reused from status: nothing was re-checked, so an earlier warning stands.
        None if status
            .condition(ConditionType::SourceResolved)
            .is_some_and(|c| c.is_true()) => {}
        None | Some([]) => status.set_condition(condition(
            ConditionType::SourceResolved,
            true,
            reason::RESOLVED,
            format!("runs {}", resolved.display()),
            generation,
        )),
        // Allowed by policy but worth a person's attention (e.g. a deprecated npm version).
        Some(warnings) => {
            let message = warnings
                .iter()
                .map(|w| w.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            status.set_condition(condition(
                ConditionType::SourceResolved,
                true,
                warnings[0].reason,
                format!("runs {}; {message}", resolved.display()),
                generation,
            ));
            ctx.publish(obj, EventType::Warning, warnings[0].reason, &message)
                .await;
        }
    }

    // Credentials: unsealed only into memory; digests go to status, values only into the Fly secrets call.
    let unsealed = match ctx.unseal(namespace, &name, &obj.spec.credentials).await {
        Ok(unsealed) => unsealed,
        Err(UnsealFailure::Transient(message)) => return Err(Error::Credentials(message)),
        Err(UnsealFailure::Stall(stall)) => {
            return stalled(api, obj, &stored, status, stall, ctx).await;
        }
    };
    let mut secret_values = BTreeMap::new();
    let mut secret_digests = BTreeMap::new();
    let mut credential_keys = BTreeMap::new();
    for credential in &unsealed.credentials {
        secret_values.insert(
            credential.name.clone(),
            fly_adapter::client::types::SecretValue::new(credential.value.expose()),
        );
        secret_digests.insert(credential.name.clone(), credential.digest.clone());
        if let crate::sealing::unsealer::UnsealedFrom::Sealed { key_id, .. } = &credential.source {
            credential_keys.insert(credential.name.clone(), key_id.as_str().to_string());
        }
    }
    status.set_condition(condition(
        ConditionType::CredentialsReady,
        true,
        reason::UNSEALED,
        format!("{} credential(s) ready", unsealed.credentials.len()),
        generation,
    ));

    // The endpoint token lives in the connection Secret, the one place MCP clients read it from.
    let connection = ConnectionSecret::read(ctx, namespace, &obj.connection_secret_name()).await?;
    // A new value of the rotate-token annotation replaces the token; otherwise the stored one stands.
    let rotation = obj.annotations().get(ROTATE_TOKEN_ANNOTATION).cloned();
    let rotate = rotation.is_some() && rotation != stored.token_rotation;
    let token = match obj.spec.access.auth {
        Auth::Bearer => Some(match (&connection.token, rotate) {
            (Some(existing), false) => existing.clone(),
            _ => generate_token(),
        }),
        Auth::None => None,
    };
    status.token_rotation = rotation.or(stored.token_rotation.clone());
    if let Some(token) = &token {
        let value = crate::sealing::SecretValue::new(token.clone());
        secret_digests.insert(
            AUTH_TOKEN_SECRET.to_string(),
            crate::sealing::credential_digest(AUTH_TOKEN_SECRET, &value),
        );
        secret_values.insert(
            AUTH_TOKEN_SECRET.to_string(),
            fly_adapter::client::types::SecretValue::new(token.clone()),
        );
    }

    let uid = obj.uid().unwrap_or_default();
    let inputs = Inputs {
        namespace,
        name: &name,
        uid: &uid,
        spec: &obj.spec,
        resolved: &resolved,
        secrets: secret_digests.clone(),
    };
    let mut want = desired(&inputs, &ctx.settings);
    want.app = app.clone();
    status.url = Some(want.url.clone());

    let ready_for_generation =
        stored.phase == Some(Phase::Ready) && stored.observed_generation == generation;
    let with_ips = !ready_for_generation && !ctx.in_flight.ips_known(&app, generation);
    let observed = observe(&ctx.fly, &app, with_ips, ctx.in_flight.app_known(&app)).await?;
    if observed.app == ObservedApp::Missing {
        ctx.in_flight.forget_known_app(&app);
    }
    ctx.fleet.observed(&app, &observed.machines);
    ctx.start_times.learn(&observed.machines);
    let progress = Progress {
        applied_secrets: stored
            .credentials
            .iter()
            .map(|c| (c.name.clone(), c.digest.clone()))
            .collect(),
        leased: ctx.in_flight.leased_machines(&app),
        unconfirmed_creates: ctx.in_flight.unconfirmed_creates(&app, &observed.machines),
    };
    let the_plan = match plan(&want, &observed, &progress, &uid) {
        Ok(p) => p,
        Err(blocked) => {
            let stall = Stall {
                reason: blocked.reason.into(),
                message: blocked.message,
                condition: None,
            };
            return stalled(api, obj, &stored, status, stall, ctx).await;
        }
    };

    // The connection Secret is the token's one home: written before Fly receives it, so a retry after any
    // failure converges on the same token. (During a rotation clients may see the new token a moment before
    // the machines accept it.)
    connection
        .ensure(ctx, obj, &want.url, token.as_deref())
        .await?;

    let actor = Actor {
        fly: &ctx.fly,
        app: &app,
        in_flight: &ctx.in_flight,
        secret_values: &secret_values,
        desired_secrets: &secret_digests,
        secrets_version: stored.secrets_version.map(|v| v as u64),
        lease_owner: &ctx.identity,
    };
    let outcome = actor.run(&the_plan).await;
    if outcome.error.is_none() {
        // The app exists in our org now, and its IPs are complete if they were looked at (or just assigned).
        let ips_done = observed.ips.is_some() || observed.app == ObservedApp::Missing;
        ctx.in_flight
            .note_app(&app, ips_done.then_some(generation).flatten());
    }
    for (reason, note) in &outcome.done {
        info!(reason, note, "changed on Fly");
        ctx.publish(obj, EventType::Normal, reason, note).await;
    }
    if let Some(version) = outcome.secrets_version {
        status.secrets_version = Some(version as i64);
    }
    if let Some(applied) = &outcome.applied_secrets {
        status.credentials = applied
            .iter()
            .map(|(name, digest)| CredentialStatus {
                name: name.clone(),
                digest: digest.clone(),
                key: credential_keys.get(name).cloned(),
            })
            .collect();
    } else {
        // Report which key unsealed each credential that is already delivered (rotation visibility).
        for entry in &mut status.credentials {
            if secret_digests.get(&entry.name) == Some(&entry.digest) {
                entry.key = credential_keys.get(&entry.name).cloned();
            }
        }
    }

    let requeue = match &outcome.error {
        None if the_plan.converged() => Next::after(ctx.ready_requeue()),
        None => Next::after(next_look(
            &observed.machines,
            the_plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::CreateMachine { .. })),
            chrono::Utc::now().timestamp_millis(),
            ctx.converge_interval,
            ctx.start_times.expected(),
        )),
        Some(ActError::Ambiguous { .. }) => Next::after(AFTER_AMBIGUOUS),
        Some(ActError::AppNameTaken) => {
            let stall = Stall {
                reason: reason::APP_NAME_TAKEN.into(),
                message: format!(
                    "Fly app name {app} belongs to another organization; set spec.fly.app to a name that is free on Fly"
                ),
                condition: None,
            };
            return stalled(api, obj, &stored, status, stall, ctx).await;
        }
        Some(ActError::Fly { source, .. })
            if !source.is_retryable()
                && !matches!(
                    source,
                    fly_adapter::client::FlyError::LeaseConflict { .. }
                        | fly_adapter::client::FlyError::Precondition { .. }
                ) =>
        {
            // Fly refused what we asked for (e.g. an invalid config): retrying the same request cannot help.
            let stall = Stall {
                reason: reason::FLY_REJECTED.into(),
                message: format!(
                    "{}; fix the spec and apply again",
                    outcome.error.as_ref().unwrap()
                ),
                condition: None,
            };
            return stalled(api, obj, &stored, status, stall, ctx).await;
        }
        Some(_) => Next::after(ctx.converge_interval.max(Duration::from_secs(1))),
    };
    let act_error = outcome.error.as_ref().map(|e| e.to_string());
    mark_progress(
        &mut status,
        &the_plan,
        &observed.machines,
        act_error.as_deref(),
        generation,
    );
    let mut requeue = requeue;
    if ctx.verify {
        let converged = the_plan.converged() && act_error.is_none();
        // Only a rollout (new config or secrets on the machines) makes the last verification stale. A machine
        // that autostop parked and traffic woke is the same server: verifying it again would wake it again.
        let rollout = the_plan.actions.iter().any(|a| {
            matches!(
                a,
                Action::SetSecrets { .. }
                    | Action::CreateMachine { .. }
                    | Action::UpdateMachine { .. }
            )
        });
        if let Some(retry) = verify(
            &mut status,
            converged,
            rollout,
            rotate,
            &want.url,
            token.as_deref(),
            generation,
        )
        .await
        {
            requeue = Next::after(retry);
        }
    }
    write_status(ctx, api, obj, &stored, &status).await?;
    Ok(requeue)
}

/// After a retry failure, look again after this long.
const VERIFY_RETRY: Duration = Duration::from_secs(30);

/// The MCP handshake through the public URL, once per rollout: a rollout in flight resets `Verified` to Unknown,
/// and a converged deployment whose `Verified` is not true for this generation is verified. Returns a requeue
/// delay when verification failed.
async fn verify(
    status: &mut MCPDeploymentStatus,
    converged: bool,
    rollout: bool,
    token_rotated: bool,
    url: &str,
    token: Option<&str>,
    generation: Option<i64>,
) -> Option<Duration> {
    if rollout {
        status.set_condition(crate::api::Condition::new(
            ConditionType::Verified,
            crate::api::ConditionStatus::Unknown,
            reason::VERIFICATION_PENDING,
            "the endpoint is verified once every machine runs the current spec",
            generation,
        ));
        return None;
    }
    if !converged {
        return None;
    }
    let current = status.condition(ConditionType::Verified);
    if !token_rotated && current.is_some_and(|c| c.is_true() && c.observed_generation == generation)
    {
        return None;
    }
    match crate::bridge::verify(url, token).await {
        Ok(info) => {
            let message = format!(
                "{} {} speaks MCP {} and offers {} tool(s)",
                info.name,
                info.version,
                info.protocol_version,
                info.tools.len()
            );
            status.server = Some(crate::api::ServerInfo {
                name: Some(info.name),
                version: Some(info.version),
                protocol_version: Some(info.protocol_version),
                tools: info.tools,
            });
            status.set_condition(condition(
                ConditionType::Verified,
                true,
                reason::HANDSHAKE_SUCCEEDED,
                message,
                generation,
            ));
            None
        }
        Err(e) => {
            let message =
                format!("{e}; the machines run but the endpoint does not answer MCP; retrying");
            status.set_condition(condition(
                ConditionType::Verified,
                false,
                reason::HANDSHAKE_FAILED,
                &message,
                generation,
            ));
            status.set_condition(condition(
                ConditionType::Ready,
                false,
                reason::HANDSHAKE_FAILED,
                &message,
                generation,
            ));
            status.phase = Some(Phase::Degraded);
            Some(VERIFY_RETRY)
        }
    }
}

async fn stalled(
    api: &Api<MCPDeployment>,
    obj: &MCPDeployment,
    stored: &MCPDeploymentStatus,
    mut status: MCPDeploymentStatus,
    stall: Stall,
    ctx: &Context,
) -> Result<Next, Error> {
    let newly = stored
        .condition(ConditionType::Stalled)
        .map(|c| c.reason.as_str())
        != Some(stall.reason.as_str());
    warn!(reason = %stall.reason, message = %stall.message, "stalled");
    mark_stalled(&mut status, &stall, obj.metadata.generation);
    write_status(ctx, api, obj, stored, &status).await?;
    if newly {
        ctx.publish(obj, EventType::Warning, &stall.reason, &stall.message)
            .await;
    }
    // Only a change to the resource (or what it references, which requeues it) can unblock it.
    Ok(Next::on_change())
}

/// Writes status with server-side apply, and only when it changed: idle deployments cause no writes.
async fn write_status(
    ctx: &Context,
    api: &Api<MCPDeployment>,
    obj: &MCPDeployment,
    stored: &MCPDeploymentStatus,
    status: &MCPDeploymentStatus,
) -> Result<(), Error> {
    if obj.status.is_some() && stored == status {
        return Ok(());
    }
    let patch =
        json!({"apiVersion": "mcpfly.dev/v1alpha1", "kind": "MCPDeployment", "status": status});
    let written = api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    ctx.settled.wrote_status(obj, &written);
    Ok(())
}

fn generate_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

pub(super) enum UnsealFailure {
    Transient(String),
    Stall(Stall),
}

impl Context {
    async fn unseal(
        &self,
        namespace: &str,
        name: &str,
        credentials: &[crate::api::Credential],
    ) -> Result<crate::sealing::unsealer::UnsealedCredentials, UnsealFailure> {
        let refs: Vec<CredentialRef> = credentials
            .iter()
            .map(|c| CredentialRef {
                name: c.name.clone(),
                source: match (&c.sealed, &c.secret_key_ref) {
                    (Some(sealed), _) => CredentialSource::Sealed(sealed.clone()),
                    (None, Some(r)) => CredentialSource::SecretKeyRef {
                        name: r.name.clone(),
                        key: r.key.clone(),
                    },
                    (None, None) => CredentialSource::Sealed(String::new()),
                },
            })
            .collect();
        let ring = self.keyring.read().unwrap().clone();
        let unsealer = Unsealer::new(ring, self.client.clone());
        match unsealer.unseal_credentials(namespace, name, &refs).await {
            Ok(unsealed) => Ok(unsealed),
            Err(e) if e.reason.is_transient() => Err(UnsealFailure::Transient(e.to_string())),
            Err(e) => Err(UnsealFailure::Stall(Stall {
                reason: e.reason.condition_reason().into(),
                message: format!(
                    "{e}; reseal it for {namespace}/{name} (`mcpfly seal`) or fix the reference"
                ),
                condition: Some(ConditionType::CredentialsReady),
            })),
        }
    }

    pub(super) async fn publish(
        &self,
        obj: &MCPDeployment,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

/// The Secret MCP clients read: the URL and, with bearer auth, the token. Owned by the resource.
struct ConnectionSecret {
    namespace: String,
    name: String,
    token: Option<String>,
    url: Option<String>,
    exists: bool,
}

impl ConnectionSecret {
    async fn read(ctx: &Context, namespace: &str, name: &str) -> Result<Self, Error> {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let found = api.get_opt(name).await?;
        let field = |key: &str| -> Option<String> {
            let data = found.as_ref()?.data.as_ref()?;
            String::from_utf8(data.get(key)?.0.clone()).ok()
        };
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
            token: field("token"),
            url: field("url"),
            exists: found.is_some(),
        })
    }

    async fn ensure(
        &self,
        ctx: &Context,
        obj: &MCPDeployment,
        url: &str,
        token: Option<&str>,
    ) -> Result<(), Error> {
        if self.exists && self.url.as_deref() == Some(url) && self.token.as_deref() == token {
            return Ok(());
        }
        let mut data = BTreeMap::from([("url".to_string(), ByteString(url.as_bytes().to_vec()))]);
        if let Some(token) = token {
            data.insert("token".into(), ByteString(token.as_bytes().to_vec()));
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "mcpfly".to_string(),
                )])),
                owner_references: obj.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let mut value =
            serde_json::to_value(&secret).map_err(|e| Error::Internal(e.to_string()))?;
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Secret");
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &self.namespace);
        let written = api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        ctx.settled
            .wrote_secret(&self.namespace, &self.name, written.resource_version());
        Ok(())
    }
}
