//! Queries behind daemon sessions: registration, the atomic claim, output
//! ingestion and the command outbox.

use sqlx::Row;

use super::liveness::{ID_CHUNK, placeholders};
use super::{Backend, Error, NewEvent, Result, Store, TASK_COLUMNS, insert_event, task_from_row};
use crate::model::*;

/// A message as a daemon reported it, after redaction.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub seq: i64,
    pub kind: MessageKind,
    pub content: String,
    pub tool_name: String,
    pub tool_input_json: String,
}

/// Builds the SpawnTask written in the same transaction as a claim.
pub type SpawnMaker<'a> = dyn Fn(&Task, &AttemptInput) -> NewCommand + Sync + 'a;

/// A command for the outbox; `payload` is the encoded `pb::Command`.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: String,
    pub daemon_id: String,
    pub task_id: String,
    pub payload: Vec<u8>,
}

/// A command its daemon has just acknowledged.
#[derive(Debug, Clone)]
pub struct AckedCommand {
    pub task_id: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct PendingCommand {
    pub seq: i64,
    pub payload: Vec<u8>,
}

/// What a daemon registers.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub workspace_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub version: String,
    pub runtimes: Vec<Runtime>,
    pub max_concurrent_tasks: i64,
}

/// Rows per INSERT of output: 8 parameters each stays far below SQLite's
/// parameter limit and keeps statements a manageable size.
const MESSAGE_CHUNK: usize = 500;

