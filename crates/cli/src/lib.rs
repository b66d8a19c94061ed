//! The verbs for people: `taskmesh task …` and `taskmesh daemons`, clients
//! of a running server over gRPC.
//!
//! - this file: the clap types, connecting with the token, one thin
//!   function per verb, and [`CliError`], the one line a failure prints.
//! - [`format`]: every table and line the verbs print.
//! - [`watch`]: `task watch`, which follows a task's output across dropped
//!   connections.

mod format;
pub mod mcp;
mod watch;

use std::io::Write as _;
use std::time::Duration;

use taskmesh_proto::{Bearer, ClientTls, pb};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::pb::TaskStatus;
use crate::pb::task_service_client::TaskServiceClient;
use crate::pb::workspace_service_client::WorkspaceServiceClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `task retry-completion` waits for the daemon's answer.
const RETRY_PATIENCE: Duration = Duration::from_secs(120);
/// Largest message accepted from the server (a plan is up to 1 MiB).
const MAX_DECODING_MESSAGE: usize = 16 * 1024 * 1024;
/// The most rows one ListTasks page may carry.
const MAX_PAGE: u32 = 1000;

/// Where the server is and who is asking; every verb takes these.
#[derive(clap::Args, Clone)]
pub struct ServerArgs {
    /// URL of the taskmesh server. `https://` is TLS, checked against the
    /// system's roots or --ca-cert, and never falls back to cleartext; a
    /// plain `http://` URL to another machine sends the token in cleartext
    /// (a warning says so). Several comma-separated URLs (replicas of one
    /// control plane) are tried in turn until one answers.
    #[arg(
        long,
        env = "TASKMESH_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true,
        help_heading = "Server"
    )]
    pub server: String,

    /// User token (`tmu_…`), sent as `authorization: Bearer <token>`; the one
    /// `taskmesh serve` printed on first start, or from `taskmesh token create`.
    #[arg(
        long,
        env = "TASKMESH_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Server"
    )]
    pub token: Option<String>,

    /// With an https:// server: trust this CA certificate (PEM) instead of
    /// the system's roots, e.g. the CA that signed `serve --tls-cert`.
    #[arg(
        long,
        env = "TASKMESH_CA_CERT",
        global = true,
        value_name = "FILE",
        help_heading = "Server"
    )]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Options of `taskmesh task`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    ID=$(taskmesh task create --name hello --plan 'echo hello' --start)\n  \
    taskmesh task watch $ID")]
