//! Approvals: an agent asks for a permission its mode does not grant, a
//! person decides.
//!
//! The daemon relays the request as an output message of kind `approval`
//! naming its own request id; storing that message opens an approval (once,
//! however often the message is resent) and the task counts it as waiting
//! for a person. DecideApproval (or the timeout, which denies) records the
//! decision, sends it to the daemon as a durable ApprovalDecision command
//! (it survives a reconnect), and writes an audit event naming who decided.

use std::time::Duration;

use super::validate::{identifier, quote, text};
use super::{Domain, Error, Result, invalid};
use crate::model::*;
use crate::pb;
use crate::store::NewEvent;

/// Most approvals ListApprovals answers.
const MAX_LISTED: i64 = 1000;
/// Largest edited tool input, and decision message.
const MAX_INPUT_BYTES: usize = 256 * 1024;
const MAX_MESSAGE_BYTES: usize = 4096;

/// A decision on an approval.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allow: bool,
    /// For allow: the input to run the tool with instead (JSON).
    pub updated_input_json: String,
    /// For deny: told to the agent.
    pub message: String,
}

impl Domain {
    /// Opens the approval an `approval` message asks for; answers its id.
    pub(super) async fn open_approval(
        &self,
        task: &Task,
        seq: i64,
        request_id: &str,
        tool_name: &str,
        tool_input_json: &str,
    ) -> Result<String> {
        let now = now_micros();
        let timeout = i64::try_from(self.liveness.approval_timeout.as_micros()).unwrap_or(i64::MAX);
        let approval = self
            .store
            .open_approval(&Approval {
                id: uuid::Uuid::now_v7().to_string(),
                task_id: task.id.clone(),
                attempt: task.attempt,
                request_id: request_id.to_string(),
                seq,
                tool_name: tool_name.to_string(),
                tool_input_json: tool_input_json.to_string(),
                state: ApprovalState::Pending,
                decided_by: String::new(),
                message: String::new(),
                updated_input_json: String::new(),
                created_at: now,
                decided_at: None,
                expires_at: now.saturating_add(timeout),
            })
            .await?;
        Ok(approval.id)
    }

    /// Recounts a task's pending approvals and tells its watchers.
    pub(super) async fn recount_approvals(&self, task_id: &str) -> Result<()> {
        if let Some(task) = self.store.count_pending_approvals(task_id).await? {
            self.task_changed(&task, false);
        }
        Ok(())
    }

    pub async fn list_approvals(&self, p: &Principal, task_id: &str) -> Result<Vec<Approval>> {
        let task = self.load_task(p, task_id).await?;
        Ok(self.store.list_approvals(&task.id, MAX_LISTED).await?)
    }

    /// DecideApproval: answers the task's pending approval `approval_id`, or
    /// its only pending one.
    pub async fn decide_approval(
        &self,
        p: &Principal,
        task_id: &str,
        approval_id: Option<&str>,
        decision: Decision,
    ) -> Result<Approval> {
        let updated = text(
            "updated_input_json",
            &decision.updated_input_json,
            MAX_INPUT_BYTES,
        )?;
        if !updated.is_empty() {
            match serde_json::from_str::<serde_json::Value>(&updated) {
                Ok(v) if v.is_object() => {}
                _ => {
                    return Err(invalid(
                        "updated_input_json",
                        "must be a JSON object: the tool's whole input",
                    ));
                }
            }
            if !decision.allow {
                return Err(invalid(
                    "updated_input_json",
                    "goes with allow; a denial has a message",
                ));
            }
        }
        let message = text("message", &decision.message, MAX_MESSAGE_BYTES)?;
        let task = self.load_task(p, task_id).await?;
        let pending: Vec<Approval> = self
            .store
            .list_approvals(&task.id, MAX_LISTED)
            .await?
            .into_iter()
            .filter(|a| a.state == ApprovalState::Pending)
            .collect();
        let approval = match approval_id {
            Some(id) => {
                let id = identifier("approval_id", id, 64)?;
                match pending.into_iter().find(|a| a.id == id) {
                    Some(a) => a,
                    None => {
                        let any = self.store.list_approvals(&task.id, MAX_LISTED).await?;
                        return Err(match any.into_iter().find(|a| a.id == id) {
                            Some(a) => Error::FailedPrecondition(format!(
                                "approval {id} is already {} (by {})",
                                a.state, a.decided_by
                            )),
                            None => Error::NotFound(format!(
                                "approval {} not found on task {task_id}",
                                quote(&id)
                            )),
                        });
                    }
                }
            }
            None => match pending.len() {
                0 => {
                    return Err(Error::FailedPrecondition(format!(
                        "task {task_id} has no approval waiting"
                    )));
                }
                1 => pending.into_iter().next().expect("one"),
                n => {
                    let ids: Vec<String> = pending
                        .iter()
                        .map(|a| format!("{} ({})", a.id, a.tool_name))
                        .collect();
                    return Err(invalid(
                        "approval_id",
                        format!(
                            "task {task_id} has {n} approvals waiting; name one of {}",
                            ids.join(", ")
                        ),
                    ));
                }
            },
        };
        let state = if decision.allow {
            ApprovalState::Allowed
        } else {
            ApprovalState::Denied
        };
        let decided = self
            .store
            .decide_approval(&approval.id, state, &p.subject, &message, &updated)
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("approval {} was decided meanwhile", approval.id))
            })?;
        self.deliver_decision(&task, &decided).await?;
        Ok(decided)
    }

    /// Sends a decision to the agent's daemon, records it as an audit event
    /// and updates the task's count.
    async fn deliver_decision(&self, task: &Task, a: &Approval) -> Result<()> {
        let allow = a.state == ApprovalState::Allowed;
        if task.status.is_active() && task.attempt == a.attempt {
            let decision = pb::ApprovalDecision {
                request_id: a.request_id.clone(),
                allow,
                updated_input_json: a.updated_input_json.clone(),
                message: match (allow, a.message.is_empty()) {
                    (false, true) => format!("{} was denied by {}", a.tool_name, a.decided_by),
                    _ => a.message.clone(),
                },
            };
            self.send_command(task, pb::command::Kind::ApprovalDecision(decision))
                .await?;
        }
        let mut reason = format!("approval {} ({}) {}", a.id, a.tool_name, a.state);
        if !a.message.is_empty() {
            reason.push_str(": ");
            reason.push_str(&a.message);
        }
        self.store
            .add_event(
                task,
                &NewEvent {
                    from: Some(task.status),
                    to: task.status,
                    actor: a.decided_by.clone(),
                    reason,
                },
            )
            .await?;
        self.recount_approvals(&task.id).await
    }

    /// Denies the approvals nobody answered in time; answers how many.
    pub(super) async fn expire_approvals(&self) -> Result<usize> {
        let timeout = self.liveness.approval_timeout;
        let mut n = 0;
        for a in self.store.expired_approvals(now_micros()).await? {
            let why = format!("no one answered within {}; denied", human(timeout));
            let Some(decided) = self
                .store
                .decide_approval(&a.id, ApprovalState::Expired, "system", &why, "")
                .await?
            else {
                continue;
            };
            if let Some(task) = self.store.get_task(&a.task_id).await? {
                self.deliver_decision(&task, &decided).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
