//! A daemon's lifecycle reports: started, progress, usage, the end.

use super::{Domain, Error, Result, invalid};
use crate::model::*;

/// A daemon's end-of-task report.
#[derive(Debug, Clone, Default)]
pub struct TaskEnd {
    pub success: bool,
    pub reason: String,
    pub agent_session_id: String,
    pub working_directory: String,
}

/// Largest progress summary.
pub const MAX_PROGRESS_BYTES: usize = 4096;

impl Domain {
    /// A task reported on by a daemon: it must be in the daemon's workspace
    /// and assigned to a daemon.
    pub(super) async fn reported_task(&self, p: &Principal, task_id: &str) -> Result<Task> {
        self.daemon_workspace(p)?;
        let task = self.load_task(p, task_id).await?;
        match (&task.daemon_id, &p.daemon_id) {
            (None, _) => Err(Error::FailedPrecondition(format!(
                "task {task_id} is not assigned to a daemon"
            ))),
            (Some(on), Some(caller)) if on != caller => Err(Error::FailedPrecondition(format!(
                "task {task_id} is assigned to another daemon"
            ))),
            _ => Ok(task),
        }
    }

    pub async fn report_started(&self, p: &Principal, task_id: &str) -> Result<Task> {
        let task = self.reported_task(p, task_id).await?;
        if task.status == TaskStatus::Running {
            return Ok(task);
        }
        let stale_progress = !task.progress_summary.is_empty() || task.progress_percent != -1;
        let actor = daemon_actor(&task);
        let task = self
            .transition(&actor, task, TaskStatus::Running, "started", |t| {
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
        let task = self.reported_task(p, task_id).await?;
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
    ) -> Result<()> {
        let task = self.reported_task(p, task_id).await?;
        if usage.iter().any(|u| {
            u.input_tokens < 0
                || u.output_tokens < 0
                || u.cache_read_tokens < 0
                || u.cache_write_tokens < 0
        }) {
            return Err(invalid("usage", "token counts must not be negative"));
        }
        self.store.upsert_usage(&task.id, &usage).await?;
        Ok(())
    }

    /// CompleteTask / FailTask. Repeats are answered with the recorded end,
    /// so a daemon may resend its report after a reconnect. A task that was
    /// asked to stop ends cancelled.
    pub async fn end_task(&self, p: &Principal, task_id: &str, end: TaskEnd) -> Result<Task> {
        let task = self.reported_task(p, task_id).await?;
        self.marks.forget(&task.id);
        if task.status.is_finished() && task.status != TaskStatus::Interrupted {
            return Ok(task);
        }
        let (to, reason) = match (task.stop_requested_at.is_some(), end.success) {
            (true, _) => (TaskStatus::Cancelled, "stopped"),
            (false, true) => (TaskStatus::Completed, "completed"),
            (false, false) => (TaskStatus::Failed, "failed"),
        };
        let actor = daemon_actor(&task);
        let daemon_id = task.daemon_id.clone();
        let task = self
            .transition(&actor, task, to, reason, |t| {
                t.ended_at = Some(t.updated_at);
                t.status_reason = end.reason.chars().take(4096).collect();
                if !end.agent_session_id.is_empty() {
                    t.agent_session_id = end.agent_session_id.clone();
                }
                if !end.working_directory.is_empty() {
                    t.working_directory = end.working_directory.clone();
                }
            })
            .await?;
        if let Some(d) = daemon_id {
            self.dispatch_to(&d).await?;
        }
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
