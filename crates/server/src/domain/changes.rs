//! What an attempt changed in its repository (reported by its daemon
//! before the attempt's end), and the completion action: its result as an
//! event, and running it again on the daemon that holds the worktree.

use super::redact::redact;
use super::reports::{MAX_REASON_BYTES, daemon_actor};
use super::validate::{MAX_PATH_BYTES, text};
use super::{Domain, Error, Result, invalid};
use crate::model::*;
use crate::pb;
use crate::store::NewEvent;

/// Largest patch a daemon reports; it cuts longer ones and says so.
pub const MAX_PATCH_BYTES: usize = 1 << 20;
/// Most files listed per attempt (the counts cover all of them).
pub const MAX_CHANGED_FILES: usize = 1000;

impl Domain {
    /// ReportTaskChanges: stored with the attempt; a completion result in
    /// it becomes an event of the task.
    pub async fn report_changes(
        &self,
        p: &Principal,
        task_id: &str,
        attempt: i64,
        mut changes: TaskChanges,
        patch: &str,
    ) -> Result<()> {
        if patch.len() > MAX_PATCH_BYTES {
            return Err(invalid(
                "patch",
                format!("{} bytes; cut it at {MAX_PATCH_BYTES}", patch.len()),
            ));
        }
        if changes.files.len() > MAX_CHANGED_FILES {
            return Err(invalid(
                "changes.files",
                format!(
                    "{} files; list at most {MAX_CHANGED_FILES}",
                    changes.files.len()
                ),
            ));
        }
        for f in &mut changes.files {
            f.path = text("changes.files.path", &f.path, MAX_PATH_BYTES)?;
        }
        changes.branch = text("changes.branch", &changes.branch, 256)?;
        changes.base_commit = text("changes.base_commit", &changes.base_commit, 64)?;
        changes.head_commit = text("changes.head_commit", &changes.head_commit, 64)?;
        if !matches!(changes.completion_state.as_str(), "" | "ok" | "failed") {
            return Err(invalid(
                "changes.completion_state",
                "must be \"ok\", \"failed\" or empty",
            ));
        }
        let detail = text(
            "changes.completion_detail",
            &changes.completion_detail,
            MAX_REASON_BYTES,
        )?;
        changes.completion_detail = redact(&detail).into_owned();
        let task = self.reported_task(p, task_id, attempt).await?;
        changes.attempt = task.attempt;
        let patch = redact(&patch.replace('\0', "")).into_owned();
        self.store.put_changes(&task.id, &changes, &patch).await?;
        if !changes.completion_state.is_empty() {
            let event = completion_event(
                &task,
                &daemon_actor(&task),
                &changes.completion_state,
                &changes.completion_detail,
                false,
            );
            self.store.add_event(&task, &event).await?;
        }
        Ok(())
    }

    /// The newest attempt's changes, for GetTask.
    pub async fn latest_changes(&self, task: &Task) -> Result<Option<TaskChanges>> {
        if task.repository.is_empty() {
            return Ok(None);
        }
        Ok(self.store.latest_changes(&task.id).await?)
    }

    /// GetTaskDiff.
    pub async fn task_diff(&self, p: &Principal, id: &str) -> Result<(TaskChanges, String)> {
        let task = self.load_task(p, id).await?;
        self.store.latest_diff(&task.id).await?.ok_or_else(|| {
            Error::NotFound(if task.repository.is_empty() {
                format!("task {id} names no repository, so it has no diff")
            } else {
                format!(
                    "task {id} has no recorded changes yet: they are reported when an attempt ends"
                )
            })
        })
    }

    /// RetryCompletion: asks the daemon holding the task's worktree to run
    /// its completion action again (a durable RetryCompletionAction
    /// command); its result comes back as the command's result.
    pub async fn retry_completion(&self, p: &Principal, id: &str) -> Result<(Task, String)> {
        let task = self.load_task(p, id).await?;
        if task.completion_action == CompletionAction::None {
            return Err(Error::FailedPrecondition(format!(
                "task {id} has no completion action to retry (it is none)"
            )));
        }
        if task.status != TaskStatus::Completed {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; completion actions run for completed tasks",
                task.status
            )));
        }
        if self.store.latest_changes(&task.id).await?.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "task {id} has no worktree on record: its daemon reported no changes"
            )));
        }
        let daemon_id = task.daemon_id.clone().unwrap_or_default();
        if !self.daemon_online(&daemon_id).await? {
            return Err(Error::Unavailable(format!(
                "daemon {daemon_id} holds the worktree of task {id} and is offline; start that daemon again to retry"
            )));
        }
        let action = pb::RetryCompletionAction {
            action: task.completion_action.as_str().into(),
            target_branch: task.target_branch.clone(),
        };
        let command_id = self
            .send_command(&task, pb::command::Kind::RetryCompletionAction(action))
            .await?;
        Ok((task, command_id))
    }

    /// The daemon's answer to a RetryCompletionAction: recorded on the
    /// changes and as an event.
    pub(super) async fn completion_retried(
        &self,
        daemon_id: &str,
        task_id: &str,
        ok: bool,
        message: &str,
    ) -> Result<()> {
        let Some(task) = self.store.get_task(task_id).await? else {
            return Ok(());
        };
        let state = if ok { "ok" } else { "failed" };
        let actor = format!("daemon:{daemon_id}");
        let event = completion_event(&task, &actor, state, message, true);
        self.store
            .set_completion(&task, state, message, &event)
            .await?;
        Ok(())
    }
}

/// "push: pushed …" or "merge failed: conflict in …", as an event that
/// leaves the status as it is.
fn completion_event(
    task: &Task,
    actor: &str,
    state: &str,
    detail: &str,
    retried: bool,
) -> NewEvent {
    let how = match (state, retried) {
        ("ok", false) => "done",
        ("ok", true) => "done on retry",
        (_, false) => "failed",
        (_, true) => "failed again",
    };
    NewEvent {
        from: Some(task.status),
        to: task.status,
        actor: actor.to_owned(),
        reason: format!("{} {how}: {detail}", task.completion_action),
    }
}