pub struct TaskArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(clap::Subcommand)]
pub enum TaskCommand {
    /// Create a task and print its id alone on stdout.
    ///
    /// Example: ID=$(taskmesh task create --name count --plan 'seq 3' --start)
    Create(CreateArgs),
    /// List tasks, newest first, as a table.
    ///
    /// Example: taskmesh task list --status running,queued --limit 20
    List(ListArgs),
    /// Show one task: its fields, token usage and subtasks.
    ///
    /// Example: taskmesh task get $ID
    Get(IdArg),
    /// Queue a task to run (a new attempt when it ran before).
    ///
    /// Example: taskmesh task start $ID --daemon $DAEMON_ID
    Start(StartArgs),
    /// Cancel a queued task, or interrupt a running one.
    ///
    /// Example: taskmesh task stop $ID
    Stop(IdArg),
    /// Send text to a running agent's stdin; prints the command id.
    ///
    /// Example: taskmesh task send $ID 'y'
    Send(SendArgs),
    /// Run an interrupted or failed task again on another daemon (or one
    /// whose daemon is offline, without waiting for the grace), with the
    /// output recorded so far passed to the agent as context.
    ///
    /// Example: taskmesh task reassign $ID --daemon $DAEMON_ID
    Reassign(StartArgs),
    /// Give a finished task a follow-up prompt: a new attempt that resumes
    /// the agent's own conversation when it can.
    ///
    /// Example: taskmesh task continue $ID 'now add tests for it'
    Continue(ContinueArgs),
    /// Print a task's output from the start (or after --since-seq) and follow
    /// it live until the task ends.
    ///
    /// Output and assistant text go to stdout as they are, other messages
    /// with a short prefix such as `[tool_use Bash]`; the agent's stderr
    /// and status changes go to stderr. A dropped connection is resumed
    /// where it broke, without repeating or skipping a line. Exits 0 when
    /// the task completes, 1 when it fails, is cancelled or interrupted,
    /// 130 on Ctrl-C.
    ///
    /// Example: taskmesh task watch $ID
    Watch(WatchArgs),
    /// Allow what the agent asked permission for (its pending approval).
    ///
    /// Example: taskmesh task approve $ID
    Approve(ApproveArgs),
    /// Deny what the agent asked permission for, telling it why.
    ///
    /// Example: taskmesh task deny $ID --message 'not on main'
    Deny(DenyArgs),
    /// List a task's approvals, waiting ones first.
    ///
    /// Example: taskmesh task approvals $ID
    Approvals(IdArg),
    /// Show what the task's newest attempt changed in its repository: the
    /// branch, commits, files with lines added and removed, and the patch.
    ///
    /// Example: taskmesh task diff $ID --stat
    Diff(DiffArgs),
    /// Run a completed task's completion action (push or merge) again, on
    /// the daemon that holds its worktree: after fixing a conflict or a
    /// credential. Prints the result once the daemon answers.
    ///
    /// Example: taskmesh task retry-completion $ID
    RetryCompletion(IdArg),
    /// Copy a finished task's directory, with its git state, to a directory
    /// on the daemon that ran it (absolute; missing or empty). Waits for the
    /// daemon to say it is done.
    ///
    /// Example: taskmesh task clone-worktree $ID /home/me/src/review-1
    CloneWorktree(CloneWorktreeArgs),
    /// A task's status changes and other events, oldest first: when, from
    /// what to what, who, why.
    ///
    /// Example: taskmesh task events $ID
    Events(IdArg),
    /// A task's token usage per model, its cost in USD and turns, summed
    /// over its attempts.
    ///
    /// Example: taskmesh task usage $ID
    Usage(IdArg),
    /// Delete a task and its subtasks (running ones are interrupted first)
    /// and, on their daemons, their directories.
    ///
    /// Example: taskmesh task delete $ID
    Delete(IdArg),
}

#[derive(clap::Args)]
pub struct CloneWorktreeArgs {
    /// The task's id.
    pub id: String,
    /// Where to copy it, on the daemon's machine.
    pub path: String,
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The task's id.
    pub id: String,
    /// Only the summary and the files, not the patch.
    #[arg(long)]
    pub stat: bool,
}

#[derive(clap::Args)]
pub struct ApproveArgs {
    /// The task's id.
    pub id: String,
    /// The approval to answer; needed only when several are waiting.
    #[arg(long, value_name = "APPROVAL_ID")]
    pub approval: Option<String>,
    /// Run the tool with this input instead (a JSON object, the tool's
    /// whole input).
    #[arg(long, value_name = "JSON")]
    pub input: Option<String>,
}

