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

mod client;
mod output;
mod runner;
mod session;

/// The stream-json parser, public for the fuzz targets.
pub use output::{MAX_LINE_BYTES, StreamParser};

use std::fmt;
use std::future::Future;
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
    /// URL of the taskmesh server.
    #[arg(long, env = "TASKMESH_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,

    /// Daemon token (`tmd_…`), sent as `authorization: Bearer <token>`.
    /// Prefer --token-file: a flag shows in `ps`. Never passed on to agents.
    #[arg(
        long,
        env = "TASKMESH_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<DaemonToken>,

    /// A file holding the daemon token (its first line).
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

    /// An agent runtime: a command run with `sh -c`, with the task's plan in
    /// `$TASKMESH_PLAN` and appended as a last quoted argument. Repeatable;
    /// the environment variable takes a comma-separated list. Example:
    /// `claude='claude -p --output-format stream-json --verbose'`. The
    /// `shell` runtime (the plan is the script) always exists.
    #[arg(
        long = "runtime",
        env = "TASKMESH_DAEMON_RUNTIMES",
        value_name = "NAME=COMMAND"
    )]
    pub runtimes: Vec<String>,

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
    /// `None` for the built-in `shell` runtime.
    pub template: Option<String>,
    pub version: String,
}

/// The daemon's resolved settings.
#[derive(Debug)]
pub(crate) struct Config {
    pub machine_id: String,
    pub hostname: String,
    pub work_dir: PathBuf,
    pub runtimes: Vec<RuntimeDef>,
    pub max_tasks: usize,
    pub interrupt_grace: Duration,
    pub shutdown_grace: Duration,
    /// Values no agent may see in its environment (the daemon's token).
    pub hidden_secrets: Vec<String>,
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

/// Runs the daemon until `shutdown` completes and the graceful stop is
/// done: running tasks get `--shutdown-secs` to finish, are then
/// interrupted, their end reports are flushed, and the daemon deregisters.
pub async fn run(
    args: DaemonArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let token = token(&args)?;
    let bearer = Bearer::new(token.expose()).map_err(|_| DaemonError::InvalidToken)?;
    let tls = ClientTls {
        ca_cert: args.ca_cert.clone(),
        identity: args.client_cert.clone().zip(args.client_key.clone()),
    };
    let (endpoint, warning) = taskmesh_proto::endpoint(&args.server, &tls)?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let mut config = resolve_config(&args).await?;
    config.hidden_secrets.push(token.expose().to_string());
    info!(
        server = %args.server,
        machine_id = %config.machine_id,
        hostname = %config.hostname,
        work_dir = %config.work_dir.display(),
        runtimes = ?config.runtimes.iter().map(|r| format!("{}@{}", r.name, r.version)).collect::<Vec<_>>(),
        max_tasks = config.max_tasks,
        "daemon starting"
    );
    let client = client::connect(endpoint, bearer);
    Session::new(Arc::new(config), client, Box::pin(shutdown))
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
        template: None,
        version: "builtin".into(),
    }];
    let defined = parse_runtimes(&args.runtimes)?;
    let versions =
        futures_util::future::join_all(defined.iter().map(|(_, cmd)| probe_version(cmd))).await;
    for ((name, template), version) in defined.into_iter().zip(versions) {
        runtimes.push(RuntimeDef {
            name,
            template: Some(template),
            version,
        });
    }
    Ok(Config {
        machine_id,
        hostname: hostname(),
        work_dir,
        runtimes,
        max_tasks: usize::try_from(args.max_tasks).unwrap_or(1).max(1),
        interrupt_grace: Duration::from_secs(args.interrupt_grace_secs),
        shutdown_grace: Duration::from_secs(args.shutdown_secs),
        hidden_secrets: Vec::new(),
    })
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

/// Does `piece` start a `NAME=COMMAND` entry?
fn starts_entry(piece: &str) -> bool {
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

/// `NAME=COMMAND` entries from the flags. A value may hold several entries
/// separated by commas (the environment variable form); a comma not
/// followed by `NAME=` belongs to the command (`--allowedTools Read,Edit`).
fn parse_runtimes(values: &[String]) -> Result<Vec<(String, String)>, DaemonError> {
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
    let mut runtimes: Vec<(String, String)> = Vec::new();
    for entry in entries {
        if entry.trim().is_empty() {
            continue;
        }
        let invalid = |reason: &str| DaemonError::InvalidRuntime {
            spec: entry.clone(),
            reason: reason.into(),
        };
        let Some((name, command)) = entry.split_once('=') else {
            return Err(invalid("expected NAME=COMMAND"));
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
            Some(existing) => existing.1 = command.to_owned(),
            None => runtimes.push((name.to_owned(), command.to_owned())),
        }
    }
    Ok(runtimes)
}

/// The first line of `<first word of the command> --version`, or "unknown".
async fn probe_version(template: &str) -> String {
    let Some(program) = template.split_whitespace().next() else {
        return "unknown".into();
    };
    let output = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_PROBE_TIMEOUT, output).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| runner::truncate_chars(l, 100))
            .unwrap_or_else(|| "unknown".into()),
        _ => "unknown".into(),
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
        assert_eq!(
            rts,
            [
                (
                    "claude".to_owned(),
                    "claude -p --allowedTools Read,Edit --output-format stream-json".to_owned()
                ),
                ("codex".to_owned(), "codex exec".to_owned()),
                ("echo".to_owned(), "echo hi".to_owned()),
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
        assert_eq!(cli.args.server, "http://127.0.0.1:7070");
        assert_eq!(cli.args.max_tasks, 4);
        assert_eq!(cli.args.interrupt_grace_secs, 10);
        assert_eq!(cli.args.shutdown_secs, 30);
        assert_eq!(token(&cli.args).unwrap().expose(), "tmd_secret");
        assert!(!format!("{:?}", cli.args).contains("tmd_secret"));
        assert!(Cli::try_parse_from(["daemon", "--token", "t", "--max-tasks", "0"]).is_err());
        // Only one way to pass the token; without one it says how.
        assert!(Cli::try_parse_from(["daemon", "--token", "t", "--token-file", "f"]).is_err());
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

    #[tokio::test]
    async fn version_probe_takes_the_first_line_or_unknown() {
        assert_eq!(probe_version("no-such-program-xyz --flag").await, "unknown");
        let v = probe_version("git clone").await;
        assert!(v.starts_with("git version"), "{v}");
    }
}
