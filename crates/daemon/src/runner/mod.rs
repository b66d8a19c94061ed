//! One task's child process: prepare its directory, run the agent in its own
//! process group, number its output, and report how it ended.
//!
//! The runner talks to the session loop only through channels: it sends
//! [`RunnerEvent`]s up (in order: `Started`, `Output`…, `Ended`) and takes
//! [`Control`]s down. It never touches the network, so a broken connection
//! does not disturb the agent.

pub(crate) mod git;
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

use process::{describe_status, outcome_of, scrub_env, signal_group, spawn_stdin_writer};

use super::output::LineReader;
use crate::agents::{Agent, AgentKind, TaskTools, Turn, UsageReport};
use crate::pb::{
    AgentResume, ApprovalDecision, CompletionAction, MessageKind, TaskChanges, TaskMessageInput,
};

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
/// How long an agent may linger after it was told it is done (its stdin
/// closed) before its process group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// Everything a runner needs to run one attempt of a task.
#[derive(Debug, Clone)]
pub(crate) struct TaskSpec {
    /// Tells this run's events from those of an earlier run of the same task.
    pub run_id: u64,
    pub task_id: String,
    /// Which adapter runs the agent.
    pub agent: AgentKind,
    /// What the agent is asked: the prompt (plan), context, resume, model.
    pub turn: Turn,
    pub repository: String,
    /// The working branch (see [`git::working_branch`]).
    pub branch: String,
    /// What happens to the branch when the agent completes.
    pub completion_action: CompletionAction,
    pub target_branch: String,
    /// `<work-dir>/<task_id>`.
    pub dir: PathBuf,
    /// The seq of this attempt's first message.
    pub first_seq: i64,
    pub default_grace: Duration,
    /// No output for this long interrupts the agent and fails the task.
    pub silence_limit: Option<Duration>,
    pub attempt: i32,
    /// Values no child may see in its environment (the daemon's token).
    pub hidden_secrets: Vec<String>,
    /// `<work-dir>`, where the directory's lock file is.
    pub work_dir: PathBuf,
    /// The agent's own access: TASKMESH_TOKEN (its attempt's agent token),
    /// TASKMESH_SERVER and TASKMESH_CA_CERT.
    pub agent_env: Vec<(String, String)>,
}