#[derive(clap::Args)]
pub struct DenyArgs {
    /// The task's id.
    pub id: String,
    /// The approval to answer; needed only when several are waiting.
    #[arg(long, value_name = "APPROVAL_ID")]
    pub approval: Option<String>,
    /// Why, for the agent.
    #[arg(long)]
    pub message: Option<String>,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Workspace id or name; needed when the token sees several.
    #[arg(long, env = "TASKMESH_WORKSPACE")]
    pub workspace: Option<String>,
    /// A short name for the task.
    #[arg(long)]
    pub name: String,
    /// The prompt or plan for the agent (for the `shell` runtime: the script).
    #[arg(long)]
    pub plan: Option<String>,
    /// The agent runtime to run it with, such as `claude`, `codex` or `shell`.
    #[arg(long, default_value = "shell")]
    pub runtime: String,
    /// The model an agent runtime uses; the daemon's default when unset.
    #[arg(long)]
    pub model: Option<String>,
    /// What an agent may do without asking: default, acceptEdits, plan or
    /// bypassPermissions; the daemon's default when unset.
    #[arg(long, value_name = "MODE")]
    pub permission_mode: Option<String>,
    /// A git repository to clone for the task (a URL or a path the daemon
    /// can reach). The daemon's git configuration and credential helpers
    /// give access; a token written into the URL is dropped, never stored.
    #[arg(long)]
    pub repository: Option<String>,
    /// The task's working branch in its clone of --repository: checked out
    /// when the remote has it, else made from the default branch.
    /// `taskmesh/<first 8 of the id>` when unset.
    #[arg(long, requires = "repository")]
    pub branch: Option<String>,
    /// What happens to the work when the agent completes: `none` (it stays
    /// in the daemon's worktree), `push` (push the branch) or `merge`
    /// (merge it into --target-branch and push that; a conflict refuses).
    #[arg(long, value_name = "none|push|merge", value_parser = ["none", "push", "merge"],
          requires = "repository")]
    pub completion_action: Option<String>,
    /// For `--completion-action merge`: the branch to merge into; the
    /// repository's default branch when unset.
    #[arg(long, value_name = "BRANCH")]
    pub target_branch: Option<String>,
    /// Make the new task a subtask of this task.
    #[arg(long, value_name = "TASK_ID")]
    pub parent: Option<String>,
    /// Queue the task at once.
    #[arg(long)]
    pub start: bool,
    /// With --start: run it only on this daemon.
    #[arg(long, value_name = "DAEMON_ID", requires = "start")]
    pub daemon: Option<String>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Workspace id or name; needed when the token sees several.
    #[arg(long, env = "TASKMESH_WORKSPACE")]
    pub workspace: Option<String>,
    /// Only tasks in this state (repeat or comma-separate): pending, queued,
    /// dispatched, running, completed, failed, cancelled, interrupted.
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    pub status: Vec<TaskStatus>,
    /// Only tasks on this daemon.
    #[arg(long, value_name = "DAEMON_ID")]
    pub daemon: Option<String>,
    /// Only subtasks of this task.
    #[arg(long, value_name = "TASK_ID")]
    pub parent: Option<String>,
    /// The most tasks to show.
    #[arg(long, default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
}

#[derive(clap::Args)]
pub struct IdArg {
    /// The task's id.
    pub id: String,
}

#[derive(clap::Args)]
pub struct StartArgs {
    /// The task's id.
    pub id: String,
    /// Run it only on this daemon.
    #[arg(long, value_name = "DAEMON_ID")]
    pub daemon: Option<String>,
}

#[derive(clap::Args)]
pub struct SendArgs {
    /// The task's id.
    pub id: String,
    /// The text for the agent's stdin.
    pub text: String,
}

#[derive(clap::Args)]
pub struct ContinueArgs {
    /// The task's id.
    pub id: String,
    /// The follow-up prompt.
    pub prompt: String,
    /// Run it only on this daemon.
    #[arg(long, value_name = "DAEMON_ID")]
    pub daemon: Option<String>,
}

#[derive(clap::Args)]
pub struct WatchArgs {
    /// The task's id.
    pub id: String,
    /// Print only output after this seq (0: from the start).
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub since_seq: i64,
}

/// Options of `taskmesh daemons`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  taskmesh daemons --workspace default\n  \
    taskmesh daemons disconnect $DAEMON_ID")]
pub struct DaemonsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Workspace id or name; needed when the token sees several.
    #[arg(long, env = "TASKMESH_WORKSPACE")]
    pub workspace: Option<String>,
    #[command(subcommand)]
    pub command: Option<DaemonsCommand>,
}

#[derive(clap::Subcommand)]
pub enum DaemonsCommand {
    /// End a daemon's session now and refuse the token it used for it,
    /// until it comes back with a new daemon token.
    ///
    /// Example: taskmesh daemons disconnect $DAEMON_ID
    Disconnect {
        /// The daemon's id.
        id: String,
    },
    /// Show one daemon: its state, runtimes, where its task directories
    /// are and the directories it suggests for copies of them.
    ///
    /// Example: taskmesh daemons get $DAEMON_ID
    Get {
        /// The daemon's id.
        id: String,
    },
    /// Ask a daemon whether a path exists on its machine (before a
    /// `task clone-worktree`, say). Exits 1 when it does not.
    ///
    /// Example: taskmesh daemons check-target $DAEMON_ID /home/me/src/copy
    CheckTarget {
        /// The daemon's id.
        id: String,
        /// An absolute path on the daemon's machine.
        path: String,
    },
}

