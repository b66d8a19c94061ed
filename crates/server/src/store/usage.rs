//! Token usage per task, attempt and model, and the cost and turns the
//! agent reported. Each attempt's totals replace the last report of that
//! attempt; a task's usage is the sum over its attempts.

use sqlx::Row;

use super::*;
use crate::model::*;

impl Store {
    /// The task's usage summed over attempts per (provider, model), with
    /// saturating sums (computed here, not in SQL, so nothing overflows).
    pub async fn task_usage(&self, task_id: &str) -> Result<TaskUsage> {
        let rows = sqlx::query(
            "SELECT provider, model, input_tokens, output_tokens, cache_read_tokens, \
             cache_write_tokens FROM attempt_usage WHERE task_id = $1 \
             ORDER BY provider, model, attempt",
        )
        .bind(task_id)
        .fetch_all(&self.reader)
        .await?;
        let mut models: Vec<Usage> = Vec::new();
        for r in &rows {
            let u = Usage {
                provider: r.try_get("provider")?,
                model: r.try_get("model")?,
                input_tokens: r.try_get("input_tokens")?,
                output_tokens: r.try_get("output_tokens")?,
                cache_read_tokens: r.try_get("cache_read_tokens")?,
                cache_write_tokens: r.try_get("cache_write_tokens")?,
            };
            match models.last_mut() {
                Some(m) if m.provider == u.provider && m.model == u.model => m.add(&u),
                _ => models.push(u),
            }
        }
        let costs = sqlx::query("SELECT cost_usd, turns FROM attempt_costs WHERE task_id = $1")
            .bind(task_id)
            .fetch_all(&self.reader)
            .await?;
        let mut cost_usd = 0.0;
        let mut turns = 0i64;
        for r in &costs {
            cost_usd += r.try_get::<f64, _>(0)?;
            turns = turns.saturating_add(r.try_get(1)?);
        }
        Ok(TaskUsage {
            models,
            cost_usd,
            turns,
        })
    }

    /// Replaces an attempt's totals for each (provider, model) reported,
    /// and its cost and turns when given.
    pub async fn upsert_usage(
        &self,
        task_id: &str,
        attempt: i64,
        usage: &[Usage],
        cost: Option<(f64, i64)>,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for u in usage {
            sqlx::query(
                "INSERT INTO attempt_usage (task_id, attempt, provider, model, input_tokens, \
                 output_tokens, cache_read_tokens, cache_write_tokens) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (task_id, attempt, provider, model) DO UPDATE SET \
                 input_tokens = $5, output_tokens = $6, cache_read_tokens = $7, \
                 cache_write_tokens = $8",
            )
            .bind(task_id)
            .bind(attempt)
            .bind(&u.provider)
            .bind(&u.model)
            .bind(u.input_tokens)
            .bind(u.output_tokens)
            .bind(u.cache_read_tokens)
            .bind(u.cache_write_tokens)
            .execute(&mut *tx)
            .await?;
        }
        if let Some((cost_usd, turns)) = cost {
            sqlx::query(
                "INSERT INTO attempt_costs (task_id, attempt, cost_usd, turns) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (task_id, attempt) DO UPDATE SET \
                 cost_usd = $3, turns = $4",
            )
            .bind(task_id)
            .bind(attempt)
            .bind(cost_usd)
            .bind(turns)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
