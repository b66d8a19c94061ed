//! Daemons: registration, dispatch (push and claim), the lifecycle reports,
//! gapless output and the durable command outbox.

use prost::Message;

use super::status::is_finished;
use super::{Domain, Error, Result, check_runtime, invalid};
use crate::model::*;
use crate::pb;
use crate::store::{DaemonInfo, NewCommand, NewMessage};
use crate::wire;

/// Most output messages in one report; larger batches are refused.
pub const MAX_BATCH: usize = 5000;
/// Largest single message content.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Largest progress summary.
pub const MAX_PROGRESS_BYTES: usize = 4096;

/// A task handed to a daemon, with what it needs to start.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub task: Task,
    pub first_seq: i64,
    pub input: AttemptInput,
}

/// A daemon's end-of-task report.
#[derive(Debug, Clone, Default)]
pub struct TaskEnd {
    pub success: bool,
    pub reason: String,
    pub agent_session_id: String,
    pub working_directory: String,
}

impl Domain {
    /// The one workspace of a daemon token; user tokens are refused.
    fn daemon_workspace<'p>(&self, p: &'p Principal) -> Result<&'p Workspace> {
        match (p.kind, p.workspaces.as_slice()) {
            (TokenKind::Daemon, [ws]) => Ok(ws),
            _ => Err(Error::PermissionDenied(
                "DaemonService needs a daemon token".into(),
            )),
        }
    }

    /// A daemon of the caller's workspace.
    pub async fn load_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        let ws = self.daemon_workspace(p)?;
        match self.store.get_daemon(id).await? {
            Some(d) if d.workspace_id == ws.id => Ok(d),
            _ => Err(Error::NotFound(format!("daemon {id} not found"))),
        }
    }

    pub async fn register_daemon(
        &self,
        p: &Principal,
        mut info: DaemonInfo,
        legacy_ids: &[String],
    ) -> Result<Daemon> {
        info.workspace_id = self.daemon_workspace(p)?.id.clone();
        if info.machine_id.trim().is_empty() || info.machine_id.len() > 256 {
            return Err(invalid("machine_id", "must be 1-256 characters"));
        }
        if !(1..=1024).contains(&info.max_concurrent_tasks) {
            return Err(invalid("max_concurrent_tasks", "must be in 1..=1024"));
        }
        for r in &info.runtimes {
            check_runtime("runtimes", &r.name)?;
        }
        Ok(self.store.register_daemon(&info, legacy_ids).await?)
    }

    pub async fn deregister_daemon(&self, p: &Principal, id: &str) -> Result<()> {
        let d = self.load_daemon(p, id).await?;
        self.sessions.remove(&d.id);
        self.store
            .set_daemon_state(&d.id, DaemonState::Gone)
            .await?;
        Ok(())
    }

    /// Heartbeats only touch memory; the database hears of a daemon when
    /// its state changes and from the liveness sweep.
    pub async fn heartbeat(&self, p: &Principal, id: &str) -> Result<()> {
        let ws = self.daemon_workspace(p)?;
        if self.sessions.touch(id, &ws.id) {
            return Ok(());
        }
        let daemon = self.load_daemon(p, id).await?;
        if daemon.state != DaemonState::Online {
            self.store
                .set_daemon_state(&daemon.id, DaemonState::Online)
                .await?;
        }
        self.sessions.alive(&daemon);
        Ok(())
    }

    /// ClaimTask: the oldest queued task this daemon can run, atomically.
    pub async fn claim_task(&self, p: &Principal, daemon_id: &str) -> Result<Option<Assignment>> {
        let daemon = self.load_daemon(p, daemon_id).await?;
        if self
            .store
            .with_free_slots(vec![daemon.clone()])
            .await?
            .is_empty()
        {
            return Ok(None);
        }
        let Some((task, input)) = self.store.claim_task(&daemon, None).await? else {
            return Ok(None);
        };
        self.task_changed(&task, false);
        Ok(Some(Assignment {
            first_seq: task.last_seq + 1,
            task,
            input,
        }))
    }

    /// Pushes queued work to a connected daemon while it has free slots:
    /// each claim writes its SpawnTask into the outbox in the same
    /// transaction, then the session's pump is woken.
    pub async fn dispatch_to(&self, daemon_id: &str) -> Result<usize> {
        let Some(daemon) = self.sessions.dispatchable(daemon_id) else {
            return Ok(0);
        };
        let mut n = 0;
        for (daemon, free) in self.store.with_free_slots(vec![daemon]).await? {
            n += self.fill(&daemon, free).await?;
        }
        Ok(n)
    }

    /// Claims up to `free` queued tasks for a connected daemon, each with
    /// its SpawnTask, then wakes the daemon's session.
    async fn fill(&self, daemon: &Daemon, free: i64) -> Result<usize> {
        let make = |task: &Task, input: &AttemptInput| spawn_command(&daemon.id, task, input);
        let mut n = 0;
        while (n as i64) < free {
            let Some((task, _)) = self.store.claim_task(daemon, Some(&make)).await? else {
                break;
            };
            self.task_changed(&task, false);
            n += 1;
        }
        if n > 0 {
            self.sessions.wake(&daemon.id);
        }
        Ok(n)
    }

    /// Offers a workspace's queue to each of its connected daemons.
    pub async fn dispatch_workspace(&self, workspace_id: &str) -> Result<()> {
        // Most connected daemons are usually busy: one read finds the free
        // ones, rather than a read per daemon.
        let daemons = self.sessions.in_workspace(workspace_id);
        for (daemon, free) in self.store.with_free_slots(daemons).await? {
            self.fill(&daemon, free).await?;
        }
        Ok(())
    }

    /// A task reported on by a daemon: it must be in the daemon's workspace
    /// and assigned to a daemon.
    async fn reported_task(&self, p: &Principal, task_id: &str) -> Result<Task> {
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

    /// Stores a batch of output (redacted, NUL-free) and answers the highest
    /// contiguous seq stored. A message that cannot be stored as sent (bad
    /// kind, too large) is stored as a system note instead, so one bad
    /// message never fails its batch nor leaves a gap.
    pub async fn ingest(
        &self,
        p: &Principal,
        task_id: &str,
        input: Vec<pb::TaskMessageInput>,
    ) -> Result<i64> {
        if input.len() > MAX_BATCH {
            return Err(Error::ResourceExhausted(format!(
                "{} messages in one batch; at most {MAX_BATCH}",
                input.len()
            )));
        }
        // The usual batch continues where the last one from this session
        // ended: two statements, no reads.
        let known = self.marks.get(task_id).filter(|m| {
            p.sees(&m.workspace_id) && p.daemon_id.as_deref() == Some(m.daemon_id.as_str())
        });
        if let Some(mark) = known {
            let messages: Vec<NewMessage> = input
                .iter()
                .filter(|m| m.seq > mark.seq)
                .cloned()
                .map(clean_message)
                .collect();
            if messages.is_empty() {
                return Ok(mark.seq);
            }
            let continues = messages
                .iter()
                .enumerate()
                .all(|(i, m)| m.seq == mark.seq + 1 + i as i64);
            if continues
                && self
                    .store
                    .append_messages(task_id, &mark.daemon_id, mark.attempt, mark.seq, &messages)
                    .await?
            {
                let new = messages.last().map_or(mark.seq, |m| m.seq);
                self.marks.advance(task_id, new);
                self.publish_output(
                    task_id,
                    &mark.workspace_id,
                    mark.attempt,
                    &messages,
                    mark.seq,
                    new,
                )
                .await?;
                return Ok(new);
            }
            self.marks.forget(task_id);
        }
        let task = self.reported_task(p, task_id).await?;
        let messages: Vec<NewMessage> = input
            .into_iter()
            .filter(|m| m.seq > task.last_seq)
            .map(clean_message)
            .collect();
        if messages.is_empty() {
            return Ok(task.last_seq);
        }
        let (old, new, clean) = self
            .store
            .insert_messages(&task.id, task.attempt, &messages)
            .await?;
        if let (true, Some(daemon_id)) = (clean, &task.daemon_id) {
            self.marks.remember(&task, daemon_id, new);
        }
        if new > old {
            self.publish_output(
                &task.id,
                &task.workspace_id,
                task.attempt,
                &messages,
                old,
                new,
            )
            .await?;
        }
        Ok(new)
    }

    /// Publishes the messages that became contiguous, (old, new]. Usually
    /// they are all in this batch; when an earlier out-of-order batch filled
    /// part of the range, the range is read back from the store instead, so
    /// live watchers never wait on a message nobody will publish again.
    pub(super) async fn publish_output(
        &self,
        task_id: &str,
        workspace_id: &str,
        attempt: i64,
        batch: &[NewMessage],
        old: i64,
        new: i64,
    ) -> Result<()> {
        let fresh: Vec<&NewMessage> = batch
            .iter()
            .filter(|m| m.seq > old && m.seq <= new)
            .collect();
        self.output_grew(task_id, workspace_id, old, new);
        if fresh.len() as i64 != new - old {
            for m in self.store.list_messages(task_id, old, new - old).await? {
                self.hub.message(m);
            }
            return Ok(());
        }
        let now = now_micros();
        for m in fresh {
            self.hub.message(TaskMessage {
                task_id: task_id.to_string(),
                seq: m.seq,
                kind: m.kind,
                content: m.content.clone(),
                tool_name: m.tool_name.clone(),
                tool_input_json: m.tool_input_json.clone(),
                attempt,
                created_at: now,
            });
        }
        Ok(())
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
        if is_finished(task.status) && task.status != TaskStatus::Interrupted {
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

    /// Queues a command for the daemon holding `task` and wakes its session.
    /// Answers the command id.
    pub async fn send_command(&self, task: &Task, kind: pb::command::Kind) -> Result<String> {
        let daemon_id = task.daemon_id.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!("task {} is not on a daemon", task.id))
        })?;
        let id = uuid::Uuid::now_v7().to_string();
        let command = pb::Command {
            id: id.clone(),
            task_id: task.id.clone(),
            kind: Some(kind),
        };
        self.store
            .insert_command(&NewCommand {
                id: id.clone(),
                daemon_id: daemon_id.clone(),
                task_id: task.id.clone(),
                payload: command.encode_to_vec(),
            })
            .await?;
        self.wake_daemon(&daemon_id);
        Ok(id)
    }

    /// A CommandResult: the command leaves the outbox. A SpawnTask the
    /// daemon could not run fails its task with the daemon's reason; one it
    /// rejected for now (shutting down, full) is queued again for another
    /// daemon, and this session gets no more pushed work.
    pub async fn command_result(&self, daemon_id: &str, result: &pb::CommandResult) -> Result<()> {
        let status = pb::CommandResultStatus::try_from(result.status)
            .unwrap_or(pb::CommandResultStatus::Unspecified);
        let Some(acked) = self
            .store
            .ack_command(
                daemon_id,
                &result.command_id,
                status.as_str_name(),
                &result.message,
            )
            .await?
        else {
            return Ok(());
        };
        let refused = !matches!(status, pb::CommandResultStatus::Ok);
        let is_spawn = matches!(
            pb::Command::decode(acked.payload.as_slice()).map(|c| c.kind),
            Ok(Some(pb::command::Kind::SpawnTask(_)))
        );
        if !(refused && is_spawn) {
            return Ok(());
        }
        let Some(task) = self.store.get_task(&acked.task_id).await? else {
            return Ok(());
        };
        if status == pb::CommandResultStatus::Rejected {
            self.sessions.drain(daemon_id);
            if task.status == TaskStatus::Dispatched
                && task.daemon_id.as_deref() == Some(daemon_id)
                && let Some(t) = self.requeue(task, "its daemon rejected it for now").await?
            {
                self.dispatch_workspace(&t.workspace_id).await?;
            }
            return Ok(());
        }
        let reason = format!("daemon {daemon_id} could not start it: {}", result.message);
        let on_it = |t: &Task| {
            t.status == TaskStatus::Dispatched && t.daemon_id.as_deref() == Some(daemon_id)
        };
        self.transition_when(
            &format!("daemon:{daemon_id}"),
            task,
            TaskStatus::Failed,
            "spawn refused",
            on_it,
            |t| {
                t.status_reason = reason.chars().take(4096).collect();
                t.ended_at = Some(t.updated_at);
            },
        )
        .await?;
        self.dispatch_to(daemon_id).await?;
        Ok(())
    }

    /// Notes a sign of life from a daemon's session.
    pub fn session_alive(&self, p: &Principal, daemon_id: &str) {
        if let [ws] = p.workspaces.as_slice() {
            self.sessions.touch(daemon_id, &ws.id);
        }
    }

    /// Whether `conn` is still the daemon's session: false once a newer
    /// session replaced it, the daemon deregistered, or it fell silent.
    pub fn session_current(&self, daemon_id: &str, conn: u64) -> bool {
        self.sessions.is_current(daemon_id, conn)
    }

    /// A session opened: the daemon is online here, gets what is queued for
    /// it, and tasks it no longer runs are not left hanging.
    pub async fn open_session(
        &self,
        p: &Principal,
        daemon_id: &str,
        running: &[String],
    ) -> Result<(Daemon, u64, std::sync::Arc<tokio::sync::Notify>)> {
        let daemon = self.load_daemon(p, daemon_id).await?;
        self.store
            .set_daemon_state(&daemon.id, DaemonState::Online)
            .await?;
        let (conn, wake) = self.sessions.register(daemon.clone());
        for task in self.store.active_tasks_of(&daemon.id).await? {
            if task.status == TaskStatus::Running && !running.contains(&task.id) {
                let reason = "the daemon reconnected without it";
                self.transition("system", task, TaskStatus::Interrupted, reason, |t| {
                    t.status_reason = reason.into();
                    t.ended_at = Some(t.updated_at);
                })
                .await?;
            }
        }
        self.dispatch_to(&daemon.id).await?;
        Ok((daemon, conn, wake))
    }

    pub async fn close_session(&self, daemon_id: &str, conn: u64) -> Result<()> {
        if self.sessions.unregister(daemon_id, conn) {
            self.store
                .set_daemon_state(daemon_id, DaemonState::Offline)
                .await?;
        }
        Ok(())
    }
}

