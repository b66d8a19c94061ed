//! The task API: create, read, list, update, delete, start, stop, message.

use super::transition::new_attempt;
use super::validate::*;
use super::{Domain, Error, Result, invalid, version_conflict};
use crate::model::*;
use crate::pb;
use crate::store::{NewEvent, TaskFilter};

/// A task as a client asks for it.
#[derive(Debug, Default)]
pub struct NewTask {
    pub workspace: String,
    pub name: String,
    pub plan: String,
    pub parent_id: Option<String>,
    pub runtime: String,
    pub repository: String,
    pub branch: String,
    pub model: String,
    pub permission_mode: String,
    pub completion_action: CompletionAction,
    pub target_branch: String,
}

/// The fields UpdateTask may change; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct TaskPatch {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub runtime: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    pub completion_action: Option<CompletionAction>,
    pub target_branch: Option<String>,
}

#[derive(Debug, Default)]
pub struct ListTasks {
    pub workspace: String,
    pub statuses: Vec<TaskStatus>,
    pub parent_id: Option<String>,
    pub daemon_id: Option<String>,
    pub page_size: i64,
    pub page_token: Option<String>,
}

/// A page of a task's output.
pub struct MessagesPage {
    pub messages: Vec<TaskMessage>,
    /// The task's highest contiguous stored seq.
    pub last_seq: i64,
    /// When the page starts after output removed by retention: the last
    /// removed seq; else 0.
    pub pruned_through_seq: i64,
}

impl Domain {
    /// Loads a task the caller may see; anything else is NOT_FOUND.
    pub async fn load_task(&self, p: &Principal, id: &str) -> Result<Task> {
        match self.store.get_task(id).await? {
            Some(t) if p.sees(&t.workspace_id) && self.in_scope(p, &t).await? => Ok(t),
            _ => Err(Error::NotFound(format!("task {id} not found"))),
        }
    }

    pub async fn create_task(&self, p: &Principal, new: NewTask) -> Result<Task> {
        let ws = self.resolve_workspace(p, &new.workspace)?;
        let name = check_name("name", &new.name)?;
        let plan = check_plan("plan", &new.plan)?;
        let runtime = check_runtime("runtime", &new.runtime)?;
        let repository = check_repository("repository", &new.repository)?;
        let branch = check_branch("branch", &new.branch)?;
        let target_branch = check_branch("target_branch", &new.target_branch)?;
        let model = check_model("model", &new.model)?;
        let permission_mode = check_permission_mode("permission_mode", &new.permission_mode)?;
        let parent_id = match &p.task_scope {
            // An agent's subtasks go under its own task.
            Some(root) => Some(self.agent_parent(p, root, new.parent_id).await?),
            None => new.parent_id,
        };
        let depth = match &parent_id {
            None => 0,
            Some(parent_id) => {
                let parent = self.load_task(p, parent_id).await?;
                if parent.workspace_id != ws.id {
                    return Err(invalid(
                        "parent_task_id",
                        "the parent task is in another workspace",
                    ));
                }
                if parent.depth + 1 > MAX_DEPTH {
                    return Err(invalid(
                        "parent_task_id",
                        format!("subtasks nest at most {MAX_DEPTH} levels deep"),
                    ));
                }
                parent.depth + 1
            }
        };
        let now = now_micros();
        let task = Task {
            id: uuid::Uuid::now_v7().to_string(),
            workspace_id: ws.id,
            parent_id,
            depth,
            name,
            plan,
            status: TaskStatus::Pending,
            version: 1,
            runtime,
            repository,
            branch,
            daemon_id: None,
            pinned_daemon_id: None,
            attempt: 0,
            status_reason: String::new(),
            agent_session_id: String::new(),
            working_directory: String::new(),
            created_by: p.subject.clone(),
            created_at: now,
            updated_at: now,
            queued_at: None,
            started_at: None,
            ended_at: None,
            last_seq: 0,
            stop_requested_at: None,
            progress_summary: String::new(),
            progress_percent: -1,
            plan_truncated: false,
            output_pruned_seq: 0,
            model,
            permission_mode,
            pending_approvals: 0,
            completion_action: new.completion_action,
            target_branch,
        };
        check_git_fields(&task)?;
        let event = NewEvent {
            from: None,
            to: TaskStatus::Pending,
            actor: p.subject.clone(),
            reason: "created".into(),
        };
        self.store.insert_task(&task, &event).await?;
        self.task_changed(&task, false);
        Ok(task)
    }

