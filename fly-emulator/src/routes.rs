//! HTTP front of the emulator: one dispatcher that parses the path into an endpoint label first, so
//! auth, rate limiting, fault injection, counting and logging are done once for every endpoint.

use super::state::{ApiErr, Ctx, Res, WaitCheck};
use super::{EventRecord, Shared};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use fly_adapter::token_bucket::{TokenBucket, bucket_identity, is_mutation};
use http::{HeaderValue, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let public = shared.cfg.driver.public_router();
    let api = Router::new().fallback(handle).with_state(shared);
    match public {
        Some(public) => public.merge(api),
        None => api,
    }
}

/// (endpoint label, app, machine, extra path segment) of an API path below `/v1`.
fn route(
    method: &str,
    segs: &[&str],
) -> (&'static str, Option<String>, Option<String>, Option<String>) {
    let s = |i: usize| segs.get(i).map(|x| x.to_string());
    let label = match (method, segs) {
        ("GET", ["apps"]) => "apps.list",
        ("POST", ["apps"]) => "apps.create",
        ("GET", ["apps", _]) => "apps.get",
        ("DELETE", ["apps", _]) => "apps.delete",
        ("GET", ["apps", _, "machines"]) => "machines.list",
        ("POST", ["apps", _, "machines"]) => "machines.create",
        ("GET", ["apps", _, "machines", _]) => "machines.get",
        ("POST", ["apps", _, "machines", _]) => "machines.update",
        ("DELETE", ["apps", _, "machines", _]) => "machines.delete",
        ("POST", ["apps", _, "machines", _, "start"]) => "machines.start",
        ("POST", ["apps", _, "machines", _, "stop"]) => "machines.stop",
        ("POST", ["apps", _, "machines", _, "restart"]) => "machines.restart",
        ("POST", ["apps", _, "machines", _, "suspend"]) => "machines.suspend",
        ("POST", ["apps", _, "machines", _, "cordon"]) => "machines.cordon",
        ("POST", ["apps", _, "machines", _, "uncordon"]) => "machines.uncordon",
        ("GET", ["apps", _, "machines", _, "wait"]) => "machines.wait",
        ("GET", ["apps", _, "machines", _, "events"]) => "machines.events",
        ("POST", ["apps", _, "machines", _, "lease"]) => "leases.acquire",
        ("GET", ["apps", _, "machines", _, "lease"]) => "leases.get",
        ("DELETE", ["apps", _, "machines", _, "lease"]) => "leases.release",
        ("GET", ["apps", _, "machines", _, "metadata"]) => "metadata.get",
        ("POST", ["apps", _, "machines", _, "metadata", _]) => "metadata.set",
        ("DELETE", ["apps", _, "machines", _, "metadata", _]) => "metadata.delete",
        ("GET", ["apps", _, "secrets"]) => "secrets.list",
        ("POST", ["apps", _, "secrets"]) => "secrets.set",
        ("POST", ["apps", _, "secrets", _]) => "secrets.set_one",
        ("DELETE", ["apps", _, "secrets", _]) => "secrets.delete_one",
        ("GET", ["apps", _, "ip_assignments"]) => "ips.list",
        ("POST", ["apps", _, "ip_assignments"]) => "ips.assign",
        ("DELETE", ["apps", _, "ip_assignments", _]) => "ips.delete",
        ("GET", ["platform", "regions"]) => "regions.list",
        ("GET", ["orgs", _, "machines"]) => "orgs.machines",
        _ => "unknown",
    };
    match segs {
        ["apps", _, "machines", _, rest @ ..] => (
            label,
            s(1),
            s(3),
            rest.get(1).or(rest.first()).map(|x| x.to_string()),
        ),
        ["apps", _, _, x] => (label, s(1), None, Some(x.to_string())),
        ["apps", ..] => (label, s(1), None, None),
        ["orgs", org, ..] => (label, None, None, Some(org.to_string())),
        _ => (label, None, None, None),
    }
}

fn json_response(status: u16, body: &Value, request_id: &str) -> Response {
    let mut r = if body.is_null() && matches!(status, 202 | 204) {
        Response::new(Body::empty())
    } else {
        let mut r = Response::new(Body::from(body.to_string()));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("fly-request-id", v);
    }
    r
}