/// Options of `taskmesh token`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    taskmesh token create --kind daemon --name build-box > daemon.token\n  \
    taskmesh token list\n  \
    taskmesh token revoke $TOKEN_ID\n\n\
    With a user token (TASKMESH_TOKEN or --token) these go through the server, \
    as the dashboard's Tokens view does. Without one, or with --database-url, \
    `token create` writes straight to the database: the way to a first token of \
    another workspace, or with no server running.")]
pub struct TokenArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret alone on stdout (shown once).
    ///
    /// Example: taskmesh token create --kind daemon > daemon.token
    Create(TokenCreateArgs),
    /// List the tokens of a workspace (never their secrets).
    ///
    /// Example: taskmesh token list --workspace default
    List {
        /// Workspace id or name; needed when the token sees several.
        #[arg(long, env = "TASKMESH_WORKSPACE")]
        workspace: Option<String>,
    },
    /// Revoke a token: calls with it fail from now on, and its open
    /// streams (a daemon's session, watches) end at once.
    ///
    /// Example: taskmesh token revoke $TOKEN_ID
    Revoke {
        /// The token's id (from `token list`).
        id: String,
    },
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenKindArg {
    /// For people and scripts: TaskService and WorkspaceService.
    User,
    /// For `taskmesh daemon`: DaemonService in one workspace.
    Daemon,
    /// Read-only, in one workspace: list, get and watch; change nothing.
    Viewer,
}

#[derive(clap::Args)]
pub struct TokenCreateArgs {
    /// What the token may do.
    #[arg(long, value_enum, default_value = "user")]
    pub kind: TokenKindArg,
    /// A label to tell tokens apart in `token list`.
    #[arg(long, default_value = "cli")]
    pub name: String,
    /// Workspace id or name (through the server: needed when your token
    /// sees several; in the database: `default` unless given, created if
    /// missing).
    #[arg(long, env = "TASKMESH_WORKSPACE")]
    pub workspace: Option<String>,
    /// Write the token straight to this database instead of asking the
    /// server (also what happens when no user token is set; then
    /// `sqlite://taskmesh.db`).
    #[arg(long, env = "TASKMESH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// In the database only: the user a user token acts as (created and
    /// added to the workspace if missing). Through the server a user token
    /// acts as you.
    #[arg(long, default_value = "admin")]
    pub user: String,
}

/// Where a `taskmesh token` verb goes.
pub enum TokenRoute {
    /// `token create` straight in the database.
    Database(TokenCreateArgs),
    /// Any verb, through the server.
    Server(TokenArgs),
}

impl TokenArgs {
    /// `token create` writes to the database (not the server) when asked
    /// to, or when there is no user token to ask the server with.
    pub fn route(self) -> TokenRoute {
        let no_token = self
            .server
            .token
            .as_deref()
            .is_none_or(|t| t.trim().is_empty());
        match self.command {
            TokenCommand::Create(c) if c.database_url.is_some() || no_token => {
                TokenRoute::Database(c)
            }
            command => TokenRoute::Server(TokenArgs {
                server: self.server,
                command,
            }),
        }
    }
}

