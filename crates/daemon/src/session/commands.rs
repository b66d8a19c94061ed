//! Commands from the server, each answered once: a command id seen before
//! is answered with the result it got, never run twice.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::shutdown::Phase;
use super::{Session, TaskRecord, up};
use crate::agents::Turn;
use crate::output::OutputBuffer;
use crate::pb::session_request::Message as Up;
use crate::pb::session_response::Message as Down;
use crate::pb::{
    Command, CommandResult, CommandResultStatus, CompletionAction, RetryCompletionAction,
    SpawnTask, command,
};
use crate::runner::{self, Control, RunnerEvent, TaskSpec, git, send_control};
use crate::worktrees;

/// Results of recent commands by id, so a redelivered command is answered
/// again without running twice. `None` while the result is not known yet.
pub(super) struct SeenCommands {
    results: HashMap<String, Option<CommandResult>>,
    order: VecDeque<String>,
    cap: usize,
}

impl Default for SeenCommands {
    fn default() -> Self {
        Self {
            results: HashMap::new(),
            order: VecDeque::new(),
            cap: SEEN_COMMANDS,
        }
    }
}

impl SeenCommands {
    pub(super) fn get(&self, id: &str) -> Option<&Option<CommandResult>> {
        self.results.get(id)
    }

    pub(super) fn insert(&mut self, id: &str) {
        if self.results.insert(id.to_owned(), None).is_none() {
            self.order.push_back(id.to_owned());
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.results.remove(&old);
                }
            }
        }
    }

    pub(super) fn record(&mut self, result: &CommandResult) {
        if let Some(slot) = self.results.get_mut(&result.command_id) {
            *slot = Some(result.clone());
        }
    }
}

/// How an answer to a command comes.
pub(super) enum Reply {
    Now(CommandResultStatus, String),
    /// A runner answers later (spawn, input).
    Later,
}

/// A task id names a directory: keep it to one plain path component.
fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Command ids remembered for redelivery.
const SEEN_COMMANDS: usize = 10_000;

const CONTROL_CAPACITY: usize = 16;

const MAX_INTERRUPT_GRACE: Duration = Duration::from_secs(3600);

impl Session {
    pub(super) fn finish_command(
        &mut self,
        command_id: &str,
        status: CommandResultStatus,
        message: String,
    ) {
        if status != CommandResultStatus::Ok {
            info!(%command_id, ?status, %message, "command not done");
        }
        let result = CommandResult {
            command_id: command_id.to_owned(),
            status: status as i32,
            message,
            result_json: String::new(),
        };
        self.seen.record(&result);
        self.control_out.push_back(up(Up::CommandResult(result)));
    }

    pub(super) fn on_response(&mut self, message: Option<Down>) {
        match message {
            Some(Down::Command(cmd)) => self.on_command(cmd),
            Some(Down::OutputAck(ack)) => self.on_ack(ack),
            Some(Down::Error(err)) => self.on_session_error(err),
            Some(Down::Ready(_)) => debug!("repeated SessionReady ignored"),
            Some(Down::StartedAck(ack)) => debug!(task_id = %ack.task_id, "started acknowledged"),
            // Handled by the session loop, which moves to another server.
            Some(Down::Drain(_)) => debug!("repeated Drain ignored"),
            None => debug!("empty SessionResponse ignored"),
        }
    }

