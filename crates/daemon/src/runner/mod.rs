//! One task's child process: prepare its directory, run the agent in its own
//! process group, number its output, and report how it ended.
//!
//! The runner talks to the session loop only through channels: it sends
//! [`RunnerEvent`]s up (in order: `Started`, `Output`…, `Ended`) and takes
//! [`Control`]s down. It never touches the network, so a broken connection
//! does not disturb the agent.

mod git;
mod process;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use git::clone_repository;
use process::{
    agent_command, describe_status, outcome_of, scrub_env, signal_group, spawn_stdin_writer,
};

use super::output::{LineReader, StreamParser};
use crate::pb::{AgentResume, MessageKind, TaskMessageInput};

/// How long the pipes may stay open after the agent exits (a background
/// grandchild holding them) before the rest of the group is killed.
const PIPE_DRAIN: Duration = Duration::from_secs(5);
/// After that SIGKILL, how long before the pipes are abandoned.
const PIPE_ABANDON: Duration = Duration::from_secs(2);
/// Longest `CompleteTaskRequest.summary`.
const MAX_SUMMARY_CHARS: usize = 2000;
/// The rebuilt context is passed in the environment only up to this size
/// (Linux refuses single environment strings over 128 KiB).
const MAX_ENV_CONTEXT: usize = 100 * 1024;

/// Everything a runner needs to run one attempt of a task.
#[derive(Debug, Clone)]
pub(crate) struct TaskSpec {
    /// Tells this run's events from those of an earlier run of the same task.
    pub run_id: u64,
    pub task_id: String,
    pub plan: String,
    /// The runtime's command template; `None` runs the plan with `sh -c`.
    pub command_template: Option<String>,
    pub repository: String,
    pub branch: String,
    /// `<work-dir>/<task_id>`.
    pub dir: PathBuf,
    /// The seq of this attempt's first message.
    pub first_seq: i64,
    pub default_grace: Duration,
    pub attempt: i32,
    pub resume_session_id: Option<String>,
    pub context: String,
    /// Values no child may see in its environment (the daemon's token).
    pub hidden_secrets: Vec<String>,
}

/// Instructions from the session loop.
#[derive(Debug)]
pub(crate) enum Control {
    /// Write `text` (plus a newline) to the agent's stdin; answered with
    /// [`RunnerEvent::CommandDone`].
    Input { command_id: String, text: String },
    /// SIGINT the process group, then SIGKILL it after `grace`.
    Interrupt { grace: Duration },
    /// SIGKILL the process group now.
    Kill,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed { summary: String },
    Failed { reason: String, exit_code: i32 },
}

#[derive(Debug, Clone)]
pub(crate) struct TaskEnd {
    pub outcome: Outcome,
    pub resume: Option<AgentResume>,
}

/// Reports from a runner to the session loop.
#[derive(Debug)]
pub(crate) enum RunnerEvent {
    Started {
        run_id: u64,
        task_id: String,
        pid: u32,
    },
    /// The messages of one output line, already numbered.
    Output {
        run_id: u64,
        task_id: String,
        messages: Vec<TaskMessageInput>,
    },
    /// The outcome of a [`Control::Input`].
    CommandDone {
        command_id: String,
        result: Result<(), String>,
    },
    /// The last event of a run: the agent exited and its pipes are drained,
    /// or it never started (`before_start`).
    Ended {
        run_id: u64,
        task_id: String,
        end: TaskEnd,
        before_start: bool,
    },
}

/// Hands `ctrl` to a runner; false when the runner is gone.
pub(crate) fn send_control(control: &mpsc::Sender<Control>, ctrl: Control) -> bool {
    match control.try_send(ctrl) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(ctrl)) => {
            // Interrupts must not be lost to a momentarily full queue.
            let control = control.clone();
            tokio::spawn(async move {
                let _ = control.send(ctrl).await;
            });
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Why a task could not start.
pub(super) struct StartError {
    pub(super) reason: String,
    pub(super) exit_code: i32,
}

impl StartError {
    pub(super) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            exit_code: -1,
        }
    }
}

/// Runs one attempt of a task to its end. Always sends `Ended` last (unless
/// the session loop is gone).
#[tracing::instrument(skip_all, fields(task_id = %spec.task_id))]
pub(crate) async fn run_task(
    spec: TaskSpec,
    events: mpsc::Sender<RunnerEvent>,
    mut control: mpsc::Receiver<Control>,
    pressure: watch::Receiver<bool>,
) {
    let child = match start(&spec, &mut control, &events).await {
        Ok(child) => child,
        Err(e) => {
            warn!(reason = %e.reason, "task failed before its agent started");
            let end = TaskEnd {
                outcome: Outcome::Failed {
                    reason: e.reason,
                    exit_code: e.exit_code,
                },
                resume: None,
            };
            let _ = events
                .send(RunnerEvent::Ended {
                    run_id: spec.run_id,
                    task_id: spec.task_id.clone(),
                    end,
                    before_start: true,
                })
                .await;
            return;
        }
    };
    TaskRunner::new(spec, child, events, control, pressure)
        .run()
        .await;
}

