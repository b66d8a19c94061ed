//! One task's child process: prepare its directory, run the agent in its own
//! process group, number its output, and report how it ended.
//!
//! The runner talks to the session loop only through channels: it sends
//! [`RunnerEvent`]s up (in order: `Started`, `Output`…, `Ended`) and takes
//! [`Control`]s down. It never touches the network, so a broken connection
//! does not disturb the agent.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use super::output::{LineReader, StreamParser};
use crate::pb::{AgentResume, MessageKind, TaskMessageInput};

/// How long the pipes may stay open after the agent exits (a background
/// grandchild holding them) before the rest of the group is killed.
const PIPE_DRAIN: Duration = Duration::from_secs(5);
/// After that SIGKILL, how long before the pipes are abandoned.
const PIPE_ABANDON: Duration = Duration::from_secs(2);
/// Longest `CompleteTaskRequest.summary`.
const MAX_SUMMARY_CHARS: usize = 2000;
/// Longest git error kept in a failure reason.
const MAX_GIT_ERROR_CHARS: usize = 2000;
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

/// Quotes `s` as one word for `sh`.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The agent's command line: the runtime template with the plan appended
/// as a final quoted argument, or the plan itself for the shell runtime.
fn agent_command(template: Option<&str>, plan: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c");
    match template {
        Some(template) => cmd.arg(format!("{template} {}", shell_quote(plan))),
        None => cmd.arg(plan),
    };
    cmd
}

/// Sends `sig` to every process in the group led by `pgid`.
fn signal_group(pgid: i32, sig: libc::c_int) {
    // pgid 0 or 1 would signal our own group or every process we may signal.
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, sig, error = %err, "signalling the process group failed");
        }
    }
}

/// Why a task could not start.
struct StartError {
    reason: String,
    exit_code: i32,
}

