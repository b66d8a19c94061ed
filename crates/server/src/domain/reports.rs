//! A daemon's lifecycle reports: started, progress, usage, the end.

use super::transition::new_attempt;
use super::validate::text;
use super::{Domain, Error, Result, invalid};
use crate::model::*;

/// A daemon's end-of-task report.
#[derive(Debug, Clone, Default)]
pub struct TaskEnd {
    pub success: bool,
    pub reason: String,
    pub agent_session_id: String,
    pub working_directory: String,
    /// The attempt it ends; 0 when the daemon did not say.
    pub attempt: i64,
    /// The daemon cut it short as it shut down: queue it again.
    pub requeue: bool,
}

/// Largest progress summary, end reason or summary.
pub const MAX_PROGRESS_BYTES: usize = 4096;
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest agent session id or working directory a daemon reports.
pub const MAX_RESUME_BYTES: usize = 4096;
/// Largest provider or model name in a usage report, and most models.
pub const MAX_MODEL_BYTES: usize = 256;
pub const MAX_USAGE_MODELS: usize = 64;

impl Domain {
    /// A task reported on by a daemon: in the daemon's workspace, assigned
    /// to the reporting daemon, and (when the report names one) in the
    /// attempt the report names.
    pub(super) async fn reported_task(
        &self,
        p: &Principal,
        task_id: &str,
        attempt: i64,
    ) -> Result<Task> {
        if p.kind == TokenKind::Agent {
            // An agent reports (progress) on its own task only.
            if p.task_scope.as_deref() != Some(task_id) {
                // Other tasks do not exist for it.
                return Err(Error::NotFound(format!("task {task_id} not found")));
            }
            return self.load_task(p, task_id).await;
        }
        self.daemon_workspace(p)?;
        let task = self.load_task(p, task_id).await?;
        match (&task.daemon_id, &p.daemon_id) {
            (None, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "task {task_id} is {} and not assigned to a daemon",
                    task.status
                )));
            }
            (Some(on), Some(caller)) if on != caller => {
                return Err(Error::FailedPrecondition(format!(
                    "task {task_id} is assigned to another daemon"
                )));
            }
            _ => {}
        }
        if attempt != 0 && attempt != task.attempt {
            return Err(Error::FailedPrecondition(format!(
                "task {task_id} is in attempt {}, not {attempt}; the report is stale",
                task.attempt
            )));
        }
        Ok(task)
    }

    /// ReportTaskStarted. A task already running is answered as it is, so
    /// the report may be resent.
    pub async fn report_started(&self, p: &Principal, task_id: &str, attempt: i64) -> Result<Task> {
        let task = self.reported_task(p, task_id, attempt).await?;
        self.started(task, "started").await
    }

    /// Moves a dispatched task to running (with its event): on its daemon's
    /// `started`, or on what shows it started (its output, its end, or its
    /// daemon listing it running), so a lost `started` never strands it.
    pub(super) async fn started(&self, task: Task, reason: &str) -> Result<Task> {
        match task.status {
            TaskStatus::Running => return Ok(task),
            // A daemon that comes back reporting its task takes it back.
            TaskStatus::Dispatched | TaskStatus::Interrupted => {}
            status => {
                return Err(Error::FailedPrecondition(format!(
                    "task {} is {status}; it cannot start",
                    task.id
                )));
            }
        }
        let stale_progress = !task.progress_summary.is_empty() || task.progress_percent != -1;
        let actor = daemon_actor(&task);
        let task = self
            .transition(&actor, task, TaskStatus::Running, reason, |t| {
                t.started_at.get_or_insert(t.updated_at);
            })
            .await?;
        if stale_progress {
            // The last attempt's progress says nothing about this one.
            return Ok(self
                .store
                .set_progress(&task.id, "", -1)
                .await?
                .unwrap_or(task));
        }
        Ok(task)
    }

    /// ReportTaskProgress: a one-line summary (redacted) and a percentage,
    /// shown on the task and to its watchers. Not an edit: the version stays.
    pub async fn report_progress(
        &self,
        p: &Principal,
        task_id: &str,
        summary: &str,
        percent: i32,
        attempt: i64,
    ) -> Result<Task> {
        if !(-1..=100).contains(&percent) {
            return Err(invalid("percent", "must be in 0..=100, or -1 when unknown"));
        }
        if summary.len() > MAX_PROGRESS_BYTES {
            return Err(invalid(
                "summary",
                format!("over {MAX_PROGRESS_BYTES} bytes"),
            ));
        }
        let task = self.reported_task(p, task_id, attempt).await?;
        let line = summary.lines().next().unwrap_or_default();
        let summary = super::redact::redact(line).replace('\0', "");
        match self
            .store
            .set_progress(&task.id, &summary, percent.into())
            .await?
        {
            Some(task) => {
                self.task_changed(&task, false);
                Ok(task)
            }
            None => Err(Error::FailedPrecondition(format!(
                "task {task_id} is {}; progress is for dispatched or running tasks",
                task.status
            ))),
        }
    }

    pub async fn report_usage(
        &self,
        p: &Principal,
        task_id: &str,
        usage: Vec<Usage>,
        attempt: i64,
        cost: Option<(f64, i64)>,
    ) -> Result<()> {
        if usage.len() > MAX_USAGE_MODELS {
            return Err(invalid(
                "usage",
                format!("{} entries; at most {MAX_USAGE_MODELS}", usage.len()),
            ));
        }
        let mut clean = Vec::with_capacity(usage.len());
        for u in usage {
            if u.input_tokens < 0
                || u.output_tokens < 0
                || u.cache_read_tokens < 0
                || u.cache_write_tokens < 0
            {
                return Err(invalid("usage", "token counts must not be negative"));
            }
            clean.push(Usage {
                provider: text("usage.provider", &u.provider, MAX_MODEL_BYTES)?,
                model: text("usage.model", &u.model, MAX_MODEL_BYTES)?,
                ..u
            });
        }
        if let Some((cost_usd, turns)) = cost
            && (!cost_usd.is_finite() || cost_usd < 0.0 || turns < 0)
        {
            return Err(invalid(
                "cost_usd",
                "cost and turns must be finite and not negative",
            ));
        }
        let task = self.reported_task(p, task_id, attempt).await?;
        self.store
            .upsert_usage(&task.id, task.attempt, &clean, cost)
            .await?;
        Ok(())
    }

    /// CompleteTask / FailTask. The same end sent again (a resend after a
    /// reconnect) is answered with the recorded end; a different one (a
    /// failure after a completion) is refused. A task still dispatched
    /// starts first, so a lost `started` costs nothing. A task that was
    /// asked to stop ends cancelled.
    pub async fn end_task(&self, p: &Principal, task_id: &str, end: TaskEnd) -> Result<Task> {
        let reason = text("reason", &end.reason, MAX_REASON_BYTES)?;
        let reason = super::redact::redact(&reason).into_owned();
        let session_id = text(
            "resume.agent_session_id",
            &end.agent_session_id,
            MAX_RESUME_BYTES,
        )?;
        let directory = text(
            "resume.working_directory",
            &end.working_directory,
            MAX_RESUME_BYTES,
        )?;
        let task = self.reported_task(p, task_id, end.attempt).await?;
        self.marks.forget(&task.id);
        self.key_blocks.forget(&task.id);
        let same = match task.status {
            TaskStatus::Completed => Some(end.success),
            TaskStatus::Failed => Some(!end.success),
            TaskStatus::Cancelled => Some(true),
            _ => None,
        };
        match same {
            Some(true) => return Ok(task),
            Some(false) => {
                return Err(Error::FailedPrecondition(format!(
                    "task {task_id} is {}; its end is recorded and cannot become {}",
                    task.status,
                    if end.success { "completed" } else { "failed" }
                )));
            }
            None => {}
        }
        let task = match task.status {
            TaskStatus::Dispatched | TaskStatus::Interrupted => {
                self.started(task, "started (its end arrived first)")
                    .await?
            }
            _ => task,
        };
        if end.requeue && !end.success && task.stop_requested_at.is_none() {
            return self
                .requeue_after_shutdown(task, &reason, &session_id, &directory)
                .await;
        }
        let (to, outcome) = match (task.stop_requested_at.is_some(), end.success) {
            (true, _) => (TaskStatus::Cancelled, "stopped"),
            (false, true) => (TaskStatus::Completed, "completed"),
            (false, false) => (TaskStatus::Failed, "failed"),
        };
        let actor = daemon_actor(&task);
        let daemon_id = task.daemon_id.clone();
        let task = self
            .transition(&actor, task, to, outcome, |t| {
                t.ended_at = Some(t.updated_at);
                t.status_reason = reason.clone();
                if !session_id.is_empty() {
                    t.agent_session_id = session_id.clone();
                }
                if !directory.is_empty() {
                    t.working_directory = directory.clone();
                }
            })
            .await?;
        self.close_approvals(&task).await?;
        if let Some(d) = daemon_id {
            self.dispatch_to(&d).await?;
        }
        Ok(task)
    }

    /// Expires the ended task's pending approvals. Most tasks never ask:
    /// their count, kept on the task (and recounted in the session before
    /// its end is handled), spares them the write.
    async fn close_approvals(&self, task: &Task) -> Result<()> {
        if task.pending_approvals == 0 {
            return Ok(());
        }
        if self
            .store
            .close_approvals(&task.id, "the task ended before anyone answered")
            .await?
            > 0
        {
            self.recount_approvals(&task.id).await?;
        }
        Ok(())
    }

    /// A task its daemon cut short while shutting down: recorded
    /// interrupted (its events say why), then queued again as a new attempt
    /// that starts from what the cut one started from. The daemon takes no
    /// more work here; another one will.
    async fn requeue_after_shutdown(
        &self,
        task: Task,
        reason: &str,
        session_id: &str,
        directory: &str,
    ) -> Result<Task> {
        let actor = daemon_actor(&task);
        if let Some(d) = &task.daemon_id {
            self.sessions.drain(d);
        }
        let task = self
            .transition(
                &actor,
                task,
                TaskStatus::Interrupted,
                "interrupted: its daemon shut down",
                |t| {
                    t.ended_at = Some(t.updated_at);
                    t.status_reason = reason.to_owned();
                    if !session_id.is_empty() {
                        t.agent_session_id = session_id.to_owned();
                    }
                    if !directory.is_empty() {
                        t.working_directory = directory.to_owned();
                    }
                },
            )
            .await?;
        self.close_approvals(&task).await?;
        self.store
            .copy_attempt_input(&task.id, task.attempt, task.attempt + 1)
            .await?;
        let task = self
            .transition(
                "system",
                task,
                TaskStatus::Queued,
                "queued again: its daemon shut down before it finished",
                |t| new_attempt(t, &None),
            )
            .await?;
        tracing::info!(task_id = %task.id, attempt = task.attempt, "task queued again: its daemon shut down");
        self.dispatch_workspace(&task.workspace_id).await?;
        Ok(task)
    }

    pub async fn task_status(&self, p: &Principal, task_id: &str) -> Result<Task> {
        self.daemon_workspace(p)?;
        self.load_task(p, task_id).await
    }
}

pub(super) fn daemon_actor(task: &Task) -> String {
    format!("daemon:{}", task.daemon_id.as_deref().unwrap_or("?"))
}