    /// The task, its first [`MAX_LISTED_SUBTASKS`] direct subtasks (plans
    /// cut to a preview) and how many it has.
    pub async fn get_task(&self, p: &Principal, id: &str) -> Result<(Task, Vec<Task>, i64)> {
        let task = self.load_task(p, id).await?;
        let subtasks = self.store.subtasks(&task.id, MAX_LISTED_SUBTASKS).await?;
        let count = if (subtasks.len() as i64) < MAX_LISTED_SUBTASKS {
            subtasks.len() as i64
        } else {
            self.store.count_subtasks(&task.id).await?
        };
        Ok((task, subtasks, count))
    }

    /// A page of tasks, newest first, and the token of the next page.
    pub async fn list_tasks(
        &self,
        p: &Principal,
        q: ListTasks,
    ) -> Result<(Vec<Task>, Option<String>)> {
        let ws = self.resolve_workspace(p, &q.workspace)?;
        // An agent lists the subtasks of its task, or of one below it.
        let parent_id = match (&p.task_scope, q.parent_id) {
            (Some(root), named) => Some(
                self.load_task(p, named.as_deref().unwrap_or(root))
                    .await?
                    .id,
            ),
            (None, named) => named,
        };
        let mut tasks = self
            .store
            .list_tasks(&TaskFilter {
                workspace_id: ws.id,
                statuses: q.statuses,
                parent_id,
                daemon_id: q.daemon_id,
                before_id: q.page_token,
                limit: q.page_size + 1,
            })
            .await?;
        Ok(next_page(&mut tasks, q.page_size, task_bytes, |t| {
            t.id.clone()
        }))
    }

