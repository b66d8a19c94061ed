//! Plain types shared by every layer. Enums carry the one pair of string
//! conversions used for storage; the gRPC conversions live in `wire` (out)
//! and `api::parse` (in).

use std::fmt;

/// Parses a stored enum value; an unknown string means the database holds
/// something this build does not know.
pub trait StoredEnum: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == s)
    }
}

macro_rules! stored_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }
        impl StoredEnum for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_enum! {
    /// A task's place in its lifecycle; `domain::status` holds the transitions.
    TaskStatus {
        Pending => "pending",
        Queued => "queued",
        Dispatched => "dispatched",
        Running => "running",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
        Interrupted => "interrupted",
    }
}

impl TaskStatus {
    /// A task a daemon holds or is about to hold.
    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Dispatched | TaskStatus::Running)
    }

    /// Finished: a new start is a new attempt.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::Interrupted
        )
    }
}

stored_enum! {
    /// What happens to an agent's work in a repository when it completes.
    #[derive(Default)]
    CompletionAction {
        #[default]
        None => "none",
        Push => "push",
        Merge => "merge",
    }
}

stored_enum! {
    /// What a token may do: users steer tasks, daemons run them, viewers
    /// only look (api::access holds the table).
    TokenKind {
        User => "user",
        Daemon => "daemon",
        Viewer => "viewer",
        /// One attempt of a task, for its agent; never stored.
        Agent => "agent",
    }
}

stored_enum! {
    /// The type of one piece of agent output.
    MessageKind {
        Assistant => "assistant",
        ToolUse => "tool_use",
        ToolResult => "tool_result",
        User => "user",
        System => "system",
        Stdout => "stdout",
        Stderr => "stderr",
        Approval => "approval",
    }
}

stored_enum! {
    /// Where a permission request stands.
    ApprovalState {
        Pending => "pending",
        Allowed => "allowed",
        Denied => "denied",
        Expired => "expired",
    }
}

/// A permission an agent asked for, and what was decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub id: String,
    pub task_id: String,
    pub attempt: i64,
    /// The daemon's id for the request.
    pub request_id: String,
    pub seq: i64,
    pub tool_name: String,
    pub tool_input_json: String,
    pub state: ApprovalState,
    pub decided_by: String,
    pub message: String,
    pub updated_input_json: String,
    pub created_at: Micros,
    pub decided_at: Option<Micros>,
    pub expires_at: Micros,
}

/// Usage of a task summed over its attempts, per model, with the cost and
/// turns the agent reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskUsage {
    pub models: Vec<Usage>,
    pub cost_usd: f64,
    pub turns: i64,
}

impl Usage {
    /// Adds `other`'s counts, saturating rather than wrapping.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_read_tokens = self
            .cache_read_tokens
            .saturating_add(other.cache_read_tokens);
        self.cache_write_tokens = self
            .cache_write_tokens
            .saturating_add(other.cache_write_tokens);
    }
}

stored_enum! {
    /// Whether a daemon is reachable.
    DaemonState {
        Online => "online",
        Offline => "offline",
        Gone => "gone",
    }
}

/// Microseconds since the Unix epoch, the unit of every stored time.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub workspace_id: String,
    pub parent_id: Option<String>,
    pub depth: i64,
    pub name: String,
    pub plan: String,
    pub status: TaskStatus,
    pub version: i64,
    pub runtime: String,
    pub repository: String,
    pub branch: String,
    pub daemon_id: Option<String>,
    pub pinned_daemon_id: Option<String>,
    pub attempt: i64,
    pub status_reason: String,
    pub agent_session_id: String,
    pub working_directory: String,
    pub created_by: String,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub queued_at: Option<Micros>,
    pub started_at: Option<Micros>,
    pub ended_at: Option<Micros>,
    /// Highest seq such that all output up to it is stored.
    pub last_seq: i64,
    /// Output with a seq up to this was removed by retention.
    pub output_pruned_seq: i64,
    /// When a stop was asked of the task while a daemon held it.
    pub stop_requested_at: Option<Micros>,
    /// The agent's last progress report: a one-line summary and 0..=100,
    /// or -1 when unknown.
    pub progress_summary: String,
    pub progress_percent: i64,
    /// Not stored: set when `plan` holds only a preview.
    pub plan_truncated: bool,
    /// For agent runtimes; empty means the daemon's default.
    pub model: String,
    pub permission_mode: String,
    /// Permission requests waiting for a person.
    pub pending_approvals: i64,
    pub completion_action: CompletionAction,
    /// For a merge; empty means the repository's default branch.
    pub target_branch: String,
}

