//! One reconcile of one `MCPDeployment`: the finalizer and deletion ([`cleanup`]), suspension, then the phases
//! of [`Run::phases`] after the controller's own admission ([`Run::admit`]): gather inputs (source, credentials, endpoint token) → desired → observe → ownership →
//! plan → act → report. Deciding is pure and lives in [`crate::reconcile`]; this file does the I/O.

use std::collections::{BTreeMap, BTreeSet};
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

use super::backoff::{Verdict, classify};
use super::settled::Next;
use super::status::{
    Stall, condition, keep_transition_times, mark_handshake_failed, mark_pending, mark_progress,
    mark_stalled, mark_suspended, review_tools,
};
use super::{Context, Error};
use crate::api::{
    ADOPT_ANNOTATION, APPROVE_TOOLS_ANNOTATION, OPEN_ENDPOINT_ANNOTATION, ROTATE_TOKEN_ANNOTATION,
    reason,
};
use crate::api::{
    Auth, ConditionType, CredentialStatus, DeletionPolicy, FINALIZER, MCPDeployment,
    MCPDeploymentStatus, Phase, RECONCILE_ANNOTATION,
};
use crate::packages::Resolved;
use crate::reconcile::act::{Actor, Outcome};
use crate::reconcile::desired::{
    AUTH_TOKEN_SECRET, DesiredDeployment, Inputs, app_name_for, desired, org_for,
};
use crate::reconcile::observe::{AppKnown, observe};
use crate::reconcile::ownership::{self, Claims, Owned, Proof};
use crate::reconcile::plan::{Action, Blocked, Observed, ObservedApp, Plan, Progress, plan};
use crate::reconcile::policy;
use crate::reconcile::timing::next_look;
use crate::sealing::unsealer::{CredentialRef, CredentialSource, Unsealer};

const FIELD_MANAGER: &str = "mcpfly";
/// While an app is being deleted.
const DELETE_POLL: Duration = Duration::from_secs(2);
/// While our new app is not visible yet (Fly answers 404, then 401, for a while; REALISM.md §1): Fly's sustained
/// rate for Get App on one app, so the look never waits on the client's rate limiter.
const APP_VISIBILITY_POLL: Duration = Duration::from_secs(1);

