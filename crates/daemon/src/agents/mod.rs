//! Agent adapters: how each kind of agent is started, fed and read. The
//! runner owns the process (its group, pipes, signals and exit); an
//! [`Agent`] only says what to run, what to write on its stdin and what its
//! stdout lines mean.
//!
//! - [`shell`]: the plan as a shell script, or a `NAME=COMMAND` template;
//!   stdout lines that are Claude Code stream-json are typed, the rest are
//!   stdout.
//! - [`claude`]: Claude Code in its stream-json protocol both ways, with
//!   follow-ups, `--resume`, usage and cost, and permission requests that
//!   become approvals.
//! - [`codex`]: Codex in `codex exec --json` mode, with `resume` and usage.

pub(crate) mod claude;
pub(crate) mod codex;
pub(crate) mod shell;

use std::path::Path;

use tokio::process::Command;

use crate::pb::{ApprovalDecision, TaskMessageInput, TaskUsage};

/// What one run of an agent is asked to do.
#[derive(Debug, Clone, Default)]
pub(crate) struct Turn {
    /// The first prompt: the task's plan, or a continued attempt's prompt.
    pub prompt: String,
    /// Earlier attempts' output, for an attempt that cannot resume.
    pub context: String,
    /// The agent's own session to resume, from an earlier attempt.
    pub resume_session_id: Option<String>,
    /// Per task; empty means the daemon's default.
    pub model: String,
    pub permission_mode: String,
    /// The agent's taskmesh tools (`taskmesh mcp`), when it has a task
    /// token.
    pub tools: Option<TaskTools>,
}

/// How an agent starts its taskmesh MCP server: the command and its
/// arguments, also as a Claude Code MCP configuration file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TaskTools {
    pub command: String,
    pub args: Vec<String>,
    /// `{"mcpServers": {"taskmesh": …}}`, for `claude --mcp-config`.
    pub config_file: std::path::PathBuf,
}

/// The name agents know the tools by (Claude calls them `mcp__taskmesh__…`).
pub(crate) const TOOLS_NAME: &str = "taskmesh";

/// Usage so far in this run (totals, not increments), per model.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct UsageReport {
    pub usage: Vec<TaskUsage>,
    pub cost_usd: f64,
    pub turns: i32,
}

/// What one stdout line meant.
#[derive(Debug, Default)]
pub(crate) struct Reading {
    /// Messages for the transcript (without seqs).
    pub messages: Vec<TaskMessageInput>,
    /// Lines the agent must be answered with on its stdin.
    pub replies: Vec<String>,
    /// New usage totals.
    pub usage: Option<UsageReport>,
    /// The agent has nothing more to do: close its stdin so it exits.
    pub close_stdin: bool,
}

/// How the agent said its run went, beyond its exit status.
#[derive(Debug, Default)]
pub(crate) struct AgentEnd {
    /// Its last words, for `CompleteTaskRequest.summary`.
    pub summary: Option<String>,
    /// It reported an error although it may exit 0 (a Claude result with
    /// `is_error`): the task fails with this reason.
    pub error: Option<String>,
    /// Its own session id, for resuming later.
    pub session_id: Option<String>,
}

/// One run of one agent. Methods return lines to write on its stdin
/// (without the newline); the runner writes them in order.
pub(crate) trait Agent: Send {
    /// The process to start, in `dir`; the runner adds the environment,
    /// pipes and process group.
    fn command(&self, turn: &Turn, dir: &Path) -> Command;
    /// What to write once the process started, and what of it goes into
    /// the transcript.
    fn opening(&mut self, turn: &Turn) -> (Vec<String>, Vec<TaskMessageInput>);
    /// Whether stdin closes right after the opening lines (an agent that
    /// reads its prompt to the end of its input).
    fn closes_stdin_after_opening(&self) -> bool {
        false
    }
    /// A person's follow-up: the line to write and its transcript message,
    /// or why it cannot be taken now.
    fn follow_up(&mut self, text: &str) -> Result<(String, TaskMessageInput), String>;
    /// One line of stdout.
    fn read_line(&mut self, line: &str) -> Reading;
    /// A person's answer to a permission request.
    fn decide(&mut self, decision: &ApprovalDecision) -> Result<String, String>;
    /// Asks the agent to stop in its own protocol, if it has one; the
    /// runner signals its process group after the grace either way.
    fn interrupt(&mut self) -> Option<String>;
    /// Called once the process exited.
    fn end(&mut self) -> AgentEnd;
}

/// Which adapter runs a runtime, and its settings.
#[derive(Debug, Clone)]
pub(crate) enum AgentKind {
    /// The built-in `shell` runtime: the plan is the script.
    Shell,
    /// `NAME=COMMAND`: the command with the plan as its last argument.
    Template(String),
    Claude(claude::Settings),
    Codex(codex::Settings),
}

impl AgentKind {
    pub(crate) fn build(&self) -> Box<dyn Agent> {
        match self {
            AgentKind::Shell => Box::new(shell::Shell::new(None)),
            AgentKind::Template(t) => Box::new(shell::Shell::new(Some(t.clone()))),
            AgentKind::Claude(s) => Box::new(claude::Claude::new(s.clone())),
            AgentKind::Codex(s) => Box::new(codex::Codex::new(s.clone())),
        }
    }
}

/// A user message for the transcript: what a person (or the plan) said.
pub(crate) fn user_message(text: &str) -> TaskMessageInput {
    TaskMessageInput {
        kind: crate::pb::MessageKind::User as i32,
        content: text.to_owned(),
        ..Default::default()
    }
}
