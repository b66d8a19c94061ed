//! Commands to daemons: durable in the outbox until acknowledged, and
//! what a daemon's answer to one means for its task.

use prost::Message;

use super::redact::redact;
use super::validate::{identifier, text};
use super::{Domain, Error, Result};
use crate::model::*;
use crate::pb;
use crate::store::{NewCommand, PendingCommand};

impl Domain {
    /// Queues a command for the daemon holding `task` and wakes its session.
    /// Answers the command id.
    pub async fn send_command(&self, task: &Task, kind: pb::command::Kind) -> Result<String> {
        let daemon_id = task.daemon_id.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!("task {} is not on a daemon", task.id))
        })?;
        self.queue_command(&daemon_id, &task.id, kind).await
    }

    /// Queues a command for `daemon_id` (about `task_id`, or none) and wakes
    /// its session. Answers the command id.
    pub(super) async fn queue_command(
        &self,
        daemon_id: &str,
        task_id: &str,
        kind: pb::command::Kind,
    ) -> Result<String> {
        let id = uuid::Uuid::now_v7().to_string();
        let command = pb::Command {
            id: id.clone(),
            task_id: task_id.to_owned(),
            kind: Some(kind),
        };
        self.store
            .insert_command(&NewCommand {
                id: id.clone(),
                daemon_id: daemon_id.to_owned(),
                task_id: task_id.to_owned(),
                payload: command.encode_to_vec(),
            })
            .await?;
        self.wake_daemon(daemon_id);
        Ok(id)
    }

    /// A CommandResult: the command leaves the outbox. A SpawnTask the
    /// daemon could not run fails its task with the daemon's reason; one it
    /// rejected for now (shutting down, full) is queued again for another
    /// daemon, and this session gets no more pushed work.
    pub async fn command_result(&self, daemon_id: &str, result: &pb::CommandResult) -> Result<()> {
        let status = pb::CommandResultStatus::try_from(result.status)
            .unwrap_or(pb::CommandResultStatus::Unspecified);
        let command_id = identifier("command_id", &result.command_id, 64)?;
        let message = text("message", &result.message, super::reports::MAX_REASON_BYTES)?;
        let message = redact(&message).into_owned();
        let Some(acked) = self
            .store
            .ack_command(daemon_id, &command_id, status.as_str_name(), &message)
            .await?
        else {
            return Ok(());
        };
        let refused = !matches!(status, pb::CommandResultStatus::Ok);
        let kind = pb::Command::decode(acked.payload.as_slice()).map(|c| c.kind);
        if let Ok(Some(pb::command::Kind::RetryCompletionAction(_))) = kind {
            return self
                .completion_retried(daemon_id, &acked.task_id, !refused, &message)
                .await;
        }
        let is_spawn = matches!(kind, Ok(Some(pb::command::Kind::SpawnTask(_))));
        if is_spawn {
            crate::metrics::METRICS.spawn_answered(&acked.task_id, !refused);
        }
        if !(refused && is_spawn) {
            return Ok(());
        }
        let Some(task) = self.store.get_task(&acked.task_id).await? else {
            return Ok(());
        };
        if status == pb::CommandResultStatus::Rejected {
            self.sessions.drain(daemon_id);
            if task.status == TaskStatus::Dispatched
                && task.daemon_id.as_deref() == Some(daemon_id)
                && let Some(t) = self.requeue(task, "its daemon rejected it for now").await?
            {
                self.dispatch_workspace(&t.workspace_id).await?;
            }
            return Ok(());
        }
        let reason = format!("daemon {daemon_id} could not start it: {}", message);
        let on_it = |t: &Task| {
            t.status == TaskStatus::Dispatched && t.daemon_id.as_deref() == Some(daemon_id)
        };
        self.transition_when(
            &format!("daemon:{daemon_id}"),
            task,
            TaskStatus::Failed,
            "spawn refused",
            on_it,
            |t| {
                t.status_reason = reason.chars().take(4096).collect();
                t.ended_at = Some(t.updated_at);
            },
        )
        .await?;
        self.dispatch_to(daemon_id).await?;
        Ok(())
    }

    /// Unacknowledged commands of a daemon after `after_seq`, oldest first:
    /// what its session pump sends.
    pub async fn pending_commands(
        &self,
        daemon_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<PendingCommand>> {
        Ok(self
            .store
            .pending_commands(daemon_id, after_seq, limit)
            .await?)
    }
}
