//! What retention reads and removes: ended tasks older than a cutoff,
//! their output a few hundred rows per statement, and whole tasks.

use sqlx::Row;

use super::tasks::{TASK_COLUMNS, task_from_row};
use super::*;
use crate::model::*;

impl Store {
    /// Up to `limit` tasks that ended before `cutoff` and still keep
    /// output, oldest first: (id, the last seq of their output).
    pub async fn outputs_to_prune(&self, cutoff: Micros, limit: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(&format!(
            "SELECT id, last_seq FROM tasks WHERE ended_at IS NOT NULL AND \
             last_seq > output_pruned_seq AND ended_at < $1 AND status IN {} \
             ORDER BY ended_at LIMIT $2",
            *FINISHED
        ))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("last_seq")?)))
            .collect()
    }

    /// Records that the task's output up to `through_seq` is removed (before
    /// it is: readers skip it from now on).
    pub async fn mark_output_pruned(&self, task_id: &str, through_seq: i64) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET output_pruned_seq = $2 WHERE id = $1 AND output_pruned_seq < $2",
        )
        .bind(task_id)
        .bind(through_seq)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deletes the task's first `limit` messages with a seq up to
    /// `through_seq`; answers how many went.
    pub async fn delete_messages(
        &self,
        task_id: &str,
        through_seq: i64,
        limit: i64,
    ) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM task_messages WHERE task_id = $1 AND seq IN \
             (SELECT seq FROM task_messages WHERE task_id = $1 AND seq <= $2 ORDER BY seq LIMIT $3)",
        )
        .bind(task_id)
        .bind(through_seq)
        .bind(limit)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// Up to `limit` tasks that ended before `cutoff` and have no subtask
    /// left, oldest first.
    pub async fn tasks_to_delete(&self, cutoff: Micros, limit: i64) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks t WHERE ended_at IS NOT NULL AND ended_at < $1 \
             AND status IN {} AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_id = t.id) \
             ORDER BY ended_at LIMIT $2",
            *FINISHED
        ))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Deletes the task (its events, usage and the rest go with it) if it
    /// still ended before `cutoff` and has no subtask.
    pub async fn delete_ended_task(&self, task_id: &str, cutoff: Micros) -> Result<bool> {
        let n = sqlx::query(&format!(
            "DELETE FROM tasks WHERE id = $1 AND ended_at IS NOT NULL AND ended_at < $2 \
             AND status IN {} AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_id = $1)",
            *FINISHED
        ))
        .bind(task_id)
        .bind(cutoff)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}