/// Instructions from the session loop.
#[derive(Debug)]
pub(crate) enum Control {
    /// A person's follow-up, for the agent's stdin in its own format;
    /// answered with [`RunnerEvent::CommandDone`].
    Input { command_id: String, text: String },
    /// A person's answer to the agent's permission request; answered with
    /// [`RunnerEvent::CommandDone`].
    Decide {
        command_id: String,
        decision: ApprovalDecision,
    },
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
    /// The agent's usage so far (totals for this run).
    Usage {
        run_id: u64,
        task_id: String,
        report: UsageReport,
    },
    /// The outcome of a [`Control::Input`] or [`Control::Decide`].
    CommandDone {
        command_id: String,
        result: Result<(), String>,
    },
    /// The answer to a command run off the loop (a retried completion
    /// action, a worktree copied or removed, a path looked up).
    CommandAnswered {
        command_id: String,
        result: Result<String, String>,
    },
    /// What the attempt changed in its repository, and what the completion
    /// action did; just before `Ended`.
    Changes {
        run_id: u64,
        task_id: String,
        changes: TaskChanges,
        patch: String,
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
    // Held while the task runs, so no cleanup touches its directory.
    let lock = crate::worktrees::lock_for_run(&spec.work_dir, &spec.task_id).await;
    let started = match lock {
        Ok(lock) => start(&spec, &mut control, &events).await.map(|s| (s, lock)),
        Err(why) => Err(StartError::new(why)),
    };
    let ((child, agent), lock) = match started {
        Ok(started) => started,
        Err(e) => {
            warn!(reason = %e.reason, "task failed before its agent started");
            for file in tool_files(&spec) {
                let _ = tokio::fs::remove_file(file).await;
            }
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
    let tool_files = tool_files(&spec);
    TaskRunner::new(spec, child, agent, events, control, pressure)
        .run()
        .await;
    // When the directory was last used, for --keep-worktrees.
    let _ = lock.set_modified(std::time::SystemTime::now());
    for file in tool_files {
        let _ = tokio::fs::remove_file(file).await;
    }
    drop(lock);
}

/// The agent token's file and the MCP configuration of a run, beside the
/// task's directory (never in it: a repository would commit them).
fn tool_files(spec: &TaskSpec) -> [PathBuf; 2] {
    [
        spec.work_dir.join(format!("{}.agent-token", spec.task_id)),
        spec.work_dir.join(format!("{}.mcp.json", spec.task_id)),
    ]
}

/// For Claude and Codex with a task token: `taskmesh mcp` as their MCP
/// server, reading the token from a file only the daemon's user may read
/// (a command line shows in `ps`).
async fn task_tools(spec: &TaskSpec) -> Result<Option<TaskTools>, String> {
    let env = |name: &str| {
        spec.agent_env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (Some(token), Some(server)) = (env("TASKMESH_TOKEN"), env("TASKMESH_SERVER")) else {
        return Ok(None);
    };
    if !matches!(spec.agent, AgentKind::Claude(_) | AgentKind::Codex(_)) {
        return Ok(None);
    }
    let command = std::env::current_exe()
        .map_err(|e| format!("cannot tell this program's path for the agent's tools: {e}"))?
        .display()
        .to_string();
    let [token_file, config_file] = tool_files(spec);
    let mut args = vec![
        "mcp".to_owned(),
        "--server".to_owned(),
        server,
        "--token-file".to_owned(),
        token_file.display().to_string(),
    ];
    if let Some(ca) = env("TASKMESH_CA_CERT") {
        args.extend(["--ca-cert".to_owned(), ca]);
    }
    let config = serde_json::json!({"mcpServers": {crate::agents::TOOLS_NAME: {
        "type": "stdio", "command": command, "args": args,
    }}});
    private_file(&token_file, token.as_bytes()).await?;
    private_file(&config_file, config.to_string().as_bytes()).await?;
    Ok(Some(TaskTools {
        command,
        args,
        config_file,
    }))
}

/// Writes a file only its owner may read.
async fn private_file(path: &std::path::Path, contents: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_owned();
    let contents = contents.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut file, &contents)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("writing the agent's tool files failed: {e}"))
}

/// Creates the task directory, clones the repository, spawns the agent and
/// reports `Started`.
async fn start(
    spec: &TaskSpec,
    control: &mut mpsc::Receiver<Control>,
    events: &mpsc::Sender<RunnerEvent>,
) -> Result<(Child, Box<dyn Agent>), StartError> {
    if let Some(parent) = spec.dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| StartError::new(format!("creating {} failed: {e}", parent.display())))?;
    }
    // A later attempt of the same task reuses its checkout (and so the
    // agent's working directory, which resuming needs).
    if !spec.repository.is_empty() && !spec.dir.join(".git").exists() {
        git::prepare(spec, control, events).await?;
    } else {
        tokio::fs::create_dir_all(&spec.dir)
            .await
            .map_err(|e| StartError::new(format!("creating {} failed: {e}", spec.dir.display())))?;
    }

