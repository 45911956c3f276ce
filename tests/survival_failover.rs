//! Leader failover under load (issue 11): two `mcpfly controller` replicas with leader election while
//! deployments keep arriving; the leader is SIGKILLed again and again (a new replica replaces it each time).
//! Never two writers: no lease conflict on Fly, and joining every mutation the emulator received with the
//! controller audit line that carries the same Fly request id, the processes' mutations never interleave —
//! each process's writes form one contiguous run in the emulator's own timeline, overall and per app. Each
//! takeover happens within the lease duration plus two retry periods and 3 s (`ops_support::takeover_bound`).
//!
//! Size: `MCPFLY_SURVIVAL_FAILOVERS` leader kills (CI default 3).

mod ops_support;
mod survival_support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fly_emulator::{Emulator, EmulatorConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use mcpfly::api::MCPDeployment;
use mcpfly::local_cluster::ControlPlane;
use ops_support::{ControllerProcess, SYSTEM_NS, eventually, takeover_bound};
use survival_support::*;

const NS: &str = "survival-failover";
const LEASE: &str = "survival-failover-lease";
/// `leaseDurationSeconds` the controller writes (LeaseTiming::default()).
const LEASE_DURATION: Duration = Duration::from_secs(15);

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_repeatedly_never_gives_two_writers() -> anyhow::Result<()> {
    let failovers = env_size("MCPFLY_SURVIVAL_FAILOVERS", 3) as usize;
    let cp = ControlPlane::shared().await?;
    cp.install_crds().await?;
    cp.create_namespace(NS).await?;
    cp.create_namespace(SYSTEM_NS).await?;
    let client = cp.client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
    let api: Api<MCPDeployment> = Api::namespaced(client.clone(), NS);
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let url = emulator.base_url();
    let spawn = |name: &str| {
        ControllerProcess::spawn(
            cp,
            name,
            cp.kubeconfig_path(),
            &url,
            &controller_env(
                NS,
                &[
                    ("MCPFLY_LEADER_ELECTION", "true"),
                    ("MCPFLY_LEASE_NAME", LEASE),
                ],
            ),
        )
    };

    let mut replicas: HashMap<String, ControllerProcess> = HashMap::new();
    let mut logs: Vec<(String, std::path::PathBuf)> = Vec::new();
    for name in ["replica-0", "replica-1"] {
        let mut p = spawn(name)?;
        p.wait_ready(Duration::from_secs(30)).await?;
        logs.push((name.into(), p.log_path().to_path_buf()));
        replicas.insert(name.into(), p);
    }

    // Load: a new deployment every 250 ms for the whole run.
    let load_client = client.clone();
    let load = tokio::spawn(async move {
        let mut created = 0u32;
        loop {
            let name = format!("fo-{created:03}");
            if create_all(&load_client, NS, std::slice::from_ref(&name))
                .await
                .is_ok()
            {
                created += 1;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    let mut takeovers = Vec::new();
    // (leader, wall-clock ms of its SIGKILL): a call in flight at the kill reaches Fly with no audit line.
    let mut kills: Vec<(String, i64)> = Vec::new();
    for next in 2..2 + failovers {
        let leader = loop {
            if let Some(h) = holder(&leases).await
                && replicas.contains_key(&h)
            {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Let the leader work for a while before killing it mid-stream.
        tokio::time::sleep(Duration::from_secs(3)).await;
        replicas.get_mut(&leader).unwrap().kill();
        kills.push((leader.clone(), chrono::Utc::now().timestamp_millis()));
        replicas.remove(&leader);
        let killed = Instant::now();
        let name = format!("replica-{next}");
        let p = spawn(&name)?;
        logs.push((name.clone(), p.log_path().to_path_buf()));
        replicas.insert(name, p);
        let took = eventually(LEASE_DURATION + Duration::from_secs(10), || async {
            holder(&leases)
                .await
                .is_some_and(|h| h != leader && replicas.contains_key(&h))
        })
        .await;
        let elapsed = killed.elapsed();
        assert!(took, "no takeover after killing {leader}");
        eprintln!(
            "killed leader {leader}; {} took over after {:.1} s",
            holder(&leases).await.unwrap_or_default(),
            elapsed.as_secs_f64()
        );
        takeovers.push(elapsed);
    }
    load.abort();
    let n = api.list(&ListParams::default()).await?.items.len();
    let ready_after = wait_all_ready(&api, n, Duration::from_secs(60))
        .await
        .map_err(|left| anyhow::anyhow!("not Ready: {left:#?}"))?;

    // Attribute every mutation the emulator received to the process whose audit line has its request id.
    let mut by_request: HashMap<String, String> = HashMap::new();
    let mut audit_count = 0;
    for (name, path) in &logs {
        for line in audit_lines(name, &read(path)) {
            audit_count += 1;
            if let Some(id) = line.fly_request_id {
                by_request.insert(id, line.process);
            }
        }
    }
    let events = emulator.event_log();
    let mutations: Vec<_> = events.iter().filter(|e| is_mutation(e)).collect();
    // A mutation with no audit line is one a leader had in flight when it was killed (it died before logging
    // the answer): it must have reached Fly just before that kill, and counts as that leader's.
    let mut in_flight_at_kill = 0;
    let mut unattributed = Vec::new();
    for e in &mutations {
        if by_request.contains_key(&e.request_id) {
            continue;
        }
        match kills
            .iter()
            .find(|(_, at)| (at - 2_000..=at + 200).contains(&e.time_ms))
        {
            Some((leader, _)) => {
                in_flight_at_kill += 1;
                by_request.insert(e.request_id.clone(), leader.clone());
            }
            None => unattributed.push(e),
        }
    }
    // Runs of one process in the emulator's order: overall and per app.
    let runs = |seq: &mut dyn Iterator<Item = &String>| -> Vec<String> {
        let mut runs: Vec<String> = Vec::new();
        for p in seq {
            if runs.last() != Some(p) {
                runs.push(p.clone());
            }
        }
        runs
    };
    let overall = runs(
        &mut mutations
            .iter()
            .filter_map(|e| by_request.get(&e.request_id)),
    );
    let mut per_app: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for e in &mutations {
        if let (Some(app), Some(p)) = (e.app.as_deref(), by_request.get(&e.request_id)) {
            per_app.entry(app).or_default().push(p);
        }
    }
    let interleaved: Vec<(&str, Vec<String>)> = per_app
        .iter()
        .map(|(app, seq)| (*app, runs(&mut seq.iter().copied())))
        .filter(|(_, r)| {
            let mut seen = std::collections::BTreeSet::new();
            !r.iter().all(|p| seen.insert(p))
        })
        .collect();
    let conflicts = lease_conflicts(&emulator);
    let resources = api.list(&ListParams::default()).await?.items;
    let audit = audit_fleet(&emulator.inventory(), &resources, &["iad-0"]);
    let worst = takeovers.iter().max().copied().unwrap_or_default();
    eprintln!(
        "failover under load: {failovers} leader kills, takeovers {:?} (worst {worst:.1?}); {n} deployments, \
         all Ready {ready_after:.1?} after the last takeover; {} mutations on Fly, {audit_count} audit lines, \
         {in_flight_at_kill} in flight at a kill, {} unattributed; writer runs in order {overall:?}; {} apps with interleaved writers; {conflicts} lease \
         conflicts; {} fleet violations",
        takeovers
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        mutations.len(),
        unattributed.len(),
        interleaved.len(),
        audit.violations.len()
    );
    assert!(
        unattributed.is_empty(),
        "mutations without an audit line: {unattributed:#?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    assert!(
        overall.iter().all(|p| seen.insert(p)),
        "two writers interleaved: {overall:?}"
    );
    assert!(interleaved.is_empty(), "{interleaved:#?}");
    assert_eq!(conflicts, 0);
    assert!(audit.violations.is_empty(), "{:#?}", audit.violations);
    assert!(
        worst <= takeover_bound(),
        "takeover took {worst:?}, more than {:?}",
        takeover_bound()
    );
    Ok(())
}