    pub(super) fn on_command(&mut self, cmd: Command) {
        if cmd.id.is_empty() {
            warn!(task_id = %cmd.task_id, "command without an id ignored: it cannot be acknowledged");
            return;
        }
        if let Some(seen) = self.seen.get(&cmd.id) {
            debug!(command_id = %cmd.id, "command delivered again; replaying its result");
            let Some(result) = seen.clone() else {
                return; // still running; its result follows
            };
            // A lost CommandResult means the started report before it may
            // be lost too.
            if let Some(command::Kind::SpawnTask(_)) = &cmd.kind
                && let Some(rec) = self
                    .tasks
                    .values()
                    .find(|r| r.spawn_command_id == cmd.id && r.is_live())
                && let Some(started) = &rec.started
            {
                self.control_out.push_back(up(Up::Started(started.clone())));
            }
            self.control_out.push_back(up(Up::CommandResult(result)));
            return;
        }
        self.seen.insert(&cmd.id);
        let reply = match cmd.kind {
            Some(command::Kind::SpawnTask(spawn)) => self.spawn(&cmd.id, &cmd.task_id, spawn),
            Some(command::Kind::InterruptTask(i)) => {
                let grace = Duration::from_secs(u64::try_from(i.grace_seconds).unwrap_or(0))
                    .min(MAX_INTERRUPT_GRACE);
                match self
                    .tasks
                    .get(&cmd.task_id)
                    .and_then(|r| r.control.as_ref())
                {
                    Some(control) if send_control(control, Control::Interrupt { grace }) => {
                        Reply::Now(CommandResultStatus::Ok, "interrupting".into())
                    }
                    _ => Reply::Now(
                        CommandResultStatus::Failed,
                        format!("task {} is not running", cmd.task_id),
                    ),
                }
            }
            Some(command::Kind::SendInput(input)) => {
                match self
                    .tasks
                    .get(&cmd.task_id)
                    .and_then(|r| r.control.as_ref())
                {
                    Some(control) => {
                        let ctrl = Control::Input {
                            command_id: cmd.id.clone(),
                            text: input.text,
                        };
                        match control.try_send(ctrl) {
                            Ok(()) => Reply::Later,
                            Err(mpsc::error::TrySendError::Full(_)) => Reply::Now(
                                CommandResultStatus::Failed,
                                "the task is busy; try again".into(),
                            ),
                            Err(mpsc::error::TrySendError::Closed(_)) => Reply::Now(
                                CommandResultStatus::Failed,
                                format!("task {} is not running", cmd.task_id),
                            ),
                        }
                    }
                    None => Reply::Now(
                        CommandResultStatus::Failed,
                        format!("task {} is not running", cmd.task_id),
                    ),
                }
            }
            Some(command::Kind::ApprovalDecision(decision)) => {
                match self
                    .tasks
                    .get(&cmd.task_id)
                    .and_then(|r| r.control.as_ref())
                {
                    Some(control) => {
                        let ctrl = Control::Decide {
                            command_id: cmd.id.clone(),
                            decision,
                        };
                        if send_control(control, ctrl) {
                            Reply::Later
                        } else {
                            Reply::Now(
                                CommandResultStatus::Failed,
                                format!("task {} is not running", cmd.task_id),
                            )
                        }
                    }
                    None => Reply::Now(
                        CommandResultStatus::Failed,
                        format!("task {} is not running", cmd.task_id),
                    ),
                }
            }
            Some(command::Kind::RetryCompletionAction(retry)) => {
                self.retry_completion(&cmd.id, &cmd.task_id, retry)
            }
            Some(command::Kind::CloneWorktree(c)) => {
                let (work_dir, task_id) = (self.cfg.work_dir.clone(), cmd.task_id.clone());
                self.answer_later(&cmd.id, async move {
                    worktrees::clone_to(&work_dir, &task_id, &c.path).await
                })
            }
            Some(command::Kind::RemoveWorktree(_)) => {
                let (work_dir, task_id) = (self.cfg.work_dir.clone(), cmd.task_id.clone());
                self.answer_later(&cmd.id, async move {
                    tokio::task::spawn_blocking(move || worktrees::remove(&work_dir, &task_id))
                        .await
                        .map_err(|e| e.to_string())?
                })
            }
            Some(command::Kind::CheckTargetExists(c)) => match worktrees::look_up(&c.path) {
                Ok(kind) => Reply::Now(CommandResultStatus::Ok, kind),
                Err(why) => Reply::Now(CommandResultStatus::Failed, why),
            },
            None => Reply::Now(
                CommandResultStatus::Unsupported,
                "unknown command kind (newer server?)".into(),
            ),
        };
        if let Reply::Now(status, message) = reply {
            self.finish_command(&cmd.id, status, message);
        }
    }

