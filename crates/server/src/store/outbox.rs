//! The durable command outbox: a command stays until its daemon
//! acknowledges it.

use sqlx::Row;

use super::*;
use crate::model::*;

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

impl Store {
    pub async fn insert_command(&self, command: &NewCommand) -> Result<()> {
        self.grouped(command.clone(), |s, tx, command| {
            Box::pin(s.insert_commands(tx, std::slice::from_ref(command)))
        })
        .await
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
        let data = [daemon_id, command_id, status, message].map(str::to_owned);
        self.grouped(data, |_, tx, [daemon_id, command_id, status, message]| {
            Box::pin(async move {
                let row = sqlx::query(
                    "UPDATE commands SET acked_at = $3, result_status = $4, result_message = $5 \
                     WHERE id = $1 AND daemon_id = $2 AND acked_at IS NULL \
                     RETURNING task_id, payload",
                )
                .bind(command_id)
                .bind(daemon_id)
                .bind(now_micros())
                .bind(status)
                .bind(message)
                .fetch_optional(&mut **tx)
                .await?;
                row.map(|r| {
                    Ok(AckedCommand {
                        task_id: r.try_get(0)?,
                        payload: r.try_get(1)?,
                    })
                })
                .transpose()
            })
        })
        .await
    }

    /// A command's result once its daemon answered: status and message.
    pub async fn command_result(&self, command_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT result_status, result_message FROM commands \
             WHERE id = $1 AND acked_at IS NOT NULL",
        )
        .bind(command_id)
        .fetch_optional(&self.writer)
        .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
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

impl Store {
    /// Several commands in one statement per chunk.
    pub(super) async fn insert_commands(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        commands: &[NewCommand],
    ) -> Result<()> {
        let now = now_micros();
        for chunk in commands.chunks(100) {
            let sql = format!(
                "INSERT INTO commands (id, daemon_id, task_id, payload, created_at) VALUES {}",
                self.rows_of(5, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for c in chunk {
                q = q
                    .bind(&c.id)
                    .bind(&c.daemon_id)
                    .bind(&c.task_id)
                    .bind(c.payload.clone())
                    .bind(now);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}