pub async fn reconcile(obj: Arc<MCPDeployment>, ctx: Arc<Context>) -> Result<Next, Error> {
    let obj = ctx.settled.freshest(obj);
    let namespace = obj.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<MCPDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    if obj.meta().deletion_timestamp.is_some() {
        cleanup(&obj, &api, &ctx).await
    } else {
        ensure_finalizer(&obj, &api).await?;
        apply(&obj, &namespace, &api, &ctx).await
    }
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
        let uid = obj.uid().unwrap_or_default();
        let created = status
            .app_id
            .clone()
            .or_else(|| ctx.in_flight.created_id(&uid, app));
        let forget_app = || {
            ctx.in_flight.forget_app(app);
            ctx.fleet.forget(app);
        };
        if obj.spec.deletion_policy == DeletionPolicy::Delete {
            let observed = match observe(&ctx.fly, app, false, AppKnown::Nothing).await {
                // Deleted while our new app is not visible yet: wait for it, keeping what proves it ours.
                Err(e) if e.is_app_not_visible_yet() => {
                    return Ok(Next::after(APP_VISIBILITY_POLL));
                }
                other => other?,
            };
            // After a restart within Fly's lag our new app answers 404 or 401 to a client that no longer
            // remembers creating it: wait for it rather than leave it on Fly (once we asked Fly to delete it, a
            // 404 is the answer we wait for).
            if matches!(
                observed.app,
                ObservedApp::Missing | ObservedApp::OwnedByOtherOrg
            ) && status.phase != Some(Phase::Deleting)
                && created_moments_ago(&status)
            {
                return Ok(Next::after(ctx.backoff.failed(&uid)));
            }
            forget_app();
            let seen = status.machines.iter().map(|m| m.id.clone()).collect();
            let claims = ownership_claims(obj, app, created.as_deref(), &seen);
            let org = org_for(&obj.spec, &ctx.settings);
            match ownership::prove(app, &org, &observed, &claims) {
                // Gone already (or never ours to find).
                Ok(owned) if owned.proof == Proof::Absent => {}
                // Adopted with machines mcpfly did not create: deleting the app would destroy them. Only our
                // machines go.
                Ok(owned) if !owned.foreign.is_empty() => {
                    for machine in &owned.observed.machines {
                        match ctx.fly.delete_machine(app, &machine.id, true, None).await {
                            Ok(()) => {}
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(Error::Fly(e)),
                        }
                    }
                    ctx.publish(
                        obj,
                        EventType::Warning,
                        "AppLeftAlone",
                        &format!(
                            "destroyed this resource's machines and left Fly app {app} in place: it runs machines \
                             mcpfly did not create ({})",
                            owned.foreign.join(", ")
                        ),
                    )
                    .await;
                    remove_finalizer(obj, api).await?;
                    ctx.forget(obj);
                    return Ok(Next::on_change());
                }
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
                // Someone else's app: only the finalizer is ours to remove.
                Err(blocked) => {
                    ctx.publish(
                        obj,
                        EventType::Warning,
                        "AppLeftAlone",
                        &format!("left Fly app {app} in place: {}", blocked.message),
                    )
                    .await;
                    remove_finalizer(obj, api).await?;
                    ctx.forget(obj);
                    return Ok(Next::on_change());
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
            forget_app();
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

/// Why a reconcile ends before its last phase.
enum Halt {
    /// The user must change something: written as `Stalled`; no retry until the resource changes.
    Stall(Stall),
    /// Retried with backoff; status is not written.
    Retry(Error),
    /// Fly has not caught up with our own change yet: looked at again after this long (the caller's choice:
    /// Fly's pace for a create this process remembers, the resource's backoff otherwise), without a status write.
    NotYet(Duration),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Self {
        Halt::Retry(e)
    }
}

impl From<kube::Error> for Halt {
    fn from(e: kube::Error) -> Self {
        Halt::Retry(e.into())
    }
}

impl From<fly_adapter::client::FlyError> for Halt {
    fn from(e: fly_adapter::client::FlyError) -> Self {
        Halt::Retry(e.into())
    }
}

impl From<Stall> for Halt {
    fn from(stall: Stall) -> Self {
        Halt::Stall(stall)
    }
}

/// One reconcile of a resource that is not being deleted. Its phases, in order (see [`Run::phases`]): gather
/// inputs (source, credentials, endpoint token) → desired → observe → ownership → plan → act → report.
struct Run<'a> {
    obj: &'a MCPDeployment,
    namespace: &'a str,
    name: String,
    uid: String,
    generation: Option<i64>,
    api: &'a Api<MCPDeployment>,
    ctx: &'a Context,
    /// Status as read; written again only when the new one differs.
    stored: MCPDeploymentStatus,
}

/// The credentials to deliver, unsealed into memory only: digests go to status, values only into the Fly
/// secrets call. The endpoint token joins them.
#[derive(Default)]
struct Credentials {
    values: BTreeMap<String, fly_adapter::client::types::SecretValue>,
    digests: BTreeMap<String, String>,
    /// Credential name → the key that unsealed it.
    keys: BTreeMap<String, String>,
}

/// The endpoint token and where it lives.
struct EndpointToken {
    connection: ConnectionSecret,
    /// `None` with `auth: none`.
    value: Option<String>,
    /// A new value of the rotate-token annotation asked for a new token this time.
    rotated: bool,
}

async fn apply(
    obj: &MCPDeployment,
    namespace: &str,
    api: &Api<MCPDeployment>,
    ctx: &Context,
) -> Result<Next, Error> {
    let run = Run {
        obj,
        namespace,
        name: obj.name_any(),
        uid: obj.uid().unwrap_or_default(),
        generation: obj.metadata.generation,
        api,
        ctx,
        stored: obj.status.clone().unwrap_or_default(),
    };
    let mut status = run.stored.clone();
    status.last_handled_reconcile_at = obj
        .annotations()
        .get(RECONCILE_ANNOTATION)
        .cloned()
        .or(run.stored.last_handled_reconcile_at.clone());

    if obj.spec.suspend {
        mark_suspended(&mut status, run.generation);
        run.write_status(&status).await?;
        return Ok(Next::on_change());
    }
    if let Err(stall) = run.admit() {
        return stalled(api, obj, &run.stored, status, stall, ctx).await;
    }
    let Some(app) = run.record_app_name(&mut status).await? else {
        return Ok(Next::after(Duration::ZERO));
    };
    match run.phases(&app, &mut status).await {
        Ok(next) => {
            run.write_status(&status).await?;
            Ok(next)
        }
        Err(Halt::Stall(stall)) => stalled(api, obj, &run.stored, status, stall, ctx).await,
        Err(Halt::Retry(e)) => Err(e),
        Err(Halt::NotYet(after)) => Ok(Next::after(after)),
    }
}

impl Run<'_> {
    /// Every phase of one reconcile, each a function below, in the order they run.
    async fn phases(&self, app: &str, status: &mut MCPDeploymentStatus) -> Result<Next, Halt> {
        // Gather inputs.
        let resolved = self.resolve_source(status).await?;
        let mut credentials = self.unseal_credentials(status).await?;
        let token = self.endpoint_token(status, &mut credentials).await?;

        let want = self.desired(app, &resolved, &credentials, status);
        let observed = self.observe(app).await?;
        // From here on only what is proven ours is looked at: `owned.observed` holds our machines only.
        let owned = self.prove_ownership(app, &want, &observed, status).await?;
        let the_plan = self.plan(app, &want, &owned.observed);
        let outcome = self
            .act(
                app,
                &want,
                &owned.observed,
                &the_plan,
                &credentials,
                &token,
                status,
            )
            .await?;
        Ok(self
            .report(status, &want, &owned.observed, &the_plan, &outcome, &token)
            .await)
    }

    /// The controller's allowlists, before anything is recorded or asked of Fly (see [`policy`]).
    fn admit(&self) -> Result<(), Stall> {
        let acknowledged = policy::Acknowledgements {
            open_endpoint: self
                .obj
                .annotations()
                .get(OPEN_ENDPOINT_ANNOTATION)
                .is_some_and(|v| v == "true"),
        };
        policy::admit(
            &self.obj.spec,
            self.namespace,
            acknowledged,
            &self.ctx.policy,
        )
        .map_err(blocked_stall)
    }

    /// The app name goes into status before the app exists: whatever happens next, we know what we may own.
    /// `None` when it was just recorded (the reconcile continues from the write's echo).
    async fn record_app_name(
        &self,
        status: &mut MCPDeploymentStatus,
    ) -> Result<Option<String>, Error> {
        let app = self.stored.app.clone().unwrap_or_else(|| {
            app_name_for(
                &self.obj.spec,
                &self.ctx.settings,
                self.namespace,
                &self.name,
            )
        });
        if self.stored.app.as_deref() == Some(app.as_str()) {
            return Ok(Some(app));
        }
        mark_pending(status, &app, self.generation);
        self.write_status(status).await?;
        Ok(None)
    }

    /// Source: pinned once and recorded in status; a registry is asked again only when the spec's source
    /// changes or the force-reconcile annotation asks, so a reboot never changes what runs.
    async fn resolve_source(&self, status: &mut MCPDeploymentStatus) -> Result<Resolved, Halt> {
        let force = crate::packages::force_requested(
            self.obj
                .annotations()
                .get(RECONCILE_ANNOTATION)
                .map(String::as_str),
            self.stored.last_handled_reconcile_at.as_deref(),
        );
        let pinned = match crate::packages::resolve_pinned(
            &*self.ctx.resolver,
            &self.obj.spec.source,
            &self.stored,
            force,
        )
        .await
        {
            Ok(pinned) => pinned,
            Err(e) if e.transient => return Err(Halt::Retry(Error::Resolve(e))),
            Err(e) => {
                return Err(Halt::Stall(Stall {
                    reason: e.reason.into(),
                    message: e.message.clone(),
                    condition: Some(ConditionType::SourceResolved),
                }));
            }
        };
        pinned.record(status);
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
                self.generation,
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
                    self.generation,
                ));
                self.ctx
                    .publish(self.obj, EventType::Warning, warnings[0].reason, &message)
                    .await;
            }
        }
        Ok(resolved)
    }

    /// Credentials: unsealed only into memory.
    async fn unseal_credentials(
        &self,
        status: &mut MCPDeploymentStatus,
    ) -> Result<Credentials, Halt> {
        let unsealed = match self
            .ctx
            .unseal(self.namespace, &self.name, &self.obj.spec.credentials)
            .await
        {
            Ok(unsealed) => unsealed,
            Err(UnsealFailure::Transient(message)) => {
                return Err(Halt::Retry(Error::Credentials(message)));
            }
            Err(UnsealFailure::Stall(stall)) => return Err(Halt::Stall(stall)),
        };
        let mut credentials = Credentials::default();
        for credential in &unsealed.credentials {
            credentials.values.insert(
                credential.name.clone(),
                fly_adapter::client::types::SecretValue::new(credential.value.expose()),
            );
            credentials
                .digests
                .insert(credential.name.clone(), credential.digest.clone());
            if let crate::sealing::unsealer::UnsealedFrom::Sealed { key_id, .. } =
                &credential.source
            {
                credentials
                    .keys
                    .insert(credential.name.clone(), key_id.as_str().to_string());
            }
        }
        status.set_condition(condition(
            ConditionType::CredentialsReady,
            true,
            reason::UNSEALED,
            format!("{} credential(s) ready", unsealed.credentials.len()),
            self.generation,
        ));
        Ok(credentials)
    }

    /// The endpoint token lives in the connection Secret, the one place MCP clients read it from; it is
    /// delivered to Fly with the credentials.
    async fn endpoint_token(
        &self,
        status: &mut MCPDeploymentStatus,
        credentials: &mut Credentials,
    ) -> Result<EndpointToken, Halt> {
        let connection = ConnectionSecret::read(self.ctx, self.obj, self.namespace).await?;
        // A new value of the rotate-token annotation replaces the token; otherwise the stored one stands.
        let rotation = self.obj.annotations().get(ROTATE_TOKEN_ANNOTATION).cloned();
        let rotated = rotation.is_some() && rotation != self.stored.token_rotation;
        let value = match self.obj.spec.access.auth {
            Auth::Bearer => Some(match (&connection.token, rotated) {
                (Some(existing), false) => existing.clone(),
                _ => generate_token(),
            }),
            // No static token: OAuth access tokens come from the authorization server.
            Auth::None | Auth::OAuth => None,
        };
        status.token_rotation = rotation.or(self.stored.token_rotation.clone());
        if let Some(token) = &value {
            let secret = crate::sealing::SecretValue::new(token.clone());
            credentials.digests.insert(
                AUTH_TOKEN_SECRET.to_string(),
                crate::sealing::credential_digest(AUTH_TOKEN_SECRET, &secret),
            );
            credentials.values.insert(
                AUTH_TOKEN_SECRET.to_string(),
                fly_adapter::client::types::SecretValue::new(token.clone()),
            );
        }
        Ok(EndpointToken {
            connection,
            value,
            rotated,
        })
    }

    /// What Fly should look like (pure, see [`desired`]).
    fn desired(
        &self,
        app: &str,
        resolved: &Resolved,
        credentials: &Credentials,
        status: &mut MCPDeploymentStatus,
    ) -> DesiredDeployment {
        let inputs = Inputs {
            namespace: self.namespace,
            name: &self.name,
            uid: &self.uid,
            spec: &self.obj.spec,
            resolved,
            secrets: credentials.digests.clone(),
            approved_tools: status.tools.as_ref().and_then(|t| t.approved.as_ref()),
        };
        let mut want = desired(&inputs, &self.ctx.settings);
        want.app = app.to_string();
        status.url = Some(want.url.clone());
        want
    }

    /// What Fly has, in as few calls as this process's memory allows.
    async fn observe(&self, app: &str) -> Result<Observed, Halt> {
        let ctx = self.ctx;
        let ready_for_generation = self.stored.phase == Some(Phase::Ready)
            && self.stored.observed_generation == self.generation;
        let with_ips = !ready_for_generation && !ctx.in_flight.ips_known(app, self.generation);
        let observed = match observe(
            &ctx.fly,
            app,
            with_ips,
            ctx.in_flight.app_known(&self.uid, app),
        )
        .await
        {
            // Our own new app, not visible yet: nothing else can be done in it before it is.
            Err(e) if e.is_app_not_visible_yet() => return Err(Halt::NotYet(APP_VISIBILITY_POLL)),
            other => other?,
        };
        if matches!(observed.app, ObservedApp::Present { .. }) {
            ctx.in_flight.note_seen(app);
        }
        // Status says we created the app moments ago, yet Fly answers 401: the process restarted within Fly's lag
        // and the client no longer remembers the create. Names are global and we hold this app's id, so it is
        // ours, not yet visible: looked at again after the resource's backoff. Past the window, a 401 stalls as
        // someone else's.
        if observed.app == ObservedApp::OwnedByOtherOrg && created_moments_ago(&self.stored) {
            return Err(Halt::NotYet(ctx.backoff.failed(&self.uid)));
        }
        if observed.app == ObservedApp::Missing {
            ctx.in_flight.forget_known_app(app);
        }
        // Our own creates the list does not show yet are looked up by id: one that is gone (Fly destroys a new
        // machine whose launch failed) is forgotten, so it is created again instead of waited for. One that
        // exists keeps the planner waiting for the list, which is what the rest of the plan is built on.
        for (name, id) in ctx.in_flight.unlisted_creates(app, &observed.machines) {
            match ctx.fly.get_machine(app, &id).await {
                Ok(m) if crate::reconcile::plan::is_gone(&m) => {
                    ctx.in_flight.forget_create(app, &name)
                }
                Err(fly_adapter::client::FlyError::NotFound { .. }) => {
                    ctx.in_flight.forget_create(app, &name)
                }
                _ => {}
            }
        }
        ctx.fleet.observed(app, &observed.machines);
        ctx.start_times.learn(&observed.machines);
        Ok(observed)
    }

    /// Nothing on Fly is changed unless it is proven ours (see [`ownership`]). The app's id is recorded with
    /// the first proof, so from then on the id alone proves it.
    async fn prove_ownership(
        &self,
        app: &str,
        want: &DesiredDeployment,
        observed: &Observed,
        status: &mut MCPDeploymentStatus,
    ) -> Result<Owned, Stall> {
        let seen = self.stored.machines.iter().map(|m| m.id.clone()).collect();
        let created = self
            .stored
            .app_id
            .clone()
            .or_else(|| self.ctx.in_flight.created_id(&self.uid, app));
        let claims = ownership_claims(self.obj, app, created.as_deref(), &seen);
        let owned = ownership::prove(app, &want.org, observed, &claims).map_err(blocked_stall)?;
        if let ObservedApp::Present { id, .. } = &observed.app
            && !id.is_empty()
        {
            status.app_id = Some(id.clone());
        }
        if owned.proof == Proof::Adopted && self.stored.app_id.is_none() {
            let note = format!(
                "adopted Fly app {app} as {ADOPT_ANNOTATION} asks; machines mcpfly did not create are left alone: {}",
                if owned.foreign.is_empty() {
                    "none".to_string()
                } else {
                    owned.foreign.join(", ")
                }
            );
            self.ctx
                .publish(self.obj, EventType::Normal, "AppAdopted", &note)
                .await;
        }
        Ok(owned)
    }

    /// The actions that get there (pure, see [`plan`]).
    fn plan(&self, app: &str, want: &DesiredDeployment, observed: &Observed) -> Plan {
        let progress = Progress {
            applied_secrets: self
                .stored
                .credentials
                .iter()
                .map(|c| (c.name.clone(), c.digest.clone()))
                .collect(),
            leased: self.ctx.in_flight.leased_machines(app),
            unconfirmed_creates: self
                .ctx
                .in_flight
                .unconfirmed_creates(app, &observed.machines),
        };
        plan(want, observed, &progress)
    }

    /// Carries out the plan: the connection Secret first, then Fly. What was done is announced as events and
    /// recorded in status even when a later action failed; a failure the user must fix stalls.
    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        app: &str,
        want: &DesiredDeployment,
        observed: &Observed,
        the_plan: &Plan,
        credentials: &Credentials,
        token: &EndpointToken,
        status: &mut MCPDeploymentStatus,
    ) -> Result<Outcome, Halt> {
        let ctx = self.ctx;
        // The connection Secret is the token's one home: written before Fly receives it, so a retry after any
        // failure converges on the same token. (During a rotation clients may see the new token a moment
        // before the machines accept it.)
        token
            .connection
            .ensure(
                ctx,
                self.obj,
                &want.url,
                token.value.as_deref(),
                self.obj
                    .spec
                    .access
                    .oauth_issuers()
                    .and_then(|issuers| issuers.into_iter().next())
                    .as_deref(),
            )
            .await?;

        let actor = Actor {
            fly: &ctx.fly,
            app,
            in_flight: &ctx.in_flight,
            secret_values: &credentials.values,
            desired_secrets: &credentials.digests,
            secrets_version: self.stored.secrets_version.map(|v| v as u64),
            lease_owner: &ctx.identity,
        };
        // The app's id is recorded the moment our create returns it, before anything else happens in the app:
        // it is the proof that the app is ours.
        let (create, rest) = match the_plan.actions.split_first() {
            Some((first @ Action::CreateApp { .. }, rest)) => (std::slice::from_ref(first), rest),
            _ => (&[][..], &the_plan.actions[..]),
        };
        let mut outcome = actor.run(create).await;
        if let Some(id) = outcome.created_app_id.clone() {
            ctx.in_flight.note_created(&self.uid, app, &id);
            status.app_id = Some(id);
            self.write_status(status).await?;
        } else if outcome.error.is_none() {
            // A new app is not visible for a while (REALISM.md §1): the rest of the plan waits for the reconcile
            // that sees it (see `report`), so no worker sits through Fly's lag.
            outcome = outcome.then(actor.run(rest).await);
            if outcome.error.is_none() {
                // The app is in our org, and its IPs are complete if they were looked at (or just assigned).
                ctx.in_flight.note_app(
                    app,
                    observed.ips.is_some().then_some(self.generation).flatten(),
                );
            }
        }
        for (reason, note) in &outcome.done {
            info!(reason, note, "changed on Fly");
            ctx.publish(self.obj, EventType::Normal, reason, note).await;
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
                    key: credentials.keys.get(name).cloned(),
                })
                .collect();
        } else {
            // Report which key unsealed each credential that is already delivered (rotation visibility).
            for entry in &mut status.credentials {
                if credentials.digests.get(&entry.name) == Some(&entry.digest) {
                    entry.key = credentials.keys.get(&entry.name).cloned();
                }
            }
        }
        // Only what a person must fix stalls; every other failure is retried after the resource's backoff.
        match outcome.error.as_ref().map(|e| classify(e, app)) {
            Some(Verdict::Stall { reason, message }) => Err(Halt::Stall(Stall {
                reason: reason.into(),
                message,
                condition: None,
            })),
            _ => Ok(outcome),
        }
    }

    /// Status from what was planned and done, verification of a converged endpoint, and when to look again.
    async fn report(
        &self,
        status: &mut MCPDeploymentStatus,
        want: &DesiredDeployment,
        observed: &Observed,
        the_plan: &Plan,
        outcome: &Outcome,
        token: &EndpointToken,
    ) -> Next {
        let ctx = self.ctx;
        let app = want.app.as_str();
        let mut retrying = false;
        let mut act_error = None;
        let mut requeue = match &outcome.error {
            None if the_plan.converged() => Next::after(ctx.ready_requeue()),
            // Just created: the rest of the plan once Fly shows the app.
            None if outcome.created_app_id.is_some() => Next::after(APP_VISIBILITY_POLL),
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
            // Every failure waits out this resource's backoff (stalls ended the reconcile in `act`). The
            // message names the call and Fly's status only, so a retry does not rewrite status.
            Some(error) => {
                warn!(error = %error, "Fly call failed; retrying");
                if let Verdict::Retry { message } = classify(error, app) {
                    act_error = Some(message);
                }
                retrying = true;
                Next::after(ctx.backoff.failed(&self.uid))
            }
        };
        mark_progress(
            status,
            the_plan,
            &observed.machines,
            act_error.as_deref(),
            self.generation,
        );
        if ctx.verify {
            let converged = the_plan.converged() && act_error.is_none();
            // Only a rollout (new config or secrets on the machines) makes the last verification stale. A
            // machine that autostop parked and traffic woke is the same server: verifying it again would wake
            // it again.
            let rollout = the_plan.actions.iter().any(|a| {
                matches!(
                    a,
                    Action::SetSecrets { .. }
                        | Action::CreateMachine { .. }
                        | Action::UpdateMachine { .. }
                )
            });
            match verify(
                status,
                converged,
                rollout,
                token.rotated,
                &want.url,
                match &self.obj.spec.access.oauth_issuers() {
                    Some(issuers) => Caller::OAuth(issuers.clone()),
                    None => Caller::Token(token.value.as_deref()),
                },
                self.generation,
            )
            .await
            {
                Handshake::NotFailed => {}
                Handshake::Failed => {
                    retrying = true;
                    requeue = Next::after(ctx.backoff.failed(&self.uid));
                }
                Handshake::Unprotected => requeue = Next::on_change(),
            }
            self.review_tools(status).await;
        }
        if !retrying {
            ctx.backoff.succeeded(&self.uid);
        }
        requeue
    }

    /// `ToolsChanged` against the approvals, with an Event when the server's tools newly differ from them.
    async fn review_tools(&self, status: &mut MCPDeploymentStatus) {
        let spec = &self.obj.spec;
        let annotation = self.obj.annotations().get(APPROVE_TOOLS_ANNOTATION);
        let approvals: Vec<&str> = [spec.tools.pinned.as_ref(), annotation]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let mode =
            crate::bridge::tools_policy::effective_mode(spec, self.ctx.settings.tools_policy);
        review_tools(status, &self.name, &approvals, mode, self.generation);
        let before = self.stored.condition(ConditionType::ToolsChanged);
        if let Some(now) = status.condition(ConditionType::ToolsChanged)
            && before.is_none_or(|b| b.status != now.status || b.message != now.message)
        {
            let type_ = if now.is_true() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            // One event per tool set seen: the set's digest is the action (see `publish_action`).
            let action = status
                .tools
                .as_ref()
                .map(|t| format!("ReviewTools {}", t.observed.digest))
                .unwrap_or_default();
            self.ctx
                .publish_action(self.obj, type_, &now.reason, &action, &now.message)
                .await;
        }
    }

    async fn write_status(&self, status: &MCPDeploymentStatus) -> Result<(), Error> {
        write_status(self.ctx, self.api, self.obj, &self.stored, status).await
    }
}

