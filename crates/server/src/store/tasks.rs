//! Tasks and their events (the audit trail), the atomic claim, progress,
//! and the tasks a lost daemon leaves behind.

use std::sync::LazyLock;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::attempts::attempt_input;
use super::group::Tx;
use super::*;
use crate::model::*;

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

/// The task columns a row write sets, in `bind_task` order ($1..$29).
macro_rules! task_write_columns {
    () => {
        "id, workspace_id, parent_id, depth, name, plan, status, version, \
    runtime, repository, branch, daemon_id, pinned_daemon_id, attempt, status_reason, \
    agent_session_id, working_directory, created_by, created_at, updated_at, queued_at, \
    started_at, ended_at, last_seq, stop_requested_at, model, permission_mode, \
    completion_action, target_branch"
    };
}

const TASK_WRITE_COLUMNS: &str = task_write_columns!();

/// Every task column a read answers; progress and the count of pending
/// approvals are written on their own.
pub(super) const TASK_COLUMNS: &str = concat!(
    task_write_columns!(),
    ", progress_summary, progress_percent, pending_approvals, output_pruned_seq"
);

impl Store {
    /// One task's event, in the transaction that changes it.
    pub(super) async fn insert_event(
        &self,
        tx: &mut sqlx::Transaction<'_, Any>,
        task: &Task,
        event: &NewEvent,
    ) -> Result<()> {
        self.insert_events(tx, std::slice::from_ref(task), event)
            .await
    }

