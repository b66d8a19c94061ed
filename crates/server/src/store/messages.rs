//! Task output: stored idempotently on (task, seq), with the task's mark
//! (`last_seq`, the highest contiguous seq) moved in the same transaction.

use std::sync::Arc;

use sqlx::Row;

use super::appends::Append;
use super::*;
use crate::model::*;

/// A message as a daemon reported it, after redaction.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub seq: i64,
    pub kind: MessageKind,
    pub content: String,
    pub tool_name: String,
    pub tool_input_json: String,
    /// For an approval message: the approval it opened.
    pub approval_id: String,
}

impl NewMessage {
    /// Bytes stored, as readers page by them.
    pub fn size(&self) -> usize {
        self.content.len() + self.tool_name.len() + self.tool_input_json.len()
    }
}

/// Rows per INSERT of output: 10 parameters each stays far below SQLite's
/// parameter limit and keeps statements a manageable size.
const MESSAGE_CHUNK: usize = 500;

impl Store {
    /// Output with seq greater than `since_seq`, in order: at most `limit`
    /// messages and, past the first, at most `max_bytes` of them, so no
    /// read holds more than that in memory.
    pub async fn list_messages(
        &self,
        task_id: &str,
        since_seq: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<TaskMessage>> {
        // The sizes first (small rows), then the rows that fit.
        let sizes = sqlx::query(
            "SELECT seq, size FROM task_messages WHERE task_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(task_id)
        .bind(since_seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        let mut last = None;
        let mut total = 0usize;
        for row in &sizes {
            let size = usize::try_from(row.try_get::<i64, _>(1)?).unwrap_or(usize::MAX);
            if last.is_some() && total.saturating_add(size) > max_bytes {
                break;
            }
            total = total.saturating_add(size);
            last = Some(row.try_get::<i64, _>(0)?);
        }
        let Some(last) = last else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT task_id, seq, kind, content, tool_name, tool_input_json, attempt, created_at, \
             approval_id FROM task_messages WHERE task_id = $1 AND seq > $2 AND seq <= $3 \
             ORDER BY seq",
        )
        .bind(task_id)
        .bind(since_seq)
        .bind(last)
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
                    approval_id: r.try_get("approval_id")?,
                })
            })
            .collect()
    }

    /// Up to `limit` messages below `before_seq`, newest first, each text
    /// cut to its first `cut_chars` characters: what a rebuilt context
    /// reads, a page at a time, without loading whole messages.
    pub async fn newest_messages(
        &self,
        task_id: &str,
        before_seq: i64,
        limit: i64,
        cut_chars: i64,
    ) -> Result<Vec<TaskMessage>> {
        let rows = sqlx::query(
            "SELECT task_id, seq, kind, SUBSTR(content, 1, CAST($4 AS INTEGER)) AS content, tool_name, \
             SUBSTR(tool_input_json, 1, CAST($4 AS INTEGER)) AS tool_input_json, attempt, created_at, \
             approval_id \
             FROM task_messages WHERE task_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(task_id)
        .bind(before_seq)
        .bind(limit)
        .bind(cut_chars)
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
                    approval_id: r.try_get("approval_id")?,
                })
            })
            .collect()
    }

    /// The multi-row INSERT of output rows, (task, attempt, message) each,
    /// one statement per chunk; a repeated seq is ignored.
    pub(super) async fn insert_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rows: &[(&str, i64, &NewMessage)],
        now: Micros,
    ) -> Result<()> {
        for chunk in rows.chunks(MESSAGE_CHUNK) {
            let sql = format!(
                "INSERT INTO task_messages (task_id, seq, kind, content, tool_name, \
                 tool_input_json, attempt, created_at, size, approval_id) VALUES {} \
                 ON CONFLICT (task_id, seq) DO NOTHING",
                self.rows_of(10, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for (task_id, attempt, m) in chunk {
                q = q
                    .bind(*task_id)
                    .bind(m.seq)
                    .bind(m.kind.as_str())
                    .bind(m.content.clone())
                    .bind(m.tool_name.clone())
                    .bind(m.tool_input_json.clone())
                    .bind(*attempt)
                    .bind(now)
                    .bind(m.size() as i64)
                    .bind(m.approval_id.clone());
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// The fast path for a batch that continues a task's output exactly
    /// (seqs `old + 1 ..`, in order, nothing stored above `old`): the rows
    /// and the new mark committed together, the mark moved only if it is
    /// still `old` and the task still active on `daemon_id`. Answers false
    /// (and changes nothing) otherwise. Appends from many sessions share a
    /// transaction (see `appends`).
    pub async fn append_messages(
        &self,
        task_id: &str,
        daemon_id: &str,
        attempt: i64,
        old: i64,
        messages: Arc<[NewMessage]>,
    ) -> Result<bool> {
        if messages.is_empty() {
            return Ok(true);
        }
        let append = Append {
            task_id: task_id.to_owned(),
            daemon_id: daemon_id.to_owned(),
            attempt,
            old,
            messages,
        };
        match &self.appends {
            Some(appends) => appends.append(append).await,
            None => Ok(self.commit_group(&[append]).await?[0]),
        }
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
        let rows: Vec<_> = messages.iter().map(|m| (task_id, attempt, m)).collect();
        self.insert_rows(&mut tx, &rows, now).await?;
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
}