/// Whether `status` shows an app our create made within Fly's visibility window: the id our create returned is
/// recorded, no machine was seen in the app, and the resource has not been Ready since the create began (Ready
/// turned false no longer ago than the window). Across a restart this is all that tells Fly's lag apart from a
/// missing app or another org's.
fn created_moments_ago(status: &MCPDeploymentStatus) -> bool {
    let not_ready_since = status
        .condition(ConditionType::Ready)
        .filter(|ready| !ready.is_true())
        .and_then(|ready| ready.last_transition_time.as_ref());
    status.app_id.is_some()
        && status.machines.is_empty()
        && not_ready_since.is_some_and(|since| {
            let seconds = k8s_openapi::jiff::Timestamp::now().as_second() - since.0.as_second();
            seconds < fly_adapter::client::APP_VISIBILITY_WINDOW.as_secs() as i64
        })
}

/// What `obj` knows that can prove `app` its own.
fn ownership_claims<'a>(
    obj: &'a MCPDeployment,
    app: &str,
    created_id: Option<&'a str>,
    seen_machines: &'a BTreeSet<String>,
) -> Claims<'a> {
    Claims {
        owner_uid: obj.metadata.uid.as_deref().unwrap_or_default(),
        created_id,
        adopt: obj
            .annotations()
            .get(ADOPT_ANNOTATION)
            .is_some_and(|named| named == app),
        derived_name: obj.spec.fly.app.as_deref().is_none_or(str::is_empty),
        seen_machines,
    }
}