impl StartError {
    fn new(reason: impl Into<String>) -> Self {
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

/// `git clone --branch <branch> --depth 50 -- <repository> <dir>`, which an
/// interrupt cancels.
async fn clone_repository(
    spec: &TaskSpec,
    control: &mut mpsc::Receiver<Control>,
    events: &mpsc::Sender<RunnerEvent>,
) -> Result<(), StartError> {
    let mut cmd = Command::new("git");
    cmd.arg("clone");
    if !spec.branch.is_empty() {
        cmd.arg("--branch").arg(&spec.branch);
    }
    // `--` keeps a repository string from the server from being read as an
    // option (such as --upload-pack).
    cmd.arg("--depth")
        .arg("50")
        .arg("--")
        .arg(&spec.repository)
        .arg(&spec.dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    info!(repository = %spec.repository, branch = %spec.branch, "cloning");
    let child = cmd
        .spawn()
        .map_err(|e| StartError::new(format!("running git clone failed: {e}")))?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    loop {
        tokio::select! {
            res = &mut output => {
                let out = res.map_err(|e| StartError::new(format!("git clone failed: {e}")))?;
                if out.status.success() {
                    return Ok(());
                }
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr = stderr.trim();
                let tail: String = {
                    let skip = stderr.chars().count().saturating_sub(MAX_GIT_ERROR_CHARS);
                    stderr.chars().skip(skip).collect()
                };
                return Err(StartError {
                    reason: format!("git clone failed ({}): {tail}", describe_status(out.status)),
                    exit_code: exit_code_of(out.status),
                });
            }
            ctrl = control.recv() => match ctrl {
                Some(Control::Input { command_id, .. }) => {
                    let _ = events
                        .send(RunnerEvent::CommandDone {
                            command_id,
                            result: Err("the agent has not started yet (cloning)".into()),
                        })
                        .await;
                }
                // Dropping `output` kills git (kill_on_drop).
                Some(Control::Interrupt { .. } | Control::Kill) | None => {
                    return Err(StartError::new("interrupted"));
                }
            }
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown exit status".into(),
    }
}

/// The exit code, or 128 + signal the way shells report a signal death.
fn exit_code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// The end of an agent run from its exit status.
fn outcome_of(exit: &Result<ExitStatus, String>, interrupted: bool, summary: String) -> Outcome {
    match exit {
        Err(e) => Outcome::Failed {
            reason: format!("waiting for the agent failed: {e}"),
            exit_code: -1,
        },
        Ok(status) if interrupted => Outcome::Failed {
            reason: "interrupted".into(),
            exit_code: exit_code_of(*status),
        },
        Ok(status) if status.success() => Outcome::Completed { summary },
        Ok(status) => Outcome::Failed {
            reason: describe_status(*status),
            exit_code: exit_code_of(*status),
        },
    }
}

/// Writes `SendInput` text to the agent's stdin off the runner loop, so a
/// child that does not read its stdin cannot stall output handling.
fn spawn_stdin_writer(
    mut stdin: ChildStdin,
    events: mpsc::Sender<RunnerEvent>,
) -> mpsc::Sender<(String, String)> {
    let (tx, mut rx) = mpsc::channel::<(String, String)>(16);
    tokio::spawn(async move {
        while let Some((command_id, mut text)) = rx.recv().await {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            let result = match stdin.write_all(text.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            }
            .map_err(|e| format!("writing to the agent's stdin failed: {e}"));
            let done = RunnerEvent::CommandDone { command_id, result };
            if events.send(done).await.is_err() {
                break;
            }
        }
    });
    tx
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        events: mpsc::Receiver<RunnerEvent>,
        control: mpsc::Sender<Control>,
        _pressure: watch::Sender<bool>,
        _dir: TempDir,
    }

    /// A directory removed on drop (no tempfile crate here).
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec(plan: &str, first_seq: i64, dir: &TempDir) -> TaskSpec {
        TaskSpec {
            run_id: 7,
            task_id: "t1".into(),
            plan: plan.into(),
            command_template: None,
            repository: String::new(),
            branch: String::new(),
            dir: dir.0.join("t1"),
            first_seq,
            default_grace: Duration::from_secs(10),
            attempt: 1,
            resume_session_id: None,
            context: String::new(),
        }
    }

    fn temp_dir() -> TempDir {
        let dir = std::env::temp_dir().join(format!("taskmesh-runner-{}", uuid::Uuid::new_v4()));
        TempDir(dir)
    }

    fn start_with(spec_fn: impl FnOnce(&TempDir) -> TaskSpec) -> Harness {
        let dir = temp_dir();
        let spec = spec_fn(&dir);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let (p_tx, p_rx) = watch::channel(false);
        tokio::spawn(run_task(spec, ev_tx, ctl_rx, p_rx));
        Harness {
            events: ev_rx,
            control: ctl_tx,
            _pressure: p_tx,
            _dir: dir,
        }
    }

    fn start(plan: &str, first_seq: i64) -> Harness {
        start_with(|d| spec(plan, first_seq, d))
    }

    impl Harness {
        async fn next(&mut self) -> RunnerEvent {
            let ev = tokio::time::timeout(Duration::from_secs(30), self.events.recv()).await;
            ev.expect("runner event in time").expect("runner alive")
        }

        /// Collects output until the end.
        async fn until_end(&mut self, out: &mut Vec<TaskMessageInput>) -> TaskEnd {
            loop {
                match self.next().await {
                    RunnerEvent::Output { messages, .. } => out.extend(messages),
                    RunnerEvent::Ended { end, .. } => return end,
                    _ => {}
                }
            }
        }
    }

    fn kind(m: &TaskMessageInput) -> MessageKind {
        MessageKind::try_from(m.kind).unwrap_or(MessageKind::Unspecified)
    }

    #[tokio::test]
    async fn exit_status_and_both_streams() {
        let mut h = start("echo a; echo b >&2; exit 3", 1);
        assert!(matches!(h.next().await, RunnerEvent::Started { pid, .. } if pid > 0));
        let mut out = Vec::new();
        let end = h.until_end(&mut out).await;
        assert_eq!(out.len(), 2, "{out:?}");
        let mut seqs: Vec<i64> = out.iter().map(|m| m.seq).collect();
        seqs.sort();
        assert_eq!(seqs, [1, 2]);
        let a = out.iter().find(|m| m.content == "a").expect("stdout line");
        assert_eq!(kind(a), MessageKind::Stdout);
        let b = out.iter().find(|m| m.content == "b").expect("stderr line");
        assert_eq!(kind(b), MessageKind::Stderr);
        assert_eq!(
            end.outcome,
            Outcome::Failed {
                reason: "exit status 3".into(),
                exit_code: 3
            }
        );
    }

    #[tokio::test]
    async fn seqs_are_contiguous_across_stdout_stderr_and_multi_message_lines() {
        let line = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"},{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}"#;
        let plan = format!(
            "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; printf '%s\\n' {}; echo tail",
            shell_quote(line)
        );
        let mut h = start(&plan, 40);
        let mut out = Vec::new();
        let end = h.until_end(&mut out).await;
        assert!(matches!(end.outcome, Outcome::Completed { .. }));
        // 10 plain lines + 2 messages from the stream-json line + 1.
        assert_eq!(out.len(), 13);
        let seqs: Vec<i64> = out.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (40..53).collect::<Vec<_>>(), "emitted in seq order");
        let tool = out
            .iter()
            .position(|m| kind(m) == MessageKind::ToolUse)
            .expect("tool use");
        assert_eq!(kind(&out[tool - 1]), MessageKind::Assistant);
        assert_eq!(out[tool - 1].seq + 1, out[tool].seq);
    }

    #[tokio::test]
    async fn send_input_reaches_stdin() {
        let mut h = start("read x; echo got:$x", 1);
        assert!(matches!(h.next().await, RunnerEvent::Started { .. }));
        h.control
            .send(Control::Input {
                command_id: "c1".into(),
                text: "hello".into(),
            })
            .await
            .expect("runner takes control");
        let mut out = Vec::new();
        let mut done = None;
        let end = loop {
            match h.next().await {
                RunnerEvent::Output { messages, .. } => out.extend(messages),
                RunnerEvent::CommandDone { command_id, result } => {
                    done = Some((command_id, result))
                }
                RunnerEvent::Ended { end, .. } => break end,
                RunnerEvent::Started { .. } => {}
            }
        };
        assert_eq!(done, Some(("c1".to_owned(), Ok(()))));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].content, "got:hello");
        assert_eq!(
            end.outcome,
            Outcome::Completed {
                summary: "got:hello".into()
            }
        );
    }