    let agent = spec.agent.build();
    let mut turn = spec.turn.clone();
    turn.tools = task_tools(spec).await.map_err(StartError::new)?;
    let mut cmd = agent.command(&turn, &spec.dir);
    scrub_env(&mut cmd, &spec.hidden_secrets);
    cmd.envs(spec.agent_env.iter().map(|(k, v)| (k, v)));
    cmd.current_dir(&spec.dir)
        .env("TASKMESH_TASK_ID", &spec.task_id)
        .env("TASKMESH_PLAN", &spec.turn.prompt)
        .env("TASKMESH_ATTEMPT", spec.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The agent and everything it starts share one group, so an
        // interrupt reaches grandchildren too.
        .process_group(0)
        .kill_on_drop(true);
    let context = &spec.turn.context;
    if !context.is_empty() {
        if context.len() <= MAX_ENV_CONTEXT {
            cmd.env("TASKMESH_CONTEXT", context);
        } else {
            warn!(
                bytes = context.len(),
                "context too large for the environment; not passed"
            );
        }
    }
    let child = cmd.spawn().map_err(|e| {
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        StartError::new(format!("starting the agent ({program}) failed: {e}"))
    })?;
    let pid = child.id().unwrap_or_default();
    info!(pid, dir = %spec.dir.display(), "agent started");
    let _ = events
        .send(RunnerEvent::Started {
            run_id: spec.run_id,
            task_id: spec.task_id.clone(),
            pid,
        })
        .await;
    Ok((child, agent))
}

/// The loop that owns a running agent.
struct TaskRunner {
    run_id: u64,
    task_id: String,
    dir: PathBuf,
    default_grace: Duration,
    silence_limit: Option<Duration>,
    /// When the agent, silent since its last line, is interrupted.
    silent_at: Option<Instant>,
    /// Why the watchdog stopped the agent.
    stalled: Option<String>,
    child: Child,
    pgid: i32,
    stdout: Option<LineReader<ChildStdout>>,
    stderr: Option<LineReader<ChildStderr>>,
    stdin: Option<mpsc::Sender<(String, String)>>,
    agent: Box<dyn Agent>,
    turn: Turn,
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
    /// When an agent asked to stop in its own protocol is sent SIGINT.
    sigint_at: Option<Instant>,
    kill_at: Option<Instant>,
    /// When an agent whose stdin was closed is killed if it has not exited.
    linger_at: Option<Instant>,
    drain_at: Option<Instant>,
    drain_killed: bool,
    session_gone: bool,
    /// For a task with a repository: what to do with it at the end.
    repo: Option<RepoWork>,
}

/// The end of an attempt in a repository: report what changed, run the
/// completion action.
struct RepoWork {
    attempt: i32,
    completion_action: CompletionAction,
    target_branch: String,
    hidden_secrets: Vec<String>,
}

impl TaskRunner {
    fn new(
        spec: TaskSpec,
        mut child: Child,
        agent: Box<dyn Agent>,
        events: mpsc::Sender<RunnerEvent>,
        control: mpsc::Receiver<Control>,
        pressure: watch::Receiver<bool>,
    ) -> Self {
        let stdin = child
            .stdin
            .take()
            .map(|s| spawn_stdin_writer(s, events.clone()));
        let repo = (!spec.repository.is_empty()).then(|| RepoWork {
            attempt: spec.attempt,
            completion_action: spec.completion_action,
            target_branch: spec.target_branch.clone(),
            hidden_secrets: spec.hidden_secrets.clone(),
        });
        Self {
            repo,
            pgid: child.id().map_or(0, |p| p as i32),
            stdout: child.stdout.take().map(LineReader::new),
            stderr: child.stderr.take().map(LineReader::new),
            stdin,
            child,
            run_id: spec.run_id,
            task_id: spec.task_id,
            dir: spec.dir,
            default_grace: spec.default_grace,
            silence_limit: spec.silence_limit,
            silent_at: spec.silence_limit.map(|d| Instant::now() + d),
            stalled: None,
            agent,
            turn: spec.turn,
            next_seq: spec.first_seq,
            events,
            control,
            control_open: true,
            pressure,
            pressure_open: true,
            exit: None,
            interrupted: false,
            sigint_at: None,
            kill_at: None,
            linger_at: None,
            drain_at: None,
            drain_killed: false,
            session_gone: false,
        }
    }