fn daemon_actor(task: &Task) -> String {
    format!("daemon:{}", task.daemon_id.as_deref().unwrap_or("?"))
}

fn spawn_command(daemon_id: &str, task: &Task, input: &AttemptInput) -> NewCommand {
    let id = uuid::Uuid::now_v7().to_string();
    let resume = (!task.agent_session_id.is_empty()).then(|| pb::AgentResume {
        agent_session_id: task.agent_session_id.clone(),
        working_directory: task.working_directory.clone(),
    });
    let command = pb::Command {
        id: id.clone(),
        task_id: task.id.clone(),
        kind: Some(pb::command::Kind::SpawnTask(pb::SpawnTask {
            task: Some(wire::task(task.clone())),
            first_seq: task.last_seq + 1,
            resume,
            context: input.context.clone(),
            prompt: input.prompt.clone(),
        })),
    };
    NewCommand {
        id,
        daemon_id: daemon_id.to_string(),
        task_id: task.id.clone(),
        payload: command.encode_to_vec(),
    }
}

fn clean_message(m: pb::TaskMessageInput) -> NewMessage {
    let kind = match pb::MessageKind::try_from(m.kind) {
        Ok(pb::MessageKind::Assistant) => Some(MessageKind::Assistant),
        Ok(pb::MessageKind::ToolUse) => Some(MessageKind::ToolUse),
        Ok(pb::MessageKind::ToolResult) => Some(MessageKind::ToolResult),
        Ok(pb::MessageKind::User) => Some(MessageKind::User),
        Ok(pb::MessageKind::System) => Some(MessageKind::System),
        Ok(pb::MessageKind::Stdout) => Some(MessageKind::Stdout),
        Ok(pb::MessageKind::Stderr) => Some(MessageKind::Stderr),
        _ => None,
    };
    let redact = |s: &str| super::redact::redact(s).into_owned();
    match kind {
        Some(kind) if m.content.len() <= MAX_MESSAGE_BYTES => NewMessage {
            seq: m.seq,
            kind,
            content: redact(&m.content),
            tool_name: redact(&m.tool_name),
            tool_input_json: redact(&m.tool_input_json),
        },
        _ => NewMessage {
            seq: m.seq,
            kind: MessageKind::System,
            content: format!(
                "[message {} dropped: unknown kind {} or over {MAX_MESSAGE_BYTES} bytes ({} bytes)]",
                m.seq,
                m.kind,
                m.content.len()
            ),
            tool_name: String::new(),
            tool_input_json: String::new(),
        },
    }
}