    fn process_gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // A zombie waiting for init to reap it is dead too.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    #[tokio::test]
    async fn interrupt_kills_grandchildren() {
        let mut h = start_with(|d| TaskSpec {
            default_grace: Duration::from_millis(300),
            ..spec("sleep 1000 & echo $!; wait", 1, d)
        });
        assert!(matches!(h.next().await, RunnerEvent::Started { .. }));
        let pid = match h.next().await {
            RunnerEvent::Output { messages, .. } => messages[0].content.clone(),
            other => panic!("expected the grandchild pid, got {other:?}"),
        };
        assert!(pid.parse::<u32>().is_ok(), "{pid}");
        assert!(!process_gone(&pid), "grandchild runs before the interrupt");
        h.control
            .send(Control::Interrupt {
                grace: Duration::ZERO,
            })
            .await
            .expect("runner takes control");
        let end = h.until_end(&mut Vec::new()).await;
        match end.outcome {
            Outcome::Failed { reason, .. } => assert_eq!(reason, "interrupted"),
            other => panic!("unexpected outcome {other:?}"),
        }
        // The runner ends only after the pipes close, which the grandchild
        // held; give init a moment to reap it.
        let mut gone = false;
        for _ in 0..200 {
            if process_gone(&pid) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "grandchild {pid} survived the interrupt");
    }

    #[tokio::test]
    async fn runtime_template_gets_the_plan_as_env_and_last_argument() {
        let mut h = start_with(|d| {
            TaskSpec {
            command_template: Some(r#"f() { echo "arg:$1"; echo "env:$TASKMESH_PLAN"; echo "id:$TASKMESH_TASK_ID"; }; f"#.into()),
            ..spec("it's a plan; $(rm -rf /)", 1, d)
        }
        });
        let mut out = Vec::new();
        h.until_end(&mut out).await;
        let lines: Vec<&str> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            lines,
            [
                "arg:it's a plan; $(rm -rf /)",
                "env:it's a plan; $(rm -rf /)",
                "id:t1"
            ]
        );
    }

    #[tokio::test]
    async fn session_id_becomes_resume() {
        let line = r#"{"type":"system","subtype":"init","session_id":"abc"}"#;
        let mut h = start(&format!("echo {}", shell_quote(line)), 1);
        let end = h.until_end(&mut Vec::new()).await;
        let resume = end.resume.expect("resume");
        assert_eq!(resume.agent_session_id, "abc");
        assert!(resume.working_directory.ends_with("/t1"));
    }

    #[tokio::test]
    async fn clone_failure_fails_the_task_with_the_git_error() {
        let mut h = start_with(|d| TaskSpec {
            repository: d.0.join("no-such-repo").display().to_string(),
            ..spec("true", 1, d)
        });
        match h.next().await {
            RunnerEvent::Ended {
                end, before_start, ..
            } => {
                assert!(before_start);
                match end.outcome {
                    Outcome::Failed { reason, exit_code } => {
                        assert!(reason.starts_with("git clone failed"), "{reason}");
                        assert_ne!(exit_code, 0);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn backpressure_stops_reading_until_released() {
        let dir = temp_dir();
        let (ev_tx, mut ev_rx) = mpsc::channel(64);
        let (_ctl_tx, ctl_rx) = mpsc::channel(8);
        let (p_tx, p_rx) = watch::channel(true);
        tokio::spawn(run_task(spec("echo one", 1, &dir), ev_tx, ctl_rx, p_rx));
        assert!(matches!(
            ev_rx.recv().await,
            Some(RunnerEvent::Started { .. })
        ));
        // While paused, the child exits but its line stays unread.
        let mut polled = 0;
        while polled < 20 {
            tokio::task::yield_now().await;
            assert!(ev_rx.try_recv().is_err(), "read while paused");
            polled += 1;
        }
        p_tx.send_replace(false);
        match ev_rx.recv().await {
            Some(RunnerEvent::Output { messages, .. }) => assert_eq!(messages[0].content, "one"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exit_descriptions() {
        let st = |raw: i32| ExitStatus::from_raw(raw);
        assert_eq!(
            outcome_of(&Ok(st(0)), false, "s".into()),
            Outcome::Completed {
                summary: "s".into()
            }
        );
        assert_eq!(
            outcome_of(&Ok(st(3 << 8)), false, String::new()),
            Outcome::Failed {
                reason: "exit status 3".into(),
                exit_code: 3
            }
        );
        assert_eq!(
            outcome_of(&Ok(st(9)), false, String::new()),
            Outcome::Failed {
                reason: "killed by signal 9".into(),
                exit_code: 137
            }
        );
        assert_eq!(
            outcome_of(&Ok(st(0)), true, String::new()),
            Outcome::Failed {
                reason: "interrupted".into(),
                exit_code: 0
            }
        );
    }
}