/// Creates the task directory, clones the repository, spawns the agent and
/// reports `Started`.
async fn start(
    spec: &TaskSpec,
    control: &mut mpsc::Receiver<Control>,
    events: &mpsc::Sender<RunnerEvent>,
) -> Result<Child, StartError> {
    if let Some(parent) = spec.dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| StartError::new(format!("creating {} failed: {e}", parent.display())))?;
    }
    // A later attempt of the same task reuses its checkout (and so the
    // agent's working directory, which resuming needs).
    if !spec.repository.is_empty() && !spec.dir.join(".git").exists() {
        clone_repository(spec, control, events).await?;
    } else {
        tokio::fs::create_dir_all(&spec.dir)
            .await
            .map_err(|e| StartError::new(format!("creating {} failed: {e}", spec.dir.display())))?;
    }

    let mut cmd = agent_command(spec.command_template.as_deref(), &spec.plan);
    scrub_env(&mut cmd, &spec.hidden_secrets);
    cmd.current_dir(&spec.dir)
        .env("TASKMESH_TASK_ID", &spec.task_id)
        .env("TASKMESH_PLAN", &spec.plan)
        .env("TASKMESH_ATTEMPT", spec.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The agent and everything it starts share one group, so an
        // interrupt reaches grandchildren too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(id) = &spec.resume_session_id {
        cmd.env("TASKMESH_AGENT_SESSION_ID", id);
    }
    if !spec.context.is_empty() {
        if spec.context.len() <= MAX_ENV_CONTEXT {
            cmd.env("TASKMESH_CONTEXT", &spec.context);
        } else {
            warn!(
                bytes = spec.context.len(),
                "context too large for the environment; not passed"
            );
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| StartError::new(format!("starting the agent failed: {e}")))?;
    let pid = child.id().unwrap_or_default();
    info!(pid, dir = %spec.dir.display(), "agent started");
    let _ = events
        .send(RunnerEvent::Started {
            run_id: spec.run_id,
            task_id: spec.task_id.clone(),
            pid,
        })
        .await;
    Ok(child)
}

/// The loop that owns a running agent.
struct TaskRunner {
    run_id: u64,
    task_id: String,
    dir: PathBuf,
    default_grace: Duration,
    child: Child,
    pgid: i32,
    stdout: Option<LineReader<ChildStdout>>,
    stderr: Option<LineReader<ChildStderr>>,
    stdin: Option<mpsc::Sender<(String, String)>>,
    parser: StreamParser,
    /// The seq of the next message. One counter for stdout and stderr
    /// together: the server wants seqs without gaps.
    next_seq: i64,
    events: mpsc::Sender<RunnerEvent>,
    control: mpsc::Receiver<Control>,
    control_open: bool,
    /// True while the task's unacknowledged output is over the limit.
    pressure: watch::Receiver<bool>,
    pressure_open: bool,
    exit: Option<Result<ExitStatus, String>>,
    interrupted: bool,
    kill_at: Option<Instant>,
    drain_at: Option<Instant>,
    drain_killed: bool,
    session_gone: bool,
}

impl TaskRunner {
    fn new(
        spec: TaskSpec,
        mut child: Child,
        events: mpsc::Sender<RunnerEvent>,
        control: mpsc::Receiver<Control>,
        pressure: watch::Receiver<bool>,
    ) -> Self {
        let stdin = child
            .stdin
            .take()
            .map(|s| spawn_stdin_writer(s, events.clone()));
        Self {
            pgid: child.id().map_or(0, |p| p as i32),
            stdout: child.stdout.take().map(LineReader::new),
            stderr: child.stderr.take().map(LineReader::new),
            stdin,
            child,
            run_id: spec.run_id,
            task_id: spec.task_id,
            dir: spec.dir,
            default_grace: spec.default_grace,
            parser: StreamParser::default(),
            next_seq: spec.first_seq,
            events,
            control,
            control_open: true,
            pressure,
            pressure_open: true,
            exit: None,
            interrupted: false,
            kill_at: None,
            drain_at: None,
            drain_killed: false,
            session_gone: false,
        }
    }

