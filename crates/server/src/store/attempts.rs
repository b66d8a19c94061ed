//! What a new attempt starts from (a continuation's prompt, a rebuilt
//! context), written before the attempt is queued.

use sqlx::Row;

use super::*;
use crate::model::*;

impl Store {
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
}

impl Store {
    /// Gives attempt `to` what attempt `from` started from, if anything.
    pub async fn copy_attempt_input(&self, task_id: &str, from: i64, to: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO attempt_inputs (task_id, attempt, prompt, context) \
             SELECT task_id, $3, prompt, context FROM attempt_inputs WHERE task_id = $1 AND attempt = $2 \
             ON CONFLICT (task_id, attempt) DO NOTHING",
        )
        .bind(task_id)
        .bind(from)
        .bind(to)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

pub(super) async fn attempt_input(
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