/// What an attempt changed in its repository, as its daemon reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskChanges {
    pub attempt: i64,
    pub branch: String,
    pub base_commit: String,
    pub head_commit: String,
    pub commits: i64,
    pub files_changed: i64,
    pub insertions: i64,
    pub deletions: i64,
    pub files: Vec<FileChange>,
    pub patch_truncated: bool,
    /// "ok", "failed", or empty when no completion action ran.
    pub completion_state: String,
    pub completion_detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub insertions: i64,
    pub deletions: i64,
    pub binary: bool,
}

/// Bytes of a plan that lists and feeds carry (ListTasks, WatchTasks,
/// subtasks); GetTask has the whole plan.
pub const PLAN_PREVIEW_BYTES: usize = 4096;

impl Task {
    /// Cuts the plan to [`PLAN_PREVIEW_BYTES`], marking it cut.
    pub fn cut_plan(&mut self) {
        if self.plan.len() > PLAN_PREVIEW_BYTES {
            let mut end = PLAN_PREVIEW_BYTES;
            while !self.plan.is_char_boundary(end) {
                end -= 1;
            }
            self.plan.truncate(end);
            self.plan_truncated = true;
        }
    }
}

/// What a StopTask did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Not on a daemon (or its daemon is away): cancelled now.
    Cancelled,
    /// Its daemon was told to interrupt it.
    Interrupting,
    /// A stop was already asked; nothing more was sent.
    AlreadyStopping,
    AlreadyCancelled,
}

/// One status transition, as recorded in the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: String,
    /// `None` for the creation event.
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
    pub actor: String,
    pub reason: String,
    pub attempt: i64,
    pub created_at: Micros,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub task_id: String,
    pub seq: i64,
    pub kind: MessageKind,
    pub content: String,
    pub tool_name: String,
    pub tool_input_json: String,
    pub attempt: i64,
    pub created_at: Micros,
    /// For an approval message: the approval it asks for.
    pub approval_id: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub provider: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub created_at: Micros,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: String,
    pub kind: TokenKind,
    pub name: String,
    pub workspace_id: String,
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    pub created_at: Micros,
    pub revoked_at: Option<Micros>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Daemon {
    pub id: String,
    pub workspace_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub version: String,
    pub runtimes: Vec<Runtime>,
    pub max_concurrent_tasks: i64,
    pub state: DaemonState,
    pub active_tasks: i64,
    pub created_at: Micros,
    pub last_seen_at: Micros,
    /// The token it last registered with.
    pub token_id: Option<String>,
    /// The token an admin cut it off from (DisconnectDaemon).
    pub blocked_token_id: Option<String>,
    /// Where its tasks' directories are, and suggested CloneWorktree targets.
    pub work_dir: String,
    pub suggested_targets: Vec<String>,
}

/// What a reassigned or continued attempt starts from; empty for a plain
/// start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptInput {
    /// A continuation's follow-up prompt, run instead of the plan.
    pub prompt: String,
    /// Earlier attempts' output, for an agent that cannot resume its own
    /// conversation.
    pub context: String,
}

/// Who is calling: the token and the workspaces it may see.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: String,
    pub kind: TokenKind,
    pub user_id: Option<String>,
    /// Recorded as the actor of what this caller causes.
    pub subject: String,
    pub workspaces: Vec<Workspace>,
    /// The daemon a session speaks for: its reports may only touch tasks
    /// assigned to it.
    pub daemon_id: Option<String>,
    /// An agent token's task: the caller sees only it and its subtasks.
    pub task_scope: Option<String>,
}

impl Principal {
    pub fn sees(&self, workspace_id: &str) -> bool {
        self.workspaces.iter().any(|w| w.id == workspace_id)
    }
}