    async fn run(mut self) {
        let (lines, said) = self.agent.opening(&self.turn);
        for line in lines {
            self.write(String::new(), line);
        }
        if self.agent.closes_stdin_after_opening() {
            self.stdin = None;
        }
        self.emit(said).await;
        loop {
            if self.exit.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let paused = self.pressure_open && *self.pressure.borrow();
            tokio::select! {
                line = next_line(&mut self.stdout), if self.stdout.is_some() && !paused => {
                    match line {
                        Some(line) => {
                            self.heard();
                            self.on_stdout(&line).await;
                        }
                        None => self.stdout = None,
                    }
                }
                line = next_line(&mut self.stderr), if self.stderr.is_some() && !paused => {
                    match line {
                        Some(line) => {
                            self.heard();
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
                ctrl = self.control.recv(), if self.control_open => self.on_control(ctrl).await,
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
                _ = sleep_until(self.silent_at.unwrap_or_else(Instant::now)), if self.silent_at.is_some() && self.exit.is_none() && !paused => {
                    self.silent_at = None;
                    let limit = self.silence_limit.unwrap_or_default();
                    let why = format!(
                        "the agent printed nothing for {} minutes; interrupted (daemon --silence-minutes)",
                        limit.as_secs() / 60
                    );
                    warn!("{why}");
                    self.stalled = Some(why);
                    self.on_control(Some(Control::Interrupt { grace: Duration::ZERO })).await;
                }
                _ = sleep_until(self.sigint_at.unwrap_or_else(Instant::now)), if self.sigint_at.is_some() => {
                    info!("agent did not stop when asked; sending SIGINT to its process group");
                    self.sigint_at = None;
                    signal_group(self.pgid, libc::SIGINT);
                }
                _ = sleep_until(self.linger_at.unwrap_or_else(Instant::now)), if self.linger_at.is_some() && self.exit.is_none() => {
                    warn!("agent lingers after its last turn; killing its process group");
                    self.linger_at = None;
                    signal_group(self.pgid, libc::SIGKILL);
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

    /// The agent printed something: the silence watchdog starts over.
    fn heard(&mut self) {
        if self.silent_at.is_some() {
            self.silent_at = self.silence_limit.map(|d| Instant::now() + d);
        }
    }

    /// One line of the agent's stdout, as its adapter reads it.
    async fn on_stdout(&mut self, line: &str) {
        let reading = self.agent.read_line(line);
        for reply in reading.replies {
            self.write(String::new(), reply);
        }
        if let Some(report) = reading.usage
            && !self.session_gone
        {
            let usage = RunnerEvent::Usage {
                run_id: self.run_id,
                task_id: self.task_id.clone(),
                report,
            };
            let _ = self.events.send(usage).await;
        }
        self.emit(reading.messages).await;
        if reading.close_stdin {
            debug!("the agent's turns are done; closing its stdin");
            self.stdin = None;
            self.linger_at = Some(Instant::now() + EXIT_GRACE);
        }
    }

    /// Queues `line` for the agent's stdin; a non-empty `command_id` is
    /// answered once it is written. False when stdin is closed or busy
    /// (then the command is answered with why).
    fn write(&self, command_id: String, line: String) -> bool {
        let sent = match &self.stdin {
            Some(tx) => tx.try_send((command_id, line)).map_err(|e| match e {
                mpsc::error::TrySendError::Full((id, _)) => (id, "the agent's stdin is busy"),
                mpsc::error::TrySendError::Closed((id, _)) => (id, "the agent's stdin is closed"),
            }),
            None => Err((command_id, "the agent's stdin is closed")),
        };
        match sent {
            Ok(()) => true,
            Err((command_id, message)) => {
                if command_id.is_empty() {
                    warn!(message, "a line for the agent was not written");
                } else {
                    self.answer(command_id, Err(message.to_owned()));
                }
                false
            }
        }
    }

    /// Answers a command off the loop (the session drains events
    /// continuously; a full channel only delays the answer).
    fn answer(&self, command_id: String, result: Result<(), String>) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let _ = events
                .send(RunnerEvent::CommandDone { command_id, result })
                .await;
        });
    }

    async fn on_control(&mut self, ctrl: Option<Control>) {
        match ctrl {
            Some(Control::Input { command_id, text }) => match self.agent.follow_up(&text) {
                Ok((line, said)) => {
                    if self.write(command_id, line) {
                        self.emit(vec![said]).await;
                    }
                }
                Err(why) => self.answer(command_id, Err(why)),
            },
            Some(Control::Decide {
                command_id,
                decision,
            }) => match self.agent.decide(&decision) {
                Ok(line) => {
                    self.write(command_id, line);
                }
                Err(why) => self.answer(command_id, Err(why)),
            },
            Some(Control::Interrupt { grace }) => {
                let grace = if grace.is_zero() {
                    self.default_grace
                } else {
                    grace
                };
                self.interrupted = true;
                let asked = match self.agent.interrupt() {
                    Some(line) if self.stdin.is_some() => self.write(String::new(), line),
                    _ => false,
                };
                let now = Instant::now();
                if asked {
                    // Asked in its own protocol: SIGINT after the grace,
                    // SIGKILL after another.
                    info!(?grace, "asking the agent to stop");
                    self.sigint_at.get_or_insert(now + grace);
                    let at = now + grace * 2;
                    self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
                } else {
                    info!(?grace, "interrupting the agent's process group");
                    signal_group(self.pgid, libc::SIGINT);
                    let at = now + grace;
                    self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
                }
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

    /// Records what the attempt changed (a note in its output, and the
    /// report), then runs the completion action of a completed attempt.
    async fn finish_repository(&mut self, repo: RepoWork, completed: bool) {
        let hidden = &repo.hidden_secrets;
        let (mut changes, patch) =
            match git::changes(&self.dir, &self.task_id, repo.attempt, completed, hidden).await {
                Ok(found) => found,
                Err(e) => {
                    warn!(error = %e, "reading what the attempt changed failed");
                    self.note(format!(
                        "could not read what changed in the repository: {e}"
                    ))
                    .await;
                    return;
                }
            };
        let plural = |n: i32, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
        self.note(format!(
            "{}: {}, {} changed, +{} -{}",
            changes.branch,
            plural(changes.commits, "commit"),
            plural(changes.files_changed, "file"),
            changes.insertions,
            changes.deletions
        ))
        .await;
        let action = repo.completion_action;
        if completed
            && !matches!(
                action,
                CompletionAction::None | CompletionAction::Unspecified
            )
        {
            let result = git::complete(&self.dir, action, &repo.target_branch, hidden).await;
            let (state, detail) = match result {
                Ok(done) => ("ok", done),
                Err(why) => ("failed", why),
            };
            info!(state, %detail, "completion action");
            self.note(format!("completion action: {detail}")).await;
            changes.completion_state = state.into();
            changes.completion_detail = detail;
        }
        if self.session_gone {
            return;
        }
        let _ = self
            .events
            .send(RunnerEvent::Changes {
                run_id: self.run_id,
                task_id: self.task_id.clone(),
                changes,
                patch,
            })
            .await;
    }

    /// A system note in the task's output.
    async fn note(&mut self, text: String) {
        self.emit(vec![TaskMessageInput {
            kind: MessageKind::System as i32,
            content: text,
            ..Default::default()
        }])
        .await;
    }

    /// Numbers the messages of one line and hands them to the session loop.
    async fn emit(&mut self, mut messages: Vec<TaskMessageInput>) {
        if messages.is_empty() {
            return;
        }
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
        let said = self.agent.end();
        let summary = said
            .summary
            .map(|s| truncate_chars(&s, MAX_SUMMARY_CHARS))
            .unwrap_or_default();
        let exit = self
            .exit
            .take()
            .unwrap_or_else(|| Err("no exit status".into()));
        // What the agent said went wrong beats its exit status (a Claude
        // result with is_error exits 0, a failed Codex turn exits 1).
        let outcome = match (outcome_of(&exit, self.interrupted, summary), said.error) {
            (Outcome::Completed { .. }, Some(error)) => Outcome::Failed {
                reason: truncate_chars(&error, MAX_SUMMARY_CHARS),
                exit_code: 1,
            },
            (Outcome::Failed { exit_code, .. }, Some(error)) if !self.interrupted => {
                Outcome::Failed {
                    reason: truncate_chars(&error, MAX_SUMMARY_CHARS),
                    exit_code,
                }
            }
            (outcome, _) => outcome,
        };
        let outcome = match (outcome, self.stalled.take()) {
            (Outcome::Failed { exit_code, .. }, Some(why)) => Outcome::Failed {
                reason: why,
                exit_code,
            },
            (outcome, _) => outcome,
        };
        let resume = said.session_id.map(|id| AgentResume {
            agent_session_id: id,
            working_directory: self.dir.display().to_string(),
        });
        if let Some(repo) = self.repo.take() {
            let completed = matches!(outcome, Outcome::Completed { .. });
            self.finish_repository(repo, completed).await;
        }
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
