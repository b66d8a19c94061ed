//! Token usage per task and model.

use sqlx::Row;

use super::*;
use crate::model::*;

impl Store {
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
}