fn blocked_stall(blocked: Blocked) -> Stall {
    Stall {
        reason: blocked.reason.into(),
        message: blocked.message,
        condition: None,
    }
}

#[derive(PartialEq, Eq)]
enum Handshake {
    /// Done now, done before, or not due yet.
    NotFailed,
    /// Recorded in status; retried after the resource's backoff.
    Failed,
    /// With `auth: bearer` the endpoint answered without the token: stalled until the resource changes.
    Unprotected,
}

/// How the verification reaches the endpoint.
enum Caller<'a> {
    /// With the endpoint token (`auth: bearer`), or none (`auth: none`).
    Token(Option<&'a str>),
    /// `auth: oauth`, advertising these authorization servers: no token to call with.
    OAuth(Vec<String>),
}

/// The MCP handshake through the public URL, once per rollout: a rollout in flight resets `Verified` to Unknown,
/// and a converged deployment whose `Verified` is not true for this generation is verified.
async fn verify(
    status: &mut MCPDeploymentStatus,
    converged: bool,
    rollout: bool,
    token_rotated: bool,
    url: &str,
    caller: Caller<'_>,
    generation: Option<i64>,
) -> Handshake {
    if rollout {
        status.set_condition(crate::api::Condition::new(
            ConditionType::Verified,
            crate::api::ConditionStatus::Unknown,
            reason::VERIFICATION_PENDING,
            "the endpoint is verified once every machine runs the current spec",
            generation,
        ));
        return Handshake::NotFailed;
    }
    if !converged {
        return Handshake::NotFailed;
    }
    let current = status.condition(ConditionType::Verified);
    if !token_rotated && current.is_some_and(|c| c.is_true() && c.observed_generation == generation)
    {
        return Handshake::NotFailed;
    }
    let token = match caller {
        Caller::OAuth(issuers) => return verify_oauth(status, url, &issuers, generation).await,
        Caller::Token(token) => token,
    };
    match crate::bridge::verify(url, token).await {
        Ok(info) => {
            // Answering with the token proves little if it answers without one too (nothing fronts an image).
            if token.is_some()
                && let Some(message) = open_despite_bearer(url).await
            {
                // The image must change: a person's job, so it stalls (GitOps tools then report it).
                let stall = Stall {
                    reason: reason::ENDPOINT_UNAUTHENTICATED.into(),
                    message,
                    condition: Some(ConditionType::Verified),
                };
                mark_stalled(status, &stall, generation);
                return Handshake::Unprotected;
            }
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
            let approved = status.tools.take().and_then(|t| t.approved);
            status.tools = Some(crate::api::ToolsStatus {
                observed: info.tool_set,
                approved,
            });
            status.set_condition(condition(
                ConditionType::Verified,
                true,
                reason::HANDSHAKE_SUCCEEDED,
                message,
                generation,
            ));
            Handshake::NotFailed
        }
        Err(e) => {
            let message =
                format!("{e}; the machines run but the endpoint does not answer MCP; retrying");
            mark_handshake_failed(status, &message, generation);
            Handshake::Failed
        }
    }
}

