//! `Store` owns the database pools; every query in taskmesh is here.
//!
//! The SQL is written once for both backends through sqlx's `Any` driver
//! (`$n` placeholders work on SQLite and PostgreSQL alike). What differs,
//! connecting, pragmas, migrations and locking, is in `sqlite.rs` and
//! `postgres.rs`, selected by [`Backend`].

mod liveness;
mod postgres;
mod sessions;
mod sqlite;

pub use sessions::{AckedCommand, DaemonInfo, NewCommand, NewMessage, PendingCommand};

use sqlx::AnyPool;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` select PostgreSQL; `sqlite:` or a
    /// plain file path select SQLite; any other scheme is refused.
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") || !url.contains("://") {
            Ok(Backend::Sqlite)
        } else {
            Err(Error::UnsupportedUrl(url.to_string()))
        }
    }
}

/// A status change to record beside a task write.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
    pub actor: String,
    pub reason: String,
}

/// ListTasks filters; `before_id` is the page token (ids are UUIDv7, so id
/// order is creation order).
#[derive(Debug, Default)]
pub struct TaskFilter {
    pub workspace_id: String,
    pub statuses: Vec<TaskStatus>,
    pub parent_id: Option<String>,
    pub daemon_id: Option<String>,
    pub before_id: Option<String>,
    pub limit: i64,
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn backend_from_url() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("data/x.db").unwrap(), Backend::Sqlite);
        assert!(Backend::from_url("mysql://h/db").is_err());
    }
}

#[derive(Clone)]
pub struct Store {
    writer: AnyPool,
    reader: AnyPool,
    backend: Backend,
    url: String,
}

/// A bound value for queries whose shape is built at run time.
enum Arg {
    Text(String),
    Int(i64),
}

/// The task columns a row write sets, in `bind_task` order.
macro_rules! task_write_columns {
    () => {
        "id, workspace_id, parent_id, depth, name, plan, status, version, \
    runtime, repository, branch, daemon_id, pinned_daemon_id, attempt, status_reason, \
    agent_session_id, working_directory, created_by, created_at, updated_at, queued_at, \
    started_at, ended_at, last_seq, stop_requested_at"
    };
}
const TASK_WRITE_COLUMNS: &str = task_write_columns!();
/// Every task column a read answers; progress is written on its own.
const TASK_COLUMNS: &str = concat!(
    task_write_columns!(),
    ", progress_summary, progress_percent"
);

const TOKEN_SELECT: &str = "SELECT t.id, t.kind, t.name, t.workspace_id, t.user_id, u.name AS user_name, \
    t.created_at, t.revoked_at FROM tokens t LEFT JOIN users u ON u.id = t.user_id";

const DAEMON_SELECT: &str = "SELECT d.id, d.workspace_id, d.machine_id, d.hostname, d.version, \
    d.runtimes, d.max_concurrent_tasks, d.state, d.created_at, d.last_seen_at, \
    (SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = d.id \
       AND t.status IN ('dispatched', 'running')) AS active_tasks FROM daemons d";

impl Store {
    /// Connects and applies the migrations of the URL's backend.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        // One plain connection first: a wrong URL fails now with the
        // driver's reason, instead of after the pool's retries time out.
        let probe_url = match backend {
            Backend::Sqlite => sqlite::normalize_url(url),
            Backend::Postgres => url.to_string(),
        };
        sqlx::Connection::close(
            <sqlx::AnyConnection as sqlx::Connection>::connect(&probe_url).await?,
        )
        .await?;
        let (writer, reader) = match backend {
            Backend::Sqlite => sqlite::connect(url).await?,
            Backend::Postgres => {
                let pool = postgres::connect(url, 16).await?;
                (pool.clone(), pool)
            }
        };
        let store = Store {
            writer,
            reader,
            backend,
            url: url.to_string(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("migrations/postgres"),
        };
        migrator.run(&self.writer).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL it was opened with (the cluster listener opens its own
    /// connection to it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// PostgreSQL NOTIFY on `channel`.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    // ---- workspaces, users, tokens -------------------------------------

    /// Creates the workspace if missing; answers it and whether it was new.
    pub async fn ensure_workspace(&self, name: &str) -> Result<(Workspace, bool)> {
        let id = uuid::Uuid::now_v7().to_string();
        let inserted = sqlx::query(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(now_micros())
        .execute(&self.writer)
        .await?
        .rows_affected()
            == 1;
        let ws = self
            .workspace_by_name(name)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("workspace {name} vanished")))?;
        Ok((ws, inserted))
    }

    pub async fn workspace_by_name(&self, name: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    /// Creates the user if missing and answers its id.
    pub async fn ensure_user(&self, name: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(name)
        .bind(now_micros())
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("id")?)
    }

    pub async fn add_member(&self, workspace_id: &str, user_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO memberships (workspace_id, user_id) VALUES ($1, $2) \
             ON CONFLICT (workspace_id, user_id) DO NOTHING",
        )
        .bind(workspace_id)
        .bind(user_id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn user_workspaces(&self, user_id: &str) -> Result<Vec<Workspace>> {
        let rows = sqlx::query(
            "SELECT w.id, w.name, w.created_at FROM workspaces w \
             JOIN memberships m ON m.workspace_id = w.id WHERE m.user_id = $1 ORDER BY w.name",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(workspace_from_row).collect()
    }

    pub async fn workspace_by_id(&self, id: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    pub async fn insert_token(&self, token: &Token, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, kind, name, secret_hash, workspace_id, user_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&token.id)
        .bind(token.kind.as_str())
        .bind(&token.name)
        .bind(secret_hash)
        .bind(&token.workspace_id)
        .bind(token.user_id.clone())
        .bind(token.created_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<Token>> {
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.secret_hash = $1"))
            .bind(secret_hash)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn token_by_id(&self, id: &str) -> Result<Option<Token>> {
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self, workspace_id: &str) -> Result<Vec<Token>> {
        let rows = sqlx::query(&format!(
            "{TOKEN_SELECT} WHERE t.workspace_id = $1 ORDER BY t.created_at, t.id"
        ))
        .bind(workspace_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Marks the token revoked (keeping the first revocation time).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now_micros())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn count_tokens(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("n")?)
    }

    // ---- tasks ------------------------------------------------------------

    /// Inserts a new task and its creation event in one transaction.
    pub async fn insert_task(&self, task: &Task, event: &NewEvent) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        bind_task(sqlx::query(&format!(
            "INSERT INTO tasks ({TASK_WRITE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)"
        )), task)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, task, event).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    pub async fn subtasks(&self, parent_id: &str) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE parent_id = $1 ORDER BY id"
        ))
        .bind(parent_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Tasks of one workspace, newest first.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE workspace_id = $1");
        let mut args = vec![Arg::Text(filter.workspace_id.clone())];
        let mut push = |sql: &mut String, clause: &str, arg: Arg| {
            args.push(arg);
            sql.push_str(&clause.replace("$?", &format!("${}", args.len())));
        };
        if !filter.statuses.is_empty() {
            sql.push_str(" AND status IN (");
            for (i, s) in filter.statuses.iter().enumerate() {
                let sep = if i == 0 { "$?" } else { ", $?" };
                push(&mut sql, sep, Arg::Text(s.as_str().to_string()));
            }
            sql.push(')');
        }
        if let Some(p) = &filter.parent_id {
            push(&mut sql, " AND parent_id = $?", Arg::Text(p.clone()));
        }
        if let Some(d) = &filter.daemon_id {
            push(&mut sql, " AND daemon_id = $?", Arg::Text(d.clone()));
        }
        if let Some(b) = &filter.before_id {
            push(&mut sql, " AND id < $?", Arg::Text(b.clone()));
        }
        push(
            &mut sql,
            " ORDER BY id DESC LIMIT $?",
            Arg::Int(filter.limit),
        );
        let rows = bind_args(sqlx::query(&sql), args)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Writes every mutable column of `task` (all but `last_seq`, which only
    /// output ingestion moves) if the stored version is still
    /// `prev_version`, recording `event` in the same transaction. Answers
    /// false when someone else changed the task first (or it is gone).
    pub async fn save_task(
        &self,
        task: &mut Task,
        prev_version: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let updated = bind_task(
            sqlx::query(
                "UPDATE tasks SET workspace_id = $2, parent_id = $3, depth = $4, name = $5, \
                 plan = $6, status = $7, version = $8, runtime = $9, repository = $10, \
                 branch = $11, daemon_id = $12, pinned_daemon_id = $13, attempt = $14, \
                 status_reason = $15, agent_session_id = $16, working_directory = $17, \
                 created_by = $18, created_at = $19, updated_at = $20, queued_at = $21, \
                 started_at = $22, ended_at = $23, stop_requested_at = $25 \
                 WHERE id = $1 AND version = $26 \
                 RETURNING last_seq, progress_summary, progress_percent",
            ),
            task,
        )
        .bind(prev_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = updated else {
            return Ok(false);
        };
        // Columns other writers own (output, progress) are read back, so the
        // task published after this write is current.
        task.last_seq = row.try_get(0)?;
        task.progress_summary = row.try_get(1)?;
        task.progress_percent = row.try_get(2)?;
        if let Some(event) = event {
            insert_event(&mut tx, task, event).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes a task; its subtasks, events and output go with it.
    pub async fn delete_task(&self, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM tasks WHERE id = $1")
            .bind(id)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Events after `after_id`, oldest first.
    pub async fn list_events(
        &self,
        task_id: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<TaskEvent>> {
        let rows = sqlx::query(
            "SELECT id, task_id, from_status, to_status, actor, reason, attempt, created_at \
             FROM task_events WHERE task_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(task_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let from: String = r.try_get("from_status")?;
                Ok(TaskEvent {
                    id: r.try_get("id")?,
                    task_id: r.try_get("task_id")?,
                    from: if from.is_empty() {
                        None
                    } else {
                        Some(parse_enum(&from)?)
                    },
                    to: parse_enum(&r.try_get::<String, _>("to_status")?)?,
                    actor: r.try_get("actor")?,
                    reason: r.try_get("reason")?,
                    attempt: r.try_get("attempt")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Output with seq greater than `since_seq`, in order.
    pub async fn list_messages(
        &self,
        task_id: &str,
        since_seq: i64,
        limit: i64,
    ) -> Result<Vec<TaskMessage>> {
        let rows = sqlx::query(
            "SELECT task_id, seq, kind, content, tool_name, tool_input_json, attempt, created_at \
             FROM task_messages WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(task_id)
        .bind(since_seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskMessage {
                    task_id: r.try_get("task_id")?,
                    seq: r.try_get("seq")?,
                    kind: parse_enum(&r.try_get::<String, _>("kind")?)?,
                    content: r.try_get("content")?,
                    tool_name: r.try_get("tool_name")?,
                    tool_input_json: r.try_get("tool_input_json")?,
                    attempt: r.try_get("attempt")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    pub async fn list_usage(&self, task_id: &str) -> Result<Vec<Usage>> {
        let rows = sqlx::query(
            "SELECT provider, model, input_tokens, output_tokens, cache_read_tokens, \
             cache_write_tokens FROM task_usage WHERE task_id = $1 ORDER BY provider, model",
        )
        .bind(task_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Usage {
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    input_tokens: r.try_get("input_tokens")?,
                    output_tokens: r.try_get("output_tokens")?,
                    cache_read_tokens: r.try_get("cache_read_tokens")?,
                    cache_write_tokens: r.try_get("cache_write_tokens")?,
                })
            })
            .collect()
    }

    // ---- daemons ----------------------------------------------------------

    pub async fn list_daemons(
        &self,
        workspace_id: &str,
        after_id: &str,
        limit: i64,
    ) -> Result<Vec<Daemon>> {
        let rows = sqlx::query(&format!(
            "{DAEMON_SELECT} WHERE d.workspace_id = $1 AND d.id > $2 ORDER BY d.id LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(daemon_from_row).collect()
    }

    pub async fn get_daemon(&self, id: &str) -> Result<Option<Daemon>> {
        let row = sqlx::query(&format!("{DAEMON_SELECT} WHERE d.id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(daemon_from_row).transpose()
    }
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, Any>,
    task: &Task,
    event: &NewEvent,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_events (task_id, from_status, to_status, actor, reason, attempt, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&task.id)
    .bind(event.from.map(|s| s.as_str()).unwrap_or(""))
    .bind(event.to.as_str())
    .bind(&event.actor)
    .bind(&event.reason)
    .bind(task.attempt)
    .bind(task.updated_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

fn bind_args(mut q: AnyQuery<'_>, args: Vec<Arg>) -> AnyQuery<'_> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

/// Binds the task's columns as $1..$25 in TASK_WRITE_COLUMNS order.
fn bind_task<'q>(q: AnyQuery<'q>, t: &Task) -> AnyQuery<'q> {
    q.bind(t.id.clone())
        .bind(t.workspace_id.clone())
        .bind(t.parent_id.clone())
        .bind(t.depth)
        .bind(t.name.clone())
        .bind(t.plan.clone())
        .bind(t.status.as_str())
        .bind(t.version)
        .bind(t.runtime.clone())
        .bind(t.repository.clone())
        .bind(t.branch.clone())
        .bind(t.daemon_id.clone())
        .bind(t.pinned_daemon_id.clone())
        .bind(t.attempt)
        .bind(t.status_reason.clone())
        .bind(t.agent_session_id.clone())
        .bind(t.working_directory.clone())
        .bind(t.created_by.clone())
        .bind(t.created_at)
        .bind(t.updated_at)
        .bind(t.queued_at)
        .bind(t.started_at)
        .bind(t.ended_at)
        .bind(t.last_seq)
        .bind(t.stop_requested_at)
}

fn parse_enum<E: StoredEnum>(s: &str) -> Result<E> {
    E::parse(s).ok_or_else(|| Error::Corrupt(format!("unknown value {s:?}")))
}

fn task_from_row(r: &AnyRow) -> Result<Task> {
    Ok(Task {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        parent_id: r.try_get("parent_id")?,
        depth: r.try_get("depth")?,
        name: r.try_get("name")?,
        plan: r.try_get("plan")?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        version: r.try_get("version")?,
        runtime: r.try_get("runtime")?,
        repository: r.try_get("repository")?,
        branch: r.try_get("branch")?,
        daemon_id: r.try_get("daemon_id")?,
        pinned_daemon_id: r.try_get("pinned_daemon_id")?,
        attempt: r.try_get("attempt")?,
        status_reason: r.try_get("status_reason")?,
        agent_session_id: r.try_get("agent_session_id")?,
        working_directory: r.try_get("working_directory")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        queued_at: r.try_get("queued_at")?,
        started_at: r.try_get("started_at")?,
        ended_at: r.try_get("ended_at")?,
        last_seq: r.try_get("last_seq")?,
        stop_requested_at: r.try_get("stop_requested_at")?,
        progress_summary: r.try_get("progress_summary")?,
        progress_percent: r.try_get("progress_percent")?,
    })
}

fn workspace_from_row(r: &AnyRow) -> Result<Workspace> {
    Ok(Workspace {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
    })
}

fn token_from_row(r: &AnyRow) -> Result<Token> {
    Ok(Token {
        id: r.try_get("id")?,
        kind: parse_enum(&r.try_get::<String, _>("kind")?)?,
        name: r.try_get("name")?,
        workspace_id: r.try_get("workspace_id")?,
        user_id: r.try_get("user_id")?,
        user_name: r.try_get("user_name")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn daemon_from_row(r: &AnyRow) -> Result<Daemon> {
    let runtimes: String = r.try_get("runtimes")?;
    Ok(Daemon {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        machine_id: r.try_get("machine_id")?,
        hostname: r.try_get("hostname")?,
        version: r.try_get("version")?,
        runtimes: runtimes_from_json(&runtimes)?,
        max_concurrent_tasks: r.try_get("max_concurrent_tasks")?,
        state: parse_enum(&r.try_get::<String, _>("state")?)?,
        active_tasks: r.try_get("active_tasks")?,
        created_at: r.try_get("created_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
    })
}

/// Runtimes are stored as a JSON array of `{"name", "version"}`.
pub fn runtimes_to_json(runtimes: &[Runtime]) -> String {
    serde_json::Value::Array(
        runtimes
            .iter()
            .map(|r| serde_json::json!({ "name": r.name, "version": r.version }))
            .collect(),
    )
    .to_string()
}

fn runtimes_from_json(s: &str) -> Result<Vec<Runtime>> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("runtimes: {e}")))?;
    let field = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_default().to_string();
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| Runtime {
                    name: field(r, "name"),
                    version: field(r, "version"),
                })
                .collect()
        })
        .unwrap_or_default())
}