/// flyd's answer when the machine's host cannot reserve what the change needs.
const NO_CAPACITY_MESSAGE: &str =
    "could not reserve resource for machine: insufficient memory available to fulfill request";

fn err_response(e: &ApiErr, request_id: &str) -> Response {
    json_response(e.status, &e.body(), request_id)
}

/// A response whose body fails mid-stream: the client sees the connection drop.
fn reset_response(request_id: &str) -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection reset by emulator"))
    });
    let mut r = Response::new(Body::from_stream(stream));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("fly-request-id", v);
    }
    r
}

fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

fn q<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

fn q_bool(pairs: &[(String, String)], k: &str) -> bool {
    matches!(q(pairs, k), Some("true" | "1"))
}

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    if let Some(rest) = path.strip_prefix("/__emulator/") {
        return admin(&sh, parts.method.as_str(), rest, &body);
    }
    let method = parts.method.as_str().to_string();
    let pairs = query_pairs(&parts.uri);
    let now = sh.clock.now();
    let request_id = format!("emu-{}", super::state_request_id(sh.clock.wall_ms(now)));
    let segs: Vec<&str> = path
        .strip_prefix("/v1")
        .unwrap_or("")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (label, app, machine, extra) = route(&method, &segs);

    let finish = |status: u16, resp: Response| {
        *sh.counters
            .lock()
            .expect("poisoned")
            .entry((label.to_string(), status))
            .or_default() += 1;
        let mut ev = sh.events.lock().expect("poisoned");
        if ev.len() >= sh.cfg.event_log_capacity {
            ev.pop_front();
        }
        ev.push_back(EventRecord {
            time_ms: sh.clock.wall_ms(sh.clock.now()),
            method: method.clone(),
            path: match parts.uri.query() {
                Some(qs) => format!("{path}?{qs}"),
                None => path.clone(),
            },
            label: label.to_string(),
            status,
            app: app.clone(),
            machine: machine.clone(),
            request_id: request_id.clone(),
        });
        resp
    };

    // Auth: the token decides the org.
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim_start_matches("Bearer ")
                .trim_start_matches("FlyV1 ")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let Some(org) = sh.cfg.tokens.get(&token).cloned() else {
        let e = ApiErr::new(401, "unauthorized").code("unauthorized");
        return finish(401, err_response(&e, &request_id));
    };
    if label == "unknown" {
        return finish(404, err_response(&ApiErr::not_found("route"), &request_id));
    }

    // Rate limits: the same buckets the client mirrors.
    if sh.cfg.rate_limits.enabled {
        let t = now.as_secs_f64();
        let limits = &sh.cfg.rate_limits;
        // `POST /apps` names its app in the body: keyed by that name, as the client keys it (Fly: "app ID for
        // app-level calls such as list and create"); a cap across apps is the optional org-wide mutation limit.
        let created = (label == "apps.create")
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .and_then(|b| {
                b.get("name")
                    .or_else(|| b.get("app_name"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
        let limit_app = app.as_deref().or(created.as_deref());
        let id = bucket_identity(label, &org, limit_app, machine.as_deref());
        let mut lim = sh.limiter.lock().expect("poisoned");
        let mut verdict = lim
            .buckets
            .entry((label.to_string(), id))
            .or_insert_with(|| TokenBucket::new(limits.limit_for(label), t))
            .try_take(t);
        if verdict.is_ok()
            && is_mutation(&method)
            && let Some(l) = limits.org_mutations
        {
            verdict = lim
                .org
                .entry(org.clone())
                .or_insert_with(|| TokenBucket::new(l, t))
                .try_take(t);
        }
        drop(lim);
        if let Err(wait) = verdict {
            let e = ApiErr::new(429, "rate limit exceeded").code("rate_limited");
            let mut r = err_response(&e, &request_id);
            let secs = wait.ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
            return finish(429, r);
        }
    }

    let fault = sh.faults.lock().expect("poisoned").pick(label);
    match &fault {
        Some(super::Fault::Status(s)) => {
            let msg = if *s == 408 {
                "deadline_exceeded: request timed out"
            } else {
                "unavailable: emulated platform error"
            };
            return finish(*s, err_response(&ApiErr::new(*s, msg), &request_id));
        }
        Some(super::Fault::Reset) => return finish(0, reset_response(&request_id)),
        Some(super::Fault::NoCapacity) => {
            let e = ApiErr::conflict(
                sh.cfg.realism.fly_conflicts,
                412,
                "failed_precondition",
                NO_CAPACITY_MESSAGE,
            );
            return finish(e.status, err_response(&e, &request_id));
        }
        _ => {}
    }

    let ctx = Ctx {
        org,
        now,
        nonce: parts
            .headers
            .get("fly-machine-lease-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let body_json: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    if !body.is_empty() && body_json.is_null() && method != "GET" {
        let e = ApiErr::invalid("request body is not valid JSON");
        return finish(400, err_response(&e, &request_id));
    }

    let result = if label == "machines.wait" {
        wait(
            &sh,
            &ctx,
            app.as_deref().unwrap_or_default(),
            machine.as_deref().unwrap_or_default(),
            &pairs,
        )
        .await
    } else {
        let r = dispatch(
            &sh,
            &ctx,
            label,
            app.as_deref().unwrap_or_default(),
            machine.as_deref().unwrap_or_default(),
            extra.as_deref(),
            &pairs,
            &body_json,
        );
        deliver_driver_changes(&sh);
        r
    };

    match (&fault, result) {
        (Some(super::Fault::CommitThenStatus(s)), _) => {
            let e = ApiErr::new(*s, "deadline_exceeded: request timed out");
            finish(*s, err_response(&e, &request_id))
        }
        (Some(super::Fault::CommitThenReset), _) => finish(0, reset_response(&request_id)),
        (_, Ok((status, v))) => finish(status, json_response(status, &v, &request_id)),
        (_, Err(e)) => finish(e.status, err_response(&e, &request_id)),
    }
}

pub(crate) fn deliver_driver_changes(sh: &Shared) {
    let changes = std::mem::take(&mut sh.state.lock().expect("poisoned").driver_queue);
    for c in &changes {
        sh.cfg.driver.on_change(c);
    }
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    sh: &Shared,
    ctx: &Ctx,
    label: &str,
    app: &str,
    id: &str,
    extra: Option<&str>,
    pairs: &[(String, String)],
    body: &Value,
) -> Res {
    let mut st = sh.state.lock().expect("poisoned");
    st.advance(ctx.now);
    let extra = extra.unwrap_or_default();
    match label {
        "apps.list" => st.apps_list(ctx, q(pairs, "org_slug")),
        "apps.create" => st.app_create(ctx, body),
        "apps.get" => st.app_get(ctx, app),
        "apps.delete" => st.app_delete(ctx, app),
        "machines.list" => {
            let states: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == "state")
                .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
                .filter(|s| !s.is_empty())
                .collect();
            st.machines_list(
                ctx,
                app,
                q_bool(pairs, "include_deleted"),
                q(pairs, "region"),
                &states,
            )
        }
        "machines.create" => st.machine_create(ctx, app, body),
        "machines.get" => st.machine_get(ctx, app, id),
        "machines.update" => st.machine_update(ctx, app, id, body),
        // Fly's Go client sends kill=true; the docs say force=true.
        "machines.delete" => st.machine_delete(
            ctx,
            app,
            id,
            q_bool(pairs, "force") || q_bool(pairs, "kill"),
        ),
        "machines.start" | "machines.stop" | "machines.restart" | "machines.suspend"
        | "machines.cordon" | "machines.uncordon" => {
            st.machine_action(ctx, app, id, label.trim_start_matches("machines."))
        }
        "machines.events" => st.events(
            ctx,
            app,
            id,
            q(pairs, "limit").and_then(|l| l.parse().ok()).unwrap_or(50),
        ),
        "leases.acquire" => {
            let ttl = q(pairs, "ttl")
                .and_then(|t| t.parse().ok())
                .or_else(|| body.get("ttl").and_then(Value::as_u64))
                .unwrap_or(30);
            let desc = body
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default();
            st.lease_acquire(ctx, app, id, ttl, desc)
        }
        "leases.get" => st.lease_get(ctx, app, id),
        "leases.release" => st.lease_release(ctx, app, id),
        "metadata.get" => st.metadata_get(ctx, app, id),
        "metadata.set" => {
            let v = body
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiErr::invalid("value is required"))?;
            st.metadata_set(ctx, app, id, extra, Some(v))
        }
        "metadata.delete" => st.metadata_set(ctx, app, id, extra, None),
        "secrets.list" => st.secrets_list(ctx, app),
        "secrets.set" => st.secrets_set(ctx, app, body),
        "secrets.set_one" => st.secret_set_one(ctx, app, extra, body),
        "secrets.delete_one" => st.secret_delete_one(ctx, app, extra),
        "ips.list" => st.ips_list(ctx, app),
        "ips.assign" => st.ip_assign(ctx, app, body),
        "ips.delete" => st.ip_delete(ctx, app, extra),
        "regions.list" => Ok((200, regions())),
        "orgs.machines" => st.org_machines(
            ctx,
            extra,
            q(pairs, "updated_after"),
            q(pairs, "cursor"),
            q(pairs, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(500),
            q_bool(pairs, "include_deleted"),
        ),
        _ => Err(ApiErr::not_found("route")),
    }
}

/// Long-poll: answer as soon as the machine is in one of the states, 408 at the deadline.
async fn wait(sh: &Shared, ctx: &Ctx, app: &str, id: &str, pairs: &[(String, String)]) -> Res {
    let timeout = match q(pairs, "timeout") {
        None => 60,
        Some(t) => match t.parse::<i64>() {
            Ok(n) if (1..=60).contains(&n) => n as u64,
            _ => {
                return Err(ApiErr::new(400, "invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]")
                    .code("invalid_argument"));
            }
        },
    };
    let mut states: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "state")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    if states.is_empty() {
        states.push("started".into());
    }
    let version = q(pairs, "version").filter(|v| !v.is_empty());
    let deadline = ctx.now + Duration::from_secs(timeout);
    let mut notify: Option<Arc<tokio::sync::Notify>> = None;
    loop {
        let n = notify.clone();
        let notified = n.as_ref().map(|n| n.notified());
        tokio::pin!(notified);
        if let Some(f) = notified.as_mut().as_pin_mut() {
            f.enable();
        }
        let now = sh.clock.now();
        let check = {
            let mut st = sh.state.lock().expect("poisoned");
            st.advance(now);
            let c = Ctx { now, ..ctx.clone() };
            st.wait_check(&c, app, id, &states, version)?
        };
        match check {
            WaitCheck::Done(v) => return Ok((200, v)),
            WaitCheck::Pending(next, n) => {
                if now >= deadline {
                    return Err(ApiErr::new(
                        408,
                        format!(
                            "deadline_exceeded: machine did not reach {} in time",
                            states.join(",")
                        ),
                    )
                    .code("deadline_exceeded"));
                }
                if notify.is_none() {
                    notify = Some(n);
                    continue;
                }
                let until = next.map_or(deadline, |t| t.min(deadline));
                tokio::select! {
                    _ = sh.clock.sleep_until(until) => {}
                    _ = async { if let Some(f) = notified.as_mut().as_pin_mut() { f.await } } => {}
                }
            }
        }
    }
}

fn regions() -> Value {
    let list = [
        ("ams", "Amsterdam, Netherlands"),
        ("arn", "Stockholm, Sweden"),
        ("bom", "Mumbai, India"),
        ("cdg", "Paris, France"),
        ("dfw", "Dallas, Texas (US)"),
        ("ewr", "Secaucus, NJ (US)"),
        ("fra", "Frankfurt, Germany"),
        ("gru", "Sao Paulo, Brazil"),
        ("iad", "Ashburn, Virginia (US)"),
        ("jnb", "Johannesburg, South Africa"),
        ("lax", "Los Angeles, California (US)"),
        ("lhr", "London, United Kingdom"),
        ("nrt", "Tokyo, Japan"),
        ("ord", "Chicago, Illinois (US)"),
        ("sin", "Singapore, Singapore"),
        ("sjc", "San Jose, California (US)"),
        ("syd", "Sydney, Australia"),
        ("yyz", "Toronto, Canada"),
    ];
    let regions: Vec<Value> = list
        .iter()
        .map(|(c, n)| json!({"code": c, "name": n}))
        .collect();
    json!({"regions": regions, "nearest": "iad"})
}

/// Admin API for other processes (benchmarks): counters, events, inventory, checks, faults, clock.
fn admin(sh: &Shared, method: &str, rest: &str, body: &[u8]) -> Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ok = |v: Value| json_response(200, &v, "admin");
    let bad = |m: &str| json_response(400, &json!({"error": m}), "admin");
    match (method, rest.trim_end_matches('/')) {
        ("GET", "counters") => {
            let c = sh.counters.lock().expect("poisoned");
            let mut list: Vec<Value> = c
                .iter()
                .map(|((l, s), n)| json!({"label": l, "status": s, "count": n}))
                .collect();
            list.sort_by_key(|v| v.to_string());
            ok(json!({"counters": list, "total": c.values().sum::<u64>()}))
        }
        ("GET", "events") => {
            ok(json!({"events": sh.events.lock().expect("poisoned").iter().collect::<Vec<_>>()}))
        }
        ("GET", "inventory") => {
            let now = sh.clock.now();
            let mut st = sh.state.lock().expect("poisoned");
            st.advance(now);
            ok(serde_json::to_value(st.inventory(now)).unwrap_or_default())
        }
        ("POST", "reset") => {
            sh.counters.lock().expect("poisoned").clear();
            sh.events.lock().expect("poisoned").clear();
            ok(json!({"ok": true}))
        }
        ("POST", "checks") => {
            let g = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let found = sh.state.lock().expect("poisoned").set_check_status(
                &g("app"),
                &g("machine"),
                &g("check"),
                &g("status"),
            );
            if found {
                ok(json!({"ok": true}))
            } else {
                json_response(404, &json!({"error": "machine not found"}), "admin")
            }
        }
        ("POST", "faults") => match serde_json::from_value::<super::FaultConfig>(body) {
            Ok(f) => {
                sh.faults.lock().expect("poisoned").random = f;
                ok(json!({"ok": true}))
            }
            Err(e) => bad(&e.to_string()),
        },
        ("POST", "faults/script") => {
            match serde_json::from_value::<Vec<super::ScriptedFault>>(body) {
                Ok(s) => {
                    sh.faults.lock().expect("poisoned").script.extend(s);
                    ok(json!({"ok": true}))
                }
                Err(e) => bad(&e.to_string()),
            }
        }
        ("POST", "launch_faults") => match serde_json::from_value::<super::LaunchFaultRule>(body) {
            Ok(rule) => {
                sh.state.lock().expect("poisoned").add_launch_faults(rule);
                ok(json!({"ok": true}))
            }
            Err(e) => bad(&e.to_string()),
        },
        // {"app", "machine" (id or name), "exit_code": N | null}
        ("POST", "crash_loop") => {
            let now = sh.clock.now();
            let exit_code = body
                .get("exit_code")
                .and_then(Value::as_i64)
                .map(|c| c as i32);
            let mut st = sh.state.lock().expect("poisoned");
            st.advance(now);
            let found = st.set_crash_loop(
                now,
                &g_str(&body, "app"),
                &g_str(&body, "machine"),
                exit_code,
            );
            if found {
                ok(json!({"ok": true}))
            } else {
                json_response(404, &json!({"error": "machine not found"}), "admin")
            }
        }
        // {"app", "machine" (id or name), "status": "ok|unknown|unreachable"}
        ("POST", "host_status") => {
            let Some(status) = super::state::host_status_str(&g_str(&body, "status")) else {
                return bad("status must be ok, unknown or unreachable");
            };
            let now = sh.clock.now();
            let mut st = sh.state.lock().expect("poisoned");
            st.advance(now);
            if st.set_host_status(now, &g_str(&body, "app"), &g_str(&body, "machine"), status) {
                ok(json!({"ok": true}))
            } else {
                json_response(404, &json!({"error": "machine not found"}), "admin")
            }
        }
        ("POST", "create_visibility_lag") => {
            let ms = body.get("ms").and_then(Value::as_u64).unwrap_or(0);
            sh.state
                .lock()
                .expect("poisoned")
                .set_create_visibility_lag(Duration::from_millis(ms));
            ok(json!({"ok": true}))
        }
        ("POST", "clock/advance") => {
            let ms = body.get("ms").and_then(Value::as_u64).unwrap_or(0);
            sh.clock.advance(Duration::from_millis(ms));
            ok(json!({"ok": true, "manual": sh.clock.is_manual()}))
        }
        _ => json_response(404, &json!({"error": "unknown admin endpoint"}), "admin"),
    }
}

fn g_str(body: &Value, k: &str) -> String {
    body.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}