    /// The same event for each of `tasks`, in one statement per chunk.
    pub(super) async fn insert_events(
        &self,
        tx: &mut sqlx::Transaction<'_, Any>,
        tasks: &[Task],
        event: &NewEvent,
    ) -> Result<()> {
        for chunk in tasks.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO task_events (task_id, from_status, to_status, actor, reason, attempt, \
             created_at) VALUES {}",
                self.rows_of(7, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for task in chunk {
                q = q
                    .bind(&task.id)
                    .bind(event.from.map(|s| s.as_str()).unwrap_or(""))
                    .bind(event.to.as_str())
                    .bind(&event.actor)
                    .bind(&event.reason)
                    .bind(task.attempt)
                    .bind(task.updated_at);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// Binds the task's columns as $1..$29 in TASK_WRITE_COLUMNS order.
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
        .bind(t.model.clone())
        .bind(t.permission_mode.clone())
        .bind(t.completion_action.as_str())
        .bind(t.target_branch.clone())
}

/// The task columns with the plan cut to its first 4097 characters: enough
/// to cut it to [`PLAN_PREVIEW_BYTES`] and tell whether anything was cut,
/// without reading whole plans.
static PREVIEW_COLUMNS: LazyLock<String> =
    LazyLock::new(|| TASK_COLUMNS.replacen(" plan,", " SUBSTR(plan, 1, 4097) AS plan,", 1));

/// A task read with [`PREVIEW_COLUMNS`], its plan cut to 4 KiB.
fn preview_from_row(r: &AnyRow) -> Result<Task> {
    let mut t = task_from_row(r)?;
    t.cut_plan();
    Ok(t)
}

pub(super) fn task_from_row(r: &AnyRow) -> Result<Task> {
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
        model: r.try_get("model")?,
        permission_mode: r.try_get("permission_mode")?,
        pending_approvals: r.try_get("pending_approvals")?,
        plan_truncated: false,
        output_pruned_seq: r.try_get("output_pruned_seq")?,
        completion_action: parse_enum(&r.try_get::<String, _>("completion_action")?)?,
        target_branch: r.try_get("target_branch")?,
    })
}

/// The transition a claim makes in one statement, beside the domain's
/// transition engine; the domain's tests check its table allows it.
pub const CLAIM: (TaskStatus, TaskStatus) = (TaskStatus::Queued, TaskStatus::Dispatched);

/// [`TASK_COLUMNS`] named as `tasks.…`, for a statement that joins another
/// table with the same column names.
static TASK_COLUMNS_OF_TASKS: LazyLock<String> = LazyLock::new(|| {
    TASK_COLUMNS
        .split(", ")
        .map(|c| format!("tasks.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
});

/// Tasks one claim takes at most.
const CLAIM_BATCH: i64 = 256;
/// Rows per multi-row INSERT (7 parameters each: far below SQLite's limit).
const ROWS_PER_INSERT: usize = 100;

/// Builds the SpawnTask written in the same transaction as a claim.
pub type SpawnMaker = Box<dyn Fn(&Task, &AttemptInput) -> NewCommand + Send + Sync>;

impl Store {
    /// Inserts a new task and its creation event in one transaction.
    pub async fn insert_task(&self, task: &Task, event: &NewEvent) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        bind_task(sqlx::query(&format!(
            "INSERT INTO tasks ({TASK_WRITE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29)"
        )), task)
        .execute(&mut *tx)
        .await?;
        self.insert_event(&mut tx, task, event).await?;
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

    /// Up to `limit` direct subtasks, oldest first, with plan previews.
    pub async fn subtasks(&self, parent_id: &str, limit: i64) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM tasks WHERE parent_id = $1 ORDER BY id LIMIT $2",
            *PREVIEW_COLUMNS
        ))
        .bind(parent_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(preview_from_row).collect()
    }

    pub async fn count_subtasks(&self, parent_id: &str) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM tasks WHERE parent_id = $1")
                .bind(parent_id)
                .fetch_one(&self.reader)
                .await?
                .try_get(0)?,
        )
    }

    /// A task and every task below it, with plan previews.
    pub async fn subtree(&self, id: &str) -> Result<Vec<Task>> {
        let mut tree = Vec::new();
        let mut parents = vec![id.to_string()];
        while let Some(parent) = parents.pop() {
            let rows = sqlx::query(&format!(
                "SELECT {} FROM tasks WHERE parent_id = $1 ORDER BY id",
                *PREVIEW_COLUMNS
            ))
            .bind(&parent)
            .fetch_all(&self.reader)
            .await?;
            for row in &rows {
                let t = preview_from_row(row)?;
                parents.push(t.id.clone());
                tree.push(t);
            }
        }
        Ok(tree)
    }

    /// Tasks of one workspace, newest first, with plan previews.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        let mut sql = format!(
            "SELECT {} FROM tasks WHERE workspace_id = $1",
            *PREVIEW_COLUMNS
        );
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
        rows.iter().map(preview_from_row).collect()
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
        let data = (task.clone(), prev_version, event.cloned());
        let saved = self
            .grouped(data, |s, tx, (task, prev, event)| {
                Box::pin(s.save_task_in(tx, task, *prev, event.as_ref()))
            })
            .await?;
        let Some(theirs) = saved else {
            return Ok(false);
        };
        // Columns other writers own (output, progress) are read back, so the
        // task published after this write is current.
        (
            task.last_seq,
            task.progress_summary,
            task.progress_percent,
            task.pending_approvals,
        ) = theirs;
        Ok(true)
    }

    /// [`Store::save_task`] in `tx`: answers the columns other writers own,
    /// or `None` when the version moved.
    async fn save_task_in(
        &self,
        tx: &mut Tx,
        task: &Task,
        prev_version: i64,
        event: Option<&NewEvent>,
    ) -> Result<Option<(i64, String, i64, i64)>> {
        let updated = bind_task(
            sqlx::query(
                "UPDATE tasks SET workspace_id = $2, parent_id = $3, depth = $4, name = $5, \
                 plan = $6, status = $7, version = $8, runtime = $9, repository = $10, \
                 branch = $11, daemon_id = $12, pinned_daemon_id = $13, attempt = $14, \
                 status_reason = $15, agent_session_id = $16, working_directory = $17, \
                 created_by = $18, created_at = $19, updated_at = $20, queued_at = $21, \
                 started_at = $22, ended_at = $23, stop_requested_at = $25, model = $26, \
                 permission_mode = $27, completion_action = $28, target_branch = $29 \
                 WHERE id = $1 AND version = $30 \
                 RETURNING last_seq, progress_summary, progress_percent, pending_approvals",
            ),
            task,
        )
        .bind(prev_version)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = updated else {
            return Ok(None);
        };
        let theirs = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        if let Some(event) = event {
            self.insert_event(tx, task, event).await?;
        }
        Ok(Some(theirs))
    }

    /// Records an event that is not a transition (a decision on an
    /// approval): from and to are the task's status.
    pub async fn add_event(&self, task: &Task, event: &NewEvent) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        self.insert_event(&mut tx, task, event).await?;
        tx.commit().await?;
        Ok(())
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

    /// Moves up to `limit` of the oldest queued tasks this daemon can run
    /// (as many as it has free slots, at most) to `dispatched` in one
    /// statement, with their events and, given `command`, their SpawnTask
    /// commands, all in one transaction; answers them oldest first.
    /// PostgreSQL skips rows another claim holds (`FOR UPDATE SKIP
    /// LOCKED`); SQLite has one writer, which makes the statement atomic by
    /// itself.
    pub async fn claim_tasks(
        &self,
        daemon: &Daemon,
        limit: i64,
        command: Option<SpawnMaker>,
    ) -> Result<Vec<(Task, AttemptInput)>> {
        if daemon.runtimes.is_empty() || limit < 1 {
            return Ok(Vec::new());
        }
        self.grouped(
            (daemon.clone(), limit, command),
            |s, tx, (d, limit, make)| Box::pin(s.claim_tasks_in(tx, d, *limit, make.as_ref())),
        )
        .await
    }

    /// [`Store::claim_tasks`] in `tx`.
    async fn claim_tasks_in(
        &self,
        tx: &mut Tx,
        daemon: &Daemon,
        limit: i64,
        command: Option<&SpawnMaker>,
    ) -> Result<Vec<(Task, AttemptInput)>> {
        let free = daemon.max_concurrent_tasks - self.active_count(&mut **tx, daemon).await?;
        let limit = limit.min(free).min(CLAIM_BATCH);
        if limit < 1 {
            return Ok(Vec::new());
        }
        let runtimes: Vec<String> = (0..daemon.runtimes.len())
            .map(|i| format!("${}", i + 5))
            .collect();
        let (from, to) = (CLAIM.0.as_str(), CLAIM.1.as_str());
        let oldest = format!(
            "SELECT id FROM tasks WHERE workspace_id = $3 AND status = '{from}' \
             AND runtime IN ({}) AND (pinned_daemon_id IS NULL OR pinned_daemon_id = $1) \
             ORDER BY queued_at, id LIMIT $4",
            runtimes.join(", ")
        );
        let set = format!(
            "UPDATE tasks SET status = '{to}', daemon_id = $1, version = version + 1, \
             updated_at = $2"
        );
        let sql = match self.backend {
            // The locking pick in a CTE, which runs once: PostgreSQL may
            // run a `WHERE id IN (subquery … LIMIT)` more than once and so
            // take more rows than the limit.
            Backend::Postgres => format!(
                "WITH picked AS ({oldest} FOR UPDATE SKIP LOCKED) {set} FROM picked \
                 WHERE tasks.id = picked.id AND tasks.status = '{from}' RETURNING {}",
                *TASK_COLUMNS_OF_TASKS
            ),
            Backend::Sqlite => format!(
                "{set} WHERE status = '{from}' AND id IN ({oldest}) RETURNING {TASK_COLUMNS}"
            ),
        };
        let now = now_micros();
        let mut q = sqlx::query(&sql)
            .bind(&daemon.id)
            .bind(now)
            .bind(&daemon.workspace_id)
            .bind(limit);
        for r in &daemon.runtimes {
            q = q.bind(r.name.clone());
        }
        let rows = q.fetch_all(&mut **tx).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?;
        // RETURNING keeps no order: the oldest goes first.
        tasks.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        let event = NewEvent {
            from: Some(CLAIM.0),
            to: CLAIM.1,
            actor: format!("daemon:{}", daemon.id),
            reason: "dispatched".into(),
        };
        self.insert_events(tx, &tasks, &event).await?;
        let mut claimed = Vec::with_capacity(tasks.len());
        for task in tasks {
            // First attempts never have inputs: spare them the read.
            let input = if task.attempt > 1 {
                attempt_input(tx, &task.id, task.attempt).await?
            } else {
                AttemptInput::default()
            };
            claimed.push((task, input));
        }
        if let Some(make) = command {
            let commands: Vec<NewCommand> = claimed.iter().map(|(t, i)| make(t, i)).collect();
            self.insert_commands(tx, &commands).await?;
        }
        Ok(claimed)
    }

    /// Whether the workspace has a queued task (read by the queue's index).
    pub async fn has_queued(&self, workspace_id: &str) -> Result<bool> {
        let row = sqlx::query(&format!(
            "SELECT 1 FROM tasks WHERE workspace_id = $1 AND status = '{}' LIMIT 1",
            CLAIM.0.as_str()
        ))
        .bind(workspace_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.is_some())
    }

    /// Records an active task's progress; answers the task, or `None` when
    /// it is no longer active. The version stays: progress is not an edit.
    pub async fn set_progress(
        &self,
        task_id: &str,
        summary: &str,
        percent: i64,
    ) -> Result<Option<Task>> {
        let row = sqlx::query(&format!(
            "UPDATE tasks SET progress_summary = $2, progress_percent = $3 \
             WHERE id = $1 AND status IN {active} RETURNING {TASK_COLUMNS}",
            active = *ACTIVE
        ))
        .bind(task_id)
        .bind(summary)
        .bind(percent)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    /// Tasks a daemon holds (dispatched or running).
    pub async fn active_tasks_of(&self, daemon_id: &str) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE daemon_id = $1 \
             AND status IN {active} ORDER BY id",
            active = *ACTIVE
        ))
        .bind(daemon_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Dispatched or running tasks whose daemon is not online and was last
    /// seen before `cutoff`.
    pub async fn orphaned_tasks(&self, cutoff: Micros) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN {active} \
             AND daemon_id IN (SELECT id FROM daemons WHERE state <> 'online' \
             AND last_seen_at < $1) ORDER BY id",
            active = *ACTIVE
        ))
        .bind(cutoff)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Tasks dispatched before `cutoff` whose daemon has not acknowledged a
    /// command for them: the SpawnTask never arrived or was never taken.
    pub async fn stale_dispatches(&self, cutoff: Micros) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'dispatched' \
             AND updated_at < $1 AND EXISTS (SELECT 1 FROM commands c \
             WHERE c.task_id = tasks.id AND c.daemon_id = tasks.daemon_id \
             AND c.acked_at IS NULL) ORDER BY id"
        ))
        .bind(cutoff)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }
}