    async fn run(mut self) {
        loop {
            if self.exit.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let paused = self.pressure_open && *self.pressure.borrow();
            tokio::select! {
                line = next_line(&mut self.stdout), if self.stdout.is_some() && !paused => {
                    match line {
                        Some(line) => {
                            let messages = self.parser.parse(&line);
                            self.emit(messages).await;
                        }
                        None => self.stdout = None,
                    }
                }
                line = next_line(&mut self.stderr), if self.stderr.is_some() && !paused => {
                    match line {
                        Some(line) => {
                            let m = TaskMessageInput {
                                kind: MessageKind::Stderr as i32,
                                content: line,
                                ..Default::default()
                            };
                            self.emit(vec![m]).await;
                        }
                        None => self.stderr = None,
                    }
                }
                status = self.child.wait(), if self.exit.is_none() => {
                    match &status {
                        Ok(s) => info!(status = %describe_status(*s), "agent exited"),
                        Err(e) => warn!(error = %e, "waiting for the agent failed"),
                    }
                    self.exit = Some(status.map_err(|e| e.to_string()));
                    self.drain_at = Some(Instant::now() + PIPE_DRAIN);
                }
                ctrl = self.control.recv(), if self.control_open => self.on_control(ctrl),
                changed = self.pressure.changed(), if paused => {
                    if changed.is_err() {
                        self.pressure_open = false;
                    } else if !*self.pressure.borrow() {
                        debug!("output acknowledged; reading again");
                    }
                    // Pipes we did not read do not count against the drain
                    // deadline.
                    if !self.pressure_open || !*self.pressure.borrow() {
                        self.drain_at = self.drain_at.map(|_| Instant::now() + PIPE_DRAIN);
                    }
                }
                _ = sleep_until(self.kill_at.unwrap_or_else(Instant::now)), if self.kill_at.is_some() => {
                    warn!("agent did not stop after SIGINT; sending SIGKILL to its process group");
                    self.kill_at = None;
                    signal_group(self.pgid, libc::SIGKILL);
                }
                _ = sleep_until(self.drain_at.unwrap_or_else(Instant::now)), if self.drain_at.is_some() && !paused => {
                    self.on_drain_deadline();
                }
            }
        }
        self.finish().await;
    }

    fn on_control(&mut self, ctrl: Option<Control>) {
        match ctrl {
            Some(Control::Input { command_id, text }) => {
                let sent = match &self.stdin {
                    Some(tx) => tx.try_send((command_id, text)).map_err(|e| match e {
                        mpsc::error::TrySendError::Full((id, _)) => {
                            (id, "the agent's stdin is busy".to_owned())
                        }
                        mpsc::error::TrySendError::Closed((id, _)) => {
                            (id, "the agent's stdin is closed".to_owned())
                        }
                    }),
                    None => Err((command_id, "the agent's stdin is closed".to_owned())),
                };
                if let Err((command_id, message)) = sent {
                    // The session loop drains events continuously; a full
                    // channel only delays this answer.
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let done = RunnerEvent::CommandDone {
                            command_id,
                            result: Err(message),
                        };
                        let _ = events.send(done).await;
                    });
                }
            }
            Some(Control::Interrupt { grace }) => {
                let grace = if grace.is_zero() {
                    self.default_grace
                } else {
                    grace
                };
                info!(?grace, "interrupting the agent's process group");
                self.interrupted = true;
                signal_group(self.pgid, libc::SIGINT);
                let at = Instant::now() + grace;
                self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
            }
            Some(Control::Kill) => self.kill(),
            None => {
                // The session loop forgot the task: nobody wants this agent.
                self.control_open = false;
                self.kill();
            }
        }
    }

    fn kill(&mut self) {
        info!("killing the agent's process group");
        self.interrupted = true;
        signal_group(self.pgid, libc::SIGKILL);
    }

    /// The agent exited but something it started still holds its pipes.
    fn on_drain_deadline(&mut self) {
        if !self.drain_killed {
            warn!("agent exited but its pipes stay open; killing its process group");
            self.drain_killed = true;
            signal_group(self.pgid, libc::SIGKILL);
            self.drain_at = Some(Instant::now() + PIPE_ABANDON);
        } else {
            warn!("abandoning the agent's pipes");
            self.drain_at = None;
            self.stdout = None;
            self.stderr = None;
        }
    }

    /// Numbers the messages of one line and hands them to the session loop.
    async fn emit(&mut self, mut messages: Vec<TaskMessageInput>) {
        for m in &mut messages {
            m.seq = self.next_seq;
            self.next_seq += 1;
        }
        if self.session_gone {
            return;
        }
        let event = RunnerEvent::Output {
            run_id: self.run_id,
            task_id: self.task_id.clone(),
            messages,
        };
        if self.events.send(event).await.is_err() {
            warn!("session loop is gone; killing the agent");
            self.session_gone = true;
            self.kill();
        }
    }

    async fn finish(mut self) {
        // Closing stdin ends the writer task.
        self.stdin = None;
        let summary = self
            .parser
            .last_result
            .take()
            .map(|s| truncate_chars(&s, MAX_SUMMARY_CHARS))
            .unwrap_or_default();
        let exit = self
            .exit
            .take()
            .unwrap_or_else(|| Err("no exit status".into()));
        let outcome = outcome_of(&exit, self.interrupted, summary);
        let resume = self.parser.session_id.take().map(|id| AgentResume {
            agent_session_id: id,
            working_directory: self.dir.display().to_string(),
        });
        info!(?outcome, last_seq = self.next_seq - 1, "task ended");
        let _ = self
            .events
            .send(RunnerEvent::Ended {
                run_id: self.run_id,
                task_id: self.task_id,
                end: TaskEnd { outcome, resume },
                before_start: false,
            })
            .await;
    }
}

async fn next_line<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut Option<LineReader<R>>,
) -> Option<String> {
    match reader {
        Some(r) => match r.next_line().await {
            Ok(line) => line,
            Err(e) => {
                warn!(error = %e, "reading the agent's output failed");
                None
            }
        },
        None => std::future::pending().await,
    }
}

pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}