    /// What an agent needs to call the server as its task: its attempt's
    /// token (never the daemon's), the server and the CA to trust.
    fn agent_env(&self, token: &str) -> Vec<(String, String)> {
        if token.is_empty() {
            return Vec::new();
        }
        let mut env = vec![
            ("TASKMESH_TOKEN".to_owned(), token.to_owned()),
            ("TASKMESH_SERVER".to_owned(), self.cfg.server_url.clone()),
        ];
        if let Some(ca) = &self.cfg.ca_cert {
            env.push(("TASKMESH_CA_CERT".to_owned(), ca.display().to_string()));
        }
        env
    }

    /// Runs a finished task's completion action again in its worktree,
    /// off the loop; the command's result says what it did.
    fn retry_completion(
        &mut self,
        command_id: &str,
        task_id: &str,
        retry: RetryCompletionAction,
    ) -> Reply {
        let failed = |m: String| Reply::Now(CommandResultStatus::Failed, m);
        let dir = match worktrees::task_dir(&self.cfg.work_dir, task_id) {
            Ok(dir) => dir,
            Err(why) => return failed(why),
        };
        if self.tasks.get(task_id).is_some_and(TaskRecord::is_live) {
            return failed(format!(
                "task {task_id} is running; its completion action runs when it completes"
            ));
        }
        if !dir.join(".git").exists() {
            return failed(format!(
                "this daemon has no worktree for task {task_id} (it was cleaned up, or the task ran elsewhere)"
            ));
        }
        let action = match retry.action.as_str() {
            "push" => CompletionAction::Push,
            "merge" => CompletionAction::Merge,
            other => return failed(format!("unknown completion action {other:?}")),
        };
        let hidden = self.cfg.hidden_secrets.clone();
        let work_dir = self.cfg.work_dir.clone();
        let task_id = task_id.to_owned();
        info!(%task_id, action = %retry.action, "running the completion action again");
        self.answer_later(command_id, async move {
            let Some(_lock) =
                worktrees::try_lock(&work_dir, &task_id).map_err(|e| e.to_string())?
            else {
                return Err(format!("the directory of task {task_id} is in use"));
            };
            git::complete(&dir, action, &retry.target_branch, &hidden).await
        })
    }

    /// Runs `work` off the loop; its outcome answers the command.
    fn answer_later(
        &mut self,
        command_id: &str,
        work: impl std::future::Future<Output = Result<String, String>> + Send + 'static,
    ) -> Reply {
        let events = self.events_tx.clone();
        let command_id = command_id.to_owned();
        tokio::spawn(async move {
            let result = work.await;
            let _ = events
                .send(RunnerEvent::CommandAnswered { command_id, result })
                .await;
        });
        Reply::Later
    }