    pub async fn update_task(
        &self,
        p: &Principal,
        id: &str,
        patch: TaskPatch,
        expected_version: i64,
    ) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        if expected_version != 0 && expected_version != task.version {
            return Err(version_conflict(id, expected_version, task.version));
        }
        let mut next = task.clone();
        if let Some(name) = patch.name {
            next.name = check_name("task.name", &name)?;
        }
        if let Some(plan) = patch.plan {
            next.plan = check_plan("task.plan", &plan)?;
        }
        if let Some(runtime) = patch.runtime {
            next.runtime = check_runtime("task.runtime", &runtime)?;
        }
        if let Some(repository) = patch.repository {
            next.repository = check_repository("task.repository", &repository)?;
        }
        if let Some(branch) = patch.branch {
            next.branch = check_branch("task.branch", &branch)?;
        }
        if let Some(action) = patch.completion_action {
            next.completion_action = action;
        }
        if let Some(target) = patch.target_branch {
            next.target_branch = check_branch("task.target_branch", &target)?;
        }
        check_git_fields(&next)?;
        if let Some(model) = patch.model {
            next.model = check_model("task.model", &model)?;
        }
        if let Some(mode) = patch.permission_mode {
            next.permission_mode = check_permission_mode("task.permission_mode", &mode)?;
        }
        next.version = task.version + 1;
        next.updated_at = now_micros();
        if self.store.save_task(&mut next, task.version, None).await? {
            self.task_changed(&next, false);
            return Ok(next);
        }
        // Someone changed the task between our read and our write.
        let actual = self.load_task(p, id).await?.version;
        Err(version_conflict(id, task.version, actual))
    }

    /// Deletes a task and its subtasks; one on a daemon is interrupted first.
    pub async fn delete_task(&self, p: &Principal, id: &str) -> Result<()> {
        let task = self.load_task(p, id).await?;
        let mut doomed = vec![task.clone()];
        doomed.extend(self.store.subtree(&task.id).await?);
        for t in doomed.iter().filter(|t| t.status.is_active()) {
            self.send_command(t, interrupt()).await?;
        }
        if !self.store.delete_task(&task.id).await? {
            return Err(Error::NotFound(format!("task {id} not found")));
        }
        for t in &doomed {
            self.task_changed(t, true);
        }
        self.remove_worktrees(&doomed).await;
        Ok(())
    }

    /// Queues the task; starting a task that ran before opens a new attempt.
    pub async fn start_task(&self, p: &Principal, id: &str, pin: Option<String>) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        self.check_pin(&task, pin.as_deref()).await?;
        let task = self
            .transition(&p.subject, task, TaskStatus::Queued, "started", |t| {
                new_attempt(t, &pin)
            })
            .await?;
        self.dispatch_workspace(&task.workspace_id).await?;
        Ok(self.store.get_task(&task.id).await?.unwrap_or(task))
    }

    /// Why a started task may wait a long time: no daemon of its workspace
    /// has ever offered its runtime.
    pub async fn runtime_warning(&self, task: &Task) -> Result<Option<String>> {
        if task.status != TaskStatus::Queued
            || self
                .store
                .runtime_offered(&task.workspace_id, &task.runtime)
                .await?
        {
            return Ok(None);
        }
        Ok(Some(format!(
            "no daemon of this workspace has offered the runtime \"{}\"; the task waits \
             until one does (start a daemon with --runtime {})",
            task.runtime, task.runtime
        )))
    }

    /// A daemon a task is pinned to must exist in the task's workspace.
    pub(super) async fn check_pin(&self, task: &Task, pin: Option<&str>) -> Result<()> {
        let Some(daemon_id) = pin else {
            return Ok(());
        };
        match self.store.get_daemon(daemon_id).await? {
            Some(d) if d.workspace_id == task.workspace_id => Ok(()),
            _ => Err(Error::NotFound(format!("daemon {daemon_id} not found"))),
        }
    }

    /// Cancels a task not yet on a daemon. A task on a daemon gets an
    /// InterruptTask and ends cancelled when the daemon reports its end, or
    /// at once when its daemon has no session.
    /// Idempotent: a task its daemon was already asked to stop gets no
    /// second InterruptTask, and a cancelled task stays as it is.
    pub async fn stop_task(&self, p: &Principal, id: &str) -> Result<(Task, StopOutcome)> {
        let task = self.load_task(p, id).await?;
        if task.status == TaskStatus::Cancelled {
            return Ok((task, StopOutcome::AlreadyCancelled));
        }
        if !task.status.is_active() {
            let task = self
                .transition(&p.subject, task, TaskStatus::Cancelled, "stopped", |t| {
                    t.ended_at = Some(t.updated_at);
                })
                .await?;
            return Ok((task, StopOutcome::Cancelled));
        }
        if task.stop_requested_at.is_some() {
            return Ok((task, StopOutcome::AlreadyStopping));
        }
        let connected = match task.daemon_id.as_deref() {
            Some(d) => self.daemon_connected(d).await?,
            None => false,
        };
        if connected {
            // The stop is recorded before the daemon hears of it: a daemon
            // quick to report the end must find it, or the task ends failed.
            let now = now_micros();
            let mut next = task.clone();
            next.stop_requested_at = Some(now);
            next.version += 1;
            next.updated_at = now;
            if self.store.save_task(&mut next, task.version, None).await? {
                self.task_changed(&next, false);
                self.send_command(&next, interrupt()).await?;
                return Ok((next, StopOutcome::Interrupting));
            }
            // It changed meanwhile (ended, most likely): judge again.
            return Box::pin(self.stop_task(p, id)).await;
        }
        self.send_command(&task, interrupt()).await?;
        let task = self
            .transition(
                &p.subject,
                task,
                TaskStatus::Cancelled,
                "stopped; daemon away",
                |t| {
                    t.ended_at = Some(t.updated_at);
                },
            )
            .await?;
        Ok((task, StopOutcome::Cancelled))
    }

    /// Text for a running agent's stdin, as a durable SendInput command.
    pub async fn send_message(&self, p: &Principal, id: &str, text: String) -> Result<String> {
        let text = check_plan("text", &text)?;
        let task = self.load_task(p, id).await?;
        if !task.status.is_active() {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; messages go to dispatched or running tasks",
                task.status
            )));
        }
        self.send_command(&task, pb::command::Kind::SendInput(pb::SendInput { text }))
            .await
    }

    pub async fn list_task_events(
        &self,
        p: &Principal,
        task_id: &str,
        page_size: i64,
        page_token: &str,
    ) -> Result<(Vec<TaskEvent>, Option<String>)> {
        let task = self.load_task(p, task_id).await?;
        let after = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse::<i64>()
                .map_err(|_| invalid("page_token", "malformed"))?
        };
        let mut events = self
            .store
            .list_events(&task.id, after, page_size + 1)
            .await?;
        Ok(next_page(
            &mut events,
            page_size,
            |e| e.reason.len() + e.actor.len() + 128,
            |e| e.id.to_string(),
        ))
    }

    pub async fn list_task_messages(
        &self,
        p: &Principal,
        task_id: &str,
        since_seq: i64,
        limit: i64,
    ) -> Result<MessagesPage> {
        if since_seq < 0 {
            return Err(invalid("since_seq", "must not be negative"));
        }
        let task = self.load_task(p, task_id).await?;
        // Pruned output is gone: say so, and go on after it.
        let pruned = (since_seq < task.output_pruned_seq).then_some(task.output_pruned_seq);
        let mut messages = self
            .store
            .list_messages(
                &task.id,
                since_seq.max(task.output_pruned_seq),
                limit,
                RESPONSE_BUDGET_BYTES,
            )
            .await?;
        // Only the acknowledged, gapless prefix: a message past a gap would
        // let a pager skip the gap for good.
        messages.retain(|m| m.seq <= task.last_seq);
        Ok(MessagesPage {
            messages,
            last_seq: task.last_seq,
            pruned_through_seq: pruned.unwrap_or(0),
        })
    }

    pub async fn task_usage(&self, p: &Principal, task_id: &str) -> Result<TaskUsage> {
        let task = self.load_task(p, task_id).await?;
        Ok(self.store.task_usage(&task.id).await?)
    }
}