impl Store {
    /// Creates or refreshes the daemon keyed by (workspace, machine id) and
    /// merges `legacy_ids` (their tasks and pending commands) into it.
    pub async fn register_daemon(
        &self,
        info: &DaemonInfo,
        legacy_ids: &[String],
    ) -> Result<Daemon> {
        let now = now_micros();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "INSERT INTO daemons (id, workspace_id, machine_id, hostname, version, runtimes, \
             max_concurrent_tasks, state, created_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'online', $8, $8) \
             ON CONFLICT (workspace_id, machine_id) DO UPDATE SET hostname = $4, version = $5, \
             runtimes = $6, max_concurrent_tasks = $7, state = 'online', last_seen_at = $8 \
             RETURNING id",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&info.workspace_id)
        .bind(&info.machine_id)
        .bind(&info.hostname)
        .bind(&info.version)
        .bind(super::runtimes_to_json(&info.runtimes))
        .bind(info.max_concurrent_tasks)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let id: String = row.try_get("id")?;
        for legacy in legacy_ids.iter().filter(|l| **l != id) {
            let owned = sqlx::query("SELECT id FROM daemons WHERE id = $1 AND workspace_id = $2")
                .bind(legacy)
                .bind(&info.workspace_id)
                .fetch_optional(&mut *tx)
                .await?;
            if owned.is_none() {
                continue;
            }
            for sql in [
                "UPDATE tasks SET daemon_id = $1 WHERE daemon_id = $2",
                "UPDATE tasks SET pinned_daemon_id = $1 WHERE pinned_daemon_id = $2",
                "UPDATE commands SET daemon_id = $1 WHERE daemon_id = $2",
                "DELETE FROM daemons WHERE id = $2 AND $1 <> $2",
            ] {
                sqlx::query(sql)
                    .bind(&id)
                    .bind(legacy)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.get_daemon(&id)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("daemon {id} vanished")))
    }

    pub async fn set_daemon_state(&self, id: &str, state: DaemonState) -> Result<()> {
        sqlx::query("UPDATE daemons SET state = $2, last_seen_at = $3 WHERE id = $1")
            .bind(id)
            .bind(state.as_str())
            .bind(now_micros())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Atomically moves the oldest queued task this daemon can run to
    /// dispatched, if it has a free slot, recording the event and (for a
    /// pushed dispatch) the SpawnTask command in the same transaction.
    ///
    /// PostgreSQL locks the candidate row `FOR UPDATE SKIP LOCKED`, so
    /// concurrent claimers take different tasks; SQLite runs every write on
    /// one connection, which makes the statement atomic by itself.
    pub async fn claim_task(
        &self,
        daemon: &Daemon,
        command: Option<&SpawnMaker<'_>>,
    ) -> Result<Option<(Task, AttemptInput)>> {
        if daemon.runtimes.is_empty() {
            return Ok(None);
        }
        let mut tx = self.writer.begin().await?;
        if self.active_count(&mut *tx, daemon).await? >= daemon.max_concurrent_tasks {
            return Ok(None);
        }
        let runtimes: Vec<String> = (0..daemon.runtimes.len())
            .map(|i| format!("${}", i + 4))
            .collect();
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE tasks SET status = 'dispatched', daemon_id = $1, version = version + 1, \
             updated_at = $2 WHERE status = 'queued' AND id = (SELECT id FROM tasks \
             WHERE workspace_id = $3 AND status = 'queued' AND runtime IN ({}) \
             AND (pinned_daemon_id IS NULL OR pinned_daemon_id = $1) \
             ORDER BY queued_at, id LIMIT 1 {lock}) RETURNING {TASK_COLUMNS}",
            runtimes.join(", ")
        );
        let now = now_micros();
        let mut q = sqlx::query(&sql)
            .bind(&daemon.id)
            .bind(now)
            .bind(&daemon.workspace_id);
        for r in &daemon.runtimes {
            q = q.bind(r.name.clone());
        }
        let Some(row) = q.fetch_optional(&mut *tx).await? else {
            return Ok(None);
        };
        let task = task_from_row(&row)?;
        let event = NewEvent {
            from: Some(TaskStatus::Queued),
            to: TaskStatus::Dispatched,
            actor: format!("daemon:{}", daemon.id),
            reason: "dispatched".into(),
        };
        insert_event(&mut tx, &task, &event).await?;
        // First attempts never have inputs: spare them the read.
        let input = if task.attempt > 1 {
            attempt_input(&mut tx, &task.id, task.attempt).await?
        } else {
            AttemptInput::default()
        };
        if let Some(make) = command {
            insert_command(&mut tx, &make(&task, &input)).await?;
        }
        tx.commit().await?;
        Ok(Some((task, input)))
    }

    /// Records what an attempt starts from, before it is queued.
    pub async fn put_attempt_input(
        &self,
        task_id: &str,
        attempt: i64,
        input: &AttemptInput,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO attempt_inputs (task_id, attempt, prompt, context) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (task_id, attempt) DO UPDATE SET prompt = excluded.prompt, context = excluded.context",
        )
        .bind(task_id)
        .bind(attempt)
        .bind(&input.prompt)
        .bind(&input.context)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The newest `limit` messages of a task, oldest first.
    pub async fn last_messages(&self, task_id: &str, limit: i64) -> Result<Vec<TaskMessage>> {
        let newest = sqlx::query(
            "SELECT seq FROM task_messages WHERE task_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2",
        )
        .bind(task_id)
        .bind(limit)
        .fetch_optional(&self.reader)
        .await?;
        let since = match newest {
            Some(row) => row.try_get::<i64, _>(0)?,
            None => 0,
        };
        self.list_messages(task_id, since, limit).await
    }

    /// The `n`th parameter of a statement whose parameters are bound in
    /// order. SQLite resolves a named parameter (`$n`) with a linear scan of
    /// the statement's names, which makes binding quadratic in the number of
    /// parameters: a 100-row batch spent most of its time there. Anonymous
    /// `?` are bound in order without a lookup.
    fn placeholder(&self, n: usize) -> String {
        match self.backend {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${n}"),
        }
    }

    /// The daemons among `daemons` with a free slot, and how many, in one
    /// read (a chunk of ids per statement). Dispatch claims only for them,
    /// so a full daemon never waits for the (SQLite: single) writer; the
    /// count inside the claim's transaction still decides.
    pub async fn with_free_slots(&self, daemons: Vec<Daemon>) -> Result<Vec<(Daemon, i64)>> {
        let mut active = std::collections::HashMap::new();
        for chunk in daemons.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT daemon_id, COUNT(*) AS n FROM tasks WHERE status IN ('dispatched', 'running') \
                 AND daemon_id IN ({}) GROUP BY daemon_id",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q.bind(&d.id);
            }
            for row in q.fetch_all(&self.reader).await? {
                active.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        Ok(daemons
            .into_iter()
            .filter_map(|d| {
                let free = d.max_concurrent_tasks - active.get(&d.id).copied().unwrap_or(0);
                (free > 0).then_some((d, free))
            })
            .collect())
    }

    async fn active_count<'e>(
        &self,
        db: impl sqlx::Executor<'e, Database = sqlx::Any>,
        daemon: &Daemon,
    ) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM tasks WHERE daemon_id = $1 \
             AND status IN ('dispatched', 'running')",
        )
        .bind(&daemon.id)
        .fetch_one(db)
        .await?
        .try_get("n")?)
    }

    /// The multi-row INSERT of a batch, one statement per chunk; a repeated
    /// seq is ignored.
    async fn insert_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        task_id: &str,
        attempt: i64,
        messages: &[NewMessage],
        now: Micros,
    ) -> Result<()> {
        for chunk in messages.chunks(MESSAGE_CHUNK) {
            let mut n = 0;
            let values: Vec<String> = (0..chunk.len())
                .map(|_| {
                    let row: Vec<String> = (0..8)
                        .map(|_| {
                            n += 1;
                            self.placeholder(n)
                        })
                        .collect();
                    format!("({})", row.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO task_messages (task_id, seq, kind, content, tool_name, \
                 tool_input_json, attempt, created_at) VALUES {} \
                 ON CONFLICT (task_id, seq) DO NOTHING",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for m in chunk {
                q = q
                    .bind(task_id)
                    .bind(m.seq)
                    .bind(m.kind.as_str())
                    .bind(m.content.clone())
                    .bind(m.tool_name.clone())
                    .bind(m.tool_input_json.clone())
                    .bind(attempt)
                    .bind(now);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// The fast path for a batch that continues a task's output exactly
    /// (seqs `old + 1 ..`, in order, nothing stored above `old`): the rows
    /// and the new mark in one transaction of two statements, the mark
    /// moved only if it is still `old` and the task still active on
    /// `daemon_id`. Answers false (and changes nothing) otherwise.
    pub async fn append_messages(
        &self,
        task_id: &str,
        daemon_id: &str,
        attempt: i64,
        old: i64,
        messages: &[NewMessage],
    ) -> Result<bool> {
        let Some(last) = messages.last() else {
            return Ok(true);
        };
        let mut tx = self.writer.begin().await?;
        let moved = sqlx::query(
            "UPDATE tasks SET last_seq = $3 WHERE id = $1 AND last_seq = $2 AND daemon_id = $4 \
             AND attempt = $5 AND status IN ('dispatched', 'running')",
        )
        .bind(task_id)
        .bind(old)
        .bind(last.seq)
        .bind(daemon_id)
        .bind(attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !moved {
            tx.rollback().await?;
            return Ok(false);
        }
        self.insert_rows(&mut tx, task_id, attempt, messages, now_micros())
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Stores output idempotently (a repeated seq is ignored), then advances
    /// the task's `last_seq` over every contiguous stored seq. Answers the
    /// old and new `last_seq`, and whether nothing is stored above the new
    /// one (so the next batch may take [`Store::append_messages`]).
    pub async fn insert_messages(
        &self,
        task_id: &str,
        attempt: i64,
        messages: &[NewMessage],
    ) -> Result<(i64, i64, bool)> {
        let now = now_micros();
        let mut tx = self.writer.begin().await?;
        let mark = sqlx::query(
            "SELECT last_seq, (SELECT MAX(seq) FROM task_messages WHERE task_id = $1) AS max_seq \
             FROM tasks WHERE id = $1",
        )
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::Corrupt(format!("task {task_id} vanished")))?;
        let old: i64 = mark.try_get("last_seq")?;
        let stored_max: Option<i64> = mark.try_get("max_seq")?;
        self.insert_rows(&mut tx, task_id, attempt, messages, now)
            .await?;
        let mut new = old;
        if stored_max.is_none_or(|max| max <= old) {
            // Nothing was stored above the mark (the usual case), so the
            // batch alone tells how far the contiguous run goes now.
            let mut seqs: Vec<i64> = messages
                .iter()
                .map(|m| m.seq)
                .filter(|s| *s > old)
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            for seq in seqs {
                if seq != new + 1 {
                    break;
                }
                new = seq;
            }
        }
        // Otherwise walk forward from the old mark while seqs are contiguous.
        while stored_max.is_some_and(|max| max > old) {
            let rows = sqlx::query(
                "SELECT seq FROM task_messages WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT 1000",
            )
            .bind(task_id)
            .bind(new)
            .fetch_all(&mut *tx)
            .await?;
            let before = new;
            for r in &rows {
                let seq: i64 = r.try_get("seq")?;
                if seq != new + 1 {
                    break;
                }
                new = seq;
            }
            if rows.len() < 1000 || new - before < rows.len() as i64 {
                break;
            }
        }
        if new > old {
            sqlx::query("UPDATE tasks SET last_seq = $2 WHERE id = $1 AND last_seq < $2")
                .bind(task_id)
                .bind(new)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let highest = messages.iter().map(|m| m.seq).chain(stored_max).max();
        Ok((old, new, highest.is_none_or(|h| h <= new)))
    }

    /// Replaces the usage totals of each (provider, model) reported.
    pub async fn upsert_usage(&self, task_id: &str, usage: &[Usage]) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for u in usage {
            sqlx::query(
                "INSERT INTO task_usage (task_id, provider, model, input_tokens, output_tokens, \
                 cache_read_tokens, cache_write_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (task_id, provider, model) DO UPDATE SET input_tokens = $4, \
                 output_tokens = $5, cache_read_tokens = $6, cache_write_tokens = $7",
            )
            .bind(task_id)
            .bind(&u.provider)
            .bind(&u.model)
            .bind(u.input_tokens)
            .bind(u.output_tokens)
            .bind(u.cache_read_tokens)
            .bind(u.cache_write_tokens)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn insert_command(&self, command: &NewCommand) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        insert_command(&mut tx, command).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Unacknowledged commands of a daemon after `after_seq`, in order.
    /// Read on a reader: a command is read after its insert committed, and
    /// waiting behind queued writes would only delay its delivery.
    pub async fn pending_commands(
        &self,
        daemon_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<PendingCommand>> {
        let rows = sqlx::query(
            "SELECT seq, payload FROM commands WHERE daemon_id = $1 AND acked_at IS NULL \
             AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(daemon_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingCommand {
                    seq: r.try_get("seq")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    /// Records a command's result; answers false for an unknown command or
    /// one acknowledged before (a redelivery).
    pub async fn ack_command(
        &self,
        daemon_id: &str,
        command_id: &str,
        status: &str,
        message: &str,
    ) -> Result<Option<AckedCommand>> {
        let row = sqlx::query(
            "UPDATE commands SET acked_at = $3, result_status = $4, result_message = $5 \
             WHERE id = $1 AND daemon_id = $2 AND acked_at IS NULL RETURNING task_id, payload",
        )
        .bind(command_id)
        .bind(daemon_id)
        .bind(now_micros())
        .bind(status)
        .bind(message)
        .fetch_optional(&self.writer)
        .await?;
        row.map(|r| {
            Ok(AckedCommand {
                task_id: r.try_get(0)?,
                payload: r.try_get(1)?,
            })
        })
        .transpose()
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
             WHERE id = $1 AND status IN ('dispatched', 'running') RETURNING {TASK_COLUMNS}"
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
             AND status IN ('dispatched', 'running') ORDER BY id"
        ))
        .bind(daemon_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }
}

async fn attempt_input(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    task_id: &str,
    attempt: i64,
) -> Result<AttemptInput> {
    let row = sqlx::query(
        "SELECT prompt, context FROM attempt_inputs WHERE task_id = $1 AND attempt = $2",
    )
    .bind(task_id)
    .bind(attempt)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match row {
        Some(r) => AttemptInput {
            prompt: r.try_get(0)?,
            context: r.try_get(1)?,
        },
        None => AttemptInput::default(),
    })
}

async fn insert_command(tx: &mut sqlx::Transaction<'_, sqlx::Any>, c: &NewCommand) -> Result<()> {
    sqlx::query(
        "INSERT INTO commands (id, daemon_id, task_id, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&c.id)
    .bind(&c.daemon_id)
    .bind(&c.task_id)
    .bind(c.payload.clone())
    .bind(now_micros())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
