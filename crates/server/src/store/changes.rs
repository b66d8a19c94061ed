//! What each attempt changed in its repository (the daemon's report, with
//! the patch), and what its completion action did.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::tasks::NewEvent;
use super::*;
use crate::model::*;

const SUMMARY_COLUMNS: &str = "attempt, branch, base_commit, head_commit, commits, \
    files_changed, insertions, deletions, files, patch_truncated, completion_state, \
    completion_detail";

impl Store {
    /// Records an attempt's changes (a resent report replaces its own).
    pub async fn put_changes(&self, task_id: &str, c: &TaskChanges, patch: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO attempt_changes (task_id, attempt, branch, base_commit, head_commit, \
             commits, files_changed, insertions, deletions, files, patch, patch_truncated, \
             completion_state, completion_detail, reported_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (task_id, attempt) DO UPDATE SET branch = excluded.branch, \
             base_commit = excluded.base_commit, head_commit = excluded.head_commit, \
             commits = excluded.commits, files_changed = excluded.files_changed, \
             insertions = excluded.insertions, deletions = excluded.deletions, \
             files = excluded.files, patch = excluded.patch, \
             patch_truncated = excluded.patch_truncated, \
             completion_state = excluded.completion_state, \
             completion_detail = excluded.completion_detail, reported_at = excluded.reported_at",
        )
        .bind(task_id)
        .bind(c.attempt)
        .bind(&c.branch)
        .bind(&c.base_commit)
        .bind(&c.head_commit)
        .bind(c.commits)
        .bind(c.files_changed)
        .bind(c.insertions)
        .bind(c.deletions)
        .bind(numstat(&c.files))
        .bind(patch)
        .bind(i64::from(c.patch_truncated))
        .bind(&c.completion_state)
        .bind(&c.completion_detail)
        .bind(now_micros())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The newest attempt's changes, without the patch.
    pub async fn latest_changes(&self, task_id: &str) -> Result<Option<TaskChanges>> {
        let row = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM attempt_changes WHERE task_id = $1 \
             ORDER BY attempt DESC LIMIT 1"
        ))
        .bind(task_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(changes_from_row).transpose()
    }

    /// The newest attempt's changes and its patch.
    pub async fn latest_diff(&self, task_id: &str) -> Result<Option<(TaskChanges, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, patch FROM attempt_changes WHERE task_id = $1 \
             ORDER BY attempt DESC LIMIT 1"
        ))
        .bind(task_id)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(r) => Ok(Some((changes_from_row(&r)?, r.try_get("patch")?))),
            None => Ok(None),
        }
    }

    /// Records what the completion action of the task's newest changed
    /// attempt did, with an event saying so.
    pub async fn set_completion(
        &self,
        task: &Task,
        state: &str,
        detail: &str,
        event: &NewEvent,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE attempt_changes SET completion_state = $2, completion_detail = $3 \
             WHERE task_id = $1 AND attempt = \
             (SELECT MAX(attempt) FROM attempt_changes WHERE task_id = $1)",
        )
        .bind(&task.id)
        .bind(state)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        self.insert_event(&mut tx, task, event).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Files as git's numstat lines.
fn numstat(files: &[FileChange]) -> String {
    let mut out = String::new();
    for f in files {
        if f.binary {
            out.push_str("-\t-\t");
        } else {
            out.push_str(&format!("{}\t{}\t", f.insertions, f.deletions));
        }
        out.push_str(&f.path.replace(['\n', '\t'], " "));
        out.push('\n');
    }
    out
}

fn parse_numstat(text: &str) -> Vec<FileChange> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let (added, deleted, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some(FileChange {
                path: path.to_owned(),
                insertions: added.parse().unwrap_or(0),
                deletions: deleted.parse().unwrap_or(0),
                binary: added == "-",
            })
        })
        .collect()
}

fn changes_from_row(r: &AnyRow) -> Result<TaskChanges> {
    Ok(TaskChanges {
        attempt: r.try_get("attempt")?,
        branch: r.try_get("branch")?,
        base_commit: r.try_get("base_commit")?,
        head_commit: r.try_get("head_commit")?,
        commits: r.try_get("commits")?,
        files_changed: r.try_get("files_changed")?,
        insertions: r.try_get("insertions")?,
        deletions: r.try_get("deletions")?,
        files: parse_numstat(&r.try_get::<String, _>("files")?),
        patch_truncated: r.try_get::<i64, _>("patch_truncated")? != 0,
        completion_state: r.try_get("completion_state")?,
        completion_detail: r.try_get("completion_detail")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numstat_round_trips() {
        let files = vec![
            FileChange {
                path: "src/a b.rs".into(),
                insertions: 12,
                deletions: 3,
                binary: false,
            },
            FileChange {
                path: "logo.png".into(),
                insertions: 0,
                deletions: 0,
                binary: true,
            },
        ];
        assert_eq!(parse_numstat(&numstat(&files)), files);
    }
}
