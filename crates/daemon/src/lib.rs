//! The reference daemon: registers with the server, holds one `Session`
//! stream, and runs each task as a child process group.
//!
//! - [`client`]: reaching the server: the client, backoff, opening a
//!   session.
//! - [`session`]: the session loop (commands down; output, end reports,
//!   heartbeats up; reconnects; graceful stop).
//! - [`runner`]: one task's child process, from clone to exit.
//! - [`output`]: splitting pipes into lines, typing Claude Code stream-json,
//!   and the per-task buffer of unacknowledged output.

mod agents;
mod client;
mod output;
mod runner;
mod session;
mod worktrees;

/// The stream-json parser, public for the fuzz targets.
pub use output::{MAX_LINE_BYTES, StreamParser};

/// What the `claude` or `codex` adapter makes of these stdout lines: the
/// transcript messages and the lines it would answer on stdin. For the
/// fuzz targets.
#[doc(hidden)]
pub fn read_agent_output(agent: &str, lines: &[&str]) -> (Vec<pb::TaskMessageInput>, Vec<String>) {
    let kind = match agent {
        "codex" => agents::AgentKind::Codex(agents::codex::Settings::default()),
        _ => agents::AgentKind::Claude(agents::claude::Settings::default()),
    };
    let mut adapter = kind.build();
    let (mut messages, mut replies) = (Vec::new(), Vec::new());
    for line in lines {
        let reading = adapter.read_line(line);
        messages.extend(reading.messages);
        replies.extend(reading.replies);
    }
    (messages, replies)
}

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use session::Session;
use taskmesh_proto::pb;
use taskmesh_proto::{Bearer, ClientTls};

