//! The domain: tenancy, tokens and the task lifecycle. Handlers call one
//! method here per RPC; every rule (validation, the transition table, who may
//! see what) is enforced in this module and nowhere else.

mod attempts;
mod daemons;
pub mod hub;
mod liveness;
mod marks;
mod peers;
pub mod redact;
mod sessions;
pub mod status;
mod tokens;

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::model::*;
use crate::store::{self, NewEvent, Store, TaskFilter};
use status::can_transition;

use crate::pb;
pub use daemons::{Assignment, TaskEnd};
pub use hub::{OutputHub, TaskUpdate, WorkspaceUpdate};
pub use liveness::{Liveness, SweepReport};
pub use sessions::SessionRegistry;
pub use tokens::hash_secret;

/// Everything that can go wrong in the domain; `api` maps each variant to
/// one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// Limits on what clients may send.
pub const MAX_PLAN_BYTES: usize = 1 << 20;
pub const MAX_NAME_CHARS: usize = 256;
pub const MAX_DEPTH: i64 = 16;
pub const DEFAULT_WORKSPACE: &str = "default";
/// How often a contended task write is re-evaluated before giving up.
const CAS_RETRIES: usize = 8;

/// Parses a UUID given for `field`, answering its canonical text.
pub fn parse_id(field: &'static str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| invalid(field, format!("{s:?} is not a valid id")))
}

/// Parses an optional UUID: empty means none.
pub fn parse_optional_id(field: &'static str, s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(field, s).map(Some)
    }
}

/// Resolves `page_size`: 0 means `default`, otherwise 1..=max.
pub fn page_size(field: &'static str, size: i32, default: i64, max: i64) -> Result<i64> {
    match i64::from(size) {
        0 => Ok(default),
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(invalid(field, format!("{n} is out of range 1..={max}"))),
    }
}

fn check_name(field: &'static str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            field,
            format!("longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(name.to_string())
}

fn check_plan(plan: &str) -> Result<()> {
    if plan.len() > MAX_PLAN_BYTES {
        return Err(invalid(
            "plan",
            format!("{} bytes is over the limit of {MAX_PLAN_BYTES}", plan.len()),
        ));
    }
    Ok(())
}

/// Runtime names are short identifiers such as `claude` or `shell`.
pub fn check_runtime(field: &'static str, runtime: &str) -> Result<String> {
    if runtime.is_empty() {
        return Ok("shell".to_string());
    }
    let ok = runtime.len() <= 32
        && runtime
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid(
            field,
            format!("{runtime:?} must be 1-32 characters of a-z, 0-9, - and _"),
        ));
    }
    Ok(runtime.to_string())
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value.trim().to_string())
}

/// A task as a client asks for it.
#[derive(Debug, Default)]
pub struct NewTask {
    pub workspace: String,
    pub name: String,
    pub plan: String,
    pub parent_id: Option<String>,
    pub runtime: String,
    pub repository: String,
    pub branch: String,
}

/// The fields UpdateTask may change; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct TaskPatch {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub runtime: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
}

#[derive(Debug, Default)]
pub struct ListTasks {
    pub workspace: String,
    pub statuses: Vec<TaskStatus>,
    pub parent_id: Option<String>,
    pub daemon_id: Option<String>,
    pub page_size: i64,
    pub page_token: Option<String>,
}

/// The edit that opens a new attempt of a task: queued afresh, optionally
/// pinned to a daemon.
fn new_attempt(t: &mut Task, pin: &Option<String>) {
    t.attempt += 1;
    t.pinned_daemon_id = pin.clone();
    t.daemon_id = None;
    t.status_reason.clear();
    t.queued_at = Some(t.updated_at);
    t.started_at = None;
    t.ended_at = None;
    t.stop_requested_at = None;
}

/// One WatchTask stream: the last seq it delivered, and how it catches up
/// from the store when the live feed skipped ahead or it fell behind.
struct Watcher {
    domain: Arc<Domain>,
    task_id: String,
    last: i64,
    tx: mpsc::Sender<Result<TaskUpdate>>,
}