/// Runs `taskmesh token <verb>` through the server.
pub async fn token(args: TokenArgs) -> Result<()> {
    let conn = args.server.connect().await?;
    let mut client = conn.workspaces();
    match args.command {
        TokenCommand::Create(c) => {
            let kind = match c.kind {
                TokenKindArg::User => pb::TokenKind::User,
                TokenKindArg::Daemon => pb::TokenKind::Daemon,
                TokenKindArg::Viewer => pb::TokenKind::Viewer,
            };
            let made = client
                .create_token(pb::CreateTokenRequest {
                    workspace: c.workspace.unwrap_or_default(),
                    kind: kind as i32,
                    name: c.name,
                })
                .await?
                .into_inner();
            let token = made.token.ok_or(CliError::Incomplete("token"))?;
            note(&format!(
                "created {} token {} ({}) in workspace {} (shown once)",
                format::token_kind(token.kind()),
                token.id,
                token.name,
                token.workspace_id
            ));
            say(&format!("{}\n", made.secret))
        }
        TokenCommand::List { workspace } => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {
                    workspace: workspace.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tokens;
            say(&format::tokens(&tokens, format::now()))
        }
        TokenCommand::Revoke { id } => {
            let token = client
                .revoke_token(pb::RevokeTokenRequest { id })
                .await?
                .into_inner()
                .token
                .ok_or(CliError::Incomplete("token"))?;
            say(&format!(
                "revoked {} token {} ({})\n",
                format::token_kind(token.kind()),
                token.id,
                token.name
            ))
        }
    }
}

fn parse_status(s: &str) -> Result<TaskStatus, String> {
    match TaskStatus::from_str_name(&format!("TASK_STATUS_{}", s.to_ascii_uppercase())) {
        Some(status) if status != TaskStatus::Unspecified => Ok(status),
        _ => Err(
            "expected one of pending, queued, dispatched, running, completed, \
                  failed, cancelled, interrupted"
                .into(),
        ),
    }
}