/// `auth: oauth`: no token to handshake with, so the check is what a chat client sees first — 401 with a
/// challenge naming the metadata, and metadata naming the configured authorization servers.
async fn verify_oauth(
    status: &mut MCPDeploymentStatus,
    url: &str,
    issuers: &[String],
    generation: Option<i64>,
) -> Handshake {
    match crate::bridge::verify_oauth(url, issuers).await {
        Ok(endpoint) => {
            status.set_condition(condition(
                ConditionType::Verified,
                true,
                reason::OAUTH_DISCOVERY_SERVED,
                format!(
                    "the endpoint refuses calls without a token (401) and {} names authorization server(s) {}",
                    endpoint.metadata_url,
                    endpoint.authorization_servers.join(", ")
                ),
                generation,
            ));
            Handshake::NotFailed
        }
        Err(e) => {
            let message = format!(
                "{e}; the machines run but OAuth clients could not find their way in; retrying"
            );
            mark_handshake_failed(status, &message, generation);
            Handshake::Failed
        }
    }
}

/// With `access.auth: bearer`, why the endpoint is not protected: it did not refuse an unauthenticated
/// `initialize`. `None` when it refused (401/403).
async fn open_despite_bearer(url: &str) -> Option<String> {
    match crate::bridge::unauthenticated_status(url).await {
        Ok(code) => unauthenticated_answer(code),
        // Unreachable without credentials is not open; the handshake above reached it.
        Err(_) => None,
    }
}

