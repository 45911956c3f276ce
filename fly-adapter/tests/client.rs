//! The client against the emulator: every error class, leases, waits, rate limiting, ambiguous
//! creates, secrets versions and config normalisation.

mod common;
use common::*;
use fly_adapter::client::*;
use fly_adapter::token_bucket::RateLimits;
use fly_emulator::{Clock, DEFAULT_ORG, EmulatorConfig, Fault, Realism, ScriptedFault};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[tokio::test]
async fn error_classes() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-errors").await;
    let app = c.get_app("app-errors").await.unwrap();
    assert_eq!(app.name, "app-errors");
    assert_eq!(app.organization.unwrap().slug, DEFAULT_ORG);

    let e = c
        .create_app(&CreateAppRequest {
            name: "app-errors".into(),
            org_slug: DEFAULT_ORG.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, FlyError::NameTaken { .. }), "{e:?}");
    assert!(e.request_id().is_some(), "request id kept on errors");

    emu.add_foreign_app("someone-elses", "other-org");
    let e = c.get_app("someone-elses").await.unwrap_err();
    assert!(matches!(e, FlyError::OwnedByOtherOrg { .. }), "{e:?}");

    let e = c.get_app("no-such-app").await.unwrap_err();
    assert!(matches!(e, FlyError::NotFound { .. }), "{e:?}");

    let e = c
        .create_machine("app-errors", &CreateMachineRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::Invalid { ref message, .. } if message.starts_with("invalid_argument")),
        "{e:?}"
    );

    let req = CreateMachineRequest {
        config: config("img:1"),
        min_secrets_version: Some(5),
        ..Default::default()
    };
    let e = c.create_machine("app-errors", &req).await.unwrap_err();
    assert!(matches!(e, FlyError::Precondition { .. }), "{e:?}");

    let m = new_machine(&c, "app-errors", "iad-0").await;
    c.wait_for_state(
        "app-errors",
        &m.id,
        &["started"],
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("started after the image pull");
    let e = c
        .delete_machine("app-errors", &m.id, false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::Precondition { .. }),
        "delete started without force: {e:?}"
    );

    let mut bad = client_cfg(&emu);
    bad.token = "wrong".to_string().into();
    // A bad token is found by the start-up check (the org's app list); on `GET /apps/{name}` Fly's 401 means
    // "someone else's app" (REALISM.md §1).
    let e = FlyClient::new(bad)
        .unwrap()
        .list_apps(DEFAULT_ORG)
        .await
        .unwrap_err();
    assert!(matches!(e, FlyError::Unauthorized { .. }), "{e:?}");

    // 429 surfaces as RateLimited{retry_after} when the client's own limiter is off and retries are spent.
    let mut hammer = client_cfg(&emu);
    hammer.rate_limits = RateLimits::disabled();
    hammer.retry.max_attempts = 1;
    let hammer = FlyClient::new(hammer).unwrap();
    let mut limited = None;
    for _ in 0..20 {
        if let Err(e) = hammer.get_machine("app-errors", &m.id).await {
            limited = Some(e);
            break;
        }
    }
    match limited {
        Some(FlyError::RateLimited { retry_after, .. }) => {
            assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test]
async fn lifecycle_wait_and_config_hash() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-life").await;
    let mut desired = config("registry.example/mcp:1");
    desired.env.insert("LOG_LEVEL".into(), "info".into());
    desired.restart = Some(RestartPolicy {
        policy: "always".into(),
        max_retries: None,
    });
    desired.services.push(ServiceConfig {
        protocol: "tcp".into(),
        internal_port: 8080,
        ports: vec![PortConfig {
            port: Some(443),
            handlers: vec!["tls".into(), "http".into()],
            force_https: None,
        }],
        autostop: Some(Autostop::Mode("stop".into())),
        autostart: Some(true),
        checks: vec![CheckConfig {
            kind: Some("http".into()),
            path: Some("/ready".into()),
            grace_period: Some(FlyDuration::Text("1s".into())),
            ..Default::default()
        }],
        ..Default::default()
    });
    let hash = config_hash(&desired);
    desired
        .metadata
        .insert(CONFIG_HASH_METADATA_KEY.into(), hash.clone());
    let req = CreateMachineRequest {
        config: desired.clone(),
        name: Some("iad-0".into()),
        ..Default::default()
    };
    let m = c.create_machine("app-life", &req).await.unwrap();
    assert_eq!(m.id.len(), 14);
    assert_eq!(m.instance_id.len(), 26);
    assert!(m.private_ip.starts_with("fdaa:"));

    let w = c
        .wait_for_state(
            "app-life",
            &m.id,
            &["started"],
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(w.state, "started");
    let got = c.get_machine("app-life", &m.id).await.unwrap();
    let echoed = got.config.clone().unwrap();
    assert_ne!(echoed, desired, "the server filled defaults");
    assert_eq!(
        config_hash(&echoed),
        hash,
        "GET after create hashes equal to the desired hash"
    );
    assert_eq!(echoed.metadata[CONFIG_HASH_METADATA_KEY], hash);

    c.stop_machine("app-life", &m.id, &StopRequest::default(), None)
        .await
        .unwrap();
    c.wait_for_state(
        "app-life",
        &m.id,
        &["stopped"],
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // Updating a stopped machine leaves the new version stopped.
    let mut upd = req.clone();
    upd.config.env.insert("NEW".into(), "1".into());
    let u = c
        .update_machine("app-life", &m.id, &upd, None)
        .await
        .unwrap();
    assert_ne!(u.instance_id, m.instance_id);
    let w = c
        .wait_for_state(
            "app-life",
            &m.id,
            &["settled"],
            Some(&u.instance_id),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(w.state, "stopped");
    c.start_machine("app-life", &m.id, None).await.unwrap();
    c.wait_for_state(
        "app-life",
        &m.id,
        &["started"],
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    c.delete_machine("app-life", &m.id, true, None)
        .await
        .unwrap();
    let w = c
        .wait_for_state(
            "app-life",
            &m.id,
            &["destroyed"],
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(w.state, "destroyed");
}

#[tokio::test]
async fn wait_timeout_and_range() {
    let mut cfg = EmulatorConfig::default();
    cfg.latencies.start = Duration::from_secs(30);
    let emu = emulator(cfg).await;
    let c = client(&emu);
    new_app(&c, "app-wait").await;
    let m = new_machine(&c, "app-wait", "iad-0").await;
    let t = std::time::Instant::now();
    let e = c
        .wait_for_state(
            "app-wait",
            &m.id,
            &["started"],
            None,
            Duration::from_millis(1500),
        )
        .await
        .unwrap_err();
    assert!(e.is_wait_timeout(), "{e:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "waited on the server side"
    );
    let e = c
        .wait_machine("app-wait", &m.id, &["started"], 61, None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::Invalid { ref message, .. } if message.contains("[1s, 1m0s]")),
        "{e:?}"
    );
}

#[tokio::test]
async fn lease_conflict_guard_and_release_on_cancel() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-lease").await;
    let m = new_machine(&c, "app-lease", "iad-0").await;
    c.wait_for_state(
        "app-lease",
        &m.id,
        &["started"],
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();

    let guard = c
        .lease_guard("app-lease", &m.id, Duration::from_secs(2), "test")
        .await
        .unwrap();
    let e = c
        .acquire_lease("app-lease", &m.id, 5, "other", None)
        .await
        .unwrap_err();
    assert!(matches!(e, FlyError::LeaseConflict { .. }), "{e:?}");
    let upd = CreateMachineRequest {
        config: config("registry.example/mcp:2"),
        ..Default::default()
    };
    let e = c
        .update_machine("app-lease", &m.id, &upd, None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::LeaseConflict { .. }),
        "mutation without nonce: {e:?}"
    );
    // Outlive the 2 s TTL: the background refresh keeps the lease.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(!guard.is_lost());
    c.update_machine("app-lease", &m.id, &upd, Some(guard.nonce()))
        .await
        .unwrap();
    guard.release().await.unwrap();
    assert!(
        c.get_lease("app-lease", &m.id)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Cancelled holder: the guard is dropped and still releases.
    let c2 = c.clone();
    let id = m.id.clone();
    let task = tokio::spawn(async move {
        let _g = c2
            .lease_guard("app-lease", &id, Duration::from_secs(30), "cancelled")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    // The acquire may first wait on the client's per-machine rate limit.
    let mut held = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.get_lease("app-lease", &m.id).await.is_ok() {
            held = true;
            break;
        }
    }
    assert!(held, "held while the task runs");
    task.abort();
    let mut released = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.get_lease("app-lease", &m.id)
            .await
            .is_err_and(|e| e.is_not_found())
        {
            released = true;
            break;
        }
    }
    assert!(released, "lease released after cancellation");
}

#[tokio::test]
async fn lease_expiry_on_manual_clock() {
    // Nothing advances a manual clock while the client waits for an app: Fly's lags are off here.
    let cfg = EmulatorConfig {
        clock: Clock::manual(),
        rate_limits: RateLimits::disabled(),
        realism: Realism::off(),
        ..Default::default()
    };
    let emu = emulator(cfg).await;
    let c = client(&emu);
    new_app(&c, "app-expiry").await;
    let m = new_machine(&c, "app-expiry", "iad-0").await;
    let l = c
        .acquire_lease("app-expiry", &m.id, 10, "first", None)
        .await
        .unwrap();
    assert!(
        c.acquire_lease("app-expiry", &m.id, 10, "second", None)
            .await
            .is_err()
    );
    emu.clock().advance(Duration::from_secs(11));
    let l2 = c
        .acquire_lease("app-expiry", &m.id, 10, "second", None)
        .await
        .unwrap();
    assert_ne!(l.nonce, l2.nonce);
    let e = c
        .release_lease("app-expiry", &m.id, &l.nonce)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::LeaseConflict { .. }),
        "the expired holder's nonce no longer works: {e:?}"
    );
    let e = c.refresh_lease("app-expiry", &m.id, &l2.nonce, 10).await;
    assert!(e.is_ok());
}

#[tokio::test]
async fn rate_limiting_waits_instead_of_429() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-rl").await;
    let m = new_machine(&c, "app-rl", "iad-0").await;
    let waits = Arc::new(AtomicU64::new(0));
    struct Obs(Arc<AtomicU64>);
    impl FlyObserver for Obs {
        fn on_rate_limit_wait(&self, _label: &str, _waited: Duration) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let mut cfg = client_cfg(&emu);
    cfg.observer = Some(Arc::new(Obs(waits.clone())));
    let c = FlyClient::new(cfg).unwrap();
    let t = std::time::Instant::now();
    let futs = (0..16).map(|_| c.get_machine("app-rl", &m.id));
    for r in futures::future::join_all(futs).await {
        r.unwrap();
    }
    // Four actions of 1/s burst 3 on one machine.
    for _ in 0..4 {
        c.cordon_machine("app-rl", &m.id, None).await.unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "the client paced itself"
    );
    assert_eq!(emu.count_status(429), 0, "no 429 in normal operation");
    assert_eq!(emu.count("machines.get"), 16);
    let s = c.stats();
    assert!(s.rate_limit_wait > Duration::ZERO && s.rate_limit_waits > 0);
    assert_eq!(s.count("machines.get", "200"), 16);
    assert!(waits.load(Ordering::SeqCst) > 0, "observer saw the waits");
}

#[tokio::test]
async fn ambiguous_create_and_transient_reads() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-amb").await;
    emu.script_faults([ScriptedFault {
        label: Some("machines.create".into()),
        fault: Fault::CommitThenStatus(408),
    }]);
    let req = CreateMachineRequest {
        config: config("img:1"),
        name: Some("iad-0".into()),
        ..Default::default()
    };
    let e = c.create_machine("app-amb", &req).await.unwrap_err();
    assert!(
        matches!(
            e,
            FlyError::Ambiguous {
                status: Some(408),
                ..
            }
        ),
        "{e:?}"
    );
    // Fly's per-app list lags behind writes (REALISM.md §5): the committed create shows up within the lag.
    let list = listed_eventually(|| async {
        c.list_machines("app-amb", &ListMachinesQuery::default())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(list.len(), 1, "the ambiguous create happened");
    assert_eq!(list[0].name, "iad-0");

    emu.script_faults([ScriptedFault {
        label: Some("machines.create".into()),
        fault: Fault::Reset,
    }]);
    let e = c.create_machine("app-amb", &req).await.unwrap_err();
    assert!(
        matches!(e, FlyError::Ambiguous { status: None, .. }),
        "reset: {e:?}"
    );
    emu.script_faults([ScriptedFault {
        label: Some("machines.create".into()),
        fault: Fault::Status(503),
    }]);
    let e = c.create_machine("app-amb", &req).await.unwrap_err();
    assert!(
        matches!(
            e,
            FlyError::Ambiguous {
                status: Some(503),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        emu.inventory().app("app-amb").unwrap().machines.len(),
        1,
        "mutations were not retried"
    );

    // Reads are retried through transient faults...
    emu.script_faults([
        ScriptedFault {
            label: Some("apps.get".into()),
            fault: Fault::Status(503),
        },
        ScriptedFault {
            label: Some("apps.get".into()),
            fault: Fault::Reset,
        },
    ]);
    c.get_app("app-amb").await.unwrap();
    assert!(c.stats().retries >= 2);
    // ...up to the policy's attempts.
    emu.script_faults((0..4).map(|_| ScriptedFault {
        label: Some("apps.get".into()),
        fault: Fault::Status(500),
    }));
    let e = c.get_app("app-amb").await.unwrap_err();
    assert!(
        matches!(
            e,
            FlyError::Transient {
                status: Some(500),
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn secrets_versions_reach_machines() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    new_app(&c, "app-sec").await;
    let mut values = BTreeMap::new();
    values.insert(
        "TOKEN".to_string(),
        Some(SecretValue::new("s3cr3t-canary-value")),
    );
    values.insert("OTHER".to_string(), Some(SecretValue::new("x")));
    let r = c.set_secrets("app-sec", &values).await.unwrap();
    assert_eq!(r.version, 1);
    let req = CreateMachineRequest {
        config: config("img:1"),
        min_secrets_version: Some(1),
        ..Default::default()
    };
    let m = c.create_machine("app-sec", &req).await.unwrap();
    assert_eq!(
        emu.inventory()
            .machine("app-sec", &m.id)
            .unwrap()
            .booted_secrets_version,
        Some(1)
    );

    let mut unset = BTreeMap::new();
    unset.insert("OTHER".to_string(), None);
    let r = c.set_secrets("app-sec", &unset).await.unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(
        emu.inventory()
            .machine("app-sec", &m.id)
            .unwrap()
            .booted_secrets_version,
        Some(1),
        "setting secrets does not touch machines"
    );
    let list = c.list_secrets("app-sec", None).await.unwrap();
    assert_eq!(list.secrets.len(), 1);
    assert!(!list.secrets[0].digest.is_empty());

    c.wait_for_state("app-sec", &m.id, &["started"], None, Duration::from_secs(5))
        .await
        .unwrap();
    let upd = CreateMachineRequest {
        min_secrets_version: Some(2),
        ..req.clone()
    };
    c.update_machine("app-sec", &m.id, &upd, None)
        .await
        .unwrap();
    assert_eq!(
        emu.inventory()
            .machine("app-sec", &m.id)
            .unwrap()
            .booted_secrets_version,
        Some(2)
    );
    let log = format!("{:?}", emu.event_log());
    assert!(
        !log.contains("s3cr3t-canary-value"),
        "the event log never holds secret values"
    );
}

#[tokio::test]
async fn ips_metadata_regions_and_org_listing() {
    // The shapes of these answers, not their timing: the listing's lag and rough pages have their own
    // fidelity tests (fly-emulator/tests/fidelity.rs) and the fleet watch copes with them.
    let emu = emulator(EmulatorConfig {
        realism: Realism::off(),
        ..EmulatorConfig::default()
    })
    .await;
    let c = client(&emu);
    new_app(&c, "app-misc").await;
    let v6 = c
        .assign_ip(
            "app-misc",
            &AssignIpRequest {
                kind: "v6".into(),
                org_slug: Some(DEFAULT_ORG.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let v4 = c
        .assign_ip(
            "app-misc",
            &AssignIpRequest {
                kind: "shared_v4".into(),
                org_slug: Some(DEFAULT_ORG.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(v4.shared && !v6.shared);
    assert_eq!(c.list_ips("app-misc").await.unwrap().len(), 2);
    c.delete_ip("app-misc", &v6.ip).await.unwrap();
    assert_eq!(c.list_ips("app-misc").await.unwrap(), vec![v4]);
    assert!(
        c.list_regions()
            .await
            .unwrap()
            .regions
            .iter()
            .any(|r| r.code == "iad")
    );

    let m1 = new_machine(&c, "app-misc", "iad-0").await;
    let m2 = new_machine(&c, "app-misc", "iad-1").await;
    c.set_metadata("app-misc", &m1.id, "owner", "uid-1", None)
        .await
        .unwrap();
    assert_eq!(
        c.get_metadata("app-misc", &m1.id).await.unwrap()["owner"],
        "uid-1"
    );
    let after = c.get_machine("app-misc", &m1.id).await.unwrap();
    assert_eq!(
        after.instance_id, m1.instance_id,
        "metadata changes do not reboot"
    );
    c.delete_metadata("app-misc", &m1.id, "owner", None)
        .await
        .unwrap();
    assert!(
        !c.get_metadata("app-misc", &m1.id)
            .await
            .unwrap()
            .contains_key("owner")
    );

    c.wait_for_state(
        "app-misc",
        &m2.id,
        &["started"],
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    c.wait_for_state(
        "app-misc",
        &m1.id,
        &["started"],
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let all = c
        .list_org_machines(DEFAULT_ORG, &OrgMachinesQuery::default())
        .await
        .unwrap();
    assert_eq!(all.machines.len(), 2);
    assert!(
        all.machines
            .iter()
            .all(|m| m.app_name.as_deref() == Some("app-misc"))
    );
    let mark = all.last_updated_at.clone().unwrap();
    c.stop_machine("app-misc", &m2.id, &StopRequest::default(), None)
        .await
        .unwrap();
    let q = OrgMachinesQuery {
        updated_after: Some(mark),
        ..Default::default()
    };
    let changed = c.list_org_machines(DEFAULT_ORG, &q).await.unwrap();
    assert_eq!(
        changed
            .machines
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        vec![m2.id.as_str()]
    );

    c.delete_app("app-misc", false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.get_app("app-misc").await.unwrap_err().is_not_found());
    assert!(c.list_apps(DEFAULT_ORG).await.unwrap().apps.is_empty());
}

/// REALISM.md §1: Fly answers 404, then 401, for a while after an app is created. The client creates with
/// `?wait=true`, waits until the app is visible, and then the app is usable at once.
#[tokio::test]
async fn create_app_waits_until_the_app_is_visible() {
    let emu = emulator_with_app_lag().await;
    let c = client(&emu);
    new_app(&c, "app-lag").await;
    // Usable at once: the create returned only when the app was visible.
    c.list_machines("app-lag", &ListMachinesQuery::default())
        .await
        .expect("app usable after create_app returns");
    let log = emu.event_log();
    let create = log.iter().find(|e| e.label == "apps.create").unwrap();
    assert_eq!(create.path, "/v1/apps?wait=true");
    assert_looked_through_the_lag(&log);
}

/// An emulator whose new apps answer 404, then 401, for 3 s: with app GETs at Fly's 1/s, long enough for both
/// answers to be seen.
async fn emulator_with_app_lag() -> fly_emulator::EmulatorHandle {
    emulator(EmulatorConfig {
        realism: Realism {
            app_visibility_lag: Duration::from_secs(3),
            ..Realism::off()
        },
        ..Default::default()
    })
    .await
}

/// The app GETs in `log` met 404 and 401 and ended on 200.
fn assert_looked_through_the_lag(log: &[fly_emulator::EventRecord]) {
    let gets: Vec<u16> = log
        .iter()
        .filter(|e| e.label == "apps.get")
        .map(|e| e.status)
        .collect();
    assert!(
        gets.contains(&404) && gets.contains(&401) && gets.last() == Some(&200),
        "looked through 404 and 401 to 200: {gets:?}"
    );
}

/// REALISM.md §1, for a caller that looks again later instead of waiting: `send_app_create` returns before the app
/// is visible, and until it is, both of Fly's answers for it (404, then 401) read as "not visible yet" — never as
/// a free name or another org's app.
#[tokio::test]
async fn send_app_create_returns_at_once_and_the_lag_reads_as_not_visible_yet() {
    let emu = emulator_with_app_lag().await;
    let c = client(&emu);
    c.send_app_create(&CreateAppRequest {
        name: "app-later".into(),
        org_slug: DEFAULT_ORG.into(),
        network: None,
        enable_subdomains: None,
    })
    .await
    .expect("create");
    assert!(c.recently_created("app-later"));
    let mut answers = Vec::new();
    let visible = loop {
        match c.get_app("app-later").await {
            Ok(app) => break app,
            Err(e) => {
                assert!(e.is_app_not_visible_yet(), "{e:?}");
                answers.push(e);
            }
        }
        // Fly's rate for Get App on one app: the client's limiter never has to hold a look back.
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(visible.name, "app-later");
    assert!(
        !answers.is_empty(),
        "the first look came before the app was visible"
    );
    assert_looked_through_the_lag(&emu.event_log());
    // Once it answered, its 404s mean what they say again.
    assert!(!c.recently_created("app-later"));
}

/// REALISM.md §1: a 401 for a name this client never created is someone else's app, not "not yet".
#[tokio::test]
async fn a_401_for_a_name_never_created_is_another_orgs_app() {
    let emu = emulator(EmulatorConfig::default()).await;
    let c = client(&emu);
    emu.add_foreign_app("theirs-401", "other-org");
    let e = c.get_app("theirs-401").await.unwrap_err();
    assert!(matches!(e, FlyError::OwnedByOtherOrg { .. }), "{e:?}");
    assert!(!c.recently_created("theirs-401"));
}

/// The listing `list` returns once it is no longer empty (Fly's lists lag behind writes), or the empty one after
/// the emulator's longest lag has certainly passed.
async fn listed_eventually<T, F, Fut>(list: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let items = list().await;
        if !items.is_empty() || std::time::Instant::now() > deadline {
            return items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// REALISM.md §6: Fly answers 409 `{"status":"error","message":...}` for a held lease, a stale
/// `current_version` and a host without capacity; the client tells them apart by the message.
#[tokio::test]
async fn conflicts_are_classified_by_their_message() {
    let cfg = EmulatorConfig {
        clock: Clock::manual(),
        rate_limits: RateLimits::disabled(),
        realism: Realism {
            fly_conflicts: true,
            ..Realism::off()
        },
        ..Default::default()
    };
    let emu = emulator(cfg).await;
    let c = client(&emu);
    new_app(&c, "app-409").await;
    let m = new_machine(&c, "app-409", "iad-0").await;
    let lease = c
        .acquire_lease("app-409", &m.id, 10, "first", None)
        .await
        .unwrap();
    let e = c
        .acquire_lease("app-409", &m.id, 10, "second", None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FlyError::LeaseConflict { ref message, .. } if message.starts_with("lease currently held")),
        "{e:?}"
    );
    let stale = CreateMachineRequest {
        config: config("registry.example/mcp:2"),
        current_version: Some("01STALEVERSION".into()),
        ..Default::default()
    };
    let e = c
        .update_machine("app-409", &m.id, &stale, Some(&lease.nonce))
        .await
        .unwrap_err();
    assert!(matches!(e, FlyError::VersionConflict { .. }), "{e:?}");
    assert!(!e.is_retryable(), "read the machine again first: {e:?}");
    emu.script_faults([ScriptedFault {
        label: Some("machines.update".into()),
        fault: Fault::NoCapacity,
    }]);
    let update = CreateMachineRequest {
        config: config("registry.example/mcp:2"),
        ..Default::default()
    };
    let e = c
        .update_machine("app-409", &m.id, &update, Some(&lease.nonce))
        .await
        .unwrap_err();
    assert!(matches!(e, FlyError::NoCapacity { .. }), "{e:?}");
    assert!(e.is_retryable(), "capacity comes back: {e:?}");
    // The same update goes through once the host has room: nothing was done by the refused one.
    c.update_machine("app-409", &m.id, &update, Some(&lease.nonce))
        .await
        .expect("update after capacity returned");
}

/// REALISM.md §6: the OpenAPI documents the lease answer as a bare `Lease` (201), fly-go reads an envelope
/// `{status, data}`; the client accepts both.
#[tokio::test]
async fn lease_answers_in_either_documented_shape() {
    for bare in [false, true] {
        let cfg = EmulatorConfig {
            clock: Clock::manual(),
            rate_limits: RateLimits::disabled(),
            realism: Realism {
                lease_answer_bare: bare,
                ..Realism::off()
            },
            ..Default::default()
        };
        let emu = emulator(cfg).await;
        let c = client(&emu);
        new_app(&c, "app-shape").await;
        let m = new_machine(&c, "app-shape", "iad-0").await;
        let l = c
            .acquire_lease("app-shape", &m.id, 10, "shape", None)
            .await
            .unwrap_or_else(|e| panic!("bare={bare}: {e:?}"));
        assert!(!l.nonce.is_empty(), "bare={bare}");
        let got = c.get_lease("app-shape", &m.id).await.unwrap();
        assert_eq!(got.nonce, l.nonce, "bare={bare}");
        c.refresh_lease("app-shape", &m.id, &l.nonce, 10)
            .await
            .unwrap_or_else(|e| panic!("bare={bare}: {e:?}"));
    }
}