const VERSION_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `taskmesh daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// URL of the taskmesh server. Repeat it (or comma-separate) to name
    /// several replicas: the daemon holds one session and moves to the
    /// next when its server fails or shuts down. A host name that
    /// resolves to several addresses counts as one replica per address.
    #[arg(
        long,
        env = "TASKMESH_SERVER",
        default_value = "http://127.0.0.1:7070",
        value_delimiter = ','
    )]
    pub server: Vec<String>,

    /// Daemon token (`tmd_…`), sent as `authorization: Bearer <token>`.
    /// Prefer --token-file: a flag shows in `ps`. Never passed on to agents.
    #[arg(long, env = "TASKMESH_TOKEN", hide_env_values = true)]
    pub token: Option<DaemonToken>,

    /// A file holding the daemon token (its first line). It wins over
    /// --token and TASKMESH_TOKEN, which in an admin's shell often holds
    /// their user token.
    #[arg(long, env = "TASKMESH_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// With an https:// server: trust this CA certificate (PEM) instead of
    /// the system's roots.
    #[arg(long, env = "TASKMESH_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// With an https:// server that asks for one (serve --client-ca): this
    /// daemon's certificate (PEM). Needs --client-key.
    #[arg(
        long,
        env = "TASKMESH_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// The private key of --client-cert (PEM).
    #[arg(
        long,
        env = "TASKMESH_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,

    /// Directory for the daemon's state (its machine id); defaults to
    /// `$HOME/.local/state/taskmesh-daemon`, or `./.taskmesh-daemon`
    /// without a home.
    #[arg(long, env = "TASKMESH_DAEMON_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory holding one directory per task (a clone of its repository
    /// when it names one); defaults to `<state-dir>/tasks`.
    #[arg(long, env = "TASKMESH_DAEMON_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// How long a task's directory is kept after its task last ran there
    /// (`7d`, `12h`, `30m`, `45s`, or `never`); a directory with a running
    /// agent is never removed, and a deleted task's goes at once.
    #[arg(long, env = "TASKMESH_DAEMON_KEEP_WORKTREES", default_value = "7d",
          value_parser = worktrees::parse_keep, value_name = "DURATION")]
    pub keep_worktrees: Duration,

    /// A directory this daemon suggests for copies of task directories
    /// (CloneWorktree), shown by GetDaemon; repeatable. Defaults to $HOME.
    #[arg(
        long = "clone-target",
        env = "TASKMESH_DAEMON_CLONE_TARGETS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub clone_targets: Vec<PathBuf>,

    /// A runtime this daemon offers. `claude` is Claude Code driven in its
    /// stream-json protocol (follow-ups, --resume, usage and cost,
    /// permission requests as approvals; see the --claude-* flags).
    /// `codex` is Codex in `codex exec --json` mode (resume, usage; see the
    /// --codex-* flags).
    /// `NAME=COMMAND` is any other command, run with `sh -c` with the plan
    /// appended as a last quoted argument and in `$TASKMESH_PLAN` (also
    /// `$TASKMESH_TASK_ID`, `$TASKMESH_ATTEMPT`, `$TASKMESH_CONTEXT`,
    /// `$TASKMESH_AGENT_SESSION_ID`); follow-ups are written to its stdin.
    /// Repeatable; the environment variable takes a comma-separated list.
    /// A runtime whose program is not found is not offered (a warning says
    /// so). The `shell` runtime (the plan is the script) always exists.
    #[arg(
        long = "runtime",
        env = "TASKMESH_DAEMON_RUNTIMES",
        value_name = "claude|codex|NAME=COMMAND"
    )]
    pub runtimes: Vec<String>,

    /// The Claude Code executable for `--runtime claude`.
    #[arg(long, env = "TASKMESH_CLAUDE_BIN", default_value = "claude")]
    pub claude_bin: String,

    /// Model for Claude tasks that name none (`--model`); Claude's own
    /// default when unset.
    #[arg(long, env = "TASKMESH_CLAUDE_MODEL")]
    pub claude_model: Option<String>,

    /// Permission mode for Claude tasks that name none: default,
    /// acceptEdits, plan or bypassPermissions. In `default`, a tool Claude
    /// may not use on its own becomes an approval a person answers
    /// (`taskmesh task approve|deny`).
    #[arg(long, env = "TASKMESH_CLAUDE_PERMISSION_MODE",
          value_parser = ["default", "acceptEdits", "plan", "bypassPermissions"])]
    pub claude_permission_mode: Option<String>,

    /// Tools Claude may use without asking (its `--allowedTools`), e.g.
    /// `Read,Grep,Bash(git status)`.
    #[arg(long, env = "TASKMESH_CLAUDE_ALLOWED_TOOLS")]
    pub claude_allowed_tools: Option<String>,

    /// The Codex executable for `--runtime codex`.
    #[arg(long, env = "TASKMESH_CODEX_BIN", default_value = "codex")]
    pub codex_bin: String,

    /// Model for Codex tasks that name none; Codex's own default when unset.
    #[arg(long, env = "TASKMESH_CODEX_MODEL")]
    pub codex_model: Option<String>,

    /// Codex's `--sandbox` for its commands.
    #[arg(long, env = "TASKMESH_CODEX_SANDBOX",
          value_parser = ["read-only", "workspace-write", "danger-full-access"])]
    pub codex_sandbox: Option<String>,

    /// Most tasks run at once.
    #[arg(long, env = "TASKMESH_DAEMON_MAX_TASKS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_tasks: u32,

    /// Seconds between SIGINT and SIGKILL when a task is interrupted.
    #[arg(
        long,
        env = "TASKMESH_DAEMON_INTERRUPT_GRACE_SECS",
        default_value_t = 10
    )]
    pub interrupt_grace_secs: u64,

    /// Minutes an agent may print nothing before it is interrupted and its
    /// task failed (a hung CLI); 0 turns the watchdog off.
    #[arg(long, env = "TASKMESH_DAEMON_SILENCE_MINUTES", default_value_t = 30)]
    pub silence_minutes: u64,

    /// On shutdown, seconds running tasks may take to finish before they
    /// are interrupted.
    #[arg(long, env = "TASKMESH_DAEMON_SHUTDOWN_SECS", default_value_t = 30)]
    pub shutdown_secs: u64,
}

/// A daemon token; its `Debug` form does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct DaemonToken(String);

impl DaemonToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DaemonToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonToken(<redacted>)")
    }
}

impl FromStr for DaemonToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl From<String> for DaemonToken {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for DaemonToken {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Why the daemon could not start, or had to stop: network and server
/// trouble is retried, but a server that refuses the daemon's token (at
/// Register) ends it.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Server(#[from] taskmesh_proto::EndpointError),
    #[error("no daemon token: pass --token-file FILE (or --token, or TASKMESH_TOKEN)")]
    NoToken,
    #[error("no server URL: pass --server http://host:7070 (repeat it for several replicas)")]
    NoServer,
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid daemon token: it must be non-empty printable ASCII")]
    InvalidToken,
    #[error("invalid --runtime {spec:?}: {reason}")]
    InvalidRuntime { spec: String, reason: String },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another taskmesh daemon is using the state directory {path}; give each daemon on a machine its own --state-dir"
    )]
    StateDirInUse { path: PathBuf },
    #[error("{path} does not hold a machine id (a UUID); remove it to make a new one")]
    BadMachineId { path: PathBuf },
    #[error(
        "the server refused this daemon ({0}); check its token (a daemon token of the right workspace, not revoked) and --server"
    )]
    Refused(String),
}

/// A runtime the daemon advertises and runs.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeDef {
    pub name: String,
    pub agent: agents::AgentKind,
    pub version: String,
}

/// The daemon's resolved settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub machine_id: String,
    pub hostname: String,
    pub work_dir: PathBuf,
    pub runtimes: Vec<RuntimeDef>,
    pub max_tasks: usize,
    pub interrupt_grace: Duration,
    /// No output for this long interrupts the agent; `None`: never.
    pub silence_limit: Option<Duration>,
    pub shutdown_grace: Duration,
    /// Values no agent may see in its environment (the daemon's token).
    pub hidden_secrets: Vec<String>,
    /// Task directories unused this long are removed; `None`: never.
    pub keep_worktrees: Option<Duration>,
    /// Suggested targets for copies of task directories.
    pub clone_targets: Vec<String>,
    /// What an agent is told to reach the server with (TASKMESH_SERVER,
    /// TASKMESH_CA_CERT), beside its own task's token.
    pub server_url: String,
    pub ca_cert: Option<PathBuf>,
    /// Held while the daemon runs: one daemon per state directory.
    pub _state_lock: Option<Arc<std::fs::File>>,
}

/// The daemon token, from --token or the first line of --token-file.
fn token(args: &DaemonArgs) -> Result<DaemonToken, DaemonError> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let line = text.lines().next().unwrap_or_default().trim();
        return Ok(DaemonToken::new(line));
    }
    args.token.clone().ok_or(DaemonError::NoToken)
}

/// Runs the daemon until a stop request and the graceful stop are done:
/// the first request takes no new work and gives running tasks
/// `--shutdown-secs` to finish; then, or at the next request, they are
/// interrupted and go back to the queue for another daemon. Their end
/// reports are flushed and the daemon deregisters.
pub async fn run(
    args: DaemonArgs,
    stops: impl futures_util::Stream<Item = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let token = token(&args)?;
    let bearer = Bearer::new(token.expose()).map_err(|_| DaemonError::InvalidToken)?;
    let tls = ClientTls {
        ca_cert: args.ca_cert.clone(),
        identity: args.client_cert.clone().zip(args.client_key.clone()),
    };
    let urls: Vec<String> = args
        .server
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(DaemonError::NoServer);
    }
    // Every URL checked now, so a typo stops the daemon at start.
    for url in &urls {
        if let (_, Some(warning)) = taskmesh_proto::endpoint(url, &tls)? {
            tracing::warn!("{warning}");
        }
    }
    let mut config = resolve_config(&args).await?;
    config.hidden_secrets.push(token.expose().to_string());
    info!(
        server = %urls.join(","),
        machine_id = %config.machine_id,
        hostname = %config.hostname,
        work_dir = %config.work_dir.display(),
        runtimes = ?config.runtimes.iter().map(|r| format!("{}@{}", r.name, r.version)).collect::<Vec<_>>(),
        max_tasks = config.max_tasks,
        "daemon starting"
    );
    if let Some(keep) = config.keep_worktrees {
        tokio::spawn(worktrees::keep_sweeping(config.work_dir.clone(), keep));
    }
    let connector: client::Connector = Box::new(move |url, addr| {
        let (endpoint, _) =
            taskmesh_proto::endpoint_via(url, addr, &tls).map_err(|e| e.to_string())?;
        Ok(client::connect(endpoint, bearer.clone()))
    });
    let servers = client::Servers::new(urls, connector);
    Session::new(Arc::new(config), servers, Box::pin(stops))
        .run()
        .await
        .map_err(|e| DaemonError::Refused(e.to_string()))
}

async fn resolve_config(args: &DaemonArgs) -> Result<Config, DaemonError> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("tasks"));
    let machine_id = load_machine_id(&state_dir).await?;
    let state_lock = lock_state_dir(&state_dir)?;
    tokio::fs::create_dir_all(&work_dir)
        .await
        .map_err(|source| DaemonError::State {
            path: work_dir.clone(),
            source,
        })?;
    // Task directories are joined to it; keep them absolute for the agent.
    let work_dir = std::path::absolute(&work_dir).unwrap_or(work_dir);

    let mut runtimes = vec![RuntimeDef {
        name: "shell".into(),
        agent: agents::AgentKind::Shell,
        version: "builtin".into(),
    }];
    let claude = agents::claude::Settings {
        binary: args.claude_bin.clone(),
        model: args.claude_model.clone(),
        permission_mode: args.claude_permission_mode.clone(),
        allowed_tools: args.claude_allowed_tools.clone(),
    };
    let codex = agents::codex::Settings {
        binary: args.codex_bin.clone(),
        model: args.codex_model.clone(),
        sandbox: args.codex_sandbox.clone(),
    };
    let defined: Vec<(String, agents::AgentKind, String)> = parse_runtimes(&args.runtimes)?
        .into_iter()
        .map(|(name, command)| match command {
            Some(command) => {
                let program = command.split_whitespace().next().unwrap_or_default();
                let program = program.to_owned();
                (name, agents::AgentKind::Template(command), program)
            }
            None if name == "codex" => {
                let bin = codex.binary.clone();
                (name, agents::AgentKind::Codex(codex.clone()), bin)
            }
            None => (
                name,
                agents::AgentKind::Claude(claude.clone()),
                claude.binary.clone(),
            ),
        })
        .collect();
    let versions = futures_util::future::join_all(
        defined.iter().map(|(_, _, program)| probe_version(program)),
    )
    .await;
    for ((name, agent, program), version) in defined.into_iter().zip(versions) {
        match version {
            Some(version) => runtimes.push(RuntimeDef {
                name,
                agent,
                version,
            }),
            None => tracing::warn!(
                runtime = %name,
                %program,
                "not offering this runtime: {program} was not found or did not answer --version"
            ),
        }
    }
    Ok(Config {
        machine_id,
        hostname: hostname(),
        work_dir,
        runtimes,
        max_tasks: usize::try_from(args.max_tasks).unwrap_or(1).max(1),
        interrupt_grace: Duration::from_secs(args.interrupt_grace_secs),
        silence_limit: (args.silence_minutes > 0)
            .then(|| Duration::from_secs(args.silence_minutes.saturating_mul(60))),
        shutdown_grace: Duration::from_secs(args.shutdown_secs),
        hidden_secrets: Vec::new(),
        keep_worktrees: (args.keep_worktrees != Duration::MAX).then_some(args.keep_worktrees),
        clone_targets: if args.clone_targets.is_empty() {
            std::env::var("HOME")
                .into_iter()
                .filter(|h| !h.is_empty())
                .collect()
        } else {
            args.clone_targets
                .iter()
                .map(|p| {
                    std::path::absolute(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                })
                .collect()
        },
        server_url: args.server.join(","),
        ca_cert: args
            .ca_cert
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        _state_lock: Some(Arc::new(state_lock)),
    })
}

/// Takes `<state_dir>/lock` for as long as the daemon runs, so a second
/// daemon on the same state (and so the same machine id, which would knock
/// the first off the server) stops at once. The kernel lets go of the lock
/// when the process ends, however it ends.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    let path = state_dir.join("lock");
    match worktrees::try_lock_file(&path) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(DaemonError::StateDirInUse {
            path: state_dir.to_path_buf(),
        }),
        Err(source) => Err(DaemonError::State { path, source }),
    }
}

fn default_state_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".local/state/taskmesh-daemon"),
        _ => PathBuf::from(".taskmesh-daemon"),
    }
}

/// The machine id in `<state_dir>/machine_id`, created on first run. It
/// keys the daemon on the server, so it is never silently replaced.
async fn load_machine_id(state_dir: &Path) -> Result<String, DaemonError> {
    let state_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::State { path, source }
    };
    tokio::fs::create_dir_all(state_dir)
        .await
        .map_err(state_err(state_dir))?;
    let path = state_dir.join("machine_id");
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => {
            let id = text.trim();
            return match uuid::Uuid::parse_str(id) {
                Ok(_) => Ok(id.to_owned()),
                Err(_) => Err(DaemonError::BadMachineId { path }),
            };
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DaemonError::State { path, source: e }),
    }
    let id = uuid::Uuid::new_v4().to_string();
    // Write then rename, so a crash never leaves a half-written id.
    let tmp = state_dir.join(format!("machine_id.{}.tmp", std::process::id()));
    tokio::fs::write(&tmp, format!("{id}\n"))
        .await
        .map_err(state_err(&tmp))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(state_err(&path))?;
    info!(path = %path.display(), %id, "created machine id");
    Ok(id)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// Does `piece` start a `NAME=COMMAND` entry (or name a built-in agent)?
fn starts_entry(piece: &str) -> bool {
    if BUILT_IN_AGENTS.contains(&piece.trim()) {
        return true;
    }
    let Some((name, _)) = piece.trim_start().split_once('=') else {
        return false;
    };
    valid_runtime_name(name)
}

fn valid_runtime_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Agents built in, named by `--runtime NAME` alone.
const BUILT_IN_AGENTS: &[&str] = &["claude", "codex"];

/// `NAME=COMMAND` entries (and built-in agents, without a command) from
/// the flags. A value may hold several entries separated by commas (the
/// environment variable form); a comma not followed by `NAME=` or a
/// built-in name belongs to the command (`--allowedTools Read,Edit`).
fn parse_runtimes(values: &[String]) -> Result<Vec<(String, Option<String>)>, DaemonError> {
    let mut entries: Vec<String> = Vec::new();
    for value in values {
        let mut first = true;
        for piece in value.split(',') {
            match entries.last_mut() {
                Some(last) if !first && !starts_entry(piece) => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ => entries.push(piece.to_owned()),
            }
            first = false;
        }
    }
    let mut runtimes: Vec<(String, Option<String>)> = Vec::new();
    for entry in entries {
        if entry.trim().is_empty() {
            continue;
        }
        let invalid = |reason: &str| DaemonError::InvalidRuntime {
            spec: entry.clone(),
            reason: reason.into(),
        };
        if BUILT_IN_AGENTS.contains(&entry.trim()) {
            let name = entry.trim().to_owned();
            runtimes.retain(|(n, _)| *n != name);
            runtimes.push((name, None));
            continue;
        }
        let Some((name, command)) = entry.split_once('=') else {
            return Err(invalid(
                "expected NAME=COMMAND, or a built-in agent: claude or codex",
            ));
        };
        let (name, command) = (name.trim(), command.trim());
        if !valid_runtime_name(name) {
            return Err(invalid(
                "the name must start with a letter and hold only letters, digits, '-', '_' or '.'",
            ));
        }
        if name == "shell" {
            return Err(invalid("`shell` is built in"));
        }
        if command.is_empty() {
            return Err(invalid("the command is empty"));
        }
        match runtimes.iter_mut().find(|(n, _)| n == name) {
            Some(existing) => existing.1 = Some(command.to_owned()),
            None => runtimes.push((name.to_owned(), Some(command.to_owned()))),
        }
    }
    Ok(runtimes)
}

/// The first line `program --version` prints ("unknown" when it prints
/// nothing or fails), or `None` when the program cannot be started at all.
async fn probe_version(program: &str) -> Option<String> {
    let output = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_PROBE_TIMEOUT, output).await {
        Ok(Ok(out)) if out.status.success() => Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| runner::truncate_chars(l, 100))
                .unwrap_or_else(|| "unknown".into()),
        ),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => None,
        Ok(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => None,
        _ => Some("unknown".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: DaemonArgs,
    }

    #[test]
    fn runtime_lists_split_on_commas_that_start_an_entry() {
        let values = vec![
            "claude=claude -p --allowedTools Read,Edit --output-format stream-json".to_owned(),
            "codex=codex exec, echo=echo hi".to_owned(),
        ];
        let rts = parse_runtimes(&values).expect("valid");
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            rts,
            [
                (
                    "claude".to_owned(),
                    some("claude -p --allowedTools Read,Edit --output-format stream-json")
                ),
                ("codex".to_owned(), some("codex exec")),
                ("echo".to_owned(), some("echo hi")),
            ]
        );
        // A built-in agent by its name alone, also in a list.
        let rts = parse_runtimes(&["claude,echo=echo a,b".to_owned()]).expect("valid");
        assert_eq!(
            rts,
            [
                ("claude".to_owned(), None),
                ("echo".to_owned(), some("echo a,b"))
            ]
        );
        assert!(parse_runtimes(&["shell=bash".to_owned()]).is_err());
        assert!(parse_runtimes(&["nocommand".to_owned()]).is_err());
        assert!(parse_runtimes(&["x=".to_owned()]).is_err());
        assert!(parse_runtimes(&[]).expect("none").is_empty());
    }

    #[test]
    fn args_parse_with_defaults_and_hide_the_token() {
        let cli = Cli::try_parse_from(["daemon", "--token", "tmd_secret", "--runtime", "a=b"])
            .expect("parses");
        assert_eq!(cli.args.server, ["http://127.0.0.1:7070"]);
        let replicas = Cli::try_parse_from([
            "daemon",
            "--server",
            "http://a:7070,http://b:7070",
            "--server",
            "http://c:7070",
        ])
        .expect("parses");
        assert_eq!(
            replicas.args.server,
            ["http://a:7070", "http://b:7070", "http://c:7070"]
        );
        assert_eq!(cli.args.max_tasks, 4);
        assert_eq!(cli.args.interrupt_grace_secs, 10);
        assert_eq!(cli.args.shutdown_secs, 30);
        assert_eq!(cli.args.keep_worktrees, Duration::from_secs(7 * 86_400));
        assert!(Cli::try_parse_from(["daemon", "--keep-worktrees", "soon"]).is_err());
        assert_eq!(token(&cli.args).unwrap().expose(), "tmd_secret");
        assert!(!format!("{:?}", cli.args).contains("tmd_secret"));
        assert!(Cli::try_parse_from(["daemon", "--token", "t", "--max-tasks", "0"]).is_err());
        // Without a token it says how to pass one.
        let none = Cli::try_parse_from(["daemon"]).expect("parses");
        assert!(
            token(&none.args)
                .unwrap_err()
                .to_string()
                .contains("--token-file")
        );
    }

    #[test]
    fn the_token_file_gives_its_first_line() {
        let path = std::env::temp_dir().join(format!("taskmesh-token-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "tmd_from_file\nignored\n").unwrap();
        let p = path.display().to_string();
        let cli = Cli::try_parse_from(["daemon", "--token-file", &p]).expect("parses");
        assert_eq!(token(&cli.args).unwrap().expose(), "tmd_from_file");
        // The file wins over a token from the flag or TASKMESH_TOKEN (an
        // admin's shell exports their user token there).
        let both = Cli::try_parse_from(["daemon", "--token", "tmu_user", "--token-file", &p])
            .expect("parses");
        assert_eq!(token(&both.args).unwrap().expose(), "tmd_from_file");
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn machine_id_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("taskmesh-state-{}", uuid::Uuid::new_v4()));
        let first = load_machine_id(&dir).await.expect("created");
        assert!(uuid::Uuid::parse_str(&first).is_ok());
        let again = load_machine_id(&dir).await.expect("read");
        assert_eq!(first, again);
        std::fs::write(dir.join("machine_id"), "garbage").expect("write");
        assert!(matches!(
            load_machine_id(&dir).await,
            Err(DaemonError::BadMachineId { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_daemon_per_state_dir() {
        let dir = std::env::temp_dir().join(format!("taskmesh-lock-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_state_dir(&dir).expect("the first takes it");
        let err = lock_state_dir(&dir).expect_err("the second is refused");
        assert!(err.to_string().contains("--state-dir"), "{err}");
        drop(held);
        lock_state_dir(&dir).expect("free again once the first lets go");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn version_probe_takes_the_first_line_or_nothing_for_a_missing_program() {
        assert_eq!(probe_version("no-such-program-xyz").await, None);
        let v = probe_version("git").await.expect("git is installed");
        assert!(v.starts_with("git version"), "{v}");
        assert_eq!(probe_version("false").await.as_deref(), Some("unknown"));
    }
}