    pub(super) fn spawn(&mut self, command_id: &str, cmd_task_id: &str, spawn: SpawnTask) -> Reply {
        let failed = |m: String| Reply::Now(CommandResultStatus::Failed, m);
        let Some(task) = spawn.task else {
            return failed("spawn_task carries no task".into());
        };
        let task_id = if task.id.is_empty() {
            cmd_task_id.to_owned()
        } else {
            task.id.clone()
        };
        // Rejected, not failed: the task is fine, it just has to run elsewhere.
        let rejected = |m: String| Reply::Now(CommandResultStatus::Rejected, m);
        if self.phase != Phase::Running {
            return rejected("daemon is shutting down".into());
        }
        if !valid_task_id(&task_id) {
            return failed(format!("invalid task id {task_id:?}"));
        }
        if self.tasks.get(&task_id).is_some_and(TaskRecord::is_live) {
            return failed(format!("task {task_id} is already running on this daemon"));
        }
        let live = self.tasks.values().filter(|r| r.is_live()).count();
        if live >= self.cfg.max_tasks {
            return rejected(format!(
                "daemon is at its limit of {} concurrent tasks",
                self.cfg.max_tasks
            ));
        }
        let runtime_name = if task.runtime.is_empty() {
            "shell"
        } else {
            task.runtime.as_str()
        };
        let Some(runtime) = self.cfg.runtimes.iter().find(|r| r.name == runtime_name) else {
            let known: Vec<&str> = self.cfg.runtimes.iter().map(|r| r.name.as_str()).collect();
            return failed(format!(
                "unknown runtime {runtime_name:?}; this daemon runs: {}",
                known.join(", ")
            ));
        };
        // The server numbers messages from 1.
        let first_seq = spawn.first_seq.max(1);
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let completion_action = task.completion_action();
        let spec = TaskSpec {
            run_id,
            task_id: task_id.clone(),
            agent: runtime.agent.clone(),
            turn: Turn {
                // A continued attempt runs its follow-up prompt.
                prompt: if spawn.prompt.is_empty() {
                    task.plan
                } else {
                    spawn.prompt
                },
                context: spawn.context,
                resume_session_id: resumable(spawn.resume, &self.cfg.work_dir.join(&task_id)),
                model: task.model,
                permission_mode: task.permission_mode,
                tools: None,
            },
            branch: if task.repository.is_empty() {
                String::new()
            } else {
                git::working_branch(&task_id, &task.branch)
            },
            completion_action,
            target_branch: task.target_branch,
            repository: task.repository,
            dir: self.cfg.work_dir.join(&task_id),
            first_seq,
            default_grace: self.cfg.interrupt_grace,
            silence_limit: self.cfg.silence_limit,
            attempt: task.attempt,
            hidden_secrets: self.cfg.hidden_secrets.clone(),
            agent_env: self.agent_env(&spawn.agent_token),
            work_dir: self.cfg.work_dir.clone(),
        };
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (pressure_tx, pressure_rx) = watch::channel(false);
        info!(task_id = %task_id, runtime = runtime_name, attempt = task.attempt, first_seq, "spawning task");
        tokio::spawn(runner::run_task(
            spec,
            self.events_tx.clone(),
            control_rx,
            pressure_rx,
        ));
        let record = TaskRecord {
            run_id,
            spawn_command_id: command_id.to_owned(),
            control: Some(control_tx),
            cut_by_shutdown: false,
            attempt: task.attempt,
            started: None,
            buffer: OutputBuffer::new(first_seq),
            pressure: pressure_tx,
            end: None,
            end_sent: false,
            last_sent: Instant::now(),
        };
        if let Some(old) = self.tasks.insert(task_id.clone(), record) {
            // The server started a new attempt, so it is done with the old.
            debug!(task_id = %task_id, unacked = old.buffer.len(), "replacing an ended attempt");
        }
        Reply::Later
    }
}

/// The agent session to resume, if it ran here: in this task's directory on
/// this machine. A session from another daemon's machine cannot be resumed
/// (the agent keeps it on that disk); the attempt starts afresh with the
/// earlier output as context instead.
fn resumable(resume: Option<crate::pb::AgentResume>, dir: &std::path::Path) -> Option<String> {
    let resume = resume.filter(|r| !r.agent_session_id.is_empty())?;
    let here = std::path::Path::new(&resume.working_directory) == dir && dir.is_dir();
    if !here {
        info!(
            session = %resume.agent_session_id,
            ran_in = %resume.working_directory,
            "not resuming an agent session that ran on another machine"
        );
    }
    here.then_some(resume.agent_session_id)
}

#[cfg(test)]
mod resume_tests {
    use super::*;
    use crate::pb::AgentResume;

    #[test]
    fn only_a_session_that_ran_here_is_resumed() {
        let dir = std::env::temp_dir().join(format!("taskmesh-resume-{}", uuid::Uuid::new_v4()));
        let resume = |wd: &std::path::Path| {
            Some(AgentResume {
                agent_session_id: "s1".into(),
                working_directory: wd.display().to_string(),
            })
        };
        assert_eq!(
            resumable(resume(&dir), &dir),
            None,
            "no such directory here"
        );
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(resumable(resume(&dir), &dir).as_deref(), Some("s1"));
        assert_eq!(resumable(resume(&dir.join("other")), &dir), None);
        assert_eq!(resumable(None, &dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
