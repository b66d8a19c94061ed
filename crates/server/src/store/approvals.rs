//! Approvals: the permissions agents asked for and what was decided. A
//! request is opened once per (task, attempt, request id), however often
//! the daemon resends the message that carries it; a decision applies only
//! to a pending approval.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;
use crate::model::*;

const APPROVAL_COLUMNS: &str = "id, task_id, attempt, request_id, seq, tool_name, \
    tool_input_json, state, decided_by, message, updated_input_json, created_at, decided_at, \
    expires_at";

fn approval_from_row(r: &AnyRow) -> Result<Approval> {
    Ok(Approval {
        id: r.try_get("id")?,
        task_id: r.try_get("task_id")?,
        attempt: r.try_get("attempt")?,
        request_id: r.try_get("request_id")?,
        seq: r.try_get("seq")?,
        tool_name: r.try_get("tool_name")?,
        tool_input_json: r.try_get("tool_input_json")?,
        state: parse_enum(&r.try_get::<String, _>("state")?)?,
        decided_by: r.try_get("decided_by")?,
        message: r.try_get("message")?,
        updated_input_json: r.try_get("updated_input_json")?,
        created_at: r.try_get("created_at")?,
        decided_at: r.try_get("decided_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

impl Store {
    /// Opens the approval a message asks for (or finds the one opened for
    /// it before); answers it.
    pub async fn open_approval(&self, a: &Approval) -> Result<Approval> {
        sqlx::query(
            "INSERT INTO approvals (id, task_id, attempt, request_id, seq, tool_name, \
             tool_input_json, state, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (task_id, attempt, request_id) DO NOTHING",
        )
        .bind(&a.id)
        .bind(&a.task_id)
        .bind(a.attempt)
        .bind(&a.request_id)
        .bind(a.seq)
        .bind(&a.tool_name)
        .bind(&a.tool_input_json)
        .bind(a.state.as_str())
        .bind(a.created_at)
        .bind(a.expires_at)
        .execute(&self.writer)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE task_id = $1 AND attempt = $2 \
             AND request_id = $3"
        ))
        .bind(&a.task_id)
        .bind(a.attempt)
        .bind(&a.request_id)
        .fetch_one(&self.writer)
        .await?;
        approval_from_row(&row)
    }

    /// A task's approvals, pending first, then newest first.
    pub async fn list_approvals(&self, task_id: &str, limit: i64) -> Result<Vec<Approval>> {
        let rows = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE task_id = $1 \
             ORDER BY CASE WHEN state = 'pending' THEN 0 ELSE 1 END, created_at DESC, id \
             LIMIT $2"
        ))
        .bind(task_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(approval_from_row).collect()
    }

    /// Records a decision on a pending approval; `None` when it was no
    /// longer pending (decided meanwhile, or expired).
    pub async fn decide_approval(
        &self,
        id: &str,
        state: ApprovalState,
        decided_by: &str,
        message: &str,
        updated_input_json: &str,
    ) -> Result<Option<Approval>> {
        let row = sqlx::query(&format!(
            "UPDATE approvals SET state = $2, decided_by = $3, message = $4, \
             updated_input_json = $5, decided_at = $6 WHERE id = $1 AND state = 'pending' \
             RETURNING {APPROVAL_COLUMNS}"
        ))
        .bind(id)
        .bind(state.as_str())
        .bind(decided_by)
        .bind(message)
        .bind(updated_input_json)
        .bind(now_micros())
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(approval_from_row).transpose()
    }

    /// Pending approvals whose time ran out by `now`.
    pub async fn expired_approvals(&self, now: Micros) -> Result<Vec<Approval>> {
        let rows = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE state = 'pending' \
             AND expires_at <= $1 ORDER BY expires_at LIMIT 500"
        ))
        .bind(now)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(approval_from_row).collect()
    }

    /// Sets the task's count of pending approvals from the table; answers
    /// the task as it is now. Not an edit: the version stays.
    pub async fn count_pending_approvals(&self, task_id: &str) -> Result<Option<Task>> {
        let row = sqlx::query(&format!(
            "UPDATE tasks SET pending_approvals = (SELECT COUNT(*) FROM approvals \
             WHERE task_id = $1 AND state = 'pending') WHERE id = $1 RETURNING {}",
            super::tasks::TASK_COLUMNS
        ))
        .bind(task_id)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(super::tasks::task_from_row).transpose()
    }

    /// Closes a task's pending approvals (the task ended): nobody can
    /// answer them any more.
    pub async fn close_approvals(&self, task_id: &str, why: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE approvals SET state = 'expired', decided_by = 'system', message = $2, \
             decided_at = $3 WHERE task_id = $1 AND state = 'pending'",
        )
        .bind(task_id)
        .bind(why)
        .bind(now_micros())
        .execute(&self.writer)
        .await?
        .rows_affected())
    }
}