fn unauthenticated_answer(code: u16) -> Option<String> {
    (!matches!(code, 401 | 403)).then(|| {
        format!(
            "the endpoint answered an MCP initialize without a token with HTTP {code}, not 401: access.auth is \
             bearer but anyone who knows the URL can call it. An image source must itself require \
             `Authorization: Bearer` with the token in MCP_AUTH_TOKEN"
        )
    })
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
    let mut status = status.clone();
    keep_transition_times(&mut status, stored);
    if obj.status.is_some() && *stored == status {
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
        self.publish_action(obj, type_, reason, "Reconcile", note)
            .await
    }

    /// [`Self::publish`] with its own action. The recorder folds events of equal type, reason and action into
    /// one series that keeps the first note, so events whose note is the news (a new tool diff) need an action
    /// of their own.
    pub(super) async fn publish_action(
        &self,
        obj: &MCPDeployment,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

/// The Secret MCP clients read: the URL and, with bearer auth, the token. Written only when absent or already
/// controlled by this resource (its controller ownerReference carries our UID); a token is read only from such
/// a Secret.
struct ConnectionSecret {
    namespace: String,
    name: String,
    token: Option<String>,
    url: Option<String>,
    /// `auth: oauth`: the authorization server clients sign in with.
    issuer: Option<String>,
    exists: bool,
}

impl ConnectionSecret {
    async fn read(ctx: &Context, obj: &MCPDeployment, namespace: &str) -> Result<Self, Halt> {
        let name = obj.connection_secret_name();
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
        let found = api.get_opt(&name).await?;
        if let Some(secret) = &found
            && !controlled_by(secret, obj)
        {
            return Err(Halt::Stall(Stall {
                reason: reason::CONNECTION_SECRET_NOT_OWNED.into(),
                message: format!(
                    "Secret {name} exists and is not controlled by this MCPDeployment (someone else's, or another \
                     resource's connection Secret); it was neither read nor written. Set \
                     spec.access.connectionSecret to a name no other object uses, or delete that Secret if it \
                     is stale"
                ),
                condition: None,
            }));
        }
        let field = |key: &str| -> Option<String> {
            let data = found.as_ref()?.data.as_ref()?;
            String::from_utf8(data.get(key)?.0.clone()).ok()
        };
        Ok(Self {
            namespace: namespace.into(),
            name,
            token: field("token"),
            url: field("url"),
            issuer: field("issuer"),
            exists: found.is_some(),
        })
    }

    async fn ensure(
        &self,
        ctx: &Context,
        obj: &MCPDeployment,
        url: &str,
        token: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<(), Error> {
        if self.exists
            && self.url.as_deref() == Some(url)
            && self.token.as_deref() == token
            && self.issuer.as_deref() == issuer
        {
            return Ok(());
        }
        let mut data = BTreeMap::from([("url".to_string(), ByteString(url.as_bytes().to_vec()))]);
        if let Some(token) = token {
            data.insert("token".into(), ByteString(token.as_bytes().to_vec()));
        }
        if let Some(issuer) = issuer {
            data.insert("issuer".into(), ByteString(issuer.as_bytes().to_vec()));
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
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &self.namespace);
        let written = if self.exists {
            let mut value =
                serde_json::to_value(&secret).map_err(|e| Error::Internal(e.to_string()))?;
            value["apiVersion"] = json!("v1");
            value["kind"] = json!("Secret");
            api.patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?
        } else {
            // A create, not an apply: if someone else made the Secret since it was read, this fails (409) and
            // the retry finds it not ours, instead of overwriting it.
            api.create(
                &kube::api::PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &secret,
            )
            .await?
        };
        ctx.settled
            .wrote_secret(&self.namespace, &self.name, written.resource_version());
        Ok(())
    }
}

/// The Secret's controller ownerReference is this resource (by UID: a namesake recreated later is not it).
fn controlled_by(secret: &Secret, obj: &MCPDeployment) -> bool {
    let uid = obj.metadata.uid.as_deref();
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

#[cfg(test)]
mod tests {
    use super::unauthenticated_answer;

    #[test]
    fn only_a_refusal_proves_an_endpoint_requires_its_token() {
        assert_eq!(unauthenticated_answer(401), None);
        assert_eq!(unauthenticated_answer(403), None);
        for open in [200, 202, 400, 404, 500] {
            let message = unauthenticated_answer(open).expect("not proven protected");
            assert!(message.contains(&format!("HTTP {open}")), "{message}");
        }
    }
}
