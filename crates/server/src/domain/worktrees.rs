//! A task's directory on its daemon: copied elsewhere on that machine
//! (CloneWorktree), a path looked up there (CheckTargetExists), removed when
//! the task is deleted. The first two wait for the daemon's answer.

use std::time::Duration;

use super::validate::MAX_PATH_BYTES;
use super::{Domain, Error, Result, invalid};
use crate::model::*;
use crate::pb;

/// How long a call waits for a daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// An absolute path for the daemon's machine.
fn check_path(field: &'static str, path: &str) -> Result<String> {
    let path = path.trim();
    if !path.starts_with('/') {
        return Err(invalid(
            field,
            "must be an absolute path on the daemon's machine",
        ));
    }
    if path.len() > MAX_PATH_BYTES || path.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be at most {MAX_PATH_BYTES} bytes without control characters"),
        ));
    }
    Ok(path.to_owned())
}

impl Domain {
    /// CloneWorktree: the daemon that ran the task copies its directory to
    /// `path`. Answers the daemon's account of it.
    pub async fn clone_worktree(&self, p: &Principal, id: &str, path: &str) -> Result<String> {
        let path = check_path("path", path)?;
        let task = self.load_task(p, id).await?;
        if !task.status.is_finished() {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; its directory is copied once it has finished",
                task.status
            )));
        }
        let daemon_id = task
            .daemon_id
            .clone()
            .ok_or_else(|| Error::FailedPrecondition(format!("task {id} never ran on a daemon")))?;
        let kind = pb::command::Kind::CloneWorktree(pb::CloneWorktree {
            path,
            ..Default::default()
        });
        self.ask_daemon(&daemon_id, &task.id, kind).await
    }

    /// CheckTargetExists: whether `path` exists on the daemon's machine,
    /// and whether it is a directory.
    pub async fn check_target_exists(
        &self,
        p: &Principal,
        daemon_id: &str,
        path: &str,
    ) -> Result<(bool, bool)> {
        let path = check_path("path", path)?;
        let daemon = self.get_daemon(p, daemon_id).await?;
        let kind = pb::command::Kind::CheckTargetExists(pb::CheckTargetExists { path });
        let answer = self.ask_daemon(&daemon.id, "", kind).await?;
        Ok(match answer.as_str() {
            "directory" => (true, true),
            "file" => (true, false),
            _ => (false, false),
        })
    }

    /// Sends a command and waits for the daemon's answer (its result's
    /// message); a refusal is FAILED_PRECONDITION with the daemon's reason.
    async fn ask_daemon(
        &self,
        daemon_id: &str,
        task_id: &str,
        kind: pb::command::Kind,
    ) -> Result<String> {
        if !self.daemon_online(daemon_id).await? {
            return Err(Error::Unavailable(format!(
                "daemon {daemon_id} is offline; start it again and retry"
            )));
        }
        let command_id = self.queue_command(daemon_id, task_id, kind).await?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let mut wait = Duration::from_millis(5);
        loop {
            if let Some((status, message)) = self.store.command_result(&command_id).await? {
                return match status.as_str() {
                    "COMMAND_RESULT_STATUS_OK" => Ok(message),
                    "COMMAND_RESULT_STATUS_UNSUPPORTED" => Err(Error::FailedPrecondition(format!(
                        "daemon {daemon_id} cannot do this: {message}"
                    ))),
                    _ => Err(Error::FailedPrecondition(format!(
                        "daemon {daemon_id}: {message}"
                    ))),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "daemon {daemon_id} did not answer within {} s; the command stays queued for it",
                    ANSWER_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Asks the daemons that ran `tasks` to remove their directories (the
    /// tasks were deleted); a daemon offline now does it when it returns.
    pub(super) async fn remove_worktrees(&self, tasks: &[Task]) {
        for t in tasks {
            let Some(daemon_id) = &t.daemon_id else {
                continue;
            };
            let kind = pb::command::Kind::RemoveWorktree(pb::RemoveWorktree {});
            if let Err(e) = self.queue_command(daemon_id, &t.id, kind).await {
                tracing::warn!(task_id = %t.id, error = %e, "asking to remove a worktree failed");
            }
        }
    }
}