pub(super) fn interrupt() -> pb::command::Kind {
    pb::command::Kind::InterruptTask(pb::InterruptTask { grace_seconds: 0 })
}

/// Trims a page fetched with one extra row, answering the next page token.
///
/// A page is also cut to [`RESPONSE_BUDGET_BYTES`] (by `size`, an estimate
/// of each item's encoded size), so every answer stays under the 4 MiB
/// that gRPC clients accept by default; the first item always goes.
pub(super) fn next_page<T>(
    items: &mut Vec<T>,
    page_size: i64,
    size: impl Fn(&T) -> usize,
    token: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let mut more = items.len() as i64 > page_size;
    items.truncate(page_size as usize);
    let mut total = 0usize;
    let fit = items
        .iter()
        .position(|item| {
            total = total.saturating_add(size(item));
            total > RESPONSE_BUDGET_BYTES
        })
        .map_or(items.len(), |over| over.max(1));
    if fit < items.len() {
        items.truncate(fit);
        more = true;
    }
    let next = if more { items.last().map(&token) } else { None };
    (std::mem::take(items), next)
}

/// Subtasks GetTask lists; ListTasks with a parent filter pages the rest.
pub const MAX_LISTED_SUBTASKS: i64 = 100;

/// About how many bytes a task takes on the wire.
pub(super) fn task_bytes(t: &Task) -> usize {
    t.plan.len()
        + t.name.len()
        + t.status_reason.len()
        + t.progress_summary.len()
        + t.repository.len()
        + t.branch.len()
        + t.agent_session_id.len()
        + t.working_directory.len()
        + t.created_by.len()
        + 256
}
