//! Retention (`serve --retain-output`, `--retain-tasks`): output, or whole
//! tasks, that ended longer ago than that are removed, a few hundred rows
//! per statement so no statement holds the writer for more than a few
//! milliseconds. Pruned output leaves its task, events and usage; readers
//! are told the range is gone (`output_pruned_seq`).

use std::sync::Arc;
use std::time::Duration;

use super::{Domain, Result};
use crate::model::*;

/// How often the sweep runs.
const EVERY: Duration = Duration::from_secs(60);
/// Tasks read per query.
const TASKS_PER_READ: i64 = 100;
/// Queries per sweep at most: a huge backlog is worked off over several.
const READS_PER_SWEEP: usize = 100;
/// Rows deleted per statement.
const ROWS_PER_DELETE: i64 = 500;

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    /// Tasks whose output was pruned.
    pub outputs_pruned: u64,
    pub messages_deleted: u64,
    pub tasks_deleted: u64,
}

fn cutoff(now: Micros, keep: Duration) -> Micros {
    now.saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX))
}

impl Domain {
    /// Sweeps once a minute while the server runs, when either retention
    /// is set.
    pub fn spawn_retention(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.limits.retain_output.is_none() && self.limits.retain_tasks.is_none() {
            return None;
        }
        let domain = self.clone();
        Some(tokio::spawn(async move {
            let closed = domain.closed();
            tokio::pin!(closed);
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut closed => return,
                    _ = tick.tick() => {}
                }
                match domain.apply_retention(now_micros()).await {
                    Ok(r) if r != RetentionReport::default() => tracing::info!(
                        outputs_pruned = r.outputs_pruned,
                        messages_deleted = r.messages_deleted,
                        tasks_deleted = r.tasks_deleted,
                        "retention sweep"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                }
            }
        }))
    }

    /// One sweep, taking `now` as the time (the sweeper passes the clock's;
    /// tests pass their own).
    pub async fn apply_retention(&self, now: Micros) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        if let Some(keep) = self.limits.retain_output {
            let before = cutoff(now, keep);
            for _ in 0..READS_PER_SWEEP {
                let batch = self.store.outputs_to_prune(before, TASKS_PER_READ).await?;
                if batch.is_empty() {
                    break;
                }
                for (task_id, through) in batch {
                    // Marked first: from now on readers skip the range.
                    self.store.mark_output_pruned(&task_id, through).await?;
                    report.messages_deleted += self.delete_output(&task_id, through).await?;
                    report.outputs_pruned += 1;
                }
            }
        }
        if let Some(keep) = self.limits.retain_tasks {
            let before = cutoff(now, keep);
            for _ in 0..READS_PER_SWEEP {
                // Subtasks first: a parent goes once it has none left.
                let batch = self.store.tasks_to_delete(before, TASKS_PER_READ).await?;
                if batch.is_empty() {
                    break;
                }
                for task in batch {
                    report.messages_deleted += self.delete_output(&task.id, i64::MAX).await?;
                    if self.store.delete_ended_task(&task.id, before).await? {
                        report.tasks_deleted += 1;
                        self.task_changed(&task, true);
                    }
                }
            }
        }
        let m = &crate::metrics::METRICS;
        m.retention_messages_deleted.inc_by(report.messages_deleted);
        m.retention_tasks_deleted.inc_by(report.tasks_deleted);
        Ok(report)
    }

    /// Deletes a task's output up to `through`, a few hundred rows at a
    /// time, letting other writers in between.
    async fn delete_output(&self, task_id: &str, through: i64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let n = self
                .store
                .delete_messages(task_id, through, ROWS_PER_DELETE)
                .await?;
            deleted += n;
            if n < ROWS_PER_DELETE as u64 {
                return Ok(deleted);
            }
            tokio::task::yield_now().await;
        }
    }
}
