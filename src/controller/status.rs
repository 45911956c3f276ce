//! Building `MCPDeployment.status` from what a reconcile saw and did. Pure: the reconciler writes the result
//! only when it differs from what is stored, so an idle deployment causes no Kubernetes writes.

use fly_adapter::client::types::Machine;

use crate::api::{
    Condition, ConditionStatus, ConditionType, MCPDeploymentStatus, MachineStatus, Phase, reason,
};
use crate::reconcile::plan::Plan;

/// Why a reconcile could not make progress without the user changing something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub reason: String,
    pub message: String,
    /// The specific condition that failed, besides `Stalled` and `Ready` (e.g. `CredentialsReady`).
    pub condition: Option<ConditionType>,
}

pub fn condition(
    type_: ConditionType,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    Condition::new(type_, status, reason, message, generation)
}

/// kstatus: `Reconciling` and `Stalled` are "abnormal-true" conditions, present only while true.
pub fn clear(status: &mut MCPDeploymentStatus, type_: ConditionType) {
    status.conditions.retain(|c| c.type_ != type_.as_str());
}

pub fn mark_stalled(status: &mut MCPDeploymentStatus, stall: &Stall, generation: Option<i64>) {
    if let Some(specific) = stall.condition {
        status.set_condition(condition(
            specific,
            false,
            &stall.reason,
            &stall.message,
            generation,
        ));
    }
    status.set_condition(condition(
        ConditionType::Stalled,
        true,
        &stall.reason,
        &stall.message,
        generation,
    ));
    status.set_condition(condition(
        ConditionType::Ready,
        false,
        &stall.reason,
        &stall.message,
        generation,
    ));
    clear(status, ConditionType::Reconciling);
    status.phase = Some(Phase::Failed);
    status.observed_generation = generation;
}

/// Status after a reconcile that planned (and maybe acted) without being blocked.
pub fn mark_progress(
    status: &mut MCPDeploymentStatus,
    plan: &Plan,
    machines: &[Machine],
    act_error: Option<&str>,
    generation: Option<i64>,
) {
    clear(status, ConditionType::Stalled);
    let converged = plan.converged() && act_error.is_none();
    let was_ready_for_this_generation =
        status.phase == Some(Phase::Ready) && status.observed_generation == generation;
    status.set_machine_counts(plan.ready_machines as i32, plan.desired_machines as i32);
    status.machines = machine_statuses(machines);
    if converged {
        status.set_condition(condition(
            ConditionType::Ready,
            true,
            reason::READY,
            format!(
                "{} of {} machines serving",
                plan.ready_machines, plan.desired_machines
            ),
            generation,
        ));
        clear(status, ConditionType::Reconciling);
        status.phase = Some(Phase::Ready);
    } else {
        let (reason, message) = progress_message(plan, act_error);
        status.set_condition(condition(
            ConditionType::Ready,
            false,
            reason,
            &message,
            generation,
        ));
        status.set_condition(condition(
            ConditionType::Reconciling,
            true,
            reason,
            &message,
            generation,
        ));
        status.phase = Some(if was_ready_for_this_generation {
            Phase::Degraded
        } else {
            Phase::Deploying
        });
    }
    status.observed_generation = generation;
}

fn progress_message(plan: &Plan, act_error: Option<&str>) -> (&'static str, String) {
    if let Some(error) = act_error {
        return (reason::FLY_CALL_FAILED, format!("{error}; retrying"));
    }
    let mut parts: Vec<String> = Vec::new();
    if !plan.actions.is_empty() {
        parts.push(format!(
            "{} change(s) applied on Fly",
            plan.actions.iter().filter(|a| a.is_mutation()).count()
        ));
    }
    parts.extend(plan.waiting.iter().cloned());
    if parts.is_empty() {
        parts.push(format!(
            "{} of {} machines serving",
            plan.ready_machines, plan.desired_machines
        ));
    }
    (reason::PROGRESSING, parts.join("; "))
}

fn machine_statuses(machines: &[Machine]) -> Vec<MachineStatus> {
    let mut list: Vec<(&str, MachineStatus)> = machines
        .iter()
        .filter(|m| !matches!(m.state.as_str(), "destroyed" | "destroying"))
        .map(|m| {
            // Against the configured checks: Fly reports none before a check's first run.
            let counts = crate::reconcile::plan::check_counts(m);
            let total = counts.configured.max(counts.reported);
            let checks = if total == 0 {
                None
            } else if counts.passing == total {
                Some("passing".to_string())
            } else {
                Some(format!("{}/{total} passing", counts.passing))
            };
            (
                m.name.as_str(),
                MachineStatus {
                    id: m.id.clone(),
                    region: m.region.clone(),
                    state: m.state.clone(),
                    version: Some(m.instance_id.clone()).filter(|v| !v.is_empty()),
                    checks,
                },
            )
        })
        .collect();
    list.sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    list.into_iter().map(|(_, s)| s).collect()
}
