//! What the metrics read from the database when scraped.

use sqlx::Row;

use super::*;

/// Counts over the whole database (every replica's work).
#[derive(Debug, Default)]
pub struct Census {
    /// (status, runtime, tasks)
    pub tasks: Vec<(String, String, i64)>,
    /// (state, daemons)
    pub daemons: Vec<(String, i64)>,
    pub pending_commands: i64,
    /// When the oldest unacknowledged command was written.
    pub oldest_command: Option<i64>,
    pub pending_approvals: i64,
}

impl Store {
    pub async fn census(&self) -> Result<Census> {
        let tasks =
            sqlx::query("SELECT status, runtime, COUNT(*) FROM tasks GROUP BY status, runtime")
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<_>>>()?;
        let daemons = sqlx::query("SELECT state, COUNT(*) FROM daemons GROUP BY state")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>>>()?;
        let outbox =
            sqlx::query("SELECT COUNT(*), MIN(created_at) FROM commands WHERE acked_at IS NULL")
                .fetch_one(&self.reader)
                .await?;
        let approvals = sqlx::query("SELECT COUNT(*) FROM approvals WHERE state = 'pending'")
            .fetch_one(&self.reader)
            .await?;
        Ok(Census {
            tasks,
            daemons,
            pending_commands: outbox.try_get(0)?,
            oldest_command: outbox.try_get(1)?,
            pending_approvals: approvals.try_get(0)?,
        })
    }
}