/// Why a verb failed, as the one line `taskmesh: …` it prints before
/// exiting with 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no token: pass --token or export TASKMESH_TOKEN (the user token \
         `taskmesh serve` printed on first start, or one from `taskmesh token create`)"
    )]
    MissingToken,
    #[error("invalid token: it must be printable ASCII")]
    InvalidToken,
    #[error(transparent)]
    Server(#[from] taskmesh_proto::EndpointError),
    #[error("cannot reach the server at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("{}", format::status(.0))]
    Rpc(#[from] Status),
    #[error("the server answered without the {0}")]
    Incomplete(&'static str),
    #[error("cannot write the output: {0}")]
    Write(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("task {id} ended {}", format::ending(*.status, .reason))]
    TaskEnded {
        id: String,
        status: TaskStatus,
        reason: String,
    },
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// Writes to stdout; unlike `print!`, a closed pipe (`| head`) is an error
/// rather than a panic.
fn say(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// A line for the person at the terminal, on stderr.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

type Tasks = TaskServiceClient<InterceptedService<Channel, Bearer>>;
type Workspaces = WorkspaceServiceClient<InterceptedService<Channel, Bearer>>;

/// A connection to the server, authenticated.
struct Connection {
    channel: Channel,
    auth: Bearer,
}

impl ServerArgs {
    /// Checks the token, then connects; a refused connection is reported
    /// here rather than as the first call's UNAVAILABLE.
    async fn connect(&self) -> Result<Connection> {
        let token = self.token.as_deref().map(str::trim).unwrap_or_default();
        if token.is_empty() {
            return Err(CliError::MissingToken);
        }
        let auth = Bearer::new(token).map_err(|_| CliError::InvalidToken)?;
        let tls = ClientTls {
            ca_cert: self.ca_cert.clone(),
            identity: None,
        };
        let mut unreachable = None;
        for url in self
            .server
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let (endpoint, warning) = taskmesh_proto::endpoint(url, &tls)?;
            // Once per run, though `task watch` connects again after a drop.
            static WARNED: std::sync::Once = std::sync::Once::new();
            if let Some(warning) = warning {
                WARNED.call_once(|| note(&format!("warning: {warning}")));
            }
            match endpoint.connect_timeout(CONNECT_TIMEOUT).connect().await {
                Ok(channel) => return Ok(Connection { channel, auth }),
                Err(e) => {
                    unreachable = Some(CliError::Unreachable {
                        url: url.to_owned(),
                        // The outermost layer only says "transport error".
                        cause: std::error::Error::source(&e)
                            .map_or_else(|| e.to_string(), format::causes),
                    })
                }
            }
        }
        Err(unreachable.unwrap_or(CliError::Unreachable {
            url: self.server.clone(),
            cause: "no server URL given".into(),
        }))
    }
}

impl Connection {
    fn tasks(&self) -> Tasks {
        TaskServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE)
    }

    fn workspaces(&self) -> Workspaces {
        WorkspaceServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

/// Runs `taskmesh task <verb>`.
pub async fn task(args: TaskArgs) -> Result<()> {
    let server = &args.server;
    match args.command {
        TaskCommand::Create(a) => create(&server.connect().await?, a).await,
        TaskCommand::List(a) => list(&server.connect().await?, a).await,
        TaskCommand::Get(a) => get(&server.connect().await?, a).await,
        TaskCommand::Start(a) => start(&server.connect().await?, a).await,
        TaskCommand::Stop(a) => stop(&server.connect().await?, a).await,
        TaskCommand::Send(a) => send(&server.connect().await?, a).await,
        TaskCommand::Reassign(a) => reassign(&server.connect().await?, a).await,
        TaskCommand::Continue(a) => continue_task(&server.connect().await?, a).await,
        TaskCommand::Watch(a) => watch::run(server, a).await,
        TaskCommand::Approve(a) => {
            let decision = pb::DecideApprovalRequest {
                task_id: a.id,
                approval_id: a.approval.unwrap_or_default(),
                decision: pb::Decision::Allow as i32,
                updated_input_json: a.input.unwrap_or_default(),
                message: String::new(),
            };
            decide(&server.connect().await?, decision).await
        }
        TaskCommand::Deny(a) => {
            let decision = pb::DecideApprovalRequest {
                task_id: a.id,
                approval_id: a.approval.unwrap_or_default(),
                decision: pb::Decision::Deny as i32,
                updated_input_json: String::new(),
                message: a.message.unwrap_or_default(),
            };
            decide(&server.connect().await?, decision).await
        }
        TaskCommand::Approvals(a) => approvals(&server.connect().await?, a).await,
        TaskCommand::Diff(a) => diff(&server.connect().await?, a).await,
        TaskCommand::RetryCompletion(a) => retry_completion(&server.connect().await?, a).await,
        TaskCommand::Events(a) => {
            let mut client = server.connect().await?.tasks();
            let events = events(&mut client, &a.id).await?;
            say(&format::event_lines(&events, format::now()))
        }
        TaskCommand::Usage(a) => {
            let usage = server
                .connect()
                .await?
                .tasks()
                .get_task_usage(pb::GetTaskUsageRequest { task_id: a.id })
                .await?
                .into_inner();
            say(&format::usage_lines(&usage))
        }
        TaskCommand::Delete(a) => {
            server
                .connect()
                .await?
                .tasks()
                .delete_task(pb::DeleteTaskRequest { id: a.id.clone() })
                .await?;
            say(&format!("deleted task {}\n", a.id))
        }
        TaskCommand::CloneWorktree(a) => {
            let done = server
                .connect()
                .await?
                .tasks()
                .clone_worktree(pb::CloneWorktreeRequest {
                    id: a.id,
                    path: a.path,
                })
                .await?
                .into_inner();
            say(&format!("{}\n", done.detail))
        }
    }
}

async fn create(conn: &Connection, a: CreateArgs) -> Result<()> {
    let task = conn
        .tasks()
        .create_task(pb::CreateTaskRequest {
            workspace: a.workspace.unwrap_or_default(),
            name: a.name,
            plan: a.plan.unwrap_or_default(),
            parent_task_id: a.parent.unwrap_or_default(),
            runtime: a.runtime,
            repository: a.repository.unwrap_or_default(),
            branch: a.branch.unwrap_or_default(),
            model: a.model.unwrap_or_default(),
            permission_mode: a.permission_mode.unwrap_or_default(),
            completion_action: completion_action(a.completion_action.as_deref()) as i32,
            target_branch: a.target_branch.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .task
        .ok_or(CliError::Incomplete("task"))?;
    // The id goes out first, so a script has it even if starting fails.
    say(&format!("{}\n", task.id))?;
    if a.start {
        let started = start_task(conn, task.id, a.daemon).await?;
        note(&format::status_line(&started));
    }
    Ok(())
}

fn completion_action(name: Option<&str>) -> pb::CompletionAction {
    match name {
        Some("push") => pb::CompletionAction::Push,
        Some("merge") => pb::CompletionAction::Merge,
        Some(_) => pb::CompletionAction::None,
        None => pb::CompletionAction::Unspecified,
    }
}

async fn diff(conn: &Connection, a: DiffArgs) -> Result<()> {
    let diff = conn
        .tasks()
        .get_task_diff(pb::GetTaskDiffRequest { id: a.id })
        .await?
        .into_inner();
    let changes = diff.changes.ok_or(CliError::Incomplete("changes"))?;
    say(&format::changes(&changes))?;
    if !a.stat && !diff.patch.is_empty() {
        say("\n")?;
        say(&diff.patch)?;
        if changes.patch_truncated {
            note("(the patch was cut at 1 MiB)");
        }
    }
    Ok(())
}

/// Asks for the retry, then waits for the daemon's answer in the task's
/// events.
async fn retry_completion(conn: &Connection, a: IdArg) -> Result<()> {
    let mut client = conn.tasks();
    let before = events(&mut client, &a.id).await?.len();
    client
        .retry_completion(pb::RetryCompletionRequest { id: a.id.clone() })
        .await?;
    note("asked the daemon to run the completion action again; waiting for its answer");
    let mut wait = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + RETRY_PATIENCE;
    loop {
        if tokio::time::Instant::now() > give_up {
            return Err(CliError::Failed(format!(
                "no answer from the daemon within {}s; the result will show in `taskmesh task get {}` when it comes",
                RETRY_PATIENCE.as_secs(),
                a.id
            )));
        }
        let events = events(&mut client, &a.id).await?;
        if let Some(e) = events
            .iter()
            .skip(before)
            .find(|e| e.from_status == e.to_status)
        {
            say(&format!("{}\n", e.reason))?;
            return if e.reason.contains(" done") {
                Ok(())
            } else {
                Err(CliError::Failed(e.reason.clone()))
            };
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

async fn events(client: &mut Tasks, id: &str) -> Result<Vec<pb::TaskEvent>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_task_events(pb::ListTaskEventsRequest {
                task_id: id.to_owned(),
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        all.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

async fn list(conn: &Connection, a: ListArgs) -> Result<()> {
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    let limit = a.limit as usize;
    while tasks.len() < limit {
        let page_size = (limit - tasks.len()).min(MAX_PAGE as usize) as i32;
        let page = conn
            .tasks()
            .list_tasks(pb::ListTasksRequest {
                workspace: a.workspace.clone().unwrap_or_default(),
                statuses: a.status.iter().map(|&s| s as i32).collect(),
                parent_task_id: a.parent.clone().unwrap_or_default(),
                daemon_id: a.daemon.clone().unwrap_or_default(),
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    tasks.truncate(limit);
    say(&format::task_table(&tasks, format::now()))
}

async fn get(conn: &Connection, a: IdArg) -> Result<()> {
    let mut client = conn.tasks();
    let task = client
        .get_task(pb::GetTaskRequest { id: a.id.clone() })
        .await?
        .into_inner()
        .task
        .ok_or(CliError::Incomplete("task"))?;
    let usage = client
        .get_task_usage(pb::GetTaskUsageRequest { task_id: a.id })
        .await?
        .into_inner();
    say(&format::task_details(&task, &usage, format::now()))
}

async fn start_task(conn: &Connection, id: String, daemon: Option<String>) -> Result<pb::Task> {
    let started = conn
        .tasks()
        .start_task(pb::StartTaskRequest {
            id,
            daemon_id: daemon.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if !started.warning.is_empty() {
        note(&format!("warning: {}", started.warning));
    }
    started.task.ok_or(CliError::Incomplete("task"))
}

async fn start(conn: &Connection, a: StartArgs) -> Result<()> {
    let task = start_task(conn, a.id, a.daemon).await?;
    say(&format!("{}\n", format::status_line(&task)))
}

async fn stop(conn: &Connection, a: IdArg) -> Result<()> {
    let stopped = conn
        .tasks()
        .stop_task(pb::StopTaskRequest { id: a.id })
        .await?
        .into_inner();
    let outcome = stopped.outcome();
    let task = stopped.task.ok_or(CliError::Incomplete("task"))?;
    say(&format!("{}\n", format::stop_line(&task, outcome)))
}

async fn send(conn: &Connection, a: SendArgs) -> Result<()> {
    let sent = conn
        .tasks()
        .send_message(pb::SendMessageRequest {
            task_id: a.id,
            text: a.text,
        })
        .await?
        .into_inner();
    say(&format!("{}\n", sent.command_id))
}

async fn reassign(conn: &Connection, a: StartArgs) -> Result<()> {
    let task = conn
        .tasks()
        .reassign_task(pb::ReassignTaskRequest {
            id: a.id,
            daemon_id: a.daemon.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .task
        .ok_or(CliError::Incomplete("task"))?;
    say(&format!("{}\n", format::status_line(&task)))
}

async fn continue_task(conn: &Connection, a: ContinueArgs) -> Result<()> {
    let task = conn
        .tasks()
        .continue_task(pb::ContinueTaskRequest {
            id: a.id,
            prompt: a.prompt,
            daemon_id: a.daemon.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .task
        .ok_or(CliError::Incomplete("task"))?;
    say(&format!("{}\n", format::status_line(&task)))
}

async fn decide(conn: &Connection, decision: pb::DecideApprovalRequest) -> Result<()> {
    let approval = conn
        .tasks()
        .decide_approval(decision)
        .await?
        .into_inner()
        .approval
        .ok_or(CliError::Incomplete("approval"))?;
    say(&format!("{}\n", format::approval_line(&approval)))
}

async fn approvals(conn: &Connection, a: IdArg) -> Result<()> {
    let approvals = conn
        .tasks()
        .list_approvals(pb::ListApprovalsRequest { task_id: a.id })
        .await?
        .into_inner()
        .approvals;
    say(&format::approval_table(&approvals, format::now()))
}

/// Runs `taskmesh daemons`.
pub async fn daemons(args: DaemonsArgs) -> Result<()> {
    let conn = args.server.connect().await?;
    let mut client = conn.workspaces();
    match args.command {
        Some(DaemonsCommand::Get { id }) => {
            let daemon = client
                .get_daemon(pb::GetDaemonRequest { id })
                .await?
                .into_inner()
                .daemon
                .ok_or(CliError::Incomplete("daemon"))?;
            return say(&format::daemon_details(&daemon, format::now()));
        }
        Some(DaemonsCommand::CheckTarget { id, path }) => {
            let found = client
                .check_target_exists(pb::CheckTargetExistsRequest {
                    daemon_id: id,
                    path: path.clone(),
                })
                .await?
                .into_inner();
            return match (found.exists, found.is_directory) {
                (true, true) => say(&format!("{path}: a directory\n")),
                (true, false) => say(&format!("{path}: a file\n")),
                (false, _) => Err(CliError::Failed(format!(
                    "{path}: not found on that daemon"
                ))),
            };
        }
        _ => {}
    }
    if let Some(DaemonsCommand::Disconnect { id }) = args.command {
        let daemon = client
            .disconnect_daemon(pb::DisconnectDaemonRequest { id })
            .await?
            .into_inner()
            .daemon
            .ok_or(CliError::Incomplete("daemon"))?;
        return say(&format!(
            "disconnected daemon {} ({}); its token no longer works for it\n",
            daemon.id, daemon.hostname
        ));
    }
    let mut daemons = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_daemons(pb::ListDaemonsRequest {
                workspace: args.workspace.clone().unwrap_or_default(),
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        daemons.extend(page.daemons);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    say(&format::daemon_table(&daemons, format::now()))
}
