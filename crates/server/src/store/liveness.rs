//! Queries behind the liveness sweep: daemons' last signs of life, and the
//! tasks a lost daemon leaves behind.

use sqlx::Row;

use super::{Result, Store, TASK_COLUMNS, task_from_row};
use crate::model::*;

/// Ids per `IN (…)` list, well below every backend's parameter limit.
pub(super) const ID_CHUNK: usize = 500;

/// `$2, $3, …` for `n` ids after `first - 1` other parameters.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Records that these daemons are alive as of `now`: one statement per
    /// chunk, once per heartbeat interval, however often they beat.
    pub async fn touch_daemons(&self, ids: &[String], now: Micros) -> Result<()> {
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE daemons SET last_seen_at = $1, state = 'online' \
                 WHERE state <> 'gone' AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Marks offline the online daemons not seen since `cutoff` (whichever
    /// replica held them); answers their ids. `last_seen_at` is kept: the
    /// grace before their tasks are interrupted counts from it.
    pub async fn expire_daemons(&self, cutoff: Micros, also: &[String]) -> Result<Vec<String>> {
        let mut expired: Vec<String> = sqlx::query(
            "UPDATE daemons SET state = 'offline' \
             WHERE state = 'online' AND last_seen_at < $1 RETURNING id",
        )
        .bind(cutoff)
        .fetch_all(&self.writer)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<std::result::Result<_, _>>()?;
        for chunk in also.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE daemons SET state = 'offline' \
                 WHERE state = 'online' AND id IN ({}) RETURNING id",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.writer).await? {
                expired.push(r.try_get(0)?);
            }
        }
        Ok(expired)
    }

    /// Dispatched or running tasks whose daemon is not online and was last
    /// seen before `cutoff`.
    pub async fn orphaned_tasks(&self, cutoff: Micros) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN ('dispatched', 'running') \
             AND daemon_id IN (SELECT id FROM daemons WHERE state <> 'online' \
             AND last_seen_at < $1) ORDER BY id"
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

    /// Takes a task's unacknowledged commands for `daemon_id` out of the
    /// outbox, recording why.
    pub async fn drop_commands(&self, task_id: &str, daemon_id: &str, why: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE commands SET acked_at = $3, result_status = 'DROPPED', result_message = $4 \
             WHERE task_id = $1 AND daemon_id = $2 AND acked_at IS NULL",
        )
        .bind(task_id)
        .bind(daemon_id)
        .bind(now_micros())
        .bind(why)
        .execute(&self.writer)
        .await?
        .rows_affected())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_after_the_leading_parameters() {
        assert_eq!(super::placeholders(2, 3), "$2, $3, $4");
        assert_eq!(super::placeholders(1, 1), "$1");
    }
}