/// The watcher's client has gone; nothing more to send.
struct Gone;

impl Watcher {
    async fn send(&self, update: TaskUpdate) -> std::result::Result<(), Gone> {
        self.tx.send(Ok(update)).await.map_err(|_| Gone)
    }

    /// Sends the stored messages after `last` up to the first gap: a
    /// message beyond a gap is stored but not yet acknowledged, and comes
    /// live once the gap is filled.
    async fn catch_up(&mut self) -> std::result::Result<(), Gone> {
        const PAGE: i64 = 1000;
        loop {
            let batch = match self
                .domain
                .store
                .list_messages(&self.task_id, self.last, PAGE)
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = self.tx.send(Err(e.into())).await;
                    return Err(Gone);
                }
            };
            let full = batch.len() as i64 == PAGE;
            for m in batch {
                if m.seq != self.last + 1 {
                    return Ok(());
                }
                self.last = m.seq;
                self.send(TaskUpdate::Message(m)).await?;
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// How every stream the server holds ends when it shuts down (UNAVAILABLE),
/// so clients reconnect rather than take it for a normal end.
pub const SHUTTING_DOWN: &str = "the server is shutting down; reconnect to go on";

fn shutting_down() -> Error {
    Error::Unavailable(SHUTTING_DOWN.into())
}

pub struct Domain {
    store: Store,
    hub: OutputHub,
    sessions: SessionRegistry,
    /// Set on shutdown: every stream the server holds open ends.
    closing: tokio::sync::watch::Sender<bool>,
    pub liveness: Liveness,
    /// Where each task's output stands, for the ingest fast path.
    marks: marks::Marks,
    /// Other replicas on the same PostgreSQL database, once joined.
    cluster: std::sync::OnceLock<crate::cluster::Link>,
}

impl Domain {
    pub fn new(store: Store) -> Arc<Domain> {
        Self::with_liveness(store, Liveness::default())
    }

    pub fn with_liveness(store: Store, liveness: Liveness) -> Arc<Domain> {
        Arc::new(Domain {
            store,
            hub: OutputHub::default(),
            sessions: SessionRegistry::default(),
            closing: tokio::sync::watch::channel(false).0,
            liveness,
            cluster: std::sync::OnceLock::new(),
            marks: marks::Marks::default(),
        })
    }

    /// Ends every open watch and session, so a graceful shutdown can finish.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once `close_streams` was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    pub fn hub(&self) -> &OutputHub {
        &self.hub
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    // ---- workspaces -------------------------------------------------------

    /// The workspace a request names (by id or name) among those the caller
    /// sees; an empty name is allowed when the caller sees exactly one.
    pub fn resolve_workspace(&self, p: &Principal, name: &str) -> Result<Workspace> {
        if name.is_empty() {
            return match p.workspaces.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(Error::PermissionDenied(
                    "this token's user belongs to no workspace".into(),
                )),
                many => Err(invalid(
                    "workspace",
                    format!(
                        "this token sees {} workspaces ({}); name one",
                        many.len(),
                        many.iter()
                            .map(|w| w.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            };
        }
        p.workspaces
            .iter()
            .find(|w| w.id == name || w.name == name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("workspace {name} not found")))
    }

    pub async fn create_workspace(&self, p: &Principal, name: &str) -> Result<Workspace> {
        let user_id = require_user(p)?;
        let name = check_workspace_name(name)?;
        let (ws, created) = self.store.ensure_workspace(&name).await?;
        if !created {
            return Err(Error::AlreadyExists(format!(
                "workspace {name} already exists"
            )));
        }
        self.store.add_member(&ws.id, user_id).await?;
        Ok(ws)
    }

    // ---- tasks -------------------------------------------------------------

    /// Loads a task the caller may see; anything else is NOT_FOUND.
    pub async fn load_task(&self, p: &Principal, id: &str) -> Result<Task> {
        match self.store.get_task(id).await? {
            Some(t) if p.sees(&t.workspace_id) => Ok(t),
            _ => Err(Error::NotFound(format!("task {id} not found"))),
        }
    }

    pub async fn create_task(&self, p: &Principal, new: NewTask) -> Result<Task> {
        let ws = self.resolve_workspace(p, &new.workspace)?;
        let name = check_name("name", &new.name)?;
        check_plan(&new.plan)?;
        let runtime = check_runtime("runtime", &new.runtime)?;
        let repository = check_text("repository", &new.repository, 2048)?;
        let branch = check_text("branch", &new.branch, 256)?;
        let depth = match &new.parent_id {
            None => 0,
            Some(parent_id) => {
                let parent = self.load_task(p, parent_id).await?;
                if parent.workspace_id != ws.id {
                    return Err(invalid(
                        "parent_task_id",
                        "the parent task is in another workspace",
                    ));
                }
                if parent.depth + 1 > MAX_DEPTH {
                    return Err(invalid(
                        "parent_task_id",
                        format!("subtasks nest at most {MAX_DEPTH} levels deep"),
                    ));
                }
                parent.depth + 1
            }
        };
        let now = now_micros();
        let task = Task {
            id: uuid::Uuid::now_v7().to_string(),
            workspace_id: ws.id,
            parent_id: new.parent_id,
            depth,
            name,
            plan: new.plan,
            status: TaskStatus::Pending,
            version: 1,
            runtime,
            repository,
            branch,
            daemon_id: None,
            pinned_daemon_id: None,
            attempt: 0,
            status_reason: String::new(),
            agent_session_id: String::new(),
            working_directory: String::new(),
            created_by: p.subject.clone(),
            created_at: now,
            updated_at: now,
            queued_at: None,
            started_at: None,
            ended_at: None,
            last_seq: 0,
            stop_requested_at: None,
            progress_summary: String::new(),
            progress_percent: -1,
        };
        let event = NewEvent {
            from: None,
            to: TaskStatus::Pending,
            actor: p.subject.clone(),
            reason: "created".into(),
        };
        self.store.insert_task(&task, &event).await?;
        self.task_changed(&task, false);
        Ok(task)
    }

    /// The task and its direct subtasks.
    pub async fn get_task(&self, p: &Principal, id: &str) -> Result<(Task, Vec<Task>)> {
        let task = self.load_task(p, id).await?;
        let subtasks = self.store.subtasks(&task.id).await?;
        Ok((task, subtasks))
    }

    /// A page of tasks, newest first, and the token of the next page.
    pub async fn list_tasks(
        &self,
        p: &Principal,
        q: ListTasks,
    ) -> Result<(Vec<Task>, Option<String>)> {
        let ws = self.resolve_workspace(p, &q.workspace)?;
        let mut tasks = self
            .store
            .list_tasks(&TaskFilter {
                workspace_id: ws.id,
                statuses: q.statuses,
                parent_id: q.parent_id,
                daemon_id: q.daemon_id,
                before_id: q.page_token,
                limit: q.page_size + 1,
            })
            .await?;
        Ok(next_page(&mut tasks, q.page_size, |t| t.id.clone()))
    }

    pub async fn update_task(
        &self,
        p: &Principal,
        id: &str,
        patch: TaskPatch,
        expected_version: i64,
    ) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        if expected_version != 0 && expected_version != task.version {
            return Err(version_conflict(id, expected_version, task.version));
        }
        let mut next = task.clone();
        if let Some(name) = patch.name {
            next.name = check_name("task.name", &name)?;
        }
        if let Some(plan) = patch.plan {
            check_plan(&plan)?;
            next.plan = plan;
        }
        if let Some(runtime) = patch.runtime {
            next.runtime = check_runtime("task.runtime", &runtime)?;
        }
        if let Some(repository) = patch.repository {
            next.repository = check_text("task.repository", &repository, 2048)?;
        }
        if let Some(branch) = patch.branch {
            next.branch = check_text("task.branch", &branch, 256)?;
        }
        next.version = task.version + 1;
        next.updated_at = now_micros();
        if self.store.save_task(&mut next, task.version, None).await? {
            self.task_changed(&next, false);
            return Ok(next);
        }
        // Someone changed the task between our read and our write.
        let actual = self.load_task(p, id).await?.version;
        Err(version_conflict(id, task.version, actual))
    }

    /// Deletes a task and its subtasks; one on a daemon is interrupted first.
    pub async fn delete_task(&self, p: &Principal, id: &str) -> Result<()> {
        let task = self.load_task(p, id).await?;
        let mut doomed = vec![task.clone()];
        let mut i = 0;
        while i < doomed.len() {
            doomed.extend(self.store.subtasks(&doomed[i].id).await?);
            i += 1;
        }
        for t in doomed.iter().filter(|t| status::is_active(t.status)) {
            self.send_command(t, interrupt()).await?;
        }
        if !self.store.delete_task(&task.id).await? {
            return Err(Error::NotFound(format!("task {id} not found")));
        }
        for t in &doomed {
            self.task_changed(t, true);
        }
        Ok(())
    }

    /// Queues the task; starting a task that ran before opens a new attempt.
    pub async fn start_task(&self, p: &Principal, id: &str, pin: Option<String>) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        self.check_pin(&task, pin.as_deref()).await?;
        let task = self
            .transition(&p.subject, task, TaskStatus::Queued, "started", |t| {
                new_attempt(t, &pin)
            })
            .await?;
        self.dispatch_workspace(&task.workspace_id).await?;
        Ok(self.store.get_task(&task.id).await?.unwrap_or(task))
    }

    /// A daemon a task is pinned to must exist in the task's workspace.
    async fn check_pin(&self, task: &Task, pin: Option<&str>) -> Result<()> {
        let Some(daemon_id) = pin else {
            return Ok(());
        };
        match self.store.get_daemon(daemon_id).await? {
            Some(d) if d.workspace_id == task.workspace_id => Ok(()),
            _ => Err(Error::NotFound(format!("daemon {daemon_id} not found"))),
        }
    }

    /// Cancels a task not yet on a daemon. A task on a daemon gets an
    /// InterruptTask and ends cancelled when the daemon reports its end, or
    /// at once when its daemon has no session.
    pub async fn stop_task(&self, p: &Principal, id: &str) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        if !status::is_active(task.status) {
            return self
                .transition(&p.subject, task, TaskStatus::Cancelled, "stopped", |t| {
                    t.ended_at = Some(t.updated_at);
                })
                .await;
        }
        let connected = match task.daemon_id.as_deref() {
            Some(d) => self.daemon_connected(d).await?,
            None => false,
        };
        if connected {
            // The stop is recorded before the daemon hears of it: a daemon
            // quick to report the end must find it, or the task ends failed.
            let now = now_micros();
            let mut next = task.clone();
            next.stop_requested_at = Some(now);
            next.version += 1;
            next.updated_at = now;
            if self.store.save_task(&mut next, task.version, None).await? {
                self.task_changed(&next, false);
                self.send_command(&next, interrupt()).await?;
                return Ok(next);
            }
            // It changed meanwhile (ended, most likely): judge again.
            return Box::pin(self.stop_task(p, id)).await;
        }
        self.send_command(&task, interrupt()).await?;
        self.transition(
            &p.subject,
            task,
            TaskStatus::Cancelled,
            "stopped; daemon away",
            |t| {
                t.ended_at = Some(t.updated_at);
            },
        )
        .await
    }

    /// Text for a running agent's stdin, as a durable SendInput command.
    pub async fn send_message(&self, p: &Principal, id: &str, text: String) -> Result<String> {
        if text.len() > MAX_PLAN_BYTES {
            return Err(invalid("text", format!("over {MAX_PLAN_BYTES} bytes")));
        }
        let task = self.load_task(p, id).await?;
        if !status::is_active(task.status) {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; messages go to dispatched or running tasks",
                task.status
            )));
        }
        self.send_command(&task, pb::command::Kind::SendInput(pb::SendInput { text }))
            .await
    }

    /// Streams a task's output from `since_seq` on, then live, with status
    /// changes: first the task itself, then its stored messages, then what
    /// arrives. The hub is subscribed before the replay reads the store, so
    /// nothing falls between them; seqs at or below the last one sent are
    /// skipped, and a gap (a lagging watcher) is filled from the store.
    pub async fn watch_task(
        self: &Arc<Self>,
        p: &Principal,
        id: &str,
        since_seq: i64,
    ) -> Result<mpsc::Receiver<Result<TaskUpdate>>> {
        if since_seq < 0 {
            return Err(invalid("since_seq", "must not be negative"));
        }
        let mut live = self.hub.subscribe_task(id);
        let task = self.load_task(p, id).await?;
        let (tx, rx) = mpsc::channel(256);
        let mut watcher = Watcher {
            domain: self.clone(),
            task_id: task.id.clone(),
            last: since_seq,
            tx,
        };
        let closed = self.closed();
        tokio::spawn(async move {
            tokio::pin!(closed);
            if watcher
                .send(TaskUpdate::Task(Box::new(task)))
                .await
                .is_err()
                || watcher.catch_up().await.is_err()
            {
                return;
            }
            loop {
                let update = tokio::select! {
                    u = live.recv() => u,
                    _ = watcher.tx.closed() => return,
                    _ = &mut closed => {
                        let _ = watcher.tx.send(Err(shutting_down())).await;
                        return;
                    }
                };
                let sent = match update {
                    Ok(TaskUpdate::Message(m)) if m.seq <= watcher.last => Ok(()),
                    Ok(TaskUpdate::Message(m)) if m.seq == watcher.last + 1 => {
                        watcher.last = m.seq;
                        watcher.send(TaskUpdate::Message(m)).await
                    }
                    Ok(TaskUpdate::Message(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        watcher.catch_up().await
                    }
                    Ok(TaskUpdate::Task(t)) => {
                        // Output it has not seen yet (a peer replica's, say)
                        // is read from the store.
                        let behind = t.last_seq > watcher.last;
                        match watcher.send(TaskUpdate::Task(t)).await {
                            Ok(()) if behind => watcher.catch_up().await,
                            sent => sent,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Task changes of a workspace, live.
    pub fn watch_tasks(
        &self,
        p: &Principal,
        workspace: &str,
    ) -> Result<broadcast::Receiver<WorkspaceUpdate>> {
        let ws = self.resolve_workspace(p, workspace)?;
        Ok(self.hub.subscribe_workspace(&ws.id))
    }

    /// Moves `task` to `to` if the transition table allows it, applying
    /// `edit` to the new row. The write is a compare-and-swap on the version;
    /// when another writer got there first the task is reloaded and the
    /// transition judged again on the fresh state.
    async fn transition(
        &self,
        actor: &str,
        task: Task,
        to: TaskStatus,
        reason: &str,
        edit: impl Fn(&mut Task),
    ) -> Result<Task> {
        let id = task.id.clone();
        self.transition_when(actor, task, to, reason, |_| true, edit)
            .await?
            .ok_or_else(|| Error::Aborted(format!("task {id} changed meanwhile")))
    }

    /// [`Domain::transition`] that applies only while `when` holds: a
    /// concurrent change is re-read and judged again. Answers `None` when
    /// `when` no longer holds.
    async fn transition_when(
        &self,
        actor: &str,
        mut task: Task,
        to: TaskStatus,
        reason: &str,
        when: impl Fn(&Task) -> bool,
        edit: impl Fn(&mut Task),
    ) -> Result<Option<Task>> {
        for _ in 0..CAS_RETRIES {
            if !when(&task) {
                return Ok(None);
            }
            if !can_transition(task.status, to) {
                return Err(Error::FailedPrecondition(format!(
                    "task {} is {}; it cannot become {to}",
                    task.id, task.status
                )));
            }
            let mut next = task.clone();
            next.status = to;
            next.version = task.version + 1;
            next.updated_at = now_micros();
            edit(&mut next);
            let event = NewEvent {
                from: Some(task.status),
                to,
                actor: actor.to_string(),
                reason: reason.to_string(),
            };
            if self
                .store
                .save_task(&mut next, task.version, Some(&event))
                .await?
            {
                self.task_changed(&next, false);
                return Ok(Some(next));
            }
            task = self
                .store
                .get_task(&task.id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("task {} not found", task.id)))?;
        }
        Err(Error::Aborted(format!(
            "task {} is changing too often; try again",
            task.id
        )))
    }

    pub async fn list_task_events(
        &self,
        p: &Principal,
        task_id: &str,
        page_size: i64,
        page_token: &str,
    ) -> Result<(Vec<TaskEvent>, Option<String>)> {
        let task = self.load_task(p, task_id).await?;
        let after = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse::<i64>()
                .map_err(|_| invalid("page_token", "malformed"))?
        };
        let mut events = self
            .store
            .list_events(&task.id, after, page_size + 1)
            .await?;
        Ok(next_page(&mut events, page_size, |e| e.id.to_string()))
    }

    pub async fn list_task_messages(
        &self,
        p: &Principal,
        task_id: &str,
        since_seq: i64,
        limit: i64,
    ) -> Result<(Vec<TaskMessage>, i64)> {
        if since_seq < 0 {
            return Err(invalid("since_seq", "must not be negative"));
        }
        let task = self.load_task(p, task_id).await?;
        let mut messages = self.store.list_messages(&task.id, since_seq, limit).await?;
        // Only the acknowledged, gapless prefix: a message past a gap would
        // let a pager skip the gap for good.
        messages.retain(|m| m.seq <= task.last_seq);
        Ok((messages, task.last_seq))
    }

    pub async fn task_usage(&self, p: &Principal, task_id: &str) -> Result<Vec<Usage>> {
        let task = self.load_task(p, task_id).await?;
        Ok(self.store.list_usage(&task.id).await?)
    }

    // ---- daemons ------------------------------------------------------------

    pub async fn list_daemons(
        &self,
        p: &Principal,
        workspace: &str,
        page_size: i64,
        page_token: Option<String>,
    ) -> Result<(Vec<Daemon>, Option<String>)> {
        let ws = self.resolve_workspace(p, workspace)?;
        let after = page_token.unwrap_or_default();
        let mut daemons = self
            .store
            .list_daemons(&ws.id, &after, page_size + 1)
            .await?;
        Ok(next_page(&mut daemons, page_size, |d| d.id.clone()))
    }

    pub async fn get_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        match self.store.get_daemon(id).await? {
            Some(d) if p.sees(&d.workspace_id) => Ok(d),
            _ => Err(Error::NotFound(format!("daemon {id} not found"))),
        }
    }
}

fn interrupt() -> pb::command::Kind {
    pb::command::Kind::InterruptTask(pb::InterruptTask { grace_seconds: 0 })
}

/// Trims a page fetched with one extra row, answering the next page token.
fn next_page<T>(
    items: &mut Vec<T>,
    page_size: i64,
    token: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let more = items.len() as i64 > page_size;
    items.truncate(page_size as usize);
    let next = if more { items.last().map(&token) } else { None };
    (std::mem::take(items), next)
}

fn version_conflict(id: &str, expected: i64, actual: i64) -> Error {
    Error::Aborted(format!(
        "task {id} changed: expected version {expected}, actual version {actual}"
    ))
}

fn check_workspace_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(
            "name",
            format!("{name:?} must be 1-64 characters of letters, digits, -, _ and ."),
        ));
    }
    Ok(name.to_string())
}

/// The caller's user id; daemon tokens answer PERMISSION_DENIED.
pub fn require_user(p: &Principal) -> Result<&str> {
    match (p.kind, &p.user_id) {
        (TokenKind::User, Some(id)) => Ok(id),
        _ => Err(Error::PermissionDenied("this needs a user token".into())),
    }
}
